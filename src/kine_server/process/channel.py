"""The writer process's side of `--workers`: front-ends' writes in, the commit feed out.

Front-end processes connect to a unix socket in a directory only this user can enter. Each
Command is carried out on this process's `Store`, as the same request from a client of this
process would be, and answered with a Result. Everything the store's hub publishes (this
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
from kine_server.auth.permissions import Identity, message_types
from kine_server.mvcc.hub import Group
from kine_server.pb import workers_pb2
from kine_server.process.frames import FrameConnection, length_delimited, parse_envelope, varint
from kine_server.store.store import Store

log = logging.getLogger(__name__)

#: Envelope's field numbers (workers.proto).
_RESULT_FIELD = 2
_FEED_FIELD = 3
_HELLO_FIELD = 4
_SCRAPE_FIELD = 5
#: How long a scrape waits for a front-end's metrics (a stopped one must not hang Prometheus).
SCRAPE_TIMEOUT = 2.0


#: Result's fields that hold etcd's response for these commands (workers.proto).
_RESPONSE_FIELDS = {"put": 2, "delete_range": 3, "txn": 4}


async def execute(store: Store, command: workers_pb2.Command) -> bytes:
    """Carry out one front-end's write on `store`; its answer, or etcd's error, as an encoded
    Result. etcd's responses are put into it as encoded bytes: no copy, and no limit on how
    deep a Txn's response nests (upb's copy re-parses, with its 100 levels)."""
    result = workers_pb2.Result(id=command.id)
    kind = command.WhichOneof("op")
    try:
        response: Any = None
        if kind == "put":
            response = await store.put(command.put)
        elif kind == "txn":
            response = await store.write_txn(command.txn)
        elif kind == "delete_range":
            response = await store.delete_range(command.delete_range)
        if response is not None:
            field = _RESPONSE_FIELDS[kind]
            return (
                b"\x08"  # field 1 (id), varint
                + varint(command.id)
                + length_delimited(field, response.SerializeToString())
            )
        if kind == "lease_keep_alive":
            ttls = await store.lease_keep_alive_many(list(command.lease_keep_alive.ids))
            result.lease_ttls.ttls.extend(ttls)
        elif kind == "lease_grant":
            lease_id, ttl = await store.lease_grant(command.lease_grant)
            result.lease_grant.ID, result.lease_grant.TTL = lease_id, ttl
        elif kind == "lease_revoke":
            await store.lease_revoke(command.lease_revoke.ID)
            result.lease_revoked = True
        elif kind == "compaction":
            request = command.compaction
            result.compacted_at = await store.compact(request.revision, request.physical)
        elif kind == "alarm":
            result.alarms.alarms.extend(await store.alarm(command.alarm))
        elif kind == "defragment":
            await store.defragment()
            result.defragmented = True
        elif kind == "auth_change":
            change = command.auth_change
            request = message_types(change.method)[0].FromString(change.request)
            who = Identity(change.user, change.revision) if change.identified else None
            answer = await store.auth_change(change.method, request, who)
            result.auth_changed = answer.SerializeToString()
        elif kind == "status":
            status = await store.write_side_status()
            reply = result.status
            reply.compaction_failures = status.compaction.consecutive_failures
            reply.compaction_last_error = status.compaction.last_error
            reply.nospace = status.nospace
            reply.expired_leases = status.expired_leases
            reply.write_batches = status.write_batches
            reply.write_requests = status.write_requests
        else:
            raise errors.Internal(f"kine-server: unknown write command {kind!r}")
    except errors.EtcdError as exc:
        result.error.code = exc.code.value[0]
        result.error.message = exc.message
    except Exception as exc:
        log.exception("write command %s failed", kind)
        failure = errors.Internal.of(exc)
        result.error.code = failure.code.value[0]
        result.error.message = failure.message
    return bytes(result.SerializeToString())


class WriterChannel:
    """Serves front-end processes on the unix socket at `path`."""

    def __init__(self, store: Store, path: str, on_ready: Callable[[int], None]) -> None:
        self._store = store
        self.path = path
        #: Told the worker number of each front-end that says it serves gRPC.
        self._on_ready = on_ready
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[FrameConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
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
            connection.send(length_delimited(_SCRAPE_FIELD, request))
        try:
            if waiting:
                await asyncio.wait(waiting, timeout=SCRAPE_TIMEOUT)
        finally:
            for scrape_id in [i for i, f in self._scrapes.items() if f in waiting]:
                self._scrapes.pop(scrape_id, None)
        return [f.result() for f in waiting if f.done() and not f.cancelled()]

    async def start(self) -> None:
        self._unsubscribe = self._store.hub.subscribe(self._published, self._skipped)
        self._store.auth.observers.append(self._auth_changed)
        loop = self._loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(self._connect, self.path)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        """After the front-ends have stopped: nothing is left to answer but what they sent last."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for connection in list(self._connections):
            connection.close()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._auth_changed in self._store.auth.observers:
            self._store.auth.observers.remove(self._auth_changed)

    def _auth_changed(self, generation: int) -> None:
        feed = workers_pb2.Feed(auth_generation=generation).SerializeToString()
        self._broadcast(length_delimited(_FEED_FIELD, feed))

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
        hello = workers_pb2.Hello(revision=self._store.hub.revision).SerializeToString()
        connection.send(length_delimited(_HELLO_FIELD, hello))

    def _received(self, connection: FrameConnection, frame: bytes) -> None:
        envelope = parse_envelope(frame)
        kind = envelope.WhichOneof("kind")
        if kind == "command":
            assert self._loop is not None
            task = self._loop.create_task(self._answer(connection, envelope.command))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind == "hello":
            self._on_ready(envelope.hello.worker)
        elif kind == "scraped":
            future = self._scrapes.pop(envelope.scraped.id, None)
            if future is not None and not future.done():
                future.set_result((envelope.scraped.worker, envelope.scraped.text))
        else:
            log.error("unexpected %s from a front-end process; disconnecting it", kind)
            connection.close()

    async def _answer(self, connection: FrameConnection, command: workers_pb2.Command) -> None:
        result = await execute(self._store, command)
        connection.send(length_delimited(_RESULT_FIELD, result))

    def _published(self, groups: list[Group]) -> None:
        # WireEvent.wire(True) is the event as field 11 with its prev_kv: Feed's own encoding.
        feed = b"".join(wire.wire(True) for _, wires in groups for wire in wires)
        self._broadcast(length_delimited(_FEED_FIELD, feed))

    def _skipped(self, through: int) -> None:
        feed = workers_pb2.Feed(skipped_through=through).SerializeToString()
        self._broadcast(length_delimited(_FEED_FIELD, feed))

    def _broadcast(self, frame: bytes) -> None:
        for connection in self._connections:
            connection.send(frame)
