"""SQLite: one embedded file in WAL mode, one writer connection, a pool of readers.

SQLite allows one writing transaction at a time, so the store's single writer owns one connection
and compaction batches use a second one that waits on SQLite's busy handler. Readers get their own
connections so that a long LIST never waits for a write; WAL gives each of them a snapshot.

This module owns what is SQLite's alone: its dialect (DIALECT), what its errors mean
(`driver_error`), the files (private modes, the lock file that keeps a second server off, WAL and
pragmas) and the connections' transactions: BEGIN IMMEDIATE for the writer and the compactor,
a BEGIN that rides with a reader's first query, a ROLLBACK queued without waiting. Where each
statement runs (inline or on a connection's thread) is sqlite_link.py's; the statements and the
transactions' logic are the generic layer's (sql.py, transactions.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import IO, Any, TypeVar

from kine_server.drivers import sql
from kine_server.drivers.base import (
    CompactTx,
    Driver,
    DriverError,
    ReadTx,
    StatementError,
    WriteTx,
)
from kine_server.drivers.dialect import Dialect, column_types
from kine_server.drivers.sqlite_link import (
    Link,
    ThreadConnection,
    WriterConnection,
    WriterLink,
    rollback,
)
from kine_server.drivers.transactions import (
    SchemaTooNew,
    SQLCompact,
    SQLRead,
    SQLWrite,
    create_schema,
)

T = TypeVar("T")

DIALECT = Dialect(
    name="sqlite",
    # julianday('now') is stable within a statement; unixepoch('subsec') needs SQLite 3.42.
    now_ms="CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
    # A JSON array: no limit on the number of ids, unlike one placeholder each.
    id_list="SELECT value FROM json_each(?)",
    encode_ids=json.dumps,
    # SQLite's integers are all 64 bits, and `id INTEGER PRIMARY KEY` is the rowid itself.
    types=column_types(int64="INTEGER"),
    greatest="max",
    # BEGIN IMMEDIATE holds SQLite's one write lock: there are no row locks to take, and taking
    # the writer's lock is only reading the counters.
    for_update="",
    overrides={"lock_counters": sql.COUNTERS},
    partial_indexes=True,
    update_returning=True,  # SQLite 3.35
)

#: Primary result codes that say "not now" rather than "not this statement": the database is
#: busy, locked, out of memory or space, or cannot be read or written.
_RETRYABLE = {
    sqlite3.SQLITE_BUSY,
    sqlite3.SQLITE_LOCKED,
    sqlite3.SQLITE_NOMEM,
    sqlite3.SQLITE_IOERR,
    sqlite3.SQLITE_FULL,
    sqlite3.SQLITE_CANTOPEN,
    sqlite3.SQLITE_PROTOCOL,
    sqlite3.SQLITE_INTERRUPT,
}


def driver_error(exc: BaseException) -> DriverError:
    """A sqlite3 error (or a value sqlite3 cannot bind) as the store sees it."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF in _RETRYABLE:
        return DriverError(str(exc))
    return StatementError(f"{type(exc).__name__}: {exc}")


#: SQLite virtual-machine steps between two looks at a compaction batch's deadline: about 1.5 ms
#: of SQLite's work. Each look takes the GIL, which a busy event loop holds: every 1000 steps
#: made a batch 2.5 times slower, every 100 000 about 1.2 times, measured with a spinning loop.
DEADLINE_STEPS = 100_000


