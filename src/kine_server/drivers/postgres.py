"""PostgreSQL driver: asyncpg pools, one row lock serialising writers across every instance.

Writers take `FOR UPDATE` on the `revision` counter row first, so transactions that write commit in
revision order and a rolled-back transaction leaves no gap, whichever process or machine they come
from. Reads run in REPEATABLE READ so the counters and the rows they read come from one snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl as ssl_module
import urllib.parse
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Any

import asyncpg

from kine_server.drivers import sql
from kine_server.drivers.base import (
    SCHEMA_VERSION,
    Change,
    ChangeRow,
    CompactTx,
    Counters,
    DatabaseUnreachable,
    Driver,
    DriverError,
    RawRow,
    ReadTx,
    Row,
    StatementError,
    WriteTx,
    change,
)

log = logging.getLogger(__name__)

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS kine_meta (
        name TEXT PRIMARY KEY,
        value BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS kine_kv (
        key BYTEA NOT NULL,
        create_revision BIGINT NOT NULL,
        mod_revision BIGINT NOT NULL,
        version BIGINT NOT NULL,
        value BYTEA NOT NULL,
        lease BIGINT NOT NULL,
        sub INTEGER NOT NULL,
        next_revision BIGINT
    )""",
    """CREATE TABLE IF NOT EXISTS kine_lease (
        id BIGINT PRIMARY KEY,
        ttl BIGINT NOT NULL,
        expires_at BIGINT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS kine_lease_expiry ON kine_lease (expires_at)",
    """CREATE TABLE IF NOT EXISTS kine_alarm (
        member_id BIGINT NOT NULL,
        alarm INTEGER NOT NULL,
        PRIMARY KEY (member_id, alarm)
    )""",
    """CREATE TABLE IF NOT EXISTS kine_auth (
        kind TEXT NOT NULL,
        name BYTEA NOT NULL,
        value BYTEA NOT NULL,
        PRIMARY KEY (kind, name)
    )""",
    """CREATE INDEX IF NOT EXISTS kine_kv_lease ON kine_kv (lease)
        WHERE next_revision IS NULL AND version > 0""",
    # INCLUDE: reads at a past revision (every page of a paginated LIST after the first) test
    # next_revision and version of every row of the range in the index, not in the heap.
    """CREATE UNIQUE INDEX IF NOT EXISTS kine_kv_key_rev_sub ON kine_kv (key, mod_revision, sub)
        INCLUDE (next_revision, version)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS kine_kv_rev_sub ON kine_kv (mod_revision, sub)",
    """CREATE INDEX IF NOT EXISTS kine_kv_live ON kine_kv (key)
        WHERE next_revision IS NULL AND version > 0""",
    """CREATE INDEX IF NOT EXISTS kine_kv_next ON kine_kv (next_revision)
        WHERE next_revision IS NOT NULL""",
]

#: Any number will do, as long as every kine-server uses the same one for schema creation.
SCHEMA_LOCK_ID = 0x6B696E65

#: A writer locks the revision row (writers commit in revision order) and the compact revision's
#: (a periodic compaction cannot move it, and delete the history a write Txn's range at an old
#: revision is reading, until the writer commits: at READ COMMITTED each statement would see the
#: deletions). The compactor takes compacted_through first and the compact revision second, so
#: no two lock orders cross. One round trip returns all three counters.
LOCK_COUNTERS = (
    "WITH locked AS (SELECT name, value FROM kine_meta "
    "WHERE name IN ('compact_revision', 'revision') ORDER BY name FOR UPDATE) "
    "SELECT name, value FROM locked "
    "UNION ALL SELECT name, value FROM kine_meta WHERE name = 'compacted_through'"
)
CHANNEL = "kine_kv"
NOTIFY = f"SELECT pg_notify('{CHANNEL}', $1)"

#: What asyncpg and the network raise when the database is unreachable or a statement fails.
DATABASE_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,  # TimeoutError and ConnectionError included
)

