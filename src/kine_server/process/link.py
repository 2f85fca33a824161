"""A `--workers` front-end's connection to the writer process: its commands out, the feed in.

Every command (store/commands.py) a front-end's Store submits goes to the writer process as a
workers.Command and comes back as a Result: its response under the same field name, or etcd's
error. The writer's feed keeps this process's hub, and so its watches, exactly in step with the
writer's: the same revisions, in order, none twice; it also tells of auth changes before their
answers, so the client that made one sees it checked at once.

If the writer process goes away, this process cannot serve anything correctly (its watches
would silently stop): it fails what is in flight with UNAVAILABLE and tells its owner to exit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from kine_server import errors
from kine_server.auth.permissions import Caller
from kine_server.auth.store import AuthStore
from kine_server.mvcc.hub import EventHub
from kine_server.pb import workers_pb2
from kine_server.process.frames import (
    CALLER_FIELD,
    ENVELOPE,
    FrameConnection,
    encode_caller,
    parse_envelope,
)
from kine_server.store.commands import COMMAND_FIELDS, Command, Req, Resp
from kine_server.wire import length_delimited, varint

log = logging.getLogger(__name__)


class WriterLink:
    """The `Writes` of a front-end: commands carried out by the writer process."""

    def __init__(
        self, socket_path: str, hub: EventHub, auth: AuthStore, on_lost: Callable[[], None]
    ) -> None:
        self._socket = socket_path
        self._hub = hub
        self._auth = auth
        #: Told once when the writer process is gone.
        self._on_lost = on_lost
        self._connection: FrameConnection | None = None
        self._pending: dict[int, asyncio.Future[workers_pb2.Result]] = {}
        self._ids = itertools.count(1)
        self._hello: asyncio.Future[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.worker = 0
        #: This process's metrics in Prometheus' text format, for the writer's scrapes.
        self.scrape: Callable[[], bytes] = lambda: b""

    async def start(self) -> None:
        """Connect; return once the hub continues from the revision the writer's hello names."""
        loop = self._loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        try:
            _, connection = await loop.create_unix_connection(
                lambda: FrameConnection(self._received, self._lost), self._socket
            )
        except OSError as exc:
            raise errors.Unavailable(
                f"kine-server: cannot reach the writer process: {exc}"
            ) from exc
        self._connection = connection
        await self._hello

    def ready(self, worker: int) -> None:
        """Tell the writer process that this front-end, number `worker`, serves gRPC now."""
        self.worker = worker
        hello = workers_pb2.Hello(worker=worker).SerializeToString()
        if self._connection is not None:
            self._connection.send(length_delimited(ENVELOPE["hello"], hello))

    async def stop(self, timeout: float | None = None) -> None:
        """After the gRPC server stopped: its last writes have been answered."""
        self._stopping = True
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def submit(
        self, command: Command[Req, Resp], request: Req, caller: Caller | None = None
    ) -> Resp:
        """Send `command` to the writer process; its response, or its error raised.

        Encoded by hand, the request as its own bytes: no copy, and a Txn nested as deep as
        --max-txn-ops allows passes (upb's copy re-parses, refusing past 100 levels)."""
        connection, loop = self._connection, self._loop
        if connection is None or connection.closed or loop is None:
            raise errors.Unavailable("kine-server: the writer process is gone")
        command_id = next(self._ids)
        encoded = (
            b"\x08"  # Command.id: field 1, varint
            + varint(command_id)
            + length_delimited(COMMAND_FIELDS[command.name], request.SerializeToString())
        )
        if caller is not None:
            encoded += length_delimited(CALLER_FIELD, encode_caller(caller))
        future: asyncio.Future[workers_pb2.Result] = loop.create_future()
        self._pending[command_id] = future
        connection.send(length_delimited(ENVELOPE["command"], encoded))
        try:
            result = await future
        finally:
            self._pending.pop(command_id, None)
        if result.WhichOneof("outcome") == "error":
            raise errors.Relayed(result.error.code, result.error.message)
        response: Resp = getattr(result, command.name)
        return response

    def _received(self, frame: bytes) -> None:
        envelope = parse_envelope(frame)
        kind = envelope.WhichOneof("kind")
        if kind == "result":
            future = self._pending.pop(envelope.result.id, None)
            if future is not None and not future.done():
                future.set_result(envelope.result)
        elif kind == "feed":
            feed = envelope.feed
            if feed.events and not self._hub.publish(list(feed.events)):
                # The writer's hub publishes revisions in order, one after another: a gap here
                # is a bug, and watches served from a hub with a hole would be wrong.
                log.error("the writer process's feed skipped revisions; restarting this process")
                self._lost(None)
            if feed.skipped_through:
                self._hub.skip(feed.skipped_through)
            if feed.auth_generation:
                self._auth.expect(feed.auth_generation)
        elif kind == "scrape":
            reply = workers_pb2.Scraped(
                id=envelope.scrape.id, text=self.scrape(), worker=self.worker
            )
            if self._connection is not None:
                self._connection.send(
                    length_delimited(ENVELOPE["scraped"], reply.SerializeToString())
                )
        elif kind == "hello" and self._hello is not None and not self._hello.done():
            # Here, not where start() awaits it: the feed that follows may be in the same read
            # (the writer sends what one loop turn queued in one write), and it continues from
            # this revision.
            self._hub.revision = envelope.hello.revision
            self._hello.set_result(envelope.hello.revision)

    def _lost(self, exc: Exception | None) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        failure = errors.Unavailable("kine-server: the writer process is gone")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(failure)
        self._pending.clear()
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(failure)
        if not self._stopping:
            log.error("lost the connection to the writer process; exiting")
            self._on_lost()
