"""--quota-backend-bytes and etcd's NOSPACE alarm.

As in etcd: a write that would take the database past the quota is refused with
"etcdserver: mvcc: database space exceeded" and raises the NOSPACE alarm; while the alarm is
raised, writes that add data (Put, Txns that put, LeaseGrant) are refused, while reads, deletes
and compaction go on, until an operator frees space and disarms the alarm. The alarm is kept in
the database, so every instance sharing it sees the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from kine_server import errors
from kine_server.drivers.base import Driver
from kine_server.store import supervise
from kine_server.store.applier import Applier
from kine_server.store.writer import Writer

log = logging.getLogger(__name__)

NOSPACE = "alarm_nospace"


class Quota:
    def __init__(self, driver: Driver, writer: Writer, quota_bytes: int, interval: float = 5.0):
        self._driver = driver
        self._writer = writer
        self.quota_bytes = quota_bytes
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.size = 0
        self.nospace = False

    async def start(self) -> None:
        await self.refresh()
        self._task = supervise.start("kine-quota", self._loop)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def refresh(self) -> None:
        """Re-read the database size and the alarm (another instance may have changed it)."""
        with errors.database_errors():
            self.size, _ = await self._driver.size()
            self.nospace = bool(await self._driver.meta(NOSPACE))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            with contextlib.suppress(errors.EtcdError):
                await self.refresh()

    async def check(self, request_bytes: int) -> None:
        """Refuse a write that adds data while the alarm is raised or would pass the quota."""
        if self.nospace:
            raise errors.NoSpace()
        if self.quota_bytes and self.size + request_bytes > self.quota_bytes:
            await self.refresh()  # the cached size may be stale: measure before refusing
            if self.size + request_bytes > self.quota_bytes:
                log.warning(
                    "database size %d plus a %d-byte request passes --quota-backend-bytes %d: "
                    "raising the NOSPACE alarm",
                    self.size,
                    request_bytes,
                    self.quota_bytes,
                )
                await self.set_alarm(True)
                raise errors.NoSpace()
        # Until the next measurement, count what this write adds (as etcd estimates by cost).
        self.size += request_bytes

    async def set_alarm(self, raised: bool) -> None:
        async def write(applier: Applier) -> None:
            await applier.write_tx.set_meta(NOSPACE, int(raised))

        await self._writer.submit(write)
        self.nospace = raised
