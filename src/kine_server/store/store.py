"""The store: the one entry point the gRPC services use for data.

`Storage` is what the services see: the reads, done here from the driver's reader pool in
every process, and the writes, as abstract methods. `Store` carries out the writes in this
process: one writer (group commit), compaction marked through the writer and carried out by
the compactor task, leases, quota. With `--workers`, each front-end process has a
`FrontendStore` (store/frontend.py) that hands its writes to the writer process's `Store`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import struct
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from google.protobuf.message import Message

from kine_server import errors
from kine_server.auth.permissions import AuthStore, Identity
from kine_server.drivers.base import OPEN_END, Counters, Driver, ReadTx
from kine_server.etcd_backend.mvcc import write_etcd_snapshot
from kine_server.lease.lessor import LeaseStatus, Lessor, lease_ids, lease_status
from kine_server.maintenance.alarms import Alarms, member_id
from kine_server.maintenance.quota import Quota
from kine_server.mvcc.applier import Applier, has_puts, is_read_only
from kine_server.mvcc.compactor import CompactionStatus, Compactor
from kine_server.mvcc.hub import EventHub
from kine_server.mvcc.poller import Poller
from kine_server.mvcc.watcher import HistoryPage, whole_revisions
from kine_server.mvcc.writer import Writer
from kine_server.pb import kv_pb2, rpc_pb2

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteSideStatus:
    """What only the process that writes knows, for Status and the metrics."""

    compaction: CompactionStatus
    nospace: bool
    expired_leases: int
    write_batches: int
    write_requests: int


async def key_space_hash(tx: ReadTx, at: int) -> int:
    """HashKV's crc32: every live key's create/mod revision, version, lease and value as of
    `at`, in key order (the same on every instance and across restarts: the table alone)."""
    crc = 0
    key = b"\x00"
    while True:
        rows = await tx.range(key, OPEN_END, at, 1000)
        for row in rows:
            crc = zlib.crc32(row.key, crc)
            header = struct.pack(
                ">qqqq", row.create_revision, row.mod_revision, row.version, row.lease
            )
            crc = zlib.crc32(row.value, zlib.crc32(header, crc))
        if len(rows) < 1000:
            return crc
        key = rows[-1].key + b"\x00"


class Storage(abc.ABC):
    """Reads straight from the database; writes (abstract) through a writer."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.hub = EventHub()
        self.auth = AuthStore(driver)
        #: Read transactions slower than this many seconds are logged (--slow-sql-threshold;
        #: 0 disables), as the writer logs slow write transactions.
        self.slow_threshold = 0.0

    @contextlib.asynccontextmanager
    async def _reading(self, what: str) -> AsyncIterator[ReadTx]:
        """One read transaction: the driver's errors become the client's answer, and one that
        takes longer than `slow_threshold` is logged with what it served."""
        began = time.monotonic()
        with errors.database_errors():
            async with self.driver.read() as tx:
                yield tx
        took = time.monotonic() - began
        if 0 < self.slow_threshold <= took:
            log.warning("slow read transaction: %s took %.3fs", what, took)

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self, timeout: float | None = None) -> None:
        """Stop; the writes still queued get `timeout` seconds (None: as long as they take)."""

    # The writes: each takes etcd's request and answers etcd's response or raises its error.

    @abc.abstractmethod
    async def put(self, req: rpc_pb2.PutRequest) -> rpc_pb2.PutResponse: ...

    @abc.abstractmethod
    async def delete_range(
        self, req: rpc_pb2.DeleteRangeRequest
    ) -> rpc_pb2.DeleteRangeResponse: ...

    @abc.abstractmethod
    async def write_txn(self, req: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        """A Txn that may write (`txn` answers the read-only ones itself)."""

    @abc.abstractmethod
    async def compact(self, revision: int, physical: bool) -> int:
        """Mark `revision` compacted (as etcd, reads below it now fail) and return the store
        revision; with `physical`, only once the history below it is gone."""

    @abc.abstractmethod
    async def lease_grant(self, req: rpc_pb2.LeaseGrantRequest) -> tuple[int, int]:
        """(id, TTL actually granted)."""

    @abc.abstractmethod
    async def lease_revoke(self, lease_id: int) -> None: ...

    @abc.abstractmethod
    async def lease_keep_alive_many(self, lease_ids: list[int]) -> list[int]:
        """Each lease's TTL after renewing them all, or 0 for one that does not exist (expired
        or revoked): one writer request for what a keep-alive stream has read."""

    @abc.abstractmethod
    async def alarm(self, req: rpc_pb2.AlarmRequest) -> list[rpc_pb2.AlarmMember]:
        """Carry out an Alarm request; the alarms its answer lists (store/alarms.py)."""

    @abc.abstractmethod
    async def defragment(self) -> None: ...

    @abc.abstractmethod
    async def auth_change(self, method: str, req: Message, who: Identity | None) -> Message:
        """Carry out an Auth call that changes users, roles or the enabled flag (store/auth.py);
        once it returns, this process checks requests against the new state."""

    @abc.abstractmethod
    async def write_side_status(self) -> WriteSideStatus: ...

    # The reads.

    async def txn(self, req: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        if not is_read_only(req):
            return await self.write_txn(req)
        async with self._reading("Txn") as tx:
            counters = await tx.counters()
            return await Applier(tx, counters.revision, counters.compact_revision).txn(req)

    async def lease_time_to_live(self, lease_id: int, with_keys: bool) -> LeaseStatus | None:
        return await lease_status(self.driver, lease_id, with_keys)

    async def lease_list(self) -> list[int]:
        return await lease_ids(self.driver)

    async def leased_keys(self, lease_id: int) -> list[bytes]:
        """The keys attached to a lease, for the permission checks of writes that touch it."""
        status = await self.lease_time_to_live(lease_id, with_keys=True)
        return [] if status is None else list(status.keys)

    async def counters(self) -> Counters:
        async with self._reading("counters") as tx:
            return await tx.counters()

    async def range(self, req: rpc_pb2.RangeRequest) -> rpc_pb2.RangeResponse:
        async with self._reading("Range") as tx:
            counters = await tx.counters()
            return await Applier(tx, counters.revision, counters.compact_revision).range(req)

    async def history(
        self, after: int, through: int, key: bytes, end: bytes | None, limit: int
    ) -> HistoryPage:
        """The changes of a key range after `after`, at most about `limit` of them, whole
        revisions only, read from one snapshot; `page.through` says how far the page reaches."""
        async with self._reading("watch history") as tx:
            counters = await tx.counters()
            if after + 1 < counters.compact_revision:
                return HistoryPage(counters.compact_revision, [], after)
            changes = await tx.changes(after, through, key, end, limit)
            if len(changes) < limit:
                return HistoryPage(counters.compact_revision, changes, through)
            whole = whole_revisions(changes)
            if not whole:  # one revision bigger than a page: read all of it
                through = changes[0].row.mod_revision
                whole = await tx.changes(after, through, key, end, 2**62)
            else:
                through = whole[-1].row.mod_revision
        return HistoryPage(counters.compact_revision, whole, through)

    async def snapshot(self, path: str) -> Counters:
        """Write a consistent copy of the store to `path` as etcd's own backend file (a bbolt
        database), so etcd's tools read it: `etcdctl snapshot status`, `snapshot restore`."""
        async with self._reading("Snapshot") as tx:
            return await write_etcd_snapshot(tx, path)

    async def size(self) -> tuple[int, int]:
        """(bytes the database occupies, bytes in use)."""
        with errors.database_errors():
            return await self.driver.size()

    async def hash_kv(self, revision: int) -> tuple[int, int, int]:
        """(crc32 of the key space as of `revision`, that revision, compact revision).

        Every key's create/mod revision, version, lease and value, in key order: the same on
        every instance and across restarts, since it is computed from the table alone.
        """
        async with self._reading("HashKV") as tx:
            counters = await tx.counters()
            # As etcd's HashByRev: 0 is the current revision, the compact revision itself
            # is compacted, and a negative one hashes nothing (it is not an error).
            if revision > 0 and revision <= counters.compact_revision:
                raise errors.Compacted()
            if revision > counters.revision:
                raise errors.FutureRevision()
            at = revision or counters.revision
            crc = await key_space_hash(tx, at)
        return crc, at, counters.compact_revision


class Store(Storage):
    """The store with its writer, compactor, lessor and quota in this process."""

    def __init__(
        self,
        driver: Driver,
        compactor: Compactor | None = None,
        poll_interval: float = 1.0,
        poll_batch_size: int = 500,
        quota_bytes: int = 0,
        member_name: str = "default",
    ) -> None:
        super().__init__(driver)
        self.writer = Writer(driver, self._committed)
        self.poller = Poller(driver, self.hub, poll_interval, poll_batch_size)
        self.compactor = compactor or Compactor(driver)
        self.lessor = Lessor(driver, self.writer)
        self.alarms = Alarms(driver, self.writer)
        self.quota = Quota(driver, self.alarms, quota_bytes)
        self._member_name = member_name

    async def start(self) -> None:
        self.hub.revision = (await self.counters()).revision
        with errors.database_errors():
            cluster_id = await self.driver.meta("cluster_id") or 1
        self.alarms.member_id = member_id(cluster_id, self._member_name)
        await self.poller.start()
        self.writer.start()
        await self.auth.start()
        await self.auth.ensure_secret(self.writer)
        await self.lessor.start()
        await self.quota.start()
        self.compactor.start()
        self.compactor.wake()  # finish any compaction a previous run left half done

    async def stop(self, timeout: float | None = None) -> None:
        """Stop every task; the writes still queued, the lessor's last one included, get
        `timeout` seconds (None: as long as they take) to finish."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        await self.auth.stop()
        await self.quota.stop()
        await self.lessor.stop(left())
        await self.writer.stop(left())
        await self.poller.stop()
        await self.compactor.stop()

    def _committed(self, begin: int, events: list[kv_pb2.Event]) -> None:
        """The writer committed a batch that started from revision `begin`."""
        if not self.hub.publish(events):
            # Revisions before ours (another instance's) have not reached the hub yet: the
            # poller brings them, and ours after them, in order.
            self.poller.wake()

    async def put(self, req: rpc_pb2.PutRequest) -> rpc_pb2.PutResponse:
        self.alarms.check_write()
        await self.quota.check(req.ByteSize())
        response: rpc_pb2.PutResponse = await self.writer.submit(lambda a: a.put(req))
        return response

    async def delete_range(self, req: rpc_pb2.DeleteRangeRequest) -> rpc_pb2.DeleteRangeResponse:
        self.alarms.check_write()
        response: rpc_pb2.DeleteRangeResponse = await self.writer.submit(
            lambda a: a.delete_range(req)
        )
        return response

    async def write_txn(self, req: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        self.alarms.check_write()
        if has_puts(req):
            await self.quota.check(req.ByteSize())
        response: rpc_pb2.TxnResponse = await self.writer.submit(lambda a: a.txn(req))
        return response

    async def compact(self, revision: int, physical: bool) -> int:
        self.alarms.check_write()

        async def mark(applier: Applier) -> int:
            # Read under lock: a periodic compaction may have raised it since the batch began.
            compacted = await applier.write_tx.lock_compact_revision()
            if revision <= compacted:
                raise errors.Compacted()
            if revision > applier.revision:
                raise errors.FutureRevision()
            await applier.write_tx.advance_compact_revision(revision)
            applier.compact_revision = revision
            return applier.revision

        current: int = await self.writer.submit(mark)
        self.compactor.wake()
        if physical:
            await self.compactor.wait_compacted(revision)
        return current

    async def lease_grant(self, req: rpc_pb2.LeaseGrantRequest) -> tuple[int, int]:
        self.alarms.check_write()
        await self.quota.check(req.ByteSize())
        return await self.lessor.grant(req.ID, req.TTL)

    async def lease_revoke(self, lease_id: int) -> None:
        self.alarms.check_write()
        await self.lessor.revoke(lease_id)

    async def lease_keep_alive_many(self, lease_ids: list[int]) -> list[int]:
        return await self.lessor.keep_alive_many(lease_ids)

    async def alarm(self, req: rpc_pb2.AlarmRequest) -> list[rpc_pb2.AlarmMember]:
        return await self.alarms.request(req)

    async def defragment(self) -> None:
        with errors.database_errors():
            await self.driver.defragment()

    async def auth_change(self, method: str, req: Message, who: Identity | None) -> Message:
        return await self.auth.change(self.writer, method, req, who)

    async def write_side_status(self) -> WriteSideStatus:
        return WriteSideStatus(
            compaction=self.compactor.status,
            nospace=self.alarms.nospace,
            expired_leases=self.lessor.expired_total,
            write_batches=self.writer.batches,
            write_requests=self.writer.requests,
        )
