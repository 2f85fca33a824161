"""Leases, kept in the database: granted, renewed, revoked and expired through the writer.

Deadlines are wall-clock milliseconds in the lease table, so any instance can renew a lease and
the database decides which instance expires it: expiry deletes the lease row only if its deadline
has passed, in the same transaction (and revision) that deletes the lease's keys. The expiry loop
asks the database for due leases twice a second; it holds nothing per lease in memory, so its cost
does not grow with the number of live leases.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kine_server import errors
from kine_server.drivers.base import Driver, DriverError
from kine_server.store.applier import Applier
from kine_server.store.writer import Writer

log = logging.getLogger(__name__)

#: etcd's minimum TTL with its default heartbeat (100ms) and election timeout (1s): 3/2 election.
MIN_TTL = 2
#: etcd's MaxLeaseTTL.
MAX_TTL = 9_000_000_000
#: Revoking is never conditional on the deadline: any deadline is "before" this one.
ANY_DEADLINE = 2**62


@dataclass(frozen=True)
class LeaseStatus:
    lease_id: int
    granted_ttl: int
    remaining_ttl: int
    keys: list[bytes]


class Lessor:
    def __init__(
        self,
        driver: Driver,
        writer: Writer,
        clock: Callable[[], float] = time.time,
        expiry_interval: float = 0.5,
    ) -> None:
        self._driver = driver
        self._writer = writer
        self._clock = clock
        self._interval = expiry_interval
        self._task: asyncio.Task[None] | None = None
        self.expired_total = 0

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def start(self) -> None:
        """Give every lease its TTL again (etcd does this when a new leader takes over), so that
        time spent down never expires a lease early; then start expiring."""
        now = self.now_ms()

        async def extend(applier: Applier) -> None:
            await applier.write_tx.extend_leases(now)

        await self._writer.submit(extend)
        self._task = asyncio.create_task(self._expiry_loop(), name="kine-lease-expiry")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def grant(self, lease_id: int, ttl: int) -> tuple[int, int]:
        """(id, ttl actually granted)."""
        if ttl > MAX_TTL:
            raise errors.LeaseTTLTooLarge()
        ttl = max(ttl, MIN_TTL)

        async def insert(applier: Applier) -> int:
            tx = applier.write_tx
            expires = self.now_ms() + ttl * 1000
            if lease_id:
                if not await tx.insert_lease(lease_id, ttl, expires):
                    raise errors.LeaseExists()
                return lease_id
            while True:  # a random positive 63-bit id, as etcd generates them
                candidate = secrets.randbits(63) or 1
                if await tx.insert_lease(candidate, ttl, expires):
                    return candidate

        granted: int = await self._writer.submit(insert)
        return granted, ttl

    async def revoke(self, lease_id: int) -> None:
        async def revoke(applier: Applier) -> None:
            if not await applier.revoke(lease_id, ANY_DEADLINE):
                raise errors.LeaseNotFound()

        await self._writer.submit(revoke)

    async def keep_alive(self, lease_id: int) -> int:
        """The lease's TTL after renewing it, or 0 if it does not exist (expired or revoked)."""

        async def renew(applier: Applier) -> int:
            ttl = await applier.write_tx.renew_lease(lease_id, self.now_ms())
            return ttl or 0

        ttl: int = await self._writer.submit(renew)
        return ttl

    async def time_to_live(self, lease_id: int, with_keys: bool) -> LeaseStatus | None:
        try:
            async with self._driver.read() as tx:
                found = await tx.lease(lease_id)
                if found is None:
                    return None
                keys = [row.key for row in await tx.leased(lease_id)] if with_keys else []
        except DriverError as exc:
            raise errors.Unavailable.database(exc) from exc
        ttl, expires = found
        remaining = max(0, (expires - self.now_ms()) // 1000)
        return LeaseStatus(lease_id, ttl, remaining, keys)

    async def leases(self) -> list[int]:
        try:
            async with self._driver.read() as tx:
                return await tx.leases()
        except DriverError as exc:
            raise errors.Unavailable.database(exc) from exc

    async def expire_due(self, limit: int = 1000) -> int:
        """Revoke every lease whose deadline has passed; returns how many this call expired."""
        now = self.now_ms()
        async with self._driver.read() as tx:
            due = await tx.expired_leases(now, limit)

        def expire(lease_id: int) -> Callable[[Applier], Awaitable[bool]]:
            return lambda applier: applier.revoke(lease_id, now)

        # Submitted together, so one transaction (each lease its own revision) expires them all.
        results = await asyncio.gather(*(self._writer.submit(expire(i)) for i in due))
        expired = sum(1 for done in results if done)
        self.expired_total += expired
        return expired

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.expire_due()
            except (DriverError, errors.EtcdError) as exc:
                log.warning("lease expiry pass failed, retrying: %s", exc)