#: Of those, the ones that mean no answer came (as opposed to an error the server answered with):
#: the connection cannot be trusted any more, and no request is at fault.
UNANSWERED = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
)

#: --datastore-timeout's default: connecting, waiting for a pooled connection and each statement
#: give up after this long (etcd itself gives up on a request after about 7 s).
DEFAULT_TIMEOUT = 10.0
#: close() waits this long for connections to end cleanly, then drops them.
CLOSE_TIMEOUT = 1.0
#: VACUUM of a large store may run for many minutes: the Defragment caller's deadline bounds it.
DEFRAGMENT_TIMEOUT = 3600.0
#: A quiet LISTEN connection is checked this often: a NAT or firewall may drop an idle connection
#: without a word to either side, and nothing else would ever notice.
LISTEN_CHECK_INTERVAL = 10.0
#: Attempts to LISTEN again back off up to this.
LISTEN_RETRY_MAX = 5.0

#: SQLSTATE classes a retry may cure: connection exceptions, transaction rollbacks (serialization,
#: deadlock), insufficient resources, operator intervention (shutdown, statement timeout), system
#: errors; and lock_not_available. Every other class (data, integrity, syntax) is the statement's.
_RETRYABLE_CLASSES = ("08", "40", "53", "57", "58", "XX")
_RETRYABLE_STATES = ("55P03",)


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer from PostgreSQL in time"
    return str(exc) or type(exc).__name__


def unreachable(exc: BaseException) -> bool:
    """Connecting failed in a way waiting may cure: nobody listens yet, no route or no name yet
    (a pod that starts beside its database), no answer in time, or a server still starting."""
    if isinstance(exc, ssl_module.SSLError):  # a certificate does not get better by waiting
        return False
    return isinstance(
        exc, OSError | asyncpg.CannotConnectNowError | asyncpg.PostgresConnectionError
    )


def describe_connect_error(exc: BaseException) -> str:
    """A connect error in a few words: asyncpg joins one per address it tried ("Multiple
    exceptions: [Errno 111] Connect call failed ('127.0.0.1', 5432), ...")."""
    if isinstance(exc, ConnectionRefusedError) or "Errno 111" in str(exc):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host: {exc.strerror}"
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, TimeoutError):
        return exc.strerror
    return describe(exc)


def unanswered(exc: BaseException) -> bool:
    """No answer came: the connection cannot be trusted any more. Not asyncpg's DataError,
    although it is an InterfaceError: a value asyncpg cannot encode (e.g. past int64) is refused
    before anything is sent, and the connection is as good as before."""
    return isinstance(exc, UNANSWERED) and not isinstance(exc, asyncpg.DataError)


def driver_error(exc: BaseException) -> DriverError:
    """What an asyncpg or network error means to the store: no answer at all, an error a
    retry may cure, or the statement's own fault."""
    if isinstance(exc, asyncpg.DataError):
        return StatementError(f"{type(exc).__name__}: {exc}")
    if unanswered(exc):
        return DatabaseUnreachable(describe(exc))
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if not (state[:2] in _RETRYABLE_CLASSES or state in _RETRYABLE_STATES):
            return StatementError(f"{type(exc).__name__}: {exc}")
    return DriverError(describe(exc))


