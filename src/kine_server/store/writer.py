"""The single writer: every write request of this process goes through one queue.

Requests that arrive while a transaction is committing are applied together in the next one
(group commit): one BEGIN, one revision lock, one fsync for the whole batch, while each request
still gets its own revision and sees the effects of the requests before it in the batch.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kine_server import errors
from kine_server.drivers.base import Driver, DriverError
from kine_server.pb import kv_pb2
from kine_server.store.applier import Applier

log = logging.getLogger(__name__)

WriteOp = Callable[[Applier], Awaitable[Any]]
#: Told of every committed batch: the revision the batch started from, and its events.
OnCommit = Callable[[int, list[kv_pb2.Event]], None]


@dataclass(slots=True)
class _Job:
    op: WriteOp
    future: asyncio.Future[Any]


class Writer:
    """Applies write requests in batches on the driver's write transaction."""

    def __init__(self, driver: Driver, on_commit: OnCommit, max_batch: int = 256) -> None:
        self._driver = driver
        self._on_commit = on_commit
        self._max_batch = max_batch
        self._queue: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: Told the size and duration of every committed batch (metrics).
        self.observe: Callable[[int, float], None] | None = None
        #: Batches slower than this many seconds are logged (0 disables).
        self.slow_threshold = 0.0
        self.batches = 0
        self.requests = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="kine-writer")

    async def stop(self) -> None:
        """Refuse new requests, finish the queued ones, then stop."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        self._wake.set()
        await task

    async def submit(self, op: WriteOp) -> Any:
        if self._task is None:
            raise errors.Unavailable("kine-server: shutting down")
        job = _Job(op, asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wake.set()
        return await job.future

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                count = min(len(self._queue), self._max_batch)
                batch = [self._queue.popleft() for _ in range(count)]
                await self._commit(batch)
            if self._closing:
                return

    async def _commit(self, batch: list[_Job]) -> None:
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        events: list[kv_pb2.Event] = []
        committing = False
        began = time.perf_counter()
        try:
            async with self._driver.write() as tx:
                counters = await tx.lock()
                applier = Applier(tx, counters.revision, counters.compact_revision)
                for job in batch:
                    if job.future.cancelled():
                        continue
                    try:
                        result = await job.op(applier)
                    except errors.EtcdError as exc:
                        if applier.changes:
                            raise  # written half: nothing of this batch may commit
                        outcomes.append((job, None, exc))
                        continue
                    events.extend(applier.take_changes())
                    outcomes.append((job, result, None))
                if applier.begin != counters.revision:
                    await tx.set_revision(applier.begin)
                committing = True
        except DriverError as exc:
            if len(batch) > 1 and not committing:
                # One request may be at fault: give each its own transaction, so that only it fails.
                log.warning("write batch of %d failed, retrying one by one: %s", len(batch), exc)
                for job in batch:
                    await self._commit([job])
                return
            log.warning("write request failed: %s", exc)
            self._fail(batch, errors.Unavailable.database(exc))
            return
        except Exception as exc:
            log.exception("write batch of %d requests failed", len(batch))
            self._fail(batch, errors.EtcdError(f"kine-server: internal error: {exc}"))
            return
        self.batches += 1
        self.requests += len(outcomes)
        took = time.perf_counter() - began
        if self.observe is not None:
            self.observe(len(outcomes), took)
        if 0 < self.slow_threshold <= took:
            log.warning("slow write transaction: %d requests took %.3fs", len(outcomes), took)
        for job, result, error in outcomes:
            if job.future.done():
                continue
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        if events:
            self._on_commit(counters.revision, events)

    @staticmethod
    def _fail(batch: list[_Job], error: errors.EtcdError) -> None:
        for job in batch:
            if not job.future.done():
                job.future.set_exception(error)
