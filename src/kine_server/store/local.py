"""The write side of the store, in the one process that writes: every write command lands here.

`WriteSide` owns what exists once per server: the writer (group commit, the one owner of the
revision counter), the compactor, the lessor's expiry, the alarms, the quota and the poller
that brings other instances' commits. With one process it serves that process's clients; with
`--workers` it runs in the writer process and front-ends reach it through `process/channel.py`.

Each command of store/commands.py is one method here, taking etcd's request (or a
workers.proto message where etcd has none) and answering its response: so a command is carried
out the same way whether it came from this process or from a front-end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf.message import Message

from kine_server import errors
from kine_server.auth.changes import message_types
from kine_server.auth.permissions import (
    AuthState,
    Caller,
    Identity,
    LeasedKeys,
    check_delete,
    check_lease_keys,
    check_put,
    check_txn,
)
from kine_server.auth.store import AuthStore
from kine_server.drivers.base import Driver
from kine_server.lease.lessor import Lessor
from kine_server.maintenance.alarms import Alarms, member_id
from kine_server.maintenance.quota import Quota
from kine_server.mvcc.applier import Applier
from kine_server.mvcc.compactor import CompactionSettings, CompactionStatus, Compactor
from kine_server.mvcc.hub import EventHub
from kine_server.mvcc.poller import Poller
from kine_server.mvcc.requests import has_puts, txn_keys
from kine_server.mvcc.writer import Writer
from kine_server.pb import kv_pb2, rpc_pb2, workers_pb2

Resp = TypeVar("Resp")


@dataclass(frozen=True)
class WriteSettings:
    """The flags the write side runs by."""

    compaction: CompactionSettings = field(default_factory=CompactionSettings)
    poll_interval: float = 1.0
    poll_batch_size: int = 500
    quota_bytes: int = 0
    member_name: str = "default"
    #: Write transactions slower than this many seconds are logged (0 disables).
    slow_threshold: float = 0.0


@dataclass(frozen=True)
class WriteSideStatus:
    """What only the process that writes knows, for the metrics."""

    compaction: CompactionStatus
    nospace: bool
    expired_leases: int
    write_batches: int
    write_requests: int


class WriteSide:
    """The store's writes, compaction, leases, alarms and quota, carried out in this process."""

    def __init__(
        self,
        driver: Driver,
        hub: EventHub,
        auth: AuthStore,
        settings: WriteSettings | None = None,
    ) -> None:
        settings = settings or WriteSettings()
        self.driver = driver
        self.hub = hub
        self.auth = auth
        self.writer = Writer(driver, self._committed)
        self.writer.slow_threshold = settings.slow_threshold
        self.poller = Poller(driver, hub, settings.poll_interval, settings.poll_batch_size)
        self.compactor = Compactor(driver, settings.compaction)
        self.lessor = Lessor(driver, self.writer)
        self.alarms = Alarms(driver, self.writer)
        self.quota = Quota(driver, self.alarms, settings.quota_bytes)
        self._member_name = settings.member_name

    async def start(self) -> None:
        with errors.database_errors():
            async with self.driver.read() as tx:
                self.hub.revision = (await tx.counters()).revision
            cluster_id = await self.driver.meta("cluster_id") or 1
        self.alarms.member_id = member_id(cluster_id, self._member_name)
        await self.poller.start()
        self.writer.start()
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

    def status(self) -> WriteSideStatus:
        return WriteSideStatus(
            compaction=self.compactor.status,
            nospace=self.alarms.nospace,
            expired_leases=self.lessor.expired_total,
            write_batches=self.writer.batches,
            write_requests=self.writer.requests,
        )

    # The commands (store/commands.py), one method each.

    # Put, DeleteRange and Txn, the requests that come by the thousand, return the writer's
    # future when nothing has to be waited for first (the quota is measured only when a write
    # may pass it): a front-end's write is then answered without a task of its own.

    def put(self, req: rpc_pb2.PutRequest, caller: Caller | None) -> Awaitable[rpc_pb2.PutResponse]:
        self.alarms.check_write()
        check = _authorized(caller, lambda state, who, leased: check_put(state, who, req, leased))

        def queue() -> Awaitable[rpc_pb2.PutResponse]:
            return self.writer.submit(lambda a: check(a, a.put(req)), (req.key,))

        return queue() if self.quota.admit(req.ByteSize()) else self._measured(req, queue)

    def delete_range(
        self, req: rpc_pb2.DeleteRangeRequest, caller: Caller | None
    ) -> Awaitable[rpc_pb2.DeleteRangeResponse]:
        self.alarms.check_write()

        async def allowed(state: AuthState, who: Identity | None, leased: LeasedKeys) -> None:
            check_delete(state, who, req)

        check = _authorized(caller, allowed)
        return self.writer.submit(lambda a: check(a, a.delete_range(req)))

    def txn(self, req: rpc_pb2.TxnRequest, caller: Caller | None) -> Awaitable[rpc_pb2.TxnResponse]:
        """A Txn that may write (Store answers the read-only ones itself)."""
        self.alarms.check_write()
        check = _authorized(caller, lambda state, who, leased: check_txn(state, who, req, leased))

        def queue() -> Awaitable[rpc_pb2.TxnResponse]:
            return self.writer.submit(lambda a: check(a, a.txn(req)), txn_keys(req))

        if has_puts(req) and not self.quota.admit(req.ByteSize()):
            return self._measured(req, queue)
        return queue()

    async def _measured(self, req: Message, queue: Callable[[], Awaitable[Resp]]) -> Resp:
        """Measure the database first (NOSPACE if the write would pass the quota), then queue
        the write."""
        await self.quota.check(req.ByteSize())
        return await queue()

    async def compact(
        self, req: rpc_pb2.CompactionRequest, caller: Caller | None
    ) -> rpc_pb2.CompactionResponse:
        """Mark the revision compacted (as etcd, reads below it now fail); the response's
        header holds the store revision. With `physical`, it answers once the history below
        the revision is gone."""
        self.alarms.check_write()
        revision = req.revision

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
        if req.physical:
            await self.compactor.wait_compacted(revision)
        response = rpc_pb2.CompactionResponse()
        response.header.revision = current
        return response

    async def lease_grant(
        self, req: rpc_pb2.LeaseGrantRequest, caller: Caller | None
    ) -> rpc_pb2.LeaseGrantResponse:
        """The lease granted: its id (the one asked for, or a new one) and the TTL granted."""
        self.alarms.check_write()
        await self.quota.check(req.ByteSize())
        lease_id, ttl = await self.lessor.grant(req.ID, req.TTL)
        return rpc_pb2.LeaseGrantResponse(ID=lease_id, TTL=ttl)

    async def lease_revoke(
        self, req: rpc_pb2.LeaseRevokeRequest, caller: Caller | None
    ) -> rpc_pb2.LeaseRevokeResponse:
        self.alarms.check_write()
        lease = req.ID
        check = _authorized(
            caller, lambda state, who, leased: check_lease_keys(state, who, lease, leased)
        )

        async def authorize(applier: Applier) -> None:
            await check(applier, _nothing())

        await self.lessor.revoke(lease, authorize)
        return rpc_pb2.LeaseRevokeResponse()

    async def lease_keep_alive(
        self, req: workers_pb2.KeepAlives, caller: Caller | None
    ) -> workers_pb2.KeepAliveTTLs:
        """Each lease's TTL after renewing them all, or 0 for one that does not exist (expired
        or revoked): one writer request for what a keep-alive stream has read."""
        return workers_pb2.KeepAliveTTLs(ttls=await self.lessor.keep_alive_many(req.ids))

    async def alarm(
        self, req: rpc_pb2.AlarmRequest, caller: Caller | None
    ) -> rpc_pb2.AlarmResponse:
        """Carry out an Alarm request; the response lists the alarms it answers with."""
        return rpc_pb2.AlarmResponse(alarms=await self.alarms.request(req))

    async def defragment(
        self, req: rpc_pb2.DefragmentRequest, caller: Caller | None
    ) -> rpc_pb2.DefragmentResponse:
        with errors.database_errors():
            await self.driver.defragment()
        return rpc_pb2.DefragmentResponse()

    async def auth_change(
        self, req: workers_pb2.AuthChange, caller: Caller | None
    ) -> workers_pb2.AuthChanged:
        """Carry out an Auth call that changes users, roles or the enabled flag, `caller`'s
        root role checked again on the state it changes; once it returns, this process (and,
        told first, every front-end) checks against the new state."""
        request = message_types(req.method)[0].FromString(req.request)
        who = caller.who if caller is not None else None
        answer = await self.auth.change(self.writer, req.method, request, who)
        return workers_pb2.AuthChanged(response=answer.SerializeToString())

    async def write_status(
        self, req: workers_pb2.StatusQuery, caller: Caller | None
    ) -> workers_pb2.StatusReply:
        """What Maintenance.Status reports of the write side: compaction's health."""
        compaction = self.compactor.status
        return workers_pb2.StatusReply(
            compaction_failures=compaction.consecutive_failures,
            compaction_last_error=compaction.last_error,
        )


