"""Compaction: removes history below the compact revision, in short batches, on its own task.

The compact revision itself is set through the writer (by the Compact RPC), so reads below it fail
at once, as in etcd. This task then deletes the history physically, batch by batch, each batch one
short transaction that also advances `compacted_through`; the database is the only record of
progress. A failed batch is logged and counted and changes nothing in memory: the next pass
re-reads where the database stands. Nothing here ever blocks the writer or readers for longer
than one batch, and no failure ends the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from kine_server.drivers.base import CompactTx, Driver

log = logging.getLogger(__name__)

#: A seam for tests: called with (tx, after, through) inside each batch, before its deletions.
BatchHook = Callable[[CompactTx, int, int], Awaitable[None]]


@dataclass
class CompactionStatus:
    """What an operator needs to see whether compaction keeps up (metrics and status read it)."""

    compacted_through: int = 0
    batches_total: int = 0
    rows_deleted_total: int = 0
    failures_total: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    last_error_time: float = 0.0
    last_success_time: float = 0.0


class Compactor:
    """Deletes superseded history up to the compact revision stored in the database."""

    def __init__(
        self,
        driver: Driver,
        batch_size: int = 1000,
        timeout: float = 5.0,
        retry_interval: float = 5.0,
        hook: BatchHook | None = None,
    ) -> None:
        self._retry_interval = retry_interval
        self._driver = driver
        self._batch_size = batch_size
        self._timeout = timeout
        self._hook = hook
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self.status = CompactionStatus()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="kine-compactor")

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

    async def _loop(self) -> None:
        while True:
            # Woken by a Compact request, or every retry interval to finish what a failure left.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._retry_interval)
            self._wake.clear()
            await self.run()

    async def run(self) -> bool:
        """One pass: compact batch after batch up to the stored compact revision.

        Returns True if the pass reached its target, False if a batch failed.
        """
        while True:
            try:
                done = await asyncio.wait_for(self._batch(), self._timeout)
            except Exception as exc:
                self._failed(exc)
                return False
            if done:
                return True

    async def _batch(self) -> bool:
        """Compact one batch; True when there is nothing (left) to do."""
        async with self._driver.compact() as tx:
            counters = await tx.counters()
            after, target = counters.compacted_through, counters.compact_revision
            if after >= target:
                await self._advanced(after, 0)
                return True
            through = min(after + self._batch_size, target)
            # Claim first: a concurrent compactor (another instance) waits on this row, then
            # finds it moved and plans again from the database instead of repeating our work.
            if not await tx.claim(after, through):
                return False
            if self._hook is not None:
                await self._hook(tx, after, through)
            deleted = await tx.delete_history(after, through)
        await self._advanced(through, deleted)
        return False

    async def _advanced(self, through: int, deleted: int) -> None:
        status = self.status
        if deleted or through > status.compacted_through:
            status.batches_total += 1
        status.rows_deleted_total += deleted
        status.consecutive_failures = 0
        status.last_success_time = time.time()
        async with self._progress:
            status.compacted_through = max(status.compacted_through, through)
            self._progress.notify_all()

    def _failed(self, exc: BaseException) -> None:
        status = self.status
        status.failures_total += 1
        status.consecutive_failures += 1
        status.last_error = f"{type(exc).__name__}: {exc}"
        status.last_error_time = time.time()
        log.error(
            "compaction batch after revision %d failed (%d in a row): %s",
            status.compacted_through,
            status.consecutive_failures,
            status.last_error,
        )