DIALECT = sql.Dialect(
    greatest="GREATEST",
    # clock_timestamp(), not now(): now() is the transaction's start, and a batch may wait.
    now_ms="CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    id_list="SELECT unnest(?::bigint[])",
    numbered=True,
)
_COUNTERS = DIALECT(sql.COUNTERS)
_META = DIALECT(sql.META)
_SET_META = DIALECT(sql.SET_META)
_NEWEST = DIALECT(sql.NEWEST)
_INSERT = DIALECT(sql.INSERT)
_SUPERSEDE = DIALECT(sql.SUPERSEDE)
_DELETE_SUPERSEDED = DIALECT(sql.DELETE_SUPERSEDED)
_DELETE_TOMBSTONES = DIALECT(sql.DELETE_TOMBSTONES)
_CLAIM_COMPACTED = DIALECT(sql.CLAIM_COMPACTED)
_LOCK_COMPACT_REVISION = sql.LOCK_COMPACT_REVISION + " FOR UPDATE"
_ADVANCE_COMPACT_REVISION = DIALECT(sql.ADVANCE_COMPACT_REVISION)
_DUMP = DIALECT(sql.DUMP)
_INSERT_RAW = DIALECT(sql.INSERT_RAW)
_ALL_LEASES = sql.ALL_LEASES
_ALL_META = sql.ALL_META
_LEASE = DIALECT(sql.LEASE)
_LEASES = DIALECT(sql.LEASES)
_EXPIRED_LEASES = DIALECT(sql.EXPIRED_LEASES)
_INSERT_LEASE = DIALECT(sql.INSERT_LEASE)
_RENEW_LEASES = DIALECT(sql.RENEW_LEASES)
_DELETE_LEASE = DIALECT(sql.DELETE_LEASE)
_DELETE_EXPIRED_LEASE = DIALECT(sql.DELETE_EXPIRED_LEASE)
_RESUME_LEASES = DIALECT(sql.RESUME_LEASES)
_LEASES_SERVED_UNTIL = DIALECT(sql.LEASES_SERVED_UNTIL)
_LEASED = DIALECT(sql.LEASED)
_MIGRATE_1_TO_2 = [DIALECT(statement) for statement in sql.MIGRATE_1_TO_2]
_MIGRATE_2_TO_3 = [DIALECT(statement) for statement in sql.MIGRATE_2_TO_3]
_MIGRATE_3_TO_4 = [DIALECT(statement) for statement in sql.MIGRATE_3_TO_4]
_PUT_AUTH_RECORD = DIALECT(sql.PUT_AUTH_RECORD)
_DELETE_AUTH_RECORD = DIALECT(sql.DELETE_AUTH_RECORD)
_RAISE_ALARM = DIALECT(sql.RAISE_ALARM)
_CLEAR_ALARM = DIALECT(sql.CLEAR_ALARM)


def _row(record: Sequence[Any]) -> Row:
    key, create, mod, version, value, lease = record
    return Row(bytes(key), create, mod, version, bytes(value) if value is not None else b"", lease)


#: Records converted between two turns of the event loop: asyncpg hands over a 50 000-row result
#: at once, and converting it in one go held the loop for every other client.
_CHUNK = 1000


async def _rows(records: list[Any]) -> list[Row]:
    rows: list[Row] = []
    for start in range(0, len(records), _CHUNK):
        if start:
            await asyncio.sleep(0)
        rows += [_row(r) for r in records[start : start + _CHUNK]]
    return rows


def _affected(status: str) -> int:
    """asyncpg returns the command tag, e.g. 'DELETE 12'."""
    return int(status.rsplit(" ", 1)[-1])