#: A request's permission check: the auth state, who asked, and the keys of a lease.
Check = Callable[[AuthState, Identity | None, LeasedKeys], Awaitable[None]]
#: Runs a writer op's work after the check (see _authorized).
Checked = Callable[[Applier, Awaitable[Resp]], Awaitable[Resp]]


def _authorized(caller: Caller | None, check: Check) -> Checked[Any]:
    """etcd's authApplierV3: a request is checked again when it is applied if the auth state
    changed since it was checked (a revocation committed between a front-end's check and the
    writer's batch): against the state in force in the writer's transaction, so it fails as
    etcd's does ("revision of auth store is old", permission denied, user name is empty)
    instead of slipping through. The usual case costs one comparison."""

    async def checked(applier: Applier, work: Awaitable[Any]) -> Any:
        if caller is not None and caller.generation != applier.auth_generation:
            state = await AuthState.read(applier.write_tx)
            try:
                await check(state, caller.who, applier.leased_keys)
            except BaseException:
                _close(work)
                raise
        return await work

    return checked


def _close(work: Awaitable[Any]) -> None:
    """A coroutine made and never awaited: close it (asyncio warns of one never awaited)."""
    close = getattr(work, "close", None)
    if close is not None:
        close()


async def _nothing() -> None:
    """The work of a check that precedes another op (a lease revocation's)."""
