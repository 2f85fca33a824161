"""A `--workers` front-end process's store: reads here, writes in the writer process.

Reads (Range, read-only Txn, watch history, lease time-to-live) go straight to the database, as
in a single process: a write is committed before the writer process answers it, so a read that
starts after any client heard of a write sees it (linearizable, as etcd's reads). Every write is
a Command to the writer process (store/channel.py); its hub's feed keeps this process's hub, and
so its watches, exactly in step with the writer's: the same revisions, in order, none twice.

If the writer process goes away, this process cannot serve anything correctly (its watches
would silently stop): it fails what is in flight with UNAVAILABLE and tells its server to exit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from google.protobuf.message import Message

from kine_server import errors
from kine_server.auth.permissions import Identity, message_types
from kine_server.drivers.base import Driver
from kine_server.mvcc.compactor import CompactionStatus
from kine_server.pb import rpc_pb2, workers_pb2
from kine_server.process.frames import FrameConnection, length_delimited, parse_envelope, varint
from kine_server.store.store import Storage, WriteSideStatus

log = logging.getLogger(__name__)

_COMMAND_FIELD = 1
#: Command's field number for each kind of write.
_COMMAND_FIELDS = {f.name: f.number for f in workers_pb2.Command.DESCRIPTOR.fields}
_HELLO_FIELD = 4
_SCRAPED_FIELD = 6


class FrontendStore(Storage):
    def __init__(self, driver: Driver, writer_socket: str, on_lost: Callable[[], None]) -> None:
        super().__init__(driver)
        self._socket = writer_socket
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
        await self._hello  # the hub continues from its revision (see _received)
        await self.auth.start()

    def ready(self, worker: int) -> None:
        """Tell the writer process that this front-end, number `worker`, serves gRPC now."""
        self.worker = worker
        hello = workers_pb2.Hello(worker=worker).SerializeToString()
        if self._connection is not None:
            self._connection.send(length_delimited(_HELLO_FIELD, hello))

    async def stop(self, timeout: float | None = None) -> None:
        """After the gRPC server stopped: its last writes have been answered."""
        self._stopping = True
        await self.auth.stop()
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _received(self, frame: bytes) -> None:
        envelope = parse_envelope(frame)
        kind = envelope.WhichOneof("kind")
        if kind == "result":
            future = self._pending.pop(envelope.result.id, None)
            if future is not None and not future.done():
                future.set_result(envelope.result)
        elif kind == "feed":
            feed = envelope.feed
            if feed.events and not self.hub.publish(list(feed.events)):
                # The writer's hub publishes revisions in order, one after another: a gap here
                # is a bug, and watches served from a hub with a hole would be wrong.
                log.error("the writer process's feed skipped revisions; restarting this process")
                self._lost(None)
            if feed.skipped_through:
                self.hub.skip(feed.skipped_through)
            if feed.auth_generation:
                self.auth.expect(feed.auth_generation)
        elif kind == "scrape":
            reply = workers_pb2.Scraped(
                id=envelope.scrape.id, text=self.scrape(), worker=self.worker
            )
            if self._connection is not None:
                self._connection.send(length_delimited(_SCRAPED_FIELD, reply.SerializeToString()))
        elif kind == "hello" and self._hello is not None and not self._hello.done():
            # Here, not where start() awaits it: the feed that follows may be in the same read
            # (the writer sends what one loop turn queued in one write), and it continues from
            # this revision.
            self.hub.revision = envelope.hello.revision
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
            log.error("lost the connection to the writer process; stopping")
            self._on_lost()

    async def _call(self, **op: Message) -> workers_pb2.Result:
        """Send the one command in `op` (its Command field name and request); its Result.

        Encoded by hand, the request as its own bytes: no copy, and a Txn nested as deep as
        --max-txn-ops allows passes (upb's copy re-parses, refusing past 100 levels)."""
        connection, loop = self._connection, self._loop
        if connection is None or connection.closed or loop is None:
            raise errors.Unavailable("kine-server: the writer process is gone")
        ((name, request),) = op.items()
        command_id = next(self._ids)
        command = (
            b"\x08"  # Command.id: field 1, varint
            + varint(command_id)
            + length_delimited(_COMMAND_FIELDS[name], request.SerializeToString())
        )
        future: asyncio.Future[workers_pb2.Result] = loop.create_future()
        self._pending[command_id] = future
        connection.send(length_delimited(_COMMAND_FIELD, command))
        try:
            result = await future
        finally:
            self._pending.pop(command_id, None)
        if result.WhichOneof("outcome") == "error":
            raise errors.Relayed(result.error.code, result.error.message)
        return result

    async def put(self, req: rpc_pb2.PutRequest) -> rpc_pb2.PutResponse:
        return (await self._call(put=req)).put

    async def delete_range(self, req: rpc_pb2.DeleteRangeRequest) -> rpc_pb2.DeleteRangeResponse:
        return (await self._call(delete_range=req)).delete_range

    async def write_txn(self, req: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        return (await self._call(txn=req)).txn

    async def compact(self, revision: int, physical: bool) -> int:
        request = rpc_pb2.CompactionRequest(revision=revision, physical=physical)
        return (await self._call(compaction=request)).compacted_at

    async def lease_grant(self, req: rpc_pb2.LeaseGrantRequest) -> tuple[int, int]:
        granted = (await self._call(lease_grant=req)).lease_grant
        return granted.ID, granted.TTL

    async def lease_revoke(self, lease_id: int) -> None:
        await self._call(lease_revoke=rpc_pb2.LeaseRevokeRequest(ID=lease_id))

    async def lease_keep_alive_many(self, lease_ids: list[int]) -> list[int]:
        keep_alive = workers_pb2.KeepAlives(ids=lease_ids)
        return list((await self._call(lease_keep_alive=keep_alive)).lease_ttls.ttls)

    async def alarm(self, req: rpc_pb2.AlarmRequest) -> list[rpc_pb2.AlarmMember]:
        return list((await self._call(alarm=req)).alarms.alarms)

    async def defragment(self) -> None:
        await self._call(defragment=rpc_pb2.DefragmentRequest())

    async def auth_change(self, method: str, req: Message, who: Identity | None) -> Message:
        change = workers_pb2.AuthChange(method=method, request=req.SerializeToString())
        if who is not None:
            change.identified, change.user, change.revision = True, who.user, who.revision
        answer = (await self._call(auth_change=change)).auth_changed
        await self.auth.reload()  # the client that made the change sees it at once
        return message_types(method)[1].FromString(answer)

    async def write_side_status(self) -> WriteSideStatus:
        reply = (await self._call(status=workers_pb2.StatusQuery())).status
        return WriteSideStatus(
            compaction=CompactionStatus(
                consecutive_failures=reply.compaction_failures,
                last_error=reply.compaction_last_error,
            ),
            nospace=reply.nospace,
            expired_leases=reply.expired_leases,
            write_batches=reply.write_batches,
            write_requests=reply.write_requests,
        )
