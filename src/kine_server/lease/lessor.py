"""Leases, kept in the database: granted, renewed, revoked and expired through the writer.

Deadlines are milliseconds of the database's own clock, so every instance on one PostgreSQL
agrees on them (one instance's clock step expires nothing) and any instance can renew a lease;
the database decides which instance expires it: expiry deletes the lease row only if its deadline
has passed, in the same transaction (and revision) that deletes the lease's keys. The expiry loop
asks the database for due leases twice a second; it holds nothing per lease in memory, so its cost
does not grow with the number of live leases.

Time when no instance serves the store does not count against a lease: every instance keeps
promising (`lease_served_until`, renewed every `promise` seconds while it runs, set to now by a
clean stop) and a starting instance moves every deadline on by the time since the last promise
ran out. A lease so never expires early because the server was down, and an instance that crash
loops does not keep it alive forever either (etcd's new leaders grant every lease its full TTL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from kine_server import errors, supervise
from kine_server.drivers.base import Driver
from kine_server.mvcc.applier import Applier
from kine_server.mvcc.writer import Writer

log = logging.getLogger(__name__)

#: etcd's minimum TTL with its default heartbeat (100ms) and election timeout (1s): 3/2 election.
MIN_TTL = 2
#: etcd's MaxLeaseTTL.
MAX_TTL = 9_000_000_000


@dataclass(frozen=True)
class LeaseStatus:
    lease_id: int
    granted_ttl: int
    remaining_ttl: int
    keys: list[bytes]


async def lease_status(driver: Driver, lease_id: int, with_keys: bool) -> LeaseStatus | None:
    """A lease's TTLs (and keys), read from the database: any process can answer it."""
    with errors.database_errors():
        async with driver.read() as tx:
            found = await tx.lease(lease_id)
            if found is None:
                return None
            keys = [row.key for row in await tx.leased(lease_id)] if with_keys else []
    ttl, remaining_ms = found
    return LeaseStatus(lease_id, ttl, max(0, remaining_ms) // 1000, keys)


async def lease_ids(driver: Driver) -> list[int]:
    with errors.database_errors():
        async with driver.read() as tx:
            return await tx.leases()


class Lessor:
    def __init__(
        self, driver: Driver, writer: Writer, expiry_interval: float = 0.5, promise: float = 2.0
    ) -> None:
        self._driver = driver
        self._writer = writer
        self._interval = expiry_interval
        self._promise_ms = int(promise * 1000)
        self._task: asyncio.Task[None] | None = None
        self.expired_total = 0
        #: Whether the last expiry pass found any lease: only then is the promise renewed, so an
        #: idle store gets no writes (and a paused instance holds no lock other writers need).
        self._any = True

    async def start(self) -> None:
        """Move deadlines on by the time nobody served the store, then start expiring."""

        async def resume(applier: Applier) -> None:
            await applier.write_tx.resume_leases(self._promise_ms)

        await self._writer.submit(resume)
        self._task = supervise.start("kine-lease-expiry", self._expiry_loop)

    async def stop(self, timeout: float | None = None) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            # A clean stop: lease time stops counting now, not when the last promise runs out
            # (if the database answers in time; else the promise simply runs out).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._promise(0)

    async def _promise(self, promise_ms: int) -> None:
        async def serve(applier: Applier) -> None:
            await applier.write_tx.serve_leases(promise_ms)

        try:
            await self._writer.submit(serve)
        except errors.EtcdError as exc:
            log.warning("cannot record that leases are being served: %s", exc.message)

    async def grant(self, lease_id: int, ttl: int) -> tuple[int, int]:
        """(id, ttl actually granted)."""
        if ttl > MAX_TTL:
            raise errors.LeaseTTLTooLarge()
        ttl = max(ttl, MIN_TTL)

        async def insert(applier: Applier) -> int:
            tx = applier.write_tx
            granted = lease_id
            if granted:
                if not await tx.insert_lease(granted, ttl):
                    raise errors.LeaseExists()
            else:
                while True:  # a random positive 63-bit id, as etcd generates them
                    granted = secrets.randbits(63) or 1
                    if await tx.insert_lease(granted, ttl):
                        break
            # The promise is not renewed while no lease exists: it may be stale.
            await tx.serve_leases(self._promise_ms)
            return granted

        granted: int = await self._writer.submit(insert)
        return granted, ttl

    async def revoke(
        self, lease_id: int, authorize: Callable[[Applier], Awaitable[None]] | None = None
    ) -> None:
        """Revoke the lease and delete its keys; `authorize` runs first, in the same
        transaction (the writer's check of who asked, see WriteSide)."""

        async def revoke(applier: Applier) -> None:
            if authorize is not None:
                await authorize(applier)
            if not await applier.revoke(lease_id, expired_only=False):
                raise errors.LeaseNotFound()

        await self._writer.submit(revoke)

    async def keep_alive(self, lease_id: int) -> int:
        """The lease's TTL after renewing it, or 0 if it does not exist (expired or revoked)."""
        return (await self.keep_alive_many([lease_id]))[0]

    async def keep_alive_many(self, lease_ids: Sequence[int]) -> list[int]:
        """The TTL of each lease after renewing them all, or 0 for one that does not exist.

        One writer request and one statement for all of them: a keep-alive stream hands over
        every request it has read, so a client sending thousands a second costs a commit per
        batch, not one per keep-alive. Each renewal is committed before it is answered (as one
        at a time was): a renewal acknowledged is never lost by a crash, and the deadline stays
        the database's, so any instance can renew and the database alone decides expiry. A lease
        named twice is renewed once; both get its TTL, as two renewals in a row would."""

        async def renew(applier: Applier) -> dict[int, int]:
            return await applier.write_tx.renew_leases(set(lease_ids))

        renewed: dict[int, int] = await self._writer.submit(renew)
        return [renewed.get(lease_id, 0) for lease_id in lease_ids]

    async def expire_due(self, limit: int = 1000) -> int:
        """Revoke every lease whose deadline has passed; returns how many this call expired."""
        with errors.database_errors():
            async with self._driver.read() as tx:
                due = await tx.expired_leases(limit)
                self._any = bool(due) or await tx.any_lease()

        def expire(lease_id: int) -> Callable[[Applier], Awaitable[bool]]:
            return lambda applier: applier.revoke(lease_id, expired_only=True)

        # Submitted together, so one transaction (each lease its own revision) expires them all.
        results = await asyncio.gather(*(self._writer.submit(expire(i)) for i in due))
        expired = sum(1 for done in results if done)
        self.expired_total += expired
        return expired

    async def _expiry_loop(self) -> None:
        promised = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.expire_due()
            except errors.EtcdError as exc:
                log.warning("lease expiry pass failed, retrying: %s", exc.message)
            now = asyncio.get_running_loop().time()
            if self._any and now - promised >= self._promise_ms / 2000:  # at half its length
                promised = now
                await self._promise(self._promise_ms)
