"""MySQL/MariaDB connections for the generic layer: asyncmy connections, their settings, a pool.

asyncmy (Cython) over aiomysql (pure Python): on kine-server's hot paths, measured here on
MariaDB 10.11, a point read in a transaction took 420-500 us against 500 us, a one-row insert
transaction 420-690 us against 1 180 us, and reading a 10 000-row LIST 24-29 ms against 93 ms
(aiomysql parses each row in Python); aiomysql 0.3.2 also fails to escape bytes with the current
PyMySQL 1.2.

Every wait on the database is bounded (`asyncio.timeout`): connecting, waiting for a pooled
connection, each statement. A connection whose statement got no answer in time, or whose caller
was cancelled halfway, is dropped (its socket closed, no round trip that would wait as long
again): the server then rolls its transaction back and frees its locks as soon as it sees the
socket close, and `wait_timeout` ends a session whose client vanished without a word (a
partition), so an instance cut off while holding the revision lock blocks the others for at most
twice the datastore timeout, as PostgreSQL's idle_in_transaction_session_timeout does.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncmy
from asyncmy.connection import Connection as AsyncmyConnection

from kine_server.drivers import sql
from kine_server.drivers.mysql_dsn import MySQLEndpoint
from kine_server.drivers.transactions import converted

T = TypeVar("T")
Record = Sequence[Any]


#: Every session's SQL mode, whatever the server's default: strict (a value that does not fit is
#: an error, not a silent truncation), and without a server's ANSI_QUOTES or
#: NO_BACKSLASH_ESCAPES, which would change how statements and escaped bytes read. (MySQL 8
#: refuses NO_AUTO_CREATE_USER, which MariaDB still lists by default.)
SQL_MODE = "STRICT_ALL_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION"


@dataclass(frozen=True)
class Session:
    """What every connection of one pool is set to when it is opened."""

    #: "READ COMMITTED" (the writer's, the compactor's) or "REPEATABLE READ" (snapshots).
    isolation: str
    #: Seconds a statement may wait for a row lock (InnoDB's unit is whole seconds, at least 1).
    lock_wait: float
    #: Seconds the server keeps a session whose client says nothing (0: the server's default).
    idle: float = 0.0


class MyConnection:
    """transactions.Connection over one asyncmy connection: statements formatted by asyncmy
    (pyformat; Dialect.percent doubles the SQL's own `%`), each bounded by `timeout`."""

    def __init__(self, conn: AsyncmyConnection, timeout: float) -> None:
        self.conn = conn
        self._cursor = conn.cursor()
        self.timeout = timeout
        #: A START TRANSACTION not sent yet: it goes with the first statement, in one round trip.
        self._begin = ""

    def begin(self, start: str) -> None:
        """Start a transaction with the next statement (asyncmy allows several statements in
        one query; the server runs them in order and answers each): a transaction costs one
        round trip less. If no statement follows, none was begun, and the COMMIT is a no-op."""
        self._begin = start

    async def _run(self, query: str, params: Sequence[Any]) -> int:
        """Run `query` (after a pending START TRANSACTION); its row count."""
        if not self._begin:
            return int(await self._cursor.execute(query, tuple(params)))
        begin, self._begin = self._begin, ""
        await self._cursor.execute(f"{begin}; {query}", tuple(params))
        await self._cursor.nextset()
        count = self._cursor.rowcount  # asyncmy's stub says object; it is an int
        assert isinstance(count, int)
        return count

    async def fetch(self, query: str, params: Sequence[Any]) -> list[Record]:
        async with asyncio.timeout(self.timeout):
            await self._run(query, params)
            rows: list[Record] = await self._cursor.fetchall()
        return rows

    async def fetch_rows(
        self, query: str, params: Sequence[Any], convert: Callable[[Record], T]
    ) -> list[T]:
        return await converted(await self.fetch(query, params), convert)

    def fetch_soon(self, query: str, params: Sequence[Any]) -> Awaitable[list[Record]]:
        return self.fetch(query, params)  # one connection, one statement at a time

    async def execute(self, query: str, params: Sequence[Any]) -> int:
        """The rows changed: asyncmy does not ask for CLIENT_FOUND_ROWS, so an UPDATE that
        matches a row without changing it, or an `ON DUPLICATE KEY UPDATE c = c` that finds the
        key, counts 0, and only a row really inserted or deleted counts 1 (what the generic
        layer relies on)."""
        async with asyncio.timeout(self.timeout):
            return await self._run(query, params)

    async def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        async with asyncio.timeout(self.timeout):
            if self._begin:
                await self._run("DO 0", ())
            # An INSERT ... VALUES becomes one multi-row INSERT (asyncmy joins them).
            await self._cursor.executemany(query, [tuple(r) for r in rows])

    async def execute_all(self, statements: sql.Batch, bulk: bool) -> None:
        for query, params in statements:
            await self.execute(query, params)


def drop(conn: AsyncmyConnection) -> None:
    """Close a connection's socket without a word to the server."""
    with contextlib.suppress(Exception):
        conn.close()


async def connect(
    endpoint: MySQLEndpoint,
    session: Session,
    timeout: float,
    tls: ssl.SSLContext | None,
    database: bool = True,
) -> AsyncmyConnection:
    """A connection set up as `session` says, within `timeout` (the server's handshake
    included); `database=False`: to no database (to create it)."""
    async with asyncio.timeout(timeout):
        conn = await asyncmy.connect(
            host=endpoint.host or None,
            port=endpoint.port or 3306,
            unix_socket=endpoint.socket or None,
            user=endpoint.user,
            password=endpoint.password,
            database=endpoint.database if database else None,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=max(1, math.ceil(timeout)),
            ssl=tls,
        )
        try:
            async with conn.cursor() as cursor:
                await cursor.execute(f"SET SESSION TRANSACTION ISOLATION LEVEL {session.isolation}")
                settings = [
                    f"sql_mode = '{SQL_MODE}'",
                    # NOW(3) in UTC: UNIX_TIMESTAMP() of it is then never ambiguous (no DST).
                    "time_zone = '+00:00'",
                    f"innodb_lock_wait_timeout = {max(1, math.ceil(session.lock_wait))}",
                    # No notes ("table already exists" of CREATE TABLE IF NOT EXISTS): asyncmy
                    # would fetch each with SHOW WARNINGS, one more round trip, and log it.
                    "sql_notes = 0",
                ]
                if session.idle:
                    settings.append(f"wait_timeout = {max(1, math.ceil(session.idle))}")
                await cursor.execute("SET SESSION " + ", ".join(settings))
        except BaseException:
            drop(conn)
            raise
    return conn


def alive(conn: AsyncmyConnection) -> bool:
    """Whether an idle connection's socket is still open: one the server or the network closed
    while it sat in the pool (a restart, a reset) would fail the request that took it. (asyncmy
    has no public test of its transport; without the attribute every connection counts as
    alive, and a dead one costs one failed request.)"""
    if not hasattr(conn, "_transport"):
        return True
    transport: asyncio.BaseTransport | None = conn._transport
    return transport is not None and not transport.is_closing()


def is_mariadb(conn: AsyncmyConnection) -> bool:
    return "mariadb" in conn.get_server_info().lower()


class Pool:
    """Connections opened by `open`, at most `size` in use; an idle one older than `max_idle`
    is closed rather than reused (the server may have ended it: `wait_timeout`)."""

    def __init__(
        self,
        open_connection: Callable[[], Awaitable[AsyncmyConnection]],
        size: int,
        timeout: float,
        max_idle: float,
    ) -> None:
        self._open = open_connection
        self._slots = asyncio.Semaphore(size)
        self._idle: list[tuple[float, AsyncmyConnection]] = []
        self._timeout = timeout
        self._max_idle = max_idle
        self._closed = False

    async def acquire(self) -> AsyncmyConnection:
        """A connection within the pool's timeout (TimeoutError when none came)."""
        if self._closed:
            raise ConnectionError("the MySQL pool is closed")
        async with asyncio.timeout(self._timeout):
            await self._slots.acquire()
        try:
            now = time.monotonic()
            while self._idle:
                since, conn = self._idle.pop()
                if now - since < self._max_idle and alive(conn):
                    return conn
                drop(conn)
            return await self._open()
        except BaseException:
            self._slots.release()
            raise

    def release(self, conn: AsyncmyConnection, reusable: bool) -> None:
        now = time.monotonic()
        while self._idle and now - self._idle[0][0] >= self._max_idle:
            drop(self._idle.pop(0)[1])  # the oldest: unused for a while, the server may end it
        if reusable and not self._closed:
            self._idle.append((now, conn))
        else:
            drop(conn)
        self._slots.release()

    def close(self) -> None:
        """Close the idle connections now, and the others as they come back."""
        self._closed = True
        idle, self._idle = self._idle, []
        for _, conn in idle:
            drop(conn)
