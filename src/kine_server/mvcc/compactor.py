"""Compaction: removes history below the compact revision, in short batches, on its own task.

Every `interval` (with jitter) a tick moves the compact revision up to `current - min_retain` and
deletes the history at or below it, batch by batch. The Compact RPC sets the compact revision
itself (through the writer, so reads below it fail at once, as in etcd) and wakes this task.

Each batch is one short transaction, bounded by `timeout`, that claims its range, deletes it and
records its progress (`compacted_through`, and the compact revision a tick moves) together. The
database is the only record of progress: every batch plans from the counters it reads, so a
failure leaves nothing in memory to drift. A failed batch is logged once with its range and
cause, counted in `status`, and retried from the database's state on the next tick; nothing
here ever stops the task, skips a tick, exits the process, or holds the writer, watchers or
readers for longer than one batch.

This is the fix for kine's bug in K3s 1.29: kine's loop kept its own copy of the compact
revision, which went stale when a batch failed, so later ticks deleted nothing and reported
success while the table grew.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kine_server import supervise
from kine_server.drivers.base import Driver

log = logging.getLogger(__name__)

#: A seam for tests: called as hook(stage, after, through) inside each batch's transaction, with
#: stage "begin" (before deleting) and "commit" (after deleting, just before the commit).
BatchHook = Callable[[str, int, int], Awaitable[None]]


@dataclass
class CompactionStatus:
    """What an operator needs to see whether compaction keeps up (metrics and Status read it)."""

    compacted_through: int = 0
    compact_revision: int = 0
    ticks_total: int = 0
    batches_total: int = 0
    rows_deleted_total: int = 0
    failures_total: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    last_error_time: float = 0.0
    last_success_time: float = 0.0


@dataclass(frozen=True)
class CompactionSettings:
    interval: float = 300.0  # 0 disables periodic compaction (the Compact RPC still works)
    jitter_percent: int = 0
    min_retain: int = 1000
    batch_size: int = 1000
    timeout: float = 5.0
    retry_interval: float = 5.0  # how soon a Compact RPC's work is retried after a failure


class Compactor:
    """Deletes superseded history up to the compact revision stored in the database."""

    def __init__(
        self,
        driver: Driver,
        settings: CompactionSettings | None = None,
        hook: BatchHook | None = None,
    ) -> None:
        self._driver = driver
        self.settings = settings or CompactionSettings()
        self.hook = hook
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._batch_range: tuple[int, int] | None = None
        self.status = CompactionStatus()

    def start(self) -> None:
        self._task = supervise.start("kine-compactor", self._loop)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    async def wait_compacted(self, revision: int) -> None:
        """Return once history at or below `revision` is physically gone (Compact physical=true)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self.status.compacted_through >= revision)

    def _next_tick(self) -> float:
        interval = self.settings.interval
        jitter = interval * self.settings.jitter_percent / 100
        return interval + random.uniform(-jitter, jitter)

    async def _loop(self) -> None:
        settings = self.settings
        next_tick = time.monotonic() + self._next_tick() if settings.interval > 0 else None
        failed = False
        while True:
            waits = [settings.retry_interval] if failed else []
            if next_tick is not None:
                waits.append(max(0.0, next_tick - time.monotonic()))
            await supervise.woken(self._wake, min(waits) if waits else None)
            self._wake.clear()
            periodic = next_tick is not None and time.monotonic() >= next_tick
            if periodic:
                next_tick = time.monotonic() + self._next_tick()
            failed = not await self.tick(advance=periodic)

    async def tick(self, advance: bool = True) -> bool:
        """One pass. With `advance`, first move the compact revision to current - min_retain.

        Returns True if the pass reached its target, False if a batch failed.
        """
        self.status.ticks_total += 1
        progressed = False
        while True:
            # The database enforces --compact-timeout itself (and says why); this is a backstop.
            backstop = self.settings.timeout + max(1.0, self.settings.timeout)
            try:
                async with asyncio.timeout(backstop):
                    outcome = await self._batch(advance)
            except TimeoutError:
                self._failed(TimeoutError(f"batch still running after {backstop:g}s"))
                return False
            except Exception as exc:  # every failure is reported, none is fatal
                self._failed(exc)
                return False
            if outcome is None:
                break
            progressed = progressed or outcome
        if progressed:
            try:
                await self._driver.checkpoint()
            except Exception as exc:  # retried after the next tick
                log.warning("checkpoint after compaction failed: %s", exc)
        return True

    async def _batch(self, advance: bool) -> bool | None:
        """Compact one batch: True if it deleted history, False if another instance took the
        range first, None when nothing is left to do."""
        settings = self.settings
        self._batch_range = None
        async with self._driver.compact(settings.timeout) as tx:
            counters = await tx.counters()
            target = counters.compact_revision
            if advance:
                target = max(target, counters.revision - settings.min_retain)
            after = counters.compacted_through
            self._batch_range = (after, min(after + settings.batch_size, target))
            if after >= target:
                await self._advanced(after, target, 0)
                return None
            through = self._batch_range[1]
            # Claim first: a concurrent compactor (another instance) waits on this row, then
            # finds it moved and plans again from the database instead of repeating our work.
            if not await tx.claim(after, through):
                return False
            if target > counters.compact_revision:
                await tx.advance_compact_revision(target)
            await self._stage("begin", after, through)
            deleted = await tx.delete_history(after, through)
            await self._stage("commit", after, through)
        await self._advanced(through, target, deleted)
        return True

    async def _stage(self, stage: str, after: int, through: int) -> None:
        if self.hook is not None:
            await self.hook(stage, after, through)

    async def _advanced(self, through: int, target: int, deleted: int) -> None:
        status = self.status
        if deleted or through > status.compacted_through:
            status.batches_total += 1
        status.rows_deleted_total += deleted
        status.consecutive_failures = 0
        status.last_success_time = time.time()
        status.compact_revision = max(status.compact_revision, target)
        async with self._progress:
            status.compacted_through = max(status.compacted_through, through)
            self._progress.notify_all()

    def _failed(self, exc: BaseException) -> None:
        status = self.status
        status.failures_total += 1
        status.consecutive_failures += 1
        status.last_error = f"{type(exc).__name__}: {exc}".rstrip(": ")
        status.last_error_time = time.time()
        where = (
            f"compaction batch ({self._batch_range[0]}, {self._batch_range[1]}]"
            if self._batch_range
            else f"compaction batch after revision {status.compacted_through} (not yet planned)"
        )
        log.error(
            "%s failed, %d in a row; retrying from the database's state on the next tick: %s",
            where,
            status.consecutive_failures,
            status.last_error,
        )
