"""--quota-backend-bytes and etcd's NOSPACE alarm.

As in etcd: a write that would take the database past the quota is refused with
"etcdserver: mvcc: database space exceeded" and raises the NOSPACE alarm for this server's
member id; while any NOSPACE alarm is raised (by any member, maintenance/alarms.py), writes that add
data (Put, Txns that put, LeaseGrant) are refused, while reads, deletes and compaction go on,
until an operator frees space and disarms the alarm. The alarms are kept in the database, so
every instance sharing it sees the same ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from kine_server import errors, supervise
from kine_server.drivers.base import Driver
from kine_server.maintenance.alarms import Alarms
from kine_server.pb import rpc_pb2

log = logging.getLogger(__name__)


class Quota:
    def __init__(self, driver: Driver, alarms: Alarms, quota_bytes: int, interval: float = 5.0):
        self._driver = driver
        self.alarms = alarms
        self.quota_bytes = quota_bytes
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.size = 0

    async def start(self) -> None:
        await self.refresh()
        self._task = supervise.start("kine-quota", self._loop)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def refresh(self) -> None:
        """Re-read the database size and the alarms (another instance may have changed them)."""
        with errors.database_errors():
            self.size, _ = await self._driver.size()
        await self.alarms.refresh()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            with contextlib.suppress(errors.EtcdError):
                await self.refresh()

    def admit(self, request_bytes: int) -> bool:
        """Without waiting: refuse a write that adds data while a NOSPACE alarm is raised
        (NoSpace), admit one that fits the quota as last measured (True), or say that the
        database must be measured first (False: `check` does it)."""
        if self.alarms.nospace:
            raise errors.NoSpace()
        if self.quota_bytes and self.size + request_bytes > self.quota_bytes:
            return False
        # Until the next measurement, count what this write adds (as etcd estimates by cost).
        self.size += request_bytes
        return True

    async def check(self, request_bytes: int) -> None:
        """Refuse a write that adds data while a NOSPACE alarm is raised or that would pass the
        quota."""
        if self.admit(request_bytes):
            return
        await self.refresh()  # the cached size may be stale: measure before refusing
        if self.size + request_bytes > self.quota_bytes:
            log.warning(
                "database size %d plus a %d-byte request passes --quota-backend-bytes %d: "
                "raising the NOSPACE alarm",
                self.size,
                request_bytes,
                self.quota_bytes,
            )
            await self.alarms.activate(self.alarms.member_id, rpc_pb2.NOSPACE)
            raise errors.NoSpace()
        self.size += request_bytes
