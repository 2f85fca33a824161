"""Length-prefixed frames over a local stream socket: how kine-server's processes talk.

Each frame is a 4-byte big-endian length and a `workers.Envelope`. Frames sent in one turn
of the event loop go out in one write (a commit's results and its feed are one syscall, not
one per request), and a peer that stops reading is cut off before its backlog can grow without
bound: a stopped front-end process must not make the writer process run out of memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from google.protobuf.message import DecodeError

from kine_server.auth.permissions import Caller, Identity
from kine_server.pb import workers_pb2

try:  # upb's switch for the nesting limit (see api/decoding.py)
    from google._upb._message import SetAllowOversizeProtos as _allow_deep
except ImportError:  # pragma: no cover - another protobuf backend
    _allow_deep = None

log = logging.getLogger(__name__)

#: Envelope's field numbers (workers.proto), from the generated descriptor.
ENVELOPE = {field.name: field.number for field in workers_pb2.Envelope.DESCRIPTOR.fields}

#: Larger than any request or response the server accepts (gRPC's limit is 2 GiB; frames carry
#: one request or one commit's events).
MAX_FRAME = 2**31 - 1
#: Bytes queued for a peer that does not read before it is disconnected.
MAX_BACKLOG = 512 * 1024 * 1024


def parse_envelope(frame: bytes) -> workers_pb2.Envelope:
    """A frame's Envelope. A Txn may nest as deep as --max-txn-ops allows (the front-end
    checked it on the wire, api/decoding.py), deeper than upb's default limit of 100 levels:
    such a frame, from our own process, is parsed again with the limit lifted."""
    envelope = workers_pb2.Envelope()
    try:
        envelope.ParseFromString(frame)
        return envelope
    except DecodeError as exc:
        if "MaxDepth" not in str(exc) or _allow_deep is None:
            raise
    _allow_deep(True)
    try:
        envelope.ParseFromString(frame)
    finally:
        _allow_deep(False)
    return envelope


#: Command's caller field: who made a command, as etcd's RequestHeader (see WriteSide).
CALLER_FIELD = workers_pb2.Command.DESCRIPTOR.fields_by_name["caller"].number


def encode_caller(caller: Caller) -> bytes:
    message = workers_pb2.Caller(generation=caller.generation)
    if caller.who is not None:
        message.identified, message.user, message.revision = (
            True,
            caller.who.user,
            caller.who.revision,
        )
    return bytes(message.SerializeToString())


def decode_caller(command: workers_pb2.Command) -> Caller | None:
    """The Command's caller, as the front-end sent it (None if it sent none)."""
    if not command.HasField("caller"):
        return None
    sent = command.caller
    who = Identity(sent.user, sent.revision) if sent.identified else None
    return Caller(who, sent.generation)


class FrameConnection(asyncio.Protocol):
    """One end of a connection; `on_frame` gets each frame, `on_lost` the end of it."""

    def __init__(
        self,
        on_frame: Callable[[bytes], None],
        on_lost: Callable[[Exception | None], None],
        on_open: Callable[[FrameConnection], None] | None = None,
    ) -> None:
        self._on_open = on_open
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._buffer = bytearray()
        self._pending: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        #: Looked up once (asyncio.get_running_loop() is a getpid() system call on 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        if self._on_open is not None:
            self._on_open(self)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset, end = 0, len(buffer)
        while end - offset >= 4:
            size = int.from_bytes(buffer[offset : offset + 4], "big")
            if end - offset - 4 < size:
                break
            frame = bytes(buffer[offset + 4 : offset + 4 + size])
            offset += 4 + size
            try:
                self._on_frame(frame)
            except Exception:
                # Only a bug gets here (the peer is this server's own process): end the
                # connection loudly rather than go on with a request or a revision missing.
                log.exception("cannot handle a frame from another kine-server process")
                self.close()
                return
        del buffer[:offset]

    def send(self, payload: bytes) -> None:
        if self.closed or self._loop is None:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(len(payload).to_bytes(4, "big"))
        self._pending.append(payload)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        transport = self._transport
        if self.closed or transport is None or not pending:
            return
        transport.write(b"".join(pending))
        if transport.get_write_buffer_size() > MAX_BACKLOG:
            log.error("a kine-server process stopped reading its connection: disconnecting it")
            self.close()

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self.closed = True
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_lost(exc)
