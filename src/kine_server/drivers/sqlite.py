"""SQLite driver: one embedded file in WAL mode, one writer connection, a pool of readers.

SQLite allows one writing transaction at a time, so the store's single writer owns one connection
and compaction batches use a second one that waits on SQLite's busy handler. Readers get their own
connections so that a long LIST never waits for a write; WAL gives each of them a snapshot.

Each connection has one thread of its own (a `_Link`), and the event loop hands it whole steps
rather than single calls: a hop to a thread and back costs 50-200 microseconds, more than most
statements. So the writer's statements run inline on the event loop (inside a transaction that
holds the write lock each is a few microseconds on cached pages; profiled, 14 of 16 ms per
group-commit batch had gone to per-statement hops) and only the steps that can wait go to its
thread: BEGIN IMMEDIATE when the lock is taken, and COMMIT with its fsync. A reader's BEGIN rides
with its first query, its ROLLBACK is queued without waiting, and a LIST's count runs on the
reader's thread while the loop builds the page.

The writer's statements that can touch many rows go to its thread too: a read of a key range (a
DeleteRange's rows, a Txn's Range), a lease's keys, the set-based delete of a range or of a
lease's keys, and a batch of more than `_INLINE_ROWS` rows.
sqlite3 releases the GIL while SQLite works, so the loop keeps serving other clients; inline, a
50 000-key DeleteRange held it for seconds. Single-key statements, the hot path, stay inline.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, Self, TypeVar

from kine_server.drivers import sql
from kine_server.drivers.base import (
    SCHEMA_VERSION,
    Change,
    ChangeRow,
    CompactTx,
    Counters,
    Driver,
    DriverError,
    RawRow,
    ReadTx,
    Row,
    StatementError,
    WriteTx,
    change,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS kine_meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kine_kv (
    key BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    version INTEGER NOT NULL,
    value BLOB NOT NULL,
    lease INTEGER NOT NULL,
    sub INTEGER NOT NULL,
    next_revision INTEGER
);
CREATE TABLE IF NOT EXISTS kine_lease (
    id INTEGER PRIMARY KEY,
    ttl INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS kine_lease_expiry ON kine_lease (expires_at);
CREATE TABLE IF NOT EXISTS kine_alarm (
    member_id INTEGER NOT NULL,
    alarm INTEGER NOT NULL,
    PRIMARY KEY (member_id, alarm)
);
CREATE TABLE IF NOT EXISTS kine_auth (
    kind TEXT NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE INDEX IF NOT EXISTS kine_kv_lease ON kine_kv (lease)
    WHERE next_revision IS NULL AND version > 0;
CREATE UNIQUE INDEX IF NOT EXISTS kine_kv_key_rev_sub ON kine_kv (key, mod_revision, sub);
-- Reads at a past revision (every page of a paginated LIST after the first) test next_revision
-- and version of every row of the range: in the index, not by a lookup of each row.
CREATE INDEX IF NOT EXISTS kine_kv_key_state ON kine_kv (key, mod_revision, next_revision, version);
CREATE UNIQUE INDEX IF NOT EXISTS kine_kv_rev_sub ON kine_kv (mod_revision, sub);
CREATE INDEX IF NOT EXISTS kine_kv_live ON kine_kv (key)
    WHERE next_revision IS NULL AND version > 0;
CREATE INDEX IF NOT EXISTS kine_kv_next ON kine_kv (next_revision)
    WHERE next_revision IS NOT NULL;
"""


def _create_schema(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        seed, rows = sql.seed_meta(secrets.randbits(63) or 1)
        conn.executemany(seed, rows)
        found = conn.execute(sql.META, ("schema_version",)).fetchall()
        if found[0][0] > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"schema version {found[0][0]} is newer than this kine-server ({SCHEMA_VERSION})"
            )
        if found[0][0] < 2:
            for statement in sql.MIGRATE_1_TO_2:
                conn.execute(statement)
        if found[0][0] < 3:
            for statement in sql.MIGRATE_2_TO_3:
                conn.execute(statement)
        if found[0][0] < 4:
            for statement in sql.MIGRATE_3_TO_4:
                conn.execute(statement)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


