"""Where each SQLite statement runs: a connection's own thread, or inline on the event loop.

Each sqlite3 connection has one thread of its own (a `Link`), and the event loop hands it whole
steps rather than single calls: a hop to a thread and back costs 50-200 microseconds, more than
most statements. So the writer's statements run inline on the event loop (inside a transaction
that holds the write lock each is a few microseconds on cached pages; profiled, 14 of 16 ms per
group-commit batch had gone to per-statement hops) and only the steps that can wait go to its
thread: BEGIN IMMEDIATE when the lock is taken, and COMMIT with its fsync. A reader's BEGIN rides
with its first query, its ROLLBACK is queued without waiting, and a LIST's count runs on the
reader's thread while the loop builds the page (`fetch_soon`).

The writer's statements that can touch many rows go to its thread too: a read of a key range (a
DeleteRange's rows, a Txn's Range), a lease's keys, the set-based delete of a range or of a
lease's keys (`execute_all(bulk=True)`), and a batch of more than `INLINE_ROWS` rows.
sqlite3 releases the GIL while SQLite works, so the loop keeps serving other clients; inline, a
50 000-key DeleteRange held it for seconds. Single-key statements, the hot path, stay inline.

`ThreadConnection` and `WriterConnection` are the two ways of running statements, as the generic
transactions (transactions.Connection) ask for them; the links are the connections and threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Self, TypeVar

from kine_server.drivers.sql import Batch

T = TypeVar("T")
Record = Sequence[Any]

#: The most rows the writer binds inline: more go to its thread (see the module docstring).
#: One key's Put or delete is one or two rows; 1000 rows take about 10 ms of SQLite's work.
INLINE_ROWS = 32


def rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):  # "no transaction is active" is fine
        conn.execute("ROLLBACK")


#: How long one step of waiting for another process's lock lasts (see Link.wait_for_lock).
LOCK_STEP_MS = 100

#: What a Worker's queue holds: a function, the future its outcome goes to and what to call on
#: the loop once it has run, or None (stop).
_Item = tuple[Callable[[], Any], asyncio.Future[Any], Callable[[], None] | None] | None


class Worker:
    """One thread that runs functions in the order they are queued, each outcome handed to an
    asyncio future on the loop that queued it.

    A hop through `loop.run_in_executor` and a ThreadPoolExecutor costs about twice the CPU of
    this (its concurrent future, work item and thread-count bookkeeping, then a second future
    chained onto the loop's): measured here 72 against 40 microseconds a hop, and a point Range
    makes two hops, a group commit one."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._loop = loop
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, fn: Callable[[], T], ran: Callable[[], None] | None = None
    ) -> asyncio.Future[T]:
        """Queue `fn`; its outcome goes to the future returned. `ran` is called on the loop once
        `fn` has run, also when the future was cancelled meanwhile (it still runs)."""
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put((fn, future, ran))
        return future

    def shutdown(self) -> None:
        """Stop once what is queued has run (without waiting for it)."""
        self._queue.put(None)

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, future, ran = item
            try:
                outcome, failed = fn(), False
            except BaseException as exc:
                outcome, failed = exc, True
            try:
                self._loop.call_soon_threadsafe(_settle, future, outcome, failed, ran)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return


def _settle(
    future: asyncio.Future[Any], outcome: Any, failed: bool, ran: Callable[[], None] | None
) -> None:
    if ran is not None:
        ran()
    if future.cancelled():
        return
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class Link:
    """One sqlite3 connection and the one thread that runs its blocking steps, in order."""

    def __init__(self, conn: sqlite3.Connection, thread: Worker, busy_timeout_ms: int) -> None:
        self.conn = conn
        self._thread = thread
        self.busy_timeout_ms = busy_timeout_ms
        #: Steps queued on the thread and not yet done: while any is, a statement run inline
        #: could overtake it (the connection's statements must run in the order they are given).
        self._queued = 0
        #: Set by close(): a statement waiting for another connection's lock gives up (see
        #: wait_for_lock), so that stopping is not held up for the whole busy timeout.
        self.closing = False

    def wait_for_lock(
        self,
        conn: sqlite3.Connection,
        statement: str,
        timeout_ms: int,
        abandoned: threading.Event | None = None,
    ) -> None:
        """On the thread: run `statement`, waiting up to `timeout_ms` while another process
        holds the lock it needs. The wait is SQLite's busy handler in steps of LOCK_STEP_MS,
        so that close(), or the caller setting `abandoned` (it was cancelled), ends it: one
        busy timeout of 30 s held a SIGTERM for 30 s whatever the grace, and the link's
        thread, behind it, could not even roll back. Leaves the busy timeout at the step."""
        deadline = time.monotonic() + timeout_ms / 1000
        conn.execute(f"PRAGMA busy_timeout={min(LOCK_STEP_MS, timeout_ms)}")
        while True:
            try:
                conn.execute(statement)
                return
            except sqlite3.OperationalError as exc:
                busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
                given_up = self.closing or (abandoned is not None and abandoned.is_set())
                if not busy or given_up or time.monotonic() >= deadline:
                    raise

    @classmethod
    async def connect(
        cls, path: str, name: str, busy_timeout_ms: int, query_only: bool = False
    ) -> Self:
        thread = Worker(asyncio.get_running_loop(), f"kine-sqlite-{name}")

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
            # FULL: an acknowledged write is on disk before the client hears of it.
            conn.execute("PRAGMA synchronous=FULL")
            if query_only:
                conn.execute("PRAGMA query_only=ON")
            return conn

        try:
            conn = await thread.submit(connect)
        except BaseException:
            thread.shutdown()
            raise
        return cls(conn, thread, busy_timeout_ms)

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue `fn` on the thread now; its result when awaited. It counts as queued until
        the thread has run it, not until its future is done: a caller cancelled while it waits
        leaves the step queued or running, and a statement run inline meanwhile would overtake
        it on the same connection (a reader's ROLLBACK before its own queued BEGIN, leaving a
        transaction open on the link)."""
        conn = self.conn
        self._queued += 1
        return self._thread.submit(lambda: fn(conn), self._ran)

    def _ran(self) -> None:
        self._queued -= 1

    @property
    def idle(self) -> bool:
        """Nothing is queued on the thread: a statement may run inline, in its turn."""
        return self._queued == 0

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self.submit(fn)

    async def execute(self, statement: str) -> None:
        await self.call(lambda conn: conn.execute(statement).fetchall())

    async def settle(self) -> None:
        """Roll back whatever is open, even while the caller is being cancelled: the thread runs
        its queue in order, so this runs after a BEGIN the cancelled caller had queued."""
        await asyncio.shield(self.submit(rollback))

    async def close(self) -> None:
        self.closing = True
        try:
            await self.call(lambda conn: conn.close())
        finally:
            self._thread.shutdown()


class WriterLink(Link):
    """The writer's link: busy timeout 0, so that BEGIN IMMEDIATE can be tried inline."""

    async def begin(self) -> None:
        """BEGIN IMMEDIATE inline when SQLite's write lock is free, as it is unless a compaction
        batch holds it; then on the thread, waiting up to the busy timeout."""
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY:
                raise

        abandoned = threading.Event()

        def waiting(conn: sqlite3.Connection) -> None:
            try:
                self.wait_for_lock(conn, "BEGIN IMMEDIATE", self.busy_timeout_ms, abandoned)
            finally:
                conn.execute("PRAGMA busy_timeout=0")

        try:
            await self.call(waiting)
        except asyncio.CancelledError:
            abandoned.set()  # the batch was given up (a stop's deadline): so is the wait
            raise


