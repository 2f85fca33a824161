"""The writer process's side of `--workers`: front-ends' commands in, the commit feed out.

Front-end processes connect to a unix socket in a directory only this user can enter. Each
Command is carried out on this process's `WriteSide` by the method store/commands.py names for
its field, as the same request from a client of this process would be, and answered with a
Result. Everything the store's hub publishes (this
process's commits, and on PostgreSQL other instances' too) goes to every front-end as a Feed,
encoded once: a commit's feed is queued before the results of its requests, so a front-end's
hub has a write's events by the time its client hears that the write succeeded.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable
from typing import Any

from kine_server import errors
from kine_server.mvcc.hub import Group
from kine_server.pb import workers_pb2
from kine_server.process.frames import ENVELOPE, FrameConnection, decode_caller, parse_envelope
from kine_server.store.commands import COMMANDS, RESULT_FIELDS
from kine_server.store.local import WriteSide
from kine_server.wire import length_delimited, varint

log = logging.getLogger(__name__)

#: How long a scrape waits for a front-end's metrics (a stopped one must not hang Prometheus).
SCRAPE_TIMEOUT = 2.0


def answer(command_id: int, name: str, outcome: asyncio.Future[Any]) -> bytes:
    """The encoded Result of a command whose outcome is known: its response put in as its
    encoded bytes (no copy, and no limit on how deep a Txn's response nests: upb's copy
    re-parses, with its 100 levels), or etcd's error."""
    failure = outcome.exception()
    if failure is None:
        return (
            b"\x08"  # Result.id: field 1, varint
            + varint(command_id)
            + length_delimited(RESULT_FIELDS[name], outcome.result().SerializeToString())
        )
    if not isinstance(failure, errors.EtcdError):
        log.error("write command %s failed", name, exc_info=failure)
        failure = errors.Internal.of(failure)
    result = workers_pb2.Result(id=command_id)
    result.error.code = failure.code.value[0]
    result.error.message = failure.message
    return bytes(result.SerializeToString())


class WriterChannel:
    """Serves front-end processes on the unix socket at `path`."""

    def __init__(self, side: WriteSide, path: str, on_ready: Callable[[int], None]) -> None:
        self._side = side
        self.path = path
        #: Told the worker number of each front-end that says it serves gRPC.
        self._on_ready = on_ready
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[FrameConnection] = set()
        #: Commands carried out and not yet answered (stop waits for them).
        self._running: set[asyncio.Future[Any]] = set()
        self._unsubscribe: Callable[[], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scrapes: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._scrape_ids = itertools.count(1)

    @property
    def frontends(self) -> int:
        """Front-ends connected now."""
        return len(self._connections)

    async def scrape(self) -> list[tuple[int, bytes]]:
        """(worker, metrics) of every connected front-end that answers in time."""
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[tuple[int, bytes]]] = []
        for connection in self._connections:
            scrape_id = next(self._scrape_ids)
            future: asyncio.Future[tuple[int, bytes]] = loop.create_future()
            self._scrapes[scrape_id] = future
            waiting.append(future)
            request = workers_pb2.Scrape(id=scrape_id).SerializeToString()
            connection.send(length_delimited(ENVELOPE["scrape"], request))
        try:
            if waiting:
                await asyncio.wait(waiting, timeout=SCRAPE_TIMEOUT)
        finally:
            for scrape_id in [i for i, f in self._scrapes.items() if f in waiting]:
                self._scrapes.pop(scrape_id, None)
        return [f.result() for f in waiting if f.done() and not f.cancelled()]

    async def start(self) -> None:
        self._unsubscribe = self._side.hub.subscribe(self._published, self._skipped)
        self._side.auth.observers.append(self._auth_changed)
        loop = self._loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._connect, self.path)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        """After the front-ends have stopped: nothing is left to answer but what they sent last."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        for connection in list(self._connections):
            connection.close()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._auth_changed in self._side.auth.observers:
            self._side.auth.observers.remove(self._auth_changed)

    def _auth_changed(self, generation: int) -> None:
        feed = workers_pb2.Feed(auth_generation=generation).SerializeToString()
        self._broadcast(length_delimited(ENVELOPE["feed"], feed))

    def _connect(self) -> FrameConnection:
        connection: FrameConnection

        def on_frame(frame: bytes) -> None:
            self._received(connection, frame)

        def on_lost(exc: Exception | None) -> None:
            self._connections.discard(connection)

        connection = FrameConnection(on_frame, on_lost, self._opened)
        return connection

    def _opened(self, connection: FrameConnection) -> None:
        # Added to the feed's recipients in the same step as the hello is queued: the feed
        # continues exactly from the revision the hello names.
        self._connections.add(connection)
        hello = workers_pb2.Hello(revision=self._side.hub.revision).SerializeToString()
        connection.send(length_delimited(ENVELOPE["hello"], hello))

    def _received(self, connection: FrameConnection, frame: bytes) -> None:
        envelope = parse_envelope(frame)
        kind = envelope.WhichOneof("kind")
        if kind == "command":
            self._carry_out(connection, envelope.command)
        elif kind == "hello":
            self._on_ready(envelope.hello.worker)
        elif kind == "scraped":
            future = self._scrapes.pop(envelope.scraped.id, None)
            if future is not None and not future.done():
                future.set_result((envelope.scraped.worker, envelope.scraped.text))
        else:
            log.error("unexpected %s from a front-end process; disconnecting it", kind)
            connection.close()

    def _carry_out(self, connection: FrameConnection, command: workers_pb2.Command) -> None:
        """Carry out one front-end's command on the write side, as the same request from a
        client of this process would be, and send its Result once it has an outcome. A write
        the writer queued at once (WriteSide.put, txn, delete_range) is answered from its
        future's callback: no task per command."""
        assert self._loop is not None
        name = command.WhichOneof("op") or ""
        entry = COMMANDS.get(name)
        outcome: asyncio.Future[Any]
        try:
            if entry is None:
                raise errors.Internal(f"kine-server: unknown write command {name!r}")
            awaitable = entry.apply(self._side, getattr(command, name), decode_caller(command))
            outcome = asyncio.ensure_future(awaitable, loop=self._loop)
        except Exception as exc:
            outcome = self._loop.create_future()
            outcome.set_exception(exc)
        command_id = command.id

        def done(finished: asyncio.Future[Any]) -> None:
            self._running.discard(finished)
            if not finished.cancelled():
                result = answer(command_id, name, finished)
                connection.send(length_delimited(ENVELOPE["result"], result))

        self._running.add(outcome)
        outcome.add_done_callback(done)

    def _published(self, groups: list[Group]) -> None:
        # WireEvent.wire(True) is the event as field 11 with its prev_kv: Feed's own encoding.
        feed = b"".join(wire.wire(True) for _, wires in groups for wire in wires)
        self._broadcast(length_delimited(ENVELOPE["feed"], feed))

    def _skipped(self, through: int) -> None:
        feed = workers_pb2.Feed(skipped_through=through).SerializeToString()
        self._broadcast(length_delimited(ENVELOPE["feed"], feed))

    def _broadcast(self, frame: bytes) -> None:
        for connection in self._connections:
            connection.send(frame)