class _Read(ReadTx):
    # A btree entry may take a third of an 8 kB page (2704 bytes), the key and revision included.
    max_key_bytes = 2600

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def counters(self) -> Counters:
        values = {r[0]: r[1] for r in await self._conn.fetch(_COUNTERS)}
        return Counters(values["revision"], values["compact_revision"], values["compacted_through"])

    async def range(
        self, key: bytes, end: bytes | None, at: int | None, limit: int, with_values: bool = True
    ) -> list[Row]:
        query, params = sql.range_query(key, end, at, limit, with_values)
        return await _rows(await self._conn.fetch(sql.numbered(query), *params))

    async def count(self, key: bytes, end: bytes | None, at: int | None) -> int:
        query, params = sql.count_query(key, end, at)
        return int(await self._conn.fetchval(sql.numbered(query), *params))

    async def changes(
        self, after: int, through: int, key: bytes, end: bytes | None, limit: int
    ) -> list[Change]:
        query, params = sql.changes_query(after, through, key, end, limit)
        records = await self._conn.fetch(sql.numbered(query), *params)
        changes: list[Change] = []
        for start in range(0, len(records), _CHUNK):  # as _rows
            if start:
                await asyncio.sleep(0)
            changes += [
                change(tuple(bytes(v) if isinstance(v, memoryview) else v for v in r))
                for r in records[start : start + _CHUNK]
            ]
        return changes

    async def lease(self, lease_id: int) -> tuple[int, int] | None:
        record = await self._conn.fetchrow(_LEASE, lease_id)
        return (record[0], record[1]) if record is not None else None

    async def leases(self) -> list[int]:
        return [r[0] for r in await self._conn.fetch(_LEASES)]

    async def any_lease(self) -> bool:
        return bool(await self._conn.fetchval(sql.ANY_LEASE))

    async def expired_leases(self, limit: int) -> list[int]:
        return [r[0] for r in await self._conn.fetch(_EXPIRED_LEASES, limit)]

    async def dump(self, after: tuple[int, int], limit: int) -> list[RawRow]:
        records = await self._conn.fetch(_DUMP, after[0], after[0], after[1], limit)
        return [
            RawRow(bytes(r[0]), r[1], r[2], r[3], bytes(r[4]), r[5], r[6], r[7]) for r in records
        ]

    async def all_leases(self) -> list[tuple[int, int, int]]:
        return [(r[0], r[1], r[2]) for r in await self._conn.fetch(_ALL_LEASES)]

    async def all_meta(self) -> dict[str, int]:
        return {r[0]: r[1] for r in await self._conn.fetch(_ALL_META)}

    async def alarms(self) -> list[tuple[int, int]]:
        return [(sql.member_of(r[0]), r[1]) for r in await self._conn.fetch(sql.ALARMS)]

    async def auth_records(self) -> list[tuple[str, bytes, bytes]]:
        records = await self._conn.fetch(sql.AUTH_RECORDS)
        return [(r[0], bytes(r[1]), bytes(r[2])) for r in records]

    async def leased(self, lease_id: int) -> list[Row]:
        return await _rows(await self._conn.fetch(_LEASED, lease_id))


class _Write(_Read, WriteTx):
    async def lock(self) -> Counters:
        values = {r[0]: r[1] for r in await self._conn.fetch(LOCK_COUNTERS)}
        return Counters(values["revision"], values["compact_revision"], values["compacted_through"])

    async def newest(self, key: bytes) -> Row | None:
        record = await self._conn.fetchrow(_NEWEST, key)
        return _row(record) if record is not None else None

    async def append(self, rows: list[ChangeRow], superseded: list[tuple[bytes, int]]) -> None:
        if superseded:
            revision = rows[0].mod_revision
            await self._conn.executemany(_SUPERSEDE, [(revision, k, r) for k, r in superseded])
        await self._conn.executemany(_INSERT, rows)

    async def delete_range(
        self, key: bytes, end: bytes | None, revision: int, first_sub: int
    ) -> None:
        for query, params in sql.delete_range(key, end, revision, first_sub):
            await self._conn.execute(sql.numbered(query), *params)

    async def delete_leased(self, lease_id: int, revision: int, first_sub: int) -> None:
        for query, params in sql.delete_leased(lease_id, revision, first_sub):
            await self._conn.execute(sql.numbered(query), *params)

    async def insert_raw(self, rows: list[RawRow]) -> None:
        await self._conn.executemany(_INSERT_RAW, rows)

    async def link_history(self) -> None:
        await self._conn.execute(sql.LINK_HISTORY)

    async def insert_lease(self, lease_id: int, ttl: int) -> bool:
        return _affected(await self._conn.execute(_INSERT_LEASE, lease_id, ttl, ttl)) == 1

    async def renew_leases(self, lease_ids: Collection[int]) -> dict[int, int]:
        rows = await self._conn.fetch(_RENEW_LEASES, list(lease_ids))
        return {int(row[0]): int(row[1]) for row in rows}

    async def delete_lease(self, lease_id: int, expired_only: bool) -> bool:
        statement = _DELETE_EXPIRED_LEASE if expired_only else _DELETE_LEASE
        return _affected(await self._conn.execute(statement, lease_id)) == 1

    async def resume_leases(self, promise_ms: int) -> None:
        await self._conn.execute(_RESUME_LEASES)
        await self.serve_leases(promise_ms)

    async def serve_leases(self, promise_ms: int) -> None:
        await self._conn.execute(_LEASES_SERVED_UNTIL, promise_ms)

    async def set_revision(self, revision: int) -> None:
        await self._conn.execute(_SET_META, revision, "revision")
        # Delivered at commit: other instances' pollers wake at once instead of at their interval.
        await self._conn.execute(NOTIFY, str(revision))

    async def set_meta(self, name: str, value: int) -> None:
        await self._conn.execute(_SET_META, value, name)

    async def put_auth_record(self, kind: str, name: bytes, value: bytes) -> None:
        await self._conn.execute(_PUT_AUTH_RECORD, kind, name, value)

    async def delete_auth_record(self, kind: str, name: bytes) -> None:
        await self._conn.execute(_DELETE_AUTH_RECORD, kind, name)

    async def raise_alarm(self, member_id: int, alarm: int) -> bool:
        status = await self._conn.execute(_RAISE_ALARM, sql.stored_member(member_id), alarm)
        return _affected(status) == 1

    async def clear_alarm(self, member_id: int, alarm: int) -> bool:
        status = await self._conn.execute(_CLEAR_ALARM, sql.stored_member(member_id), alarm)
        return _affected(status) == 1

    async def lock_compact_revision(self) -> int:
        return int(await self._conn.fetchval(_LOCK_COMPACT_REVISION))

    async def advance_compact_revision(self, revision: int) -> None:
        await self._conn.execute(_ADVANCE_COMPACT_REVISION, revision)


