"""The store: the one entry point the gRPC services use for data, in every kind of process.

A `Store` reads from this process's own driver (mvcc/kvstore.py: reads are linearizable from
any process, a write being committed before it is answered) and submits every write command
(store/commands.py) to its `Writes`: the WriteSide in this process, or the writer process's
over a socket for a `--workers` front-end. The hub (committed events, for watches) and the auth
store (the state permissions are checked against) are this process's own; the write side
publishes into the hub, or the writer process's feed does (process/link.py).
"""

from __future__ import annotations

from kine_server import errors
from kine_server.auth.permissions import Caller
from kine_server.auth.store import AuthStore
from kine_server.drivers.base import Counters, Driver
from kine_server.etcd_backend.mvcc import write_etcd_snapshot
from kine_server.lease.lessor import LeaseStatus, lease_ids, lease_status
from kine_server.mvcc.hub import EventHub
from kine_server.mvcc.kvstore import KVReader
from kine_server.mvcc.requests import is_read_only
from kine_server.pb import rpc_pb2
from kine_server.store.commands import TXN, Command, Req, Resp, Writes


class Store:
    """Reads here; writes through `writes`; this process's hub and auth state."""

    def __init__(
        self,
        driver: Driver,
        writes: Writes,
        hub: EventHub,
        auth: AuthStore,
        slow_threshold: float = 0.0,
    ) -> None:
        self.driver = driver
        self.hub = hub
        self.auth = auth
        self.kv = KVReader(driver, slow_threshold)
        self._writes = writes

    async def start(self) -> None:
        await self._writes.start()
        await self.auth.start()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop; the writes still queued get `timeout` seconds (None: as long as they take)."""
        await self.auth.stop()
        await self._writes.stop(timeout)

    async def submit(
        self, command: Command[Req, Resp], request: Req, caller: Caller | None = None
    ) -> Resp:
        """Carry out a write command (or ask the writer what only it knows) for `caller`: see
        commands.Writes."""
        return await self._writes.submit(command, request, caller)

    # The reads.

    async def range(self, req: rpc_pb2.RangeRequest) -> rpc_pb2.RangeResponse:
        return await self.kv.range(req)

    async def txn(
        self, req: rpc_pb2.TxnRequest, caller: Caller | None = None
    ) -> rpc_pb2.TxnResponse:
        """A read-only Txn is read here, as etcd serves it without a proposal; one that may
        write is a command."""
        if is_read_only(req):
            return await self.kv.read_only_txn(req)
        return await self.submit(TXN, req, caller)

    async def counters(self) -> Counters:
        return await self.kv.counters()

    async def lease_time_to_live(self, lease_id: int, with_keys: bool) -> LeaseStatus | None:
        return await lease_status(self.driver, lease_id, with_keys)

    async def lease_list(self) -> list[int]:
        return await lease_ids(self.driver)

    async def leased_keys(self, lease_id: int) -> list[bytes]:
        """The keys attached to a lease, for the permission checks of writes that touch it."""
        status = await self.lease_time_to_live(lease_id, with_keys=True)
        return [] if status is None else list(status.keys)

    async def snapshot(self, path: str) -> Counters:
        """Write a consistent copy of the store to `path` as etcd's own backend file (a bbolt
        database), so etcd's tools read it: `etcdctl snapshot status`, `snapshot restore`."""
        async with self.kv.reading("Snapshot") as tx:
            return await write_etcd_snapshot(tx, path)

    async def size(self) -> tuple[int, int]:
        """(bytes the database occupies, bytes in use)."""
        with errors.database_errors():
            return await self.driver.size()

    async def hash_kv(self, revision: int) -> tuple[int, int, int]:
        """(crc32 of the key space as of `revision`, that revision, compact revision)."""
        return await self.kv.hash_kv(revision)