#: julianday('now') is stable within a statement; unixepoch('subsec') needs SQLite 3.42.
DIALECT = sql.Dialect(
    greatest="max",
    now_ms="CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
    # A JSON array: no limit on the number of ids, unlike one placeholder each.
    id_list="SELECT value FROM json_each(?)",
    numbered=False,
)
ADVANCE_COMPACT_REVISION = DIALECT(sql.ADVANCE_COMPACT_REVISION)
_LEASE = DIALECT(sql.LEASE)
_EXPIRED_LEASES = DIALECT(sql.EXPIRED_LEASES)
_INSERT_LEASE = DIALECT(sql.INSERT_LEASE)
_RENEW_LEASES = DIALECT(sql.RENEW_LEASES)
_DELETE_EXPIRED_LEASE = DIALECT(sql.DELETE_EXPIRED_LEASE)
_RESUME_LEASES = DIALECT(sql.RESUME_LEASES)
_LEASES_SERVED_UNTIL = DIALECT(sql.LEASES_SERVED_UNTIL)

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


#: What a statement can raise: sqlite3's errors, and OverflowError for an integer past 64 bits.
ERRORS = (sqlite3.Error, OverflowError)


def _row(record: Sequence[Any]) -> Row:
    key, create, mod, version, value, lease = record
    return Row(key, create, mod, version, value if value is not None else b"", lease)


T = TypeVar("T")

#: The most rows the writer binds inline: more go to its thread (see the module docstring).
#: One key's Put or delete is one or two rows; 1000 rows take about 10 ms of SQLite's work.
_INLINE_ROWS = 32


def _run_all(conn: sqlite3.Connection, statements: list[tuple[str, list[Any]]]) -> None:
    for query, params in statements:
        conn.execute(query, params)


def _rows(conn: sqlite3.Connection, query: str, params: Sequence[Any]) -> list[Row]:
    return [_row(r) for r in conn.execute(query, params).fetchall()]


