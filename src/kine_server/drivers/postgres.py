"""PostgreSQL: asyncpg pools, one row lock serialising writers across every instance.

Writers take `FOR UPDATE` on the `revision` counter row first (sql.LOCK_COUNTERS), so
transactions that write commit in revision order and a rolled-back transaction leaves no gap,
whichever process or machine they come from. Reads run in REPEATABLE READ so the counters and
the rows they read come from one snapshot.

This module owns what is PostgreSQL's alone: its dialect (DIALECT), the connection primitives
over asyncpg (`PgConnection`: prepared statements reused by asyncpg's per-connection cache, big
results converted a chunk at a time, a compaction batch's own timeout), the pools and their
timeouts, the cancellation-safe `_connection`, the database's creation and LISTEN/NOTIFY. Which
of the DSN's servers to connect to is postgres_hosts.py's; what its errors mean is
postgres_errors.py's; the statements and the transactions' logic are the generic layer's (sql.py,
transactions.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl as ssl_module
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from kine_server import supervise
from kine_server.drivers import sql
from kine_server.drivers.base import (
    CompactTx,
    DatabaseUnreachable,
    Driver,
    DriverError,
    ReadTx,
    WriteTx,
)
from kine_server.drivers.dialect import Dialect, column_types, dollar
from kine_server.drivers.postgres_errors import (
    DATABASE_ERRORS,
    describe,
    describe_connect_error,
    driver_error,
    read_only_refusal,
    unanswered,
    unreachable,
)
from kine_server.drivers.postgres_hosts import (
    HostConnection,
    HostConnector,
    parse_endpoint,
)
from kine_server.drivers.postgres_hosts import database_name as database_name  # re-exported
from kine_server.drivers.postgres_hosts import with_database as with_database  # re-exported
from kine_server.drivers.transactions import (
    SchemaTooNew,
    SQLCompact,
    SQLRead,
    SQLWrite,
    converted,
    create_schema,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
Record = Sequence[Any]

#: Any number will do, as long as every kine-server uses the same one for schema creation.
SCHEMA_LOCK_ID = 0x6B696E65
CHANNEL = "kine_kv"

DIALECT = Dialect(
    name="postgres",
    # clock_timestamp(), not now(): now() is the transaction's start, and a batch may wait.
    now_ms="CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
    id_list="SELECT unnest(?::bigint[])",
    encode_ids=list,
    key_list="SELECT unnest(?::bytea[])",
    types=column_types(key_bytes="BYTEA", value_bytes="BYTEA"),
    placeholder=dollar,
    # INCLUDE: reads at a past revision (every page of a paginated LIST after the first) test
    # next_revision and version of every row of the range in the index, not in the heap.
    include_columns=True,
    partial_indexes=True,
    update_returning=True,
    # A btree entry may take a third of an 8 kB page (2704 bytes), the key and revision included.
    max_key_bytes=2600,
    # Delivered at commit: other instances' pollers wake at once instead of at their interval.
    notify_commit=f"SELECT pg_notify('{CHANNEL}', ?)",
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


def _affected(status: str) -> int:
    """asyncpg returns the command tag, e.g. 'DELETE 12' ('CREATE TABLE' changed no rows)."""
    count = status.rpartition(" ")[2]
    return int(count) if count.isdigit() else 0


class PgConnection:
    """transactions.Connection over one asyncpg connection. asyncpg prepares a statement the
    first time a connection runs its text and reuses it after (its statement cache): every text
    comes from sql.Statements, rendered once, so each shape is prepared once per connection.

    `execute_timeout`: a compaction batch's own limit for the statements that change rows (the
    server's statement_timeout and a second for its answer): --datastore-timeout, asyncpg's
    command_timeout for everything else, must not cut short a batch that --compact-timeout
    allows."""

    def __init__(self, conn: asyncpg.Connection, execute_timeout: float | None = None) -> None:
        self._conn = conn
        self._timeout = execute_timeout

    async def fetch(self, query: str, params: Sequence[Any]) -> list[Record]:
        records: list[Record] = await self._conn.fetch(query, *params)
        return records

    async def fetch_rows(
        self, query: str, params: Sequence[Any], convert: Callable[[Record], T]
    ) -> list[T]:
        return await converted(await self._conn.fetch(query, *params), convert)

    def fetch_soon(self, query: str, params: Sequence[Any]) -> Awaitable[list[Record]]:
        return self.fetch(query, params)  # one connection, one statement at a time

    async def execute(self, query: str, params: Sequence[Any]) -> int:
        return _affected(await self._conn.execute(query, *params, timeout=self._timeout))

    async def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._conn.executemany(query, rows)

    async def execute_all(self, statements: sql.Batch, bulk: bool) -> None:
        for query, params in statements:
            await self._conn.execute(query, *params, timeout=self._timeout)


def _drop(conn: asyncpg.Connection) -> None:
    """Close a connection without a word to the server (nothing to do if it is gone already:
    asyncpg gives a lost connection back to its pool by itself)."""
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()


class PostgresDriver(Driver):
    """A store in one PostgreSQL database, shareable by several kine-server instances.

    Every wait on the database is bounded by `timeout` (--datastore-timeout): connecting, waiting
    for a pooled connection, and each statement (asyncpg's command_timeout). A connection that
    stopped answering is dropped at once, never rolled back or reset with a round trip that would
    wait as long again. So a request to a database that no longer answers (a partition, a stalled
    server or proxy: the sockets stay open, nothing comes back) fails with UNAVAILABLE after about
    `timeout`, and close() never waits for more than CLOSE_TIMEOUT.

    A DSN may name a primary and its standbys: every connection is made through the driver's
    HostConnector (postgres_hosts.py), which tries them one by one, each within its own time,
    and moves every connection to a promoted standby once the primary is lost.
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
        endpoint = parse_endpoint(with_database(dsn, database_name(dsn)))
        #: Without libpq's connect_timeout, which the connector applies per host.
        self.dsn = endpoint.dsn
        #: A --workers front-end: a reader pool only (its writes go to the writer process).
        self.read_only = read_only
        #: Every connection is made through it: the DSN's servers one by one, each within
        #: its time, and a failover closes the connections to the lost server.
        self.hosts = HostConnector(endpoint, timeout)
        #: Passed to every connection; None leaves TLS to the DSN's sslmode.
        self.hosts.options = {"ssl": ssl} if ssl is not None else {}
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
        #: Every statement, rendered once for PostgreSQL.
        self._statements = sql.Statements(DIALECT)

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
        except SchemaTooNew as exc:
            await self.close()
            raise DriverError(f"cannot open PostgreSQL database: {exc}") from exc

    @property
    def server(self) -> str:
        """HOST:PORT of every server the DSN names (a unix socket's directory as its host)."""
        return self.hosts.description

    @property
    def location(self) -> str:
        return f"postgres {self.server}/{database_name(self.dsn)}"

    async def _pool(self, size: int, settings: dict[str, str] | None = None) -> asyncpg.Pool:
        pool = await asyncpg.create_pool(
            self.dsn,
            connect=self.hosts.connect,
            connection_class=HostConnection,
            min_size=1,
            max_size=size,
            timeout=self._timeout,
            command_timeout=self._timeout,
            server_settings=settings,
        )
        assert pool is not None
        return pool

    async def _connect(self, dsn: str) -> asyncpg.Connection:
        return await self.hosts.connect(dsn, command_timeout=self._timeout)

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
        """Inside the caller's transaction; the advisory lock keeps two instances starting at
        once from creating or migrating the schema side by side."""
        await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_ID)
        await create_schema(PgConnection(conn), self._statements, secrets.randbits(63) or 1)

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
            revision = await conn.fetchval(self._statements.meta, "revision")
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
                await supervise.woken(self._listener_lost, self.listen_check_interval)
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
        await self.hosts.close()
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
        # A wait long enough to suggest a lost server makes the driver look for a promoted one.
        overdue = self.hosts.watch()
        try:
            yield conn
        except BaseException as exc:
            if unanswered(exc) or isinstance(exc, asyncio.CancelledError):
                # Its transaction ends with the connection, on the server's side; on ours the
                # pool opens a new one when next needed.
                _drop(conn)
            elif read_only_refusal(exc):
                # A standby (or a primary being demoted): every write here would fail the same
                # way, so the next connection tries the DSN's other servers first.
                self.hosts.avoid(conn)
                _drop(conn)
            if isinstance(exc, DATABASE_ERRORS):
                raise driver_error(exc) from exc
            raise
        finally:
            if overdue is not None:
                overdue.cancel()
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
            yield SQLRead(PgConnection(conn), self._statements)

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[WriteTx]:
        assert self._writers is not None, "driver not open"
        async with self._transaction(self._writers) as conn:
            tx = SQLWrite(PgConnection(conn), self._statements)
            yield tx
            await tx.flush()

    @contextlib.asynccontextmanager
    async def compact(self, timeout: float) -> AsyncIterator[CompactTx]:
        assert self._writers is not None, "driver not open"
        millis = max(1, int(timeout * 1000))
        async with self._transaction(self._writers) as conn:
            # A batch gives up rather than wait on row locks or run long: writers first.
            await conn.execute(f"SET LOCAL lock_timeout = {millis}")
            await conn.execute(f"SET LOCAL statement_timeout = {millis}")
            # The batch's own limit (the server's statement_timeout) and a second for its answer.
            yield SQLCompact(PgConnection(conn, execute_timeout=timeout + 1.0), self._statements)

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
            value = await conn.fetchval(self._statements.meta, name)
        return int(value) if value is not None else None

    async def size(self) -> tuple[int, int]:
        assert self._readers is not None, "driver not open"
        async with self._connection(self._readers) as conn:
            total = await conn.fetchval("SELECT pg_database_size(current_database())")
            used = await conn.fetchval(
                "SELECT pg_total_relation_size('kine_kv') + pg_total_relation_size('kine_meta')"
            )
        return int(total), int(used)
