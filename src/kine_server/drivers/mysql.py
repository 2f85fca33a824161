"""MySQL and MariaDB (InnoDB): the third dialect of the one SQL implementation.

As on PostgreSQL, every writer first locks the `revision` row of kine_meta (`SELECT ... FOR
UPDATE`, sql.LOCK_COUNTERS), so revisions are dense and in commit order across every instance on
the database, and reads run in REPEATABLE READ snapshots (`START TRANSACTION WITH CONSISTENT
SNAPSHOT, READ ONLY`: the counters and the rows of one read from one snapshot).

The writer and the compactor run in READ COMMITTED, not InnoDB's default REPEATABLE READ: their
correctness comes from the row locks (the revision and compact revision rows), not from a
snapshot, and REPEATABLE READ's gap and next-key locks would make the compactor's range DELETEs
and the writer's INSERTs into the same index ranges wait on each other, or deadlock. PostgreSQL's
writer runs at its default, READ COMMITTED, for the same reason.

This module holds what is MySQL's alone: the dialect (DIALECT), the driver (pools, sessions,
the database's creation, GET_LOCK around schema creation, Defragment as OPTIMIZE TABLE, the
size from InnoDB's tablespaces) and the revision watch that stands in for NOTIFY. The connection
primitives and the pool are mysql_link.py's, the DSN forms mysql_dsn.py's, the errors
mysql_errors.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import ssl as ssl_module
from collections.abc import AsyncIterator, Callable

from asyncmy.connection import Connection as AsyncmyConnection

from kine_server.drivers import sql
from kine_server.drivers.base import (
    CompactTx,
    DatabaseUnreachable,
    Driver,
    DriverError,
    ReadTx,
    WriteTx,
)
from kine_server.drivers.dialect import Conflict, Dialect, column_types
from kine_server.drivers.mysql_dsn import MySQLEndpoint, parse
from kine_server.drivers.mysql_errors import (
    DATABASE_ERRORS,
    describe,
    describe_connect_error,
    driver_error,
    errno,
    unanswered,
    unreachable,
)
from kine_server.drivers.mysql_link import MyConnection, Pool, Session, connect, drop, is_mariadb
from kine_server.drivers.transactions import (
    SQLCompact,
    SQLRead,
    SQLWrite,
    create_schema,
)

log = logging.getLogger(__name__)


def on_duplicate_key(insert: str, conflict: Conflict) -> str:
    """MySQL's upsert. "Do nothing" is an assignment of a column to itself, not INSERT IGNORE,
    which would also turn a value that does not fit into a warning. Without CLIENT_FOUND_ROWS
    the row count is 1 for a row inserted and 0 for one found (see MyConnection.execute).
    VALUES(c) is what both accept (MySQL 8.0.20 deprecates it for a row alias MariaDB lacks)."""
    if conflict.update:
        sets = ", ".join(f"{column} = VALUES({column})" for column in conflict.update)
    else:
        found = re.match(r"INSERT INTO \w+ \((\w+)", insert)
        assert found is not None, insert
        column = conflict.columns[0] if conflict.columns else found.group(1)
        sets = f"{column} = {column}"
    return f"{insert} ON DUPLICATE KEY UPDATE {sets}"


def drop_index_on(index: str, table: str) -> str:
    """MySQL names the table (and only MariaDB has IF EXISTS here)."""
    return f"DROP INDEX {index} ON {table}"


#: MySQL cannot read the table an UPDATE writes in a subquery (error 1093): the next row of each
#: key from a window over a derived table, which is materialised first, then joined.
LINK_HISTORY = (
    "UPDATE kine_kv k JOIN (SELECT key, mod_revision, sub, "
    "LEAD(mod_revision) OVER (PARTITION BY key ORDER BY mod_revision, sub) AS after_rev "
    "FROM kine_kv) n ON n.key = k.key AND n.mod_revision = k.mod_revision AND n.sub = k.sub "
    "SET k.next_revision = n.after_rev"
)

DIALECT = Dialect(
    name="mysql",
    # NOW(3) is the statement's start, in UTC (every session sets time_zone = '+00:00').
    now_ms="CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)",
    # JSON_TABLE: MySQL 8.0.4+ and MariaDB 10.6+.
    id_list="SELECT ids.id FROM JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$')) AS ids",
    encode_ids=json.dumps,
    # A batch's keys as one parameter too (JSON holds no bytes: hex, back with UNHEX).
    key_list="SELECT UNHEX(keys_.k) FROM JSON_TABLE(?, '$[*]' COLUMNS (k VARCHAR(6000) PATH '$'))"
    " AS keys_",
    encode_keys=lambda keys: json.dumps([key.hex() for key in keys]),
    types=column_types(
        int32="INT",
        # Meta names and auth kinds: ASCII compared byte by byte, read back as str.
        name="VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin",
        # Binary: compared and sorted byte by byte, as etcd sorts keys, whatever the server's
        # default collation (MySQL 8's utf8mb4_0900_ai_ci, MariaDB's latin1_swedish_ci).
        key_bytes="VARBINARY(3000)",
        value_bytes="LONGBLOB",
    ),
    placeholder=lambda _: "%s",
    percent="%%",
    int64_cast="SIGNED",
    include_columns=False,
    partial_indexes=False,
    update_returning=False,
    # Indexes in CREATE TABLE: MySQL 8 has no CREATE INDEX IF NOT EXISTS, and InnoDB clusters
    # a table without a primary key by its first unique index over NOT NULL columns:
    # kine_kv_key_rev_sub, so a LIST reads its rows in key order from the clustered index.
    inline_indexes=True,
    # That clustered index holds every column in (key, revision) order: an index on the key
    # alone (the live rows', partial elsewhere) or on the key and the row's state would only
    # repeat it, and cost every write two more index updates and every plan two more choices.
    skip_indexes=("kine_kv_live", "kine_kv_key_state"),
    # Reads by key walk that clustered index, whatever the statistics say (see Dialect.by_key):
    # without partial indexes, kine_kv_next holds every live row under NULL.
    by_key=" FORCE INDEX (kine_kv_key_rev_sub)",
    # InnoDB's index key limit is 3072 bytes: the key and the three revision columns of
    # kine_kv_key_state (3000 + 24), as kine_auth's (kind, name) key (64 + 3000).
    max_key_bytes=3000,
    insert_on_conflict=on_duplicate_key,
    drop_index=drop_index_on,
    overrides={"link_history": LINK_HISTORY},
    reserved=("key",),
    quote="`",
)

#: --datastore-timeout's default (drivers.postgres.DEFAULT_TIMEOUT says why 10 s).
DEFAULT_TIMEOUT = 10.0
#: OPTIMIZE TABLE rebuilds the tables: the Defragment caller's deadline bounds it.
DEFRAGMENT_TIMEOUT = 3600.0
#: How often the revision watch reads the revision counter, MySQL having no NOTIFY: one primary
#: key lookup, about 0.1 ms of the server's time, so other instances' commits reach this one's
#: watchers 10 ms later on average (20 ms at most) plus the poll that reads them.
REVISION_WATCH_INTERVAL = 0.02
#: Attempts to reconnect the revision watch back off up to this.
WATCH_RETRY_MAX = 2.0
#: An idle pooled connection is closed after this long rather than reused.
MAX_IDLE = 30.0
#: GET_LOCK's name (a server-wide name: the database's is part of it).
SCHEMA_LOCK = "kine-server schema {database}"


class MySQLDriver(Driver):
    """A store in one MySQL or MariaDB database, shareable by several kine-server instances.

    Every wait is bounded by `timeout` (--datastore-timeout): connecting, waiting for a pooled
    connection, each statement, and a row lock (InnoDB's innodb_lock_wait_timeout, in whole
    seconds). A connection that stopped answering is dropped, never rolled back with a round
    trip that would wait as long again.
    """

    name = "mysql"

    def __init__(
        self,
        dsn: str,
        pool_size: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        ssl: ssl_module.SSLContext | None = None,
        read_only: bool = False,
    ) -> None:
        self.endpoint: MySQLEndpoint = parse(dsn)
        self.dsn = self.endpoint.url()
        #: A --workers front-end: a reader pool only (its writes go to the writer process).
        self.read_only = read_only
        self._tls = ssl if ssl is not None else self.endpoint.ssl_context()
        self._pool_size = pool_size or 8
        self._timeout = timeout
        self._readers: Pool | None = None
        self._writers: Pool | None = None
        self._mariadb = True
        self._watching: asyncio.Task[None] | None = None
        #: Tests turn this off to prove the poller's own interval alone converges.
        self.listen_enabled = True
        self.revision_watch_interval = REVISION_WATCH_INTERVAL
        self._statements = sql.Statements(DIALECT)

    @property
    def server(self) -> str:
        return self.endpoint.server

    @property
    def location(self) -> str:
        return f"mysql {self.server}/{self.endpoint.database}"

    def _session(self, isolation: str) -> Session:
        # The server ends a writer's session whose client went silent (a partition) after
        # twice the timeout: a writer cut off while it holds the revision lock frees it then.
        # Readers hold no locks: the server's default.
        idle = 2 * self._timeout if isolation == "READ COMMITTED" else 0.0
        return Session(isolation, lock_wait=self._timeout, idle=idle)

    def _pool(self, size: int, session: Session) -> Pool:
        async def open_connection() -> AsyncmyConnection:
            return await connect(self.endpoint, session, self._timeout, self._tls)

        max_idle = min(MAX_IDLE, session.idle / 2) if session.idle else MAX_IDLE
        return Pool(open_connection, size, self._timeout, max_idle)

    async def open(self) -> None:
        self._readers = self._pool(self._pool_size, self._session("REPEATABLE READ"))
        try:
            if self.read_only:  # a --workers front-end: the writer process made the schema
                await self._check(self._readers)
                return
            await self._create_database()
            self._writers = self._pool(3, self._session("READ COMMITTED"))
            await self._create_schema()
        except DATABASE_ERRORS as exc:
            await self.close()
            if unreachable(exc):
                raise DatabaseUnreachable(
                    f"cannot open MySQL database: cannot reach {self.server}: "
                    f"{describe_connect_error(exc)}"
                ) from exc
            raise DriverError(f"cannot open MySQL database: {describe(exc)}") from exc
        except DatabaseUnreachable as exc:  # from a pooled connection: as unreachable above
            await self.close()
            raise DatabaseUnreachable(
                f"cannot open MySQL database: cannot reach {self.server}: {exc}"
            ) from exc
        except DriverError as exc:  # SchemaTooNew, or a statement the server refused
            await self.close()
            raise DriverError(f"cannot open MySQL database: {exc}") from exc

    async def _check(self, pool: Pool) -> None:
        conn = await pool.acquire()
        self._mariadb = is_mariadb(conn)
        pool.release(conn, True)

    async def _create_database(self) -> None:
        """kine creates the database when it is missing; so do we."""
        session = self._session("READ COMMITTED")
        try:
            conn = await connect(self.endpoint, session, self._timeout, self._tls)
        except DATABASE_ERRORS as exc:
            if errno(exc) != 1049:  # ER_BAD_DB_ERROR: unknown database
                raise
            conn = await connect(self.endpoint, session, self._timeout, self._tls, database=False)
            try:
                name = self.endpoint.database.replace("`", "``")
                await MyConnection(conn, self._timeout).execute(
                    f"CREATE DATABASE IF NOT EXISTS `{name}`", ()
                )
            finally:
                drop(conn)
            return
        self._mariadb = is_mariadb(conn)
        drop(conn)

    async def _create_schema(self) -> None:
        """Outside a transaction (MySQL commits at every DDL statement), under a named lock
        that keeps two instances starting at once from creating or migrating it side by side."""
        assert self._writers is not None
        async with self._connection(self._writers) as conn:
            lock = SCHEMA_LOCK.format(database=self.endpoint.database)[:64]
            wait = max(1, int(self._timeout))
            rows = await conn.fetch("SELECT GET_LOCK(%s, %s)", (lock, wait))
            if rows[0][0] != 1:
                raise DriverError(f"another instance holds the schema lock of {self.location}")
            try:
                await create_schema(conn, self._statements, secrets.randbits(63) or 1)
            finally:
                await conn.fetch("SELECT RELEASE_LOCK(%s)", (lock,))

    async def listen(self, on_commit: Callable[[int], None]) -> None:
        """MySQL has no NOTIFY: a task reads the revision counter every
        `revision_watch_interval` and calls `on_commit` when it moved."""
        if self.listen_enabled and self._watching is None:
            self._watching = asyncio.create_task(
                self._watch_revision(on_commit), name="kine-revision-watch"
            )

    async def _watch_revision(self, on_commit: Callable[[int], None]) -> None:
        session = Session("READ COMMITTED", lock_wait=self._timeout)
        conn: MyConnection | None = None
        seen: int | None = None
        delay = 0.0
        while True:
            try:
                if conn is None:
                    raw = await connect(self.endpoint, session, self._timeout, self._tls)
                    conn = MyConnection(raw, self._timeout)
                rows = await conn.fetch(self._statements.meta, ("revision",))
                delay = 0.0
            except DATABASE_ERRORS as exc:
                if conn is not None:
                    drop(conn.conn)
                    conn = None
                delay = min(max(delay * 2, 0.1), WATCH_RETRY_MAX)
                log.debug("revision watch: %s; again in %.1fs", describe(exc), delay)
                await asyncio.sleep(delay)
                continue
            revision = int(rows[0][0]) if rows else 0
            if revision != seen:
                seen = revision
                on_commit(revision)
            await asyncio.sleep(self.revision_watch_interval)

    async def close(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
            self._watching = None
        for pool in (self._readers, self._writers):
            if pool is not None:
                pool.close()
        self._readers = self._writers = None

    @contextlib.asynccontextmanager
    async def _connection(
        self, pool: Pool, timeout: float | None = None
    ) -> AsyncIterator[MyConnection]:
        """A pooled connection; dropped if it stopped answering or its caller was cancelled
        halfway through a statement, handed back otherwise."""
        try:
            raw = await pool.acquire()
        except DATABASE_ERRORS as exc:
            raise DatabaseUnreachable(describe(exc)) from exc
        reusable = False
        try:
            yield MyConnection(raw, self._timeout if timeout is None else timeout)
            reusable = True
        except BaseException as exc:
            reusable = not (unanswered(exc) or isinstance(exc, asyncio.CancelledError))
            if isinstance(exc, DATABASE_ERRORS):
                raise driver_error(exc) from exc
            raise
        finally:
            pool.release(raw, reusable)

    @contextlib.asynccontextmanager
    async def _transaction(
        self, pool: Pool, start: str, timeout: float | None = None
    ) -> AsyncIterator[MyConnection]:
        async with self._connection(pool, timeout) as conn:
            conn.begin(start)
            try:
                yield conn
            except BaseException as exc:
                if not (unanswered(exc) or isinstance(exc, asyncio.CancelledError)):
                    await conn.execute("ROLLBACK", ())  # the server answered: keep it
                raise
            await conn.execute("COMMIT", ())

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[ReadTx]:
        assert self._readers is not None, "driver not open"
        start = "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY"
        async with self._transaction(self._readers, start) as conn:
            yield SQLRead(conn, self._statements)

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[WriteTx]:
        assert self._writers is not None, "driver not open"
        async with self._transaction(self._writers, "START TRANSACTION") as conn:
            tx = SQLWrite(conn, self._statements)
            yield tx
            await tx.flush()  # the rows the transaction buffered (SQLWrite)

    @contextlib.asynccontextmanager
    async def compact(self, timeout: float) -> AsyncIterator[CompactTx]:
        """A batch gives up rather than wait on row locks or run long (writers first): InnoDB's
        lock wait in whole seconds, MariaDB's max_statement_time to the millisecond, and the
        client's own limit a second later, which drops the connection (MySQL 8 has no limit for
        a DELETE's run time)."""
        assert self._writers is not None, "driver not open"
        limits = [f"innodb_lock_wait_timeout = {max(1, round(timeout))}"]
        if self._mariadb:
            limits.append(f"max_statement_time = {timeout:.3f}")
        restore = [f"innodb_lock_wait_timeout = {max(1, round(self._timeout))}"]
        if self._mariadb:
            restore.append("max_statement_time = 0")
        async with self._connection(self._writers, timeout + 1.0) as conn:
            await conn.execute("SET SESSION " + ", ".join(limits), ())
            answered = True
            try:
                conn.begin("START TRANSACTION")
                yield SQLCompact(conn, self._statements)
                await conn.execute("COMMIT", ())
            except BaseException as exc:
                answered = not (unanswered(exc) or isinstance(exc, asyncio.CancelledError))
                if answered:
                    await conn.execute("ROLLBACK", ())
                raise
            finally:
                if answered:  # back to the writer's limits for the pool's next user
                    await conn.execute("SET SESSION " + ", ".join(restore), ())

    async def checkpoint(self) -> None:
        """Nothing to do: InnoDB reuses the pages of deleted rows by itself (purge)."""

    async def defragment(self) -> None:
        """OPTIMIZE TABLE: InnoDB rebuilds each table (online: reads and writes go on), which
        gives the space of deleted rows back to the file system."""
        assert self._writers is not None, "driver not open"
        async with self._connection(self._writers, DEFRAGMENT_TIMEOUT) as conn:
            rows = await conn.fetch("OPTIMIZE TABLE kine_kv, kine_meta, kine_lease", ())
        failed = [r for r in rows if str(r[2]).lower() == "error"]
        if failed:
            raise DriverError(f"OPTIMIZE TABLE failed: {failed[0][3]}")

    async def meta(self, name: str) -> int | None:
        assert self._readers is not None, "driver not open"
        async with self._connection(self._readers) as conn:
            rows = await conn.fetch(self._statements.meta, (name,))
        return int(rows[0][0]) if rows else None

    async def size(self) -> tuple[int, int]:
        """(the tables' files, as InnoDB's tablespaces say now; the bytes of rows and indexes,
        InnoDB's estimate). MySQL 8 renamed MariaDB's INNODB_SYS_TABLESPACES."""
        assert self._readers is not None, "driver not open"
        spaces = "INNODB_SYS_TABLESPACES" if self._mariadb else "INNODB_TABLESPACES"
        async with self._connection(self._readers) as conn:
            files = await conn.fetch(
                f"SELECT COALESCE(SUM(FILE_SIZE), 0) FROM information_schema.{spaces} "
                "WHERE NAME LIKE %s",
                (f"{self.endpoint.database}/%",),
            )
            used = await conn.fetch(
                "SELECT COALESCE(SUM(data_length + index_length), 0) "
                "FROM information_schema.tables WHERE table_schema = DATABASE() "
                "AND table_name IN ('kine_kv', 'kine_meta')",
                (),
            )
        return int(files[0][0]), int(used[0][0])