class _Compact(_Read, CompactTx):
    def __init__(self, conn: asyncpg.Connection, timeout: float) -> None:
        super().__init__(conn)
        #: The batch's own limit (the server's statement_timeout) and a second for its answer:
        #: --datastore-timeout must not cut short a batch that --compact-timeout allows.
        self._limit = timeout + 1.0

    async def delete_history(self, after: int, through: int) -> int:
        t = self._limit
        superseded = await self._conn.execute(_DELETE_SUPERSEDED, after, through, timeout=t)
        tombstones = await self._conn.execute(_DELETE_TOMBSTONES, after, through, timeout=t)
        return _affected(superseded) + _affected(tombstones)

    async def claim(self, expected: int, through: int) -> bool:
        claimed = await self._conn.execute(_CLAIM_COMPACTED, through, expected, timeout=self._limit)
        return _affected(claimed) == 1

    async def advance_compact_revision(self, revision: int) -> None:
        await self._conn.execute(_ADVANCE_COMPACT_REVISION, revision, timeout=self._limit)


def _drop(conn: asyncpg.Connection) -> None:
    """Close a connection without a word to the server (nothing to do if it is gone already:
    asyncpg gives a lost connection back to its pool by itself)."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


def database_name(dsn: str) -> str:
    """The database a DSN names; kine's default is `kubernetes`."""
    path = urllib.parse.urlsplit(dsn).path.lstrip("/")
    return urllib.parse.unquote(path) or "kubernetes"


def with_database(dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(name)))


