"""The single writer: every write request of this process goes through one queue.

Requests that arrive while a transaction is committing are applied together in the next one
(group commit): one BEGIN, one revision lock, one fsync for the whole batch, while each request
still gets its own revision and sees the effects of the requests before it in the batch.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kine_server import errors, supervise
from kine_server.drivers.base import DatabaseUnreachable, Driver, DriverError
from kine_server.mvcc.applier import Applier
from kine_server.pb import kv_pb2

log = logging.getLogger(__name__)

WriteOp = Callable[[Applier], Awaitable[Any]]
#: Told of every committed batch: the revision the batch started from, and its events.
OnCommit = Callable[[int, list[kv_pb2.Event]], None]


@dataclass(slots=True)
class _Job:
    op: WriteOp
    future: asyncio.Future[Any]
    #: The keys the op will look up by themselves (read ahead for the whole batch at once).
    keys: Sequence[bytes]


class _Redo(enum.Enum):
    #: What _attempt returns to have its batch redone writing through (see _commit).
    WRITE_THROUGH = enum.auto()


class Writer:
    """Applies write requests in batches on the driver's write transaction."""

    def __init__(self, driver: Driver, on_commit: OnCommit, max_batch: int = 256) -> None:
        self._driver = driver
        self._on_commit = on_commit
        self._max_batch = max_batch
        self._queue: collections.deque[_Job] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: The loop the writer runs on, looked up once: asyncio.get_running_loop() makes a
        #: getpid() system call on Python 3.11, and system calls are dear here.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        #: Told the size and duration of every committed batch (metrics).
        self.observe: Callable[[int, float], None] | None = None
        #: Batches slower than this many seconds are logged (0 disables).
        self.slow_threshold = 0.0
        self.batches = 0
        self.requests = 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = supervise.start("kine-writer", self._run)

    async def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, then stop; after `timeout` seconds, give
        up on what is left (it fails with UNAVAILABLE)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        self._wake.set()
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        queued = list(self._queue)
        self._queue.clear()
        self._fail(queued, errors.Unavailable("kine-server: shutting down"))

    def submit(self, op: WriteOp, keys: Sequence[bytes] = ()) -> asyncio.Future[Any]:
        """Queue `op` for the next batch; the future of its outcome. `keys`: the single keys it
        reads (a Put's key, a Txn's compared keys), read for the whole batch ahead of applying
        it. A future rather than a coroutine: a front-end's write is answered from its
        callback, with no task per request (process/channel.py)."""
        if self._task is None or self._loop is None:
            raise errors.Unavailable("kine-server: shutting down")
        job = _Job(op, self._loop.create_future(), keys)
        self._queue.append(job)
        self._wake.set()
        return job.future

    async def _run(self) -> None:
        while True:
            if not self._queue:  # checked first: a restarted loop may find work, or a stop
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
            while self._queue:
                count = min(len(self._queue), self._max_batch)
                batch = [self._queue.popleft() for _ in range(count)]
                try:
                    await self._commit(batch)
                except asyncio.CancelledError:  # stop() ran out of time
                    self._fail(batch, errors.Unavailable("kine-server: shutting down"))
                    raise
                except BaseException as exc:
                    # A bug here must not leave callers waiting: answer them, then let the
                    # supervisor log it and start the loop again for the rest of the queue.
                    self._fail(batch, errors.Internal.of(exc))
                    raise

    async def _commit(self, batch: list[_Job]) -> None:
        """Apply and commit `batch`. A request that fails on its own account (an error after it
        wrote, a statement the database refused, a bug) gets its own error, and the batch is
        redone without it: one bad request never fails the others, and the common case pays
        for no savepoints. The driver buffers the batch's rows (WriteTx.append); when the
        database refuses one, the batch is redone writing through, so that the refusal comes
        from the request that made it."""
        careful = False
        while batch:
            outcome = await self._attempt(batch, careful)
            if outcome is None:
                return
            if outcome is _Redo.WRITE_THROUGH:
                careful = True
                continue
            batch = [job for job in batch if job is not outcome]

    async def _attempt(self, batch: list[_Job], careful: bool) -> _Job | _Redo | None:
        """One transaction for `batch`; the request to leave out if it failed on its own, or
        WRITE_THROUGH to redo it writing each request's rows at once (`careful`)."""
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        events: list[kv_pb2.Event] = []
        current: _Job | None = None
        began = time.perf_counter()
        try:
            async with self._driver.write() as tx:
                tx.write_through = careful
                counters = await tx.lock()
                applier = Applier(
                    tx, counters.revision, counters.compact_revision, counters.auth_generation
                )
                keys = [key for job in batch for key in job.keys]
                if keys:
                    await applier.prefetch(keys)
                for job in batch:
                    if job.future.cancelled():
                        continue
                    current = job
                    try:
                        result = await job.op(applier)
                    except errors.EtcdError as exc:
                        if applier.changes:
                            raise  # it wrote half: nothing of it may commit
                        outcomes.append((job, None, exc))
                        continue
                    events.extend(applier.take_changes())
                    outcomes.append((job, result, None))
                current = None
                if applier.begin != counters.revision:
                    await tx.set_revision(applier.begin)
        except errors.EtcdError as exc:
            assert current is not None
            self._fail([current], exc)
            return current
        except DriverError as exc:
            if not exc.retryable and not careful:
                # Buffered rows of any request may be what the database refused.
                log.info("a write batch was refused (%s); redoing it request by request", exc)
                return _Redo.WRITE_THROUGH
            if current is not None and not exc.retryable:
                log.warning("write request failed, redoing its batch without it: %s", exc)
                self._fail([current], errors.database(exc))
                return current
            log.warning("write batch of %d requests failed: %s", len(batch), exc)
            if isinstance(exc, DatabaseUnreachable):
                # What queued up meanwhile waited on the same silent database: fail it now,
                # not one more timeout per batch later. Clients retry UNAVAILABLE.
                batch += self._queue
                self._queue.clear()
            self._fail(batch, errors.database(exc))
            return None
        except Exception as exc:
            if current is not None:
                log.exception("write request failed, redoing its batch without it")
                self._fail([current], errors.Internal.of(exc))
                return current
            log.exception("write batch of %d requests failed", len(batch))
            self._fail(batch, errors.Internal.of(exc))
            return None
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
        return None

    @staticmethod
    def _fail(batch: list[_Job], error: errors.EtcdError) -> None:
        for job in batch:
            if not job.future.done():
                job.future.set_exception(error)