def _run_all(conn: sqlite3.Connection, statements: Batch) -> None:
    for query, params in statements:
        conn.execute(query, params)


class ThreadConnection:
    """A reader's (or the compactor's) transaction: statements one hop to the link's thread, the
    first carrying the transaction's BEGIN (cleared once sent).

    `inline`: a reader's statements that return a few rows (a counters read, one key's Range)
    run on the event loop instead, when nothing of the link's is queued on its thread: on
    cached pages such a statement takes microseconds, a hop to the thread and back tens of
    them, and a point Range made two hops. What may read many rows (a range, a count) still
    goes to the thread, so that a large LIST never holds the loop."""

    def __init__(self, link: Link, begin: str = "", inline: bool = False) -> None:
        self._link = link
        self._begin = begin
        self._inline = inline

    def _step(self, fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
        """`fn`, preceded by the transaction's BEGIN if no statement has sent it yet."""
        begin, self._begin = self._begin, ""
        if not begin:
            return fn

        def step(conn: sqlite3.Connection) -> T:
            conn.execute(begin)
            return fn(conn)

        return step

    async def fetch(self, query: str, params: Sequence[Any]) -> list[Record]:
        if self._inline and self._link.idle:
            return self._step(lambda conn: conn.execute(query, params).fetchall())(self._link.conn)
        return await self.fetch_soon(query, params)

    async def fetch_rows(
        self, query: str, params: Sequence[Any], convert: Callable[[Record], T]
    ) -> list[T]:
        def rows(conn: sqlite3.Connection) -> list[T]:  # converted on the thread too
            return [convert(r) for r in conn.execute(query, params).fetchall()]

        return await self._link.call(self._step(rows))

    def fetch_soon(self, query: str, params: Sequence[Any]) -> asyncio.Future[list[Record]]:
        return self._link.submit(self._step(lambda conn: conn.execute(query, params).fetchall()))

    async def execute(self, query: str, params: Sequence[Any]) -> int:
        return await self._link.call(self._step(lambda conn: conn.execute(query, params).rowcount))

    async def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._link.call(self._step(lambda conn: conn.executemany(query, rows)))

    async def execute_all(self, statements: Batch, bulk: bool) -> None:
        await self._link.call(self._step(lambda conn: _run_all(conn, statements)))


class WriterConnection:
    """The writer's transaction (BEGIN IMMEDIATE holds SQLite's write lock): small statements
    inline on the event loop, those that may touch many rows on the link's thread."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._conn = link.conn

    async def fetch(self, query: str, params: Sequence[Any]) -> list[Record]:
        return self._conn.execute(query, params).fetchall()

    async def fetch_rows(
        self, query: str, params: Sequence[Any], convert: Callable[[Record], T]
    ) -> list[T]:
        def rows(conn: sqlite3.Connection) -> list[T]:
            return [convert(r) for r in conn.execute(query, params).fetchall()]

        return await self._link.call(rows)

    def fetch_soon(self, query: str, params: Sequence[Any]) -> Awaitable[list[Record]]:
        return self.fetch(query, params)  # inline: nothing runs beside the caller

    async def execute(self, query: str, params: Sequence[Any]) -> int:
        return self._conn.execute(query, params).rowcount

    async def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        if len(rows) <= INLINE_ROWS:
            self._conn.executemany(query, rows)
        else:
            await self._link.call(lambda conn: conn.executemany(query, rows))

    async def execute_all(self, statements: Batch, bulk: bool) -> None:
        if bulk:
            await self._link.call(lambda conn: _run_all(conn, statements))
        else:
            _run_all(self._conn, statements)