class _Deadline:
    """A compaction batch's deadline, started once it holds the write lock; `passed` is its
    progress handler (a true result aborts the statement in flight, SQLITE_INTERRUPT)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._at = math.inf

    def start(self) -> None:
        self._at = time.monotonic() + self.seconds

    def passed(self) -> bool:
        return time.monotonic() > self._at


def _without_progress_handler(conn: sqlite3.Connection) -> None:
    conn.set_progress_handler(None, 0)


#: What a statement can raise: sqlite3's errors, and OverflowError for an integer past 64 bits.
ERRORS = (sqlite3.Error, OverflowError)


Buffered = Callable[[], list[tuple[str, Sequence[Sequence[Any]]]]]


def _commit(conn: sqlite3.Connection, buffered: list[tuple[str, Sequence[Sequence[Any]]]]) -> None:
    for statement, rows in buffered:
        conn.executemany(statement, rows)
    conn.execute("COMMIT")


@contextlib.asynccontextmanager
async def _transaction(
    link: Link, begin: Awaitable[None], buffered: Buffered | None = None
) -> AsyncIterator[None]:
    """Await `begin`, then COMMIT when the block exits normally; else roll back, also when the
    caller is cancelled (see Link.settle). `buffered`: the statements a write transaction has
    left to run (SQLWrite.take_buffered), run on the thread in the same hop as the COMMIT."""
    committed = False
    try:
        await begin
        yield
        final = buffered() if buffered is not None else []
        await link.call(lambda conn: _commit(conn, final))
        committed = True
    except ERRORS as exc:
        raise driver_error(exc) from exc
    finally:
        if not committed:
            await link.settle()


#: Modes of what the driver creates: the database holds every Secret of a Kubernetes cluster.
PRIVATE_DIRECTORY = 0o700
PRIVATE_FILE = 0o600


def create_private(path: str) -> None:
    """Create the missing directories of `path` 0700 and the database file 0600, whatever the
    umask. SQLite creates its -wal and -shm files with the database file's mode, so they are
    private too. What exists already keeps its mode: the operator chose it."""
    directory = os.path.dirname(os.path.abspath(path))
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            os.mkdir(directory, PRIVATE_DIRECTORY)
            os.chmod(directory, PRIVATE_DIRECTORY)  # mkdir's mode is cut by the umask
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE)
    except FileExistsError:
        return
    os.fchmod(descriptor, PRIVATE_FILE)
    os.close(descriptor)


def permission_hint(exc: PermissionError) -> str:
    """What an operator needs after "permission denied": who owns what and who asked. The
    usual case is a container's volume or a unit's directory that belongs to root while the
    server runs as its own user."""
    denied = exc.filename or ""
    directory = os.path.dirname(denied) or "."
    try:
        info = os.stat(directory)
    except OSError:
        return str(exc)
    return (
        f"permission denied on {denied}: {directory} belongs to uid {info.st_uid}:{info.st_gid} "
        f"(mode {info.st_mode & 0o7777:04o}) and kine-server runs as uid {os.getuid()}:"
        f"{os.getgid()}; make it that user's (chown {os.getuid()}:{os.getgid()} {directory})"
    )


class SQLiteDriver(Driver):
    """A store in one SQLite file, written by exactly one kine-server process.

    `read_only`: the role of a `--workers` front-end process, which reads the file beside the
    writer process that opened it (and holds its lock) and never writes to it.
    """

    name = "sqlite"

    @property
    def location(self) -> str:
        return f"sqlite {self.path}"

    def __init__(
        self,
        path: str,
        readers: int | None = None,
        busy_timeout_ms: int = 30_000,
        read_only: bool = False,
        dialect: Dialect = DIALECT,
    ) -> None:
        self.path = path
        self.read_only = read_only
        self._reader_count = readers or 4
        self._busy_timeout_ms = busy_timeout_ms
        self._lock_file: IO[bytes] | None = None
        self._writer: WriterLink | None = None
        self._compactor: Link | None = None
        #: The compactor's connection does compaction batches, checkpoints and VACUUM, one at a
        #: time: VACUUM cannot run inside a batch's transaction, so Defragment waits for it.
        self._maintenance = asyncio.Lock()
        #: Turns at SQLite's one write lock for this process's writer, compaction batches and
        #: VACUUM, first come first served. SQLite keeps no queue: a writer under steady load
        #: takes the lock again the moment its commit frees it, so a compaction batch waiting
        #: in SQLite's busy handler starved and failed with "database is locked". Other
        #: processes (none may write while this server runs: the lock file) still meet the busy
        #: timeout.
        self._write_turn = asyncio.Lock()
        self._readers: asyncio.Queue[Link] = asyncio.Queue()
        self._all: list[Link] = []
        #: Every statement, rendered once for SQLite (tests pass a dialect without some of its
        #: features, to run the generic layer's fallbacks on a real database).
        self._statements = sql.Statements(dialect)

    async def open(self) -> None:
        try:
            if self.read_only:
                if not os.path.exists(self.path):  # noqa: ASYNC240 - once, at start-up
                    raise OSError(f"no database at {self.path}")
                for n in range(self._reader_count):
                    self._readers.put_nowait(await self._connect(f"reader-{n}", query_only=True))
                return
            self._prepare_files()
            writer = await WriterLink.connect(self.path, "writer", self._busy_timeout_ms)
            self._all.append(writer)
            self._writer = writer
            await writer.execute("PRAGMA journal_mode=WAL")
            await self._create_schema(writer)
            await writer.execute("PRAGMA busy_timeout=0")  # see WriterLink.begin
            self._compactor = await self._connect("compactor")
            for n in range(self._reader_count):
                self._readers.put_nowait(await self._connect(f"reader-{n}", query_only=True))
        except (OSError, SchemaTooNew, *ERRORS) as exc:
            await self.close()
            reason = permission_hint(exc) if isinstance(exc, PermissionError) else str(exc)
            raise DriverError(f"cannot open SQLite database {self.path}: {reason}") from exc

    def _prepare_files(self) -> None:
        """Create the directory and the files private to this user; refuse a second server on
        the file (it would break revision order)."""
        create_private(self.path)
        # Held open for the process's lifetime.
        flags = os.O_CREAT | os.O_WRONLY | os.O_APPEND
        lock = os.fdopen(os.open(self.path + ".lock", flags, PRIVATE_FILE), "ab")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise OSError(f"another kine-server is already using {self.path}") from None
        self._lock_file = lock

    async def _create_schema(self, writer: Link) -> None:
        """The tables, a new store's counters, migrations: in one BEGIN IMMEDIATE, which
        waits (up to the busy timeout) for anyone else writing. sqlite3's own errors go on
        to open(), which says the database cannot be opened."""
        await writer.execute("BEGIN IMMEDIATE")
        try:
            await create_schema(
                ThreadConnection(writer), self._statements, secrets.randbits(63) or 1
            )
        except BaseException:
            await writer.settle()
            raise
        await writer.execute("COMMIT")

    async def _connect(self, name: str, query_only: bool = False) -> Link:
        link = await Link.connect(self.path, name, self._busy_timeout_ms, query_only)
        self._all.append(link)
        return link

    async def close(self) -> None:
        self._writer = self._compactor = None
        for link in self._all:
            with contextlib.suppress(Exception):
                await link.close()
        self._all.clear()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[ReadTx]:
        link = await self._readers.get()
        try:
            yield SQLRead(ThreadConnection(link, begin="BEGIN", inline=True), self._statements)
        except ERRORS as exc:
            raise driver_error(exc) from exc
        finally:
            # A snapshot has nothing to commit. The ROLLBACK runs at once if nothing is queued
            # on the link's thread; otherwise it is queued, not awaited: the thread runs it
            # before anything the next user of the link queues, and it also ends a BEGIN that
            # a cancelled caller had queued.
            if link.idle:
                rollback(link.conn)
            else:
                link.submit(rollback)
            self._readers.put_nowait(link)

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[WriteTx]:
        link = self._writer
        assert link is not None, "driver not open"
        tx = SQLWrite(WriterConnection(link), self._statements)
        async with self._write_turn, _transaction(link, link.begin(), tx.take_buffered):
            yield tx

    @contextlib.asynccontextmanager
    async def compact(self, timeout: float) -> AsyncIterator[CompactTx]:
        """One compaction batch within `timeout` (--compact-timeout) twice over: waiting for
        SQLite's one write lock gives up after it (the busy timeout; this process's writer
        takes turns with it, see _write_turn), and once the batch holds
        the lock, a progress handler aborts the statement in flight when it runs past it, so
        writers never wait on a batch for much longer. Only the batch's own statements are cut
        short: the handler is set after its BEGIN and removed before its end (sqlite3_interrupt
        is no help: one that lands between statements can fail the next, unrelated one)."""
        link = self._compactor
        assert link is not None, "driver not open"
        wait_ms = max(1, int(timeout * 1000))
        deadline = _Deadline(timeout)

        def begin(conn: sqlite3.Connection) -> None:
            conn.execute(f"PRAGMA busy_timeout={wait_ms}")
            conn.execute("BEGIN IMMEDIATE")
            deadline.start()
            conn.set_progress_handler(deadline.passed, DEADLINE_STEPS)

        async with self._maintenance, self._write_turn:
            try:
                async with _transaction(link, link.call(begin)):
                    yield SQLCompact(ThreadConnection(link), self._statements)
                    # Done in time: the COMMIT is not cut short.
                    await link.call(_without_progress_handler)
            except DriverError as exc:
                if deadline.passed():
                    raise DriverError(
                        f"compaction batch ran past --compact-timeout ({timeout:g}s): {exc}"
                    ) from exc
                raise
            finally:
                # Queued after the rollback of a batch that failed: checkpoints and VACUUM on
                # this connection must never meet a passed deadline.
                link.submit(_without_progress_handler)

    async def defragment(self) -> None:
        """VACUUM, then give the WAL file back. VACUUM holds the write lock while it runs (as
        etcd's defrag holds every write); the WAL truncation waits at most a second for readers
        of an older snapshot and otherwise leaves the file to be reused."""
        link = self._compactor
        assert link is not None, "driver not open"

        def vacuum(conn: sqlite3.Connection) -> None:
            link.wait_for_lock(conn, "VACUUM", self._busy_timeout_ms)
            conn.execute("PRAGMA busy_timeout=1000")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

        try:
            async with self._maintenance, self._write_turn:
                await link.call(vacuum)
        except ERRORS as exc:
            raise driver_error(exc) from exc

    async def checkpoint(self) -> None:
        """Copy what compaction changed from the WAL into the database file, so the WAL's pages
        can be reused. PASSIVE: it never waits, so it never holds up a writer; TRUNCATE waits
        for every reader of an older snapshot while blocking writers (a Put took 5.2 s)."""
        link = self._compactor
        assert link is not None, "driver not open"
        try:
            async with self._maintenance:
                await link.call(
                    lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                )
        except ERRORS as exc:
            raise driver_error(exc) from exc

    async def _on_reader(self, step: Callable[[sqlite3.Connection], T]) -> T:
        """`step` on a reader's thread, in one hop."""
        link = await self._readers.get()
        try:
            return await link.call(step)
        except ERRORS as exc:
            raise driver_error(exc) from exc
        finally:
            self._readers.put_nowait(link)

    async def meta(self, name: str) -> int | None:
        query = self._statements.meta
        rows = await self._on_reader(lambda conn: conn.execute(query, (name,)).fetchall())
        return int(rows[0][0]) if rows else None

    async def size(self) -> tuple[int, int]:
        def pragmas(conn: sqlite3.Connection) -> tuple[int, int, int]:
            conn.execute("BEGIN")  # the counts of one snapshot
            try:
                ((page_size,),) = conn.execute("PRAGMA page_size").fetchall()
                ((pages,),) = conn.execute("PRAGMA page_count").fetchall()
                ((free,),) = conn.execute("PRAGMA freelist_count").fetchall()
            finally:
                rollback(conn)
            return page_size, pages, free

        page_size, pages, free = await self._on_reader(pragmas)
        return pages * page_size, (pages - free) * page_size