class _Queries(ReadTx):
    """The statements of every transaction kind, over three primitives a connection provides."""

    async def _all(self, query: str, params: Sequence[Any]) -> list[Any]:
        raise NotImplementedError

    async def _run(self, query: str, params: Sequence[Any]) -> int:
        """Execute one statement; the number of rows it changed."""
        raise NotImplementedError

    async def _many(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    async def _rows(self, query: str, params: Sequence[Any]) -> list[Row]:
        """The rows of a query that may return many (a key range, a lease's keys)."""
        raise NotImplementedError

    async def _changes(self, query: str, params: Sequence[Any]) -> list[Change]:
        """History (only readers read it): converted on the reader's thread, as `_rows`."""
        return [change(tuple(r)) for r in await self._all(query, params)]

    async def counters(self) -> Counters:
        values = dict(await self._all(sql.COUNTERS, ()))
        return Counters(values["revision"], values["compact_revision"], values["compacted_through"])

    async def range(
        self, key: bytes, end: bytes | None, at: int | None, limit: int, with_values: bool = True
    ) -> list[Row]:
        query, params = sql.range_query(key, end, at, limit, with_values)
        if end is None:
            return [_row(r) for r in await self._all(query, params)]
        return await self._rows(query, params)

    async def count(self, key: bytes, end: bytes | None, at: int | None) -> int:
        query, params = sql.count_query(key, end, at)
        rows = await self._all(query, params)
        return int(rows[0][0])

    async def changes(
        self, after: int, through: int, key: bytes, end: bytes | None, limit: int
    ) -> list[Change]:
        query, params = sql.changes_query(after, through, key, end, limit)
        return await self._changes(query, params)

    async def lease(self, lease_id: int) -> tuple[int, int] | None:
        rows = await self._all(_LEASE, (lease_id,))
        return (rows[0][0], rows[0][1]) if rows else None

    async def leases(self) -> list[int]:
        return [r[0] for r in await self._all(sql.LEASES, ())]

    async def any_lease(self) -> bool:
        return bool((await self._all(sql.ANY_LEASE, ()))[0][0])

    async def expired_leases(self, limit: int) -> list[int]:
        return [r[0] for r in await self._all(_EXPIRED_LEASES, (limit,))]

    async def dump(self, after: tuple[int, int], limit: int) -> list[RawRow]:
        rows = await self._all(sql.DUMP, (after[0], after[0], after[1], limit))
        return [RawRow(*r) for r in rows]

    async def all_leases(self) -> list[tuple[int, int, int]]:
        return [(r[0], r[1], r[2]) for r in await self._all(sql.ALL_LEASES, ())]

    async def all_meta(self) -> dict[str, int]:
        return {r[0]: r[1] for r in await self._all(sql.ALL_META, ())}

    async def alarms(self) -> list[tuple[int, int]]:
        return [(sql.member_of(r[0]), r[1]) for r in await self._all(sql.ALARMS, ())]

    async def auth_records(self) -> list[tuple[str, bytes, bytes]]:
        return [(r[0], bytes(r[1]), bytes(r[2])) for r in await self._all(sql.AUTH_RECORDS, ())]

    async def leased(self, lease_id: int) -> list[Row]:
        return await self._rows(sql.LEASED, (lease_id,))


class _Read(_Queries):
    """A snapshot on a reader's (or the compactor's) connection, one thread hop per statement."""

    def __init__(self, link: _Link, begin: str = "") -> None:
        self._link = link
        #: Sent with the first statement (see the module docstring), then cleared.
        self._begin = begin

    def _step(self, fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
        """`fn`, preceded by the transaction's BEGIN if no statement has sent it yet."""
        begin, self._begin = self._begin, ""
        if not begin:
            return fn

        def step(conn: sqlite3.Connection) -> T:
            conn.execute(begin)
            return fn(conn)

        return step

    async def _all(self, query: str, params: Sequence[Any]) -> list[Any]:
        return await self._link.call(
            self._step(lambda conn: conn.execute(query, params).fetchall())
        )

    async def _run(self, query: str, params: Sequence[Any]) -> int:
        return await self._link.call(self._step(lambda conn: conn.execute(query, params).rowcount))

    async def _many(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._link.call(self._step(lambda conn: conn.executemany(query, rows)))

    async def _rows(self, query: str, params: Sequence[Any]) -> list[Row]:
        return await self._link.call(self._step(lambda conn: _rows(conn, query, params)))

    async def _changes(self, query: str, params: Sequence[Any]) -> list[Change]:
        def fetch(conn: sqlite3.Connection) -> list[Change]:
            return [change(tuple(r)) for r in conn.execute(query, params).fetchall()]

        return await self._link.call(self._step(fetch))

    def count_soon(self, key: bytes, end: bytes | None, at: int | None) -> Awaitable[int]:
        query, params = sql.count_query(key, end, at)
        rows = self._link.submit(self._step(lambda conn: conn.execute(query, params).fetchall()))
        return _first_int(rows)


async def _first_int(rows: Awaitable[list[Any]]) -> int:
    return int((await rows)[0][0])


class _Write(_Queries, WriteTx):
    """The writer's transaction: small statements run inline, those that can touch many rows on
    the connection's thread (see the module docstring)."""

    def __init__(self, link: _Link) -> None:
        self._link = link
        self._conn = link.conn

    async def _all(self, query: str, params: Sequence[Any]) -> list[Any]:
        return self._conn.execute(query, params).fetchall()

    async def _run(self, query: str, params: Sequence[Any]) -> int:
        return self._conn.execute(query, params).rowcount

    async def _many(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        if len(rows) <= _INLINE_ROWS:
            self._conn.executemany(query, rows)
        else:
            await self._link.call(lambda conn: conn.executemany(query, rows))

    async def _rows(self, query: str, params: Sequence[Any]) -> list[Row]:
        return await self._link.call(lambda conn: _rows(conn, query, params))

    async def lock(self) -> Counters:
        # BEGIN IMMEDIATE in Driver.write() already holds SQLite's single write lock.
        return await self.counters()

    async def newest(self, key: bytes) -> Row | None:
        rows = await self._all(sql.NEWEST, (key,))
        return _row(rows[0]) if rows else None

    async def append(self, rows: list[ChangeRow], superseded: list[tuple[bytes, int]]) -> None:
        if superseded:
            revision = rows[0].mod_revision
            await self._many(sql.SUPERSEDE, [(revision, k, r) for k, r in superseded])
        await self._many(sql.INSERT, rows)

    async def delete_range(
        self, key: bytes, end: bytes | None, revision: int, first_sub: int
    ) -> None:
        statements = sql.delete_range(key, end, revision, first_sub)
        if end is None:  # one key: inline, as a Put
            for query, params in statements:
                self._conn.execute(query, params)
        else:
            await self._link.call(lambda conn: _run_all(conn, statements))

    async def delete_leased(self, lease_id: int, revision: int, first_sub: int) -> None:
        statements = sql.delete_leased(lease_id, revision, first_sub)
        await self._link.call(lambda conn: _run_all(conn, statements))

    async def insert_raw(self, rows: list[RawRow]) -> None:
        await self._many(sql.INSERT_RAW, rows)

    async def link_history(self) -> None:
        await self._run(sql.LINK_HISTORY, ())

    async def insert_lease(self, lease_id: int, ttl: int) -> bool:
        return await self._run(_INSERT_LEASE, (lease_id, ttl, ttl)) == 1

    async def renew_leases(self, lease_ids: Collection[int]) -> dict[int, int]:
        rows = await self._all(_RENEW_LEASES, (json.dumps(list(lease_ids)),))
        return {int(lease_id): int(ttl) for lease_id, ttl in rows}

    async def delete_lease(self, lease_id: int, expired_only: bool) -> bool:
        statement = _DELETE_EXPIRED_LEASE if expired_only else sql.DELETE_LEASE
        return await self._run(statement, (lease_id,)) == 1

    async def resume_leases(self, promise_ms: int) -> None:
        await self._run(_RESUME_LEASES, ())
        await self.serve_leases(promise_ms)

    async def serve_leases(self, promise_ms: int) -> None:
        await self._run(_LEASES_SERVED_UNTIL, (promise_ms,))

    async def set_revision(self, revision: int) -> None:
        await self._run(sql.SET_META, (revision, "revision"))

    async def set_meta(self, name: str, value: int) -> None:
        await self._run(sql.SET_META, (value, name))

    async def raise_alarm(self, member_id: int, alarm: int) -> bool:
        return await self._run(sql.RAISE_ALARM, (sql.stored_member(member_id), alarm)) == 1

    async def clear_alarm(self, member_id: int, alarm: int) -> bool:
        return await self._run(sql.CLEAR_ALARM, (sql.stored_member(member_id), alarm)) == 1

    async def put_auth_record(self, kind: str, name: bytes, value: bytes) -> None:
        await self._run(sql.PUT_AUTH_RECORD, (kind, name, value))

    async def delete_auth_record(self, kind: str, name: bytes) -> None:
        await self._run(sql.DELETE_AUTH_RECORD, (kind, name))

    async def lock_compact_revision(self) -> int:
        # BEGIN IMMEDIATE already holds the write lock; nothing else can change it.
        return int((await self._all(sql.LOCK_COMPACT_REVISION, ()))[0][0])

    async def advance_compact_revision(self, revision: int) -> None:
        await self._run(ADVANCE_COMPACT_REVISION, (revision,))


class _Compact(_Read, CompactTx):
    async def delete_history(self, after: int, through: int) -> int:
        superseded = await self._run(sql.DELETE_SUPERSEDED, (after, through))
        tombstones = await self._run(sql.DELETE_TOMBSTONES, (after, through))
        return superseded + tombstones

    async def claim(self, expected: int, through: int) -> bool:
        return await self._run(sql.CLAIM_COMPACTED, (through, expected)) == 1

    async def advance_compact_revision(self, revision: int) -> None:
        await self._run(ADVANCE_COMPACT_REVISION, (revision,))


def _rollback(conn: sqlite3.Connection) -> None:
    with contextlib.suppress(sqlite3.Error):  # "no transaction is active" is fine
        conn.execute("ROLLBACK")


#: How long one step of waiting for another process's lock lasts (see _Link.wait_for_lock).
LOCK_STEP_MS = 100


class _Link:
    """One sqlite3 connection and the one thread that runs its blocking steps, in order."""

    def __init__(
        self, conn: sqlite3.Connection, thread: ThreadPoolExecutor, busy_timeout_ms: int
    ) -> None:
        self.conn = conn
        self._thread = thread
        self.busy_timeout_ms = busy_timeout_ms
        #: Looked up once: asyncio.get_running_loop() makes a getpid() system call on 3.11.
        self._loop = asyncio.get_running_loop()
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
        thread = ThreadPoolExecutor(1, thread_name_prefix=f"kine-sqlite-{name}")

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
            # FULL: an acknowledged write is on disk before the client hears of it.
            conn.execute("PRAGMA synchronous=FULL")
            if query_only:
                conn.execute("PRAGMA query_only=ON")
            return conn

        try:
            conn = await asyncio.get_running_loop().run_in_executor(thread, connect)
        except BaseException:
            thread.shutdown(wait=False)
            raise
        return cls(conn, thread, busy_timeout_ms)

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue `fn` on the thread now; its result when awaited."""
        return self._loop.run_in_executor(self._thread, fn, self.conn)

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self.submit(fn)

    async def execute(self, statement: str) -> None:
        await self.call(lambda conn: conn.execute(statement).fetchall())

    async def settle(self) -> None:
        """Roll back whatever is open, even while the caller is being cancelled: the thread runs
        its queue in order, so this runs after a BEGIN the cancelled caller had queued."""
        await asyncio.shield(self.submit(_rollback))

    async def close(self) -> None:
        self.closing = True
        try:
            await self.call(lambda conn: conn.close())
        finally:
            self._thread.shutdown(wait=False)


class _WriterLink(_Link):
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


@contextlib.asynccontextmanager
async def _transaction(link: _Link, begin: Awaitable[None]) -> AsyncIterator[None]:
    """Await `begin`, then COMMIT when the block exits normally; else roll back, also when the
    caller is cancelled (see _Link.settle)."""
    committed = False
    try:
        await begin
        yield
        await link.execute("COMMIT")
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
    ) -> None:
        self.path = path
        self.read_only = read_only
        self._reader_count = readers or 4
        self._busy_timeout_ms = busy_timeout_ms
        self._lock_file: IO[bytes] | None = None
        self._writer: _WriterLink | None = None
        self._compactor: _Link | None = None
        #: The compactor's connection does compaction batches, checkpoints and VACUUM, one at a
        #: time: VACUUM cannot run inside a batch's transaction, so Defragment waits for it.
        self._maintenance = asyncio.Lock()
        self._readers: asyncio.Queue[_Link] = asyncio.Queue()
        self._all: list[_Link] = []

    async def open(self) -> None:
        try:
            if self.read_only:
                if not os.path.exists(self.path):  # noqa: ASYNC240 - once, at start-up
                    raise OSError(f"no database at {self.path}")
                for n in range(self._reader_count):
                    self._readers.put_nowait(await self._connect(f"reader-{n}", query_only=True))
                return
            self._prepare_files()
            writer = await _WriterLink.connect(self.path, "writer", self._busy_timeout_ms)
            self._all.append(writer)
            self._writer = writer
            await writer.execute("PRAGMA journal_mode=WAL")
            await writer.call(_create_schema)
            await writer.execute("PRAGMA busy_timeout=0")  # see _WriterLink.begin
            self._compactor = await self._connect("compactor")
            for n in range(self._reader_count):
                self._readers.put_nowait(await self._connect(f"reader-{n}", query_only=True))
        except (OSError, *ERRORS) as exc:
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

    async def _connect(self, name: str, query_only: bool = False) -> _Link:
        link = await _Link.connect(self.path, name, self._busy_timeout_ms, query_only)
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
            yield _Read(link, begin="BEGIN")
        except ERRORS as exc:
            raise driver_error(exc) from exc
        finally:
            # A snapshot has nothing to commit. The ROLLBACK is queued, not awaited: the thread
            # runs it before anything the next user of the link queues, and it also ends a BEGIN
            # that a cancelled caller had queued.
            link.submit(_rollback)
            self._readers.put_nowait(link)

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[WriteTx]:
        link = self._writer
        assert link is not None, "driver not open"
        async with _transaction(link, link.begin()):
            yield _Write(link)

    @contextlib.asynccontextmanager
    async def compact(self, timeout: float) -> AsyncIterator[CompactTx]:
        link = self._compactor
        assert link is not None, "driver not open"
        # Waiting for SQLite's one write lock gives up at the deadline; once the batch holds it,
        # the batch size bounds its work. (sqlite3_interrupt is no help here: an interrupt that
        # lands between statements fails the connection's next, unrelated statement.)
        wait_ms = max(1, int(timeout * 1000))

        def begin(conn: sqlite3.Connection) -> None:
            conn.execute(f"PRAGMA busy_timeout={wait_ms}")
            conn.execute("BEGIN IMMEDIATE")

        async with self._maintenance, _transaction(link, link.call(begin)):
            yield _Compact(link)

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
            async with self._maintenance:
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

    async def meta(self, name: str) -> int | None:
        async with self.read() as tx:
            assert isinstance(tx, _Read)
            rows = await tx._all(sql.META, (name,))
        return int(rows[0][0]) if rows else None

    async def size(self) -> tuple[int, int]:
        async with self.read() as tx:
            assert isinstance(tx, _Read)
            ((page_size,),) = await tx._all("PRAGMA page_size", ())
            ((pages,),) = await tx._all("PRAGMA page_count", ())
            ((free,),) = await tx._all("PRAGMA freelist_count", ())
        return pages * page_size, (pages - free) * page_size