class PostgresDriver(Driver):
    """A store in one PostgreSQL database, shareable by several kine-server instances.

    Every wait on the database is bounded by `timeout` (--datastore-timeout): connecting, waiting
    for a pooled connection, and each statement (asyncpg's command_timeout). A connection that
    stopped answering is dropped at once, never rolled back or reset with a round trip that would
    wait as long again. So a request to a database that no longer answers (a partition, a stalled
    server or proxy: the sockets stay open, nothing comes back) fails with UNAVAILABLE after about
    `timeout`, and close() never waits for more than CLOSE_TIMEOUT.
    """

    name = "postgres"

    def __init__(
        self,
        dsn: str,
        pool_size: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        ssl: ssl_module.SSLContext | None = None,
        read_only: bool = False,
    ) -> None:
        self.dsn = with_database(dsn, database_name(dsn))
        #: A --workers front-end: a reader pool only (its writes go to the writer process).
        self.read_only = read_only
        #: Passed to every connection; None leaves TLS to the DSN's sslmode.
        self._connect_options: dict[str, Any] = {"ssl": ssl} if ssl is not None else {}
        self._pool_size = pool_size or 8
        self._timeout = timeout
        self._readers: asyncpg.Pool | None = None
        self._writers: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._listener_lost = asyncio.Event()
        self._listening: asyncio.Task[None] | None = None
        self._on_commit: Callable[[int], None] | None = None
        #: Releases of connections whose acquiring caller was cancelled (see _connection).
        self._handing_back: set[asyncio.Task[None]] = set()
        #: Tests turn this off to prove the periodic poll alone converges.
        self.listen_enabled = True
        self.listen_check_interval = LISTEN_CHECK_INTERVAL

    async def open(self) -> None:
        try:
            if self.read_only:  # a --workers front-end: the writer process made the schema
                self._readers = await self._pool(self._pool_size)
                return
            await self._create_database()
            # A writer holds the revision lock every instance needs. If its instance is cut off
            # or paused inside a transaction, PostgreSQL ends that session after twice the
            # datastore timeout (it would otherwise wait for TCP keepalive, about two hours):
            # no statement of ours leaves a transaction idle for anything like that long.
            idle = {"idle_in_transaction_session_timeout": str(int(self._timeout * 2000))}
            self._writers = await self._pool(3, idle)
            self._readers = await self._pool(self._pool_size)
            async with self._writers.acquire(timeout=self._timeout) as conn, conn.transaction():
                await self._create_schema(conn)
        except DATABASE_ERRORS as exc:
            await self.close()
            if unreachable(exc):
                raise DatabaseUnreachable(
                    f"cannot open PostgreSQL database: cannot reach {self.server}: "
                    f"{describe_connect_error(exc)}"
                ) from exc
            raise DriverError(f"cannot open PostgreSQL database: {describe(exc)}") from exc

    @property
    def server(self) -> str:
        """HOST:PORT of the DSN (the first of several; the socket directory of a unix one)."""
        parts = urllib.parse.urlsplit(self.dsn)
        query = urllib.parse.parse_qs(parts.query)
        host = (parts.hostname or query.get("host", ["localhost"])[0]).split(",")[0]
        try:
            port = parts.port or int(query.get("port", ["5432"])[0])
        except ValueError:  # several ports, as several hosts: asyncpg tries them in turn
            port = 5432
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def location(self) -> str:
        return f"postgres {self.server}/{database_name(self.dsn)}"

    async def _pool(self, size: int, settings: dict[str, str] | None = None) -> asyncpg.Pool:
        pool = await asyncpg.create_pool(
            self.dsn,
            min_size=1,
            max_size=size,
            timeout=self._timeout,
            command_timeout=self._timeout,
            server_settings=settings,
            **self._connect_options,
        )
        assert pool is not None
        return pool

    async def _connect(self, dsn: str) -> asyncpg.Connection:
        return await asyncpg.connect(
            dsn, timeout=self._timeout, command_timeout=self._timeout, **self._connect_options
        )

    async def _create_database(self) -> None:
        """kine creates the database when it is missing; so do we."""
        try:
            conn = await self._connect(self.dsn)
        except asyncpg.InvalidCatalogNameError:
            admin = await self._connect(with_database(self.dsn, "postgres"))
            try:
                name = database_name(self.dsn).replace('"', '""')
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await admin.execute(f'CREATE DATABASE "{name}"')
            finally:
                await admin.close(timeout=CLOSE_TIMEOUT)
            return
        await conn.close(timeout=CLOSE_TIMEOUT)

    async def _create_schema(self, conn: asyncpg.Connection) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_ID)
        for statement in SCHEMA:
            await conn.execute(statement)
        seed, rows = sql.seed_meta(secrets.randbits(63) or 1)
        await conn.executemany(sql.numbered(seed), rows)
        found = await conn.fetchval(_META, "schema_version")
        if found > SCHEMA_VERSION:
            raise DriverError(
                f"schema version {found} is newer than this kine-server ({SCHEMA_VERSION})"
            )
        if found < 2:
            for statement in _MIGRATE_1_TO_2:
                await conn.execute(statement)
        if found < 3:
            for statement in _MIGRATE_2_TO_3:
                await conn.execute(statement)
        if found < 4:
            for statement in _MIGRATE_3_TO_4:
                await conn.execute(statement)

    async def listen(self, on_commit: Callable[[int], None]) -> None:
        if not self.listen_enabled:
            return
        self._on_commit = on_commit
        try:
            await self._listen()
        except DATABASE_ERRORS as exc:
            # Not fatal: the poller's interval still brings every commit, only later.
            log.warning(
                "cannot LISTEN for commits, relying on the poll interval until it can: %s",
                describe(exc),
            )
        self._listening = asyncio.create_task(self._keep_listening(), name="kine-listen")

    async def _listen(self) -> None:
        """Open the LISTEN connection, then announce the newest revision: commits made while no
        connection listened were announced to nobody."""
        conn = await self._connect(self.dsn)
        try:
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _: lost.set())
            await conn.add_listener(CHANNEL, self._notified)
            revision = await conn.fetchval(_META, "revision")
        except BaseException:
            _drop(conn)
            raise
        self._listener, self._listener_lost = conn, lost
        if self._on_commit is not None and revision is not None:
            self._on_commit(int(revision))

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        if self._on_commit is not None:
            self._on_commit(int(payload))

    async def _keep_listening(self) -> None:
        """LISTEN again whenever the connection is lost (a database restart, a network fault),
        and check a quiet one every `listen_check_interval`: a connection dropped silently (by a
        NAT, a firewall, a partition) would otherwise never be noticed, and other instances'
        commits would reach this one only at the poll interval, for good."""
        delay = 0.0
        while True:
            conn = self._listener
            if conn is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._listener_lost.wait(), self.listen_check_interval)
                if not conn.is_closed():
                    try:
                        await conn.fetchval("SELECT 1")  # bounded by command_timeout
                        continue
                    except DATABASE_ERRORS:
                        pass
                _drop(conn)
                self._listener = None
                log.warning("the LISTEN connection was lost; listening again")
                delay = 0.0
            await asyncio.sleep(delay)
            try:
                await self._listen()
            except DATABASE_ERRORS as exc:
                delay = min(max(delay * 2, 0.5), LISTEN_RETRY_MAX)
                log.debug("cannot LISTEN yet, retrying in %.1fs: %s", delay, describe(exc))
            else:
                log.info("listening for commits again")

    async def close(self) -> None:
        """Close every connection, waiting at most CLOSE_TIMEOUT for them to end cleanly."""
        if self._listening is not None:
            self._listening.cancel()
            await asyncio.gather(self._listening, return_exceptions=True)
            self._listening = None
        listener, self._listener = self._listener, None
        pools = [pool for pool in (self._readers, self._writers) if pool is not None]
        self._readers = self._writers = None
        closing = [self._close_pool(pool) for pool in pools]
        if listener is not None:
            closing.append(listener.close(timeout=CLOSE_TIMEOUT))  # aborts when it times out
        await asyncio.gather(*closing, return_exceptions=True)

    @staticmethod
    async def _close_pool(pool: asyncpg.Pool) -> None:
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
        except Exception:
            pool.terminate()

    @contextlib.asynccontextmanager
    async def _connection(self, pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, within --datastore-timeout, and dropped at once (not released
        with a reset, a round trip that would wait as long again) if it stopped answering.

        A caller cancelled while the pool opens a connection lets the opening finish and hands
        the connection back before the cancellation goes on: asyncpg cancelled during a TLS
        negotiation (sslmode=prefer, the default) leaves a future whose ConnectionError nobody
        retrieves, which asyncio logs at ERROR."""
        acquiring = asyncio.ensure_future(pool.acquire(timeout=self._timeout))
        try:
            conn = await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            # Not waited for (a shutdown must not wait out a connect): handed back when done.
            acquiring.add_done_callback(lambda done: self._hand_back(pool, done))
            raise
        except DATABASE_ERRORS as exc:
            raise DatabaseUnreachable(describe(exc)) from exc
        try:
            yield conn
        except BaseException as exc:
            if unanswered(exc) or isinstance(exc, asyncio.CancelledError):
                # Its transaction ends with the connection, on the server's side; on ours the
                # pool opens a new one when next needed.
                _drop(conn)
            if isinstance(exc, DATABASE_ERRORS):
                raise driver_error(exc) from exc
            raise
        finally:
            # A failed reset drops the connection; a request that got its answer keeps it.
            with contextlib.suppress(*DATABASE_ERRORS):
                await pool.release(conn)

    def _hand_back(self, pool: asyncpg.Pool, acquired: asyncio.Future[Any]) -> None:
        if acquired.cancelled() or acquired.exception() is not None:
            return  # retrieved: nothing is left for asyncio to log

        async def release() -> None:
            with contextlib.suppress(Exception):  # a closed pool has nothing to take back
                await pool.release(acquired.result())

        task = asyncio.ensure_future(release())
        self._handing_back.add(task)
        task.add_done_callback(self._handing_back.discard)

    @contextlib.asynccontextmanager
    async def _transaction(
        self, pool: asyncpg.Pool, isolation: str | None = None, readonly: bool = False
    ) -> AsyncIterator[asyncpg.Connection]:
        async with self._connection(pool) as conn:
            tx = conn.transaction(isolation=isolation, readonly=readonly)
            await tx.start()
            try:
                yield conn
            except BaseException as exc:
                if not (unanswered(exc) or isinstance(exc, asyncio.CancelledError)):
                    await tx.rollback()  # the server answered: the connection is fine
                raise
            await tx.commit()

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[ReadTx]:
        assert self._readers is not None, "driver not open"
        async with self._transaction(self._readers, "repeatable_read", readonly=True) as conn:
            yield _Read(conn)

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[WriteTx]:
        assert self._writers is not None, "driver not open"
        async with self._transaction(self._writers) as conn:
            yield _Write(conn)

    @contextlib.asynccontextmanager
    async def compact(self, timeout: float) -> AsyncIterator[CompactTx]:
        assert self._writers is not None, "driver not open"
        millis = max(1, int(timeout * 1000))
        async with self._transaction(self._writers) as conn:
            # A batch gives up rather than wait on row locks or run long: writers first.
            await conn.execute(f"SET LOCAL lock_timeout = {millis}")
            await conn.execute(f"SET LOCAL statement_timeout = {millis}")
            yield _Compact(conn, timeout)

    async def checkpoint(self) -> None:
        """Nothing to do: autovacuum reclaims the deleted rows' space for reuse."""

    async def defragment(self) -> None:
        assert self._writers is not None, "driver not open"
        async with self._connection(self._writers) as conn:
            # VACUUM (not FULL): returns space for reuse without locking writers out.
            await conn.execute(
                "VACUUM (ANALYZE) kine_kv, kine_meta, kine_lease", timeout=DEFRAGMENT_TIMEOUT
            )

    async def meta(self, name: str) -> int | None:
        assert self._readers is not None, "driver not open"
        async with self._connection(self._readers) as conn:
            value = await conn.fetchval(_META, name)
        return int(value) if value is not None else None

    async def size(self) -> tuple[int, int]:
        assert self._readers is not None, "driver not open"
        async with self._connection(self._readers) as conn:
            total = await conn.fetchval("SELECT pg_database_size(current_database())")
            used = await conn.fetchval(
                "SELECT pg_total_relation_size('kine_kv') + pg_total_relation_size('kine_meta')"
            )
        return int(total), int(used)
