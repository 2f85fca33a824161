"""Reading a K3s kine database (its `kine` table, on SQLite, PostgreSQL or MySQL) for `kine-server import`.

kine keeps one row per revision: `id` is the revision; `name` the key; `created`/`deleted` say
whether the row created or deleted the key; `create_revision`, `prev_revision` (the key's row
before this one) and `lease` (a TTL in seconds, not a lease id); `value`. Besides the keys it
keeps a `compact_rev_key` row, whose `prev_revision` is the revision compacted through, and
`gap-N` rows that fill revisions no write took. The columns are the same in every kine release
since 0.10. Everything is read in one snapshot, a page at a time, so a live kine may keep
writing while it is read (the import then holds the state as of the snapshot).
"""

from __future__ import annotations

import abc
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import asyncpg

from kine_server.drivers import EndpointError
from kine_server.drivers.base import DriverError
from kine_server.drivers.mysql_dsn import DSNError, MySQLEndpoint, parse
from kine_server.drivers.mysql_errors import DATABASE_ERRORS as MYSQL_ERRORS
from kine_server.drivers.mysql_errors import describe as describe_mysql
from kine_server.drivers.mysql_link import MyConnection, Session, connect, drop

#: kine's own bookkeeping row: never a key.
COMPACT_ROW = "compact_rev_key"

#: Each row with the id of the key's next row (None: the newest), found through kine's
#: unique (name, prev_revision) index.
_ROWS = (
    "SELECT k.id, k.name, k.created, k.deleted, k.create_revision, k.prev_revision, k.lease, "
    "k.value, (SELECT n.id FROM kine n WHERE n.name = k.name AND n.prev_revision = k.id) "
    "FROM kine k WHERE k.id > {p1} AND k.name <> 'compact_rev_key' ORDER BY k.id LIMIT {p2}"
)
_COUNTERS = (
    "SELECT (SELECT max(id) FROM kine), "
    "(SELECT max(prev_revision) FROM kine WHERE name = 'compact_rev_key')"
)
#: Live keys: each key's newest row, unless it deleted the key (gap rows are deletions).
_LIVE = (
    "SELECT count(*) FROM kine k WHERE k.deleted = 0 AND k.name <> 'compact_rev_key' "
    "AND NOT EXISTS (SELECT 1 FROM kine n WHERE n.name = k.name AND n.id > k.id)"
)


class KineRow(NamedTuple):
    id: int
    name: bytes
    created: bool
    deleted: bool
    create_revision: int
    prev_revision: int
    #: A TTL in seconds (0: none), as kine keeps it.
    lease: int
    value: bytes
    #: The revision of the key's next row; None for its newest.
    next_id: int | None


def _row(record: Any) -> KineRow:
    name = record[1]
    return KineRow(
        id=int(record[0]),
        name=name.encode() if isinstance(name, str) else bytes(name),
        created=bool(record[2]),
        deleted=bool(record[3]),
        create_revision=int(record[4] or 0),
        prev_revision=int(record[5] or 0),
        lease=int(record[6] or 0),
        value=bytes(record[7] or b""),
        next_id=None if record[8] is None else int(record[8]),
    )


class KineSource(abc.ABC):
    """One consistent read of a kine database: open, read, close."""

    @abc.abstractmethod
    def snapshot(self) -> contextlib.AbstractAsyncContextManager[KineSnapshot]: ...


class KineSnapshot(abc.ABC):
    @abc.abstractmethod
    async def counters(self) -> tuple[int, int]:
        """(the newest revision, the revision compacted through; 0 if never)."""

    @abc.abstractmethod
    async def rows(self, after: int, limit: int) -> list[KineRow]:
        """Rows after revision `after`, in revision order, kine's bookkeeping row left out."""

    @abc.abstractmethod
    async def live_keys(self) -> int: ...


class _SQLiteSnapshot(KineSnapshot):
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def counters(self) -> tuple[int, int]:
        newest, compacted = self._conn.execute(_COUNTERS).fetchone()
        return int(newest or 0), int(compacted or 0)

    async def rows(self, after: int, limit: int) -> list[KineRow]:
        query = _ROWS.format(p1="?", p2="?")
        return [_row(r) for r in self._conn.execute(query, (after, limit)).fetchall()]

    async def live_keys(self) -> int:
        return int(self._conn.execute(_LIVE).fetchone()[0])


def read_only_uri(path: str) -> str:
    """How to open kine's file for reading only. SQLite reads a WAL-mode file (kine's) read-only
    only if it may create the -shm file beside it, or the -wal and -shm files exist: not on a
    read-only mount of a stopped K3s's db directory. There, with no -wal file or an empty one
    (K3s stopped cleanly), the database file is the whole state and nothing can write it, so it
    is opened immutable; with a -wal file to read, as usual (SQLite then says it cannot open)."""
    wal = path + "-wal"
    if (
        not os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)
        and not os.path.exists(path + "-shm")
        and (not os.path.exists(wal) or os.path.getsize(wal) == 0)
    ):
        return f"file:{path}?immutable=1"
    return f"file:{path}?mode=ro"


class SQLiteKine(KineSource):
    """A kine SQLite file, opened read-only (kine may still be running on it)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[KineSnapshot]:
        try:
            conn = sqlite3.connect(read_only_uri(self.path), uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise DriverError(f"cannot open kine database {self.path}: {exc}") from exc
        try:
            conn.execute("BEGIN")  # one snapshot for every read below (WAL mode keeps it)
            conn.execute("SELECT 1 FROM kine LIMIT 1").fetchall()
            yield _SQLiteSnapshot(conn)
        except sqlite3.Error as exc:
            raise DriverError(f"cannot read kine database {self.path}: {exc}") from exc
        finally:
            conn.close()


class _PostgresSnapshot(KineSnapshot):
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def counters(self) -> tuple[int, int]:
        record = await self._conn.fetchrow(_COUNTERS)
        return int(record[0] or 0), int(record[1] or 0)

    async def rows(self, after: int, limit: int) -> list[KineRow]:
        query = _ROWS.format(p1="$1", p2="$2")
        return [_row(r) for r in await self._conn.fetch(query, after, limit)]

    async def live_keys(self) -> int:
        return int(await self._conn.fetchval(_LIVE))


class PostgresKine(KineSource):
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[KineSnapshot]:
        try:
            conn = await asyncpg.connect(self.dsn)
        except (OSError, asyncpg.PostgresError) as exc:
            raise DriverError(f"cannot open kine database: {exc}") from exc
        try:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                yield _PostgresSnapshot(conn)
        except asyncpg.PostgresError as exc:
            raise DriverError(f"cannot read kine database: {exc}") from exc
        finally:
            await conn.close()


#: Reading a large kine table a page at a time: each statement may take a while.
MYSQL_TIMEOUT = 300.0


class _MySQLSnapshot(KineSnapshot):
    def __init__(self, conn: MyConnection) -> None:
        self._conn = conn

    async def counters(self) -> tuple[int, int]:
        newest, compacted = (await self._conn.fetch(_COUNTERS, ()))[0]
        return int(newest or 0), int(compacted or 0)

    async def rows(self, after: int, limit: int) -> list[KineRow]:
        query = _ROWS.format(p1="%s", p2="%s")
        return [_row(r) for r in await self._conn.fetch(query, (after, limit))]

    async def live_keys(self) -> int:
        return int((await self._conn.fetch(_LIVE, ()))[0][0])


class MySQLKine(KineSource):
    """kine's MySQL database, read in one REPEATABLE READ snapshot (kine may keep writing)."""

    def __init__(self, endpoint: MySQLEndpoint) -> None:
        self.endpoint = endpoint

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[KineSnapshot]:
        session = Session("REPEATABLE READ", lock_wait=MYSQL_TIMEOUT)
        try:
            raw = await connect(self.endpoint, session, MYSQL_TIMEOUT, self.endpoint.ssl_context())
        except MYSQL_ERRORS as exc:
            raise DriverError(f"cannot open kine database: {describe_mysql(exc)}") from exc
        conn = MyConnection(raw, MYSQL_TIMEOUT)
        try:
            await conn.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY", ())
            yield _MySQLSnapshot(conn)
        except MYSQL_ERRORS as exc:
            raise DriverError(f"cannot read kine database: {describe_mysql(exc)}") from exc
        finally:
            drop(raw)


def open_kine(dsn: str) -> KineSource:
    """kine's own --endpoint syntax: sqlite://PATH[?options], postgres://… or
    mysql://user:pass@tcp(host:port)/db (its default database is `kubernetes`, as kine's)."""
    scheme, sep, rest = dsn.partition("://")
    if scheme == "sqlite" and sep:
        path = rest.split("?", 1)[0]
        if path:
            return SQLiteKine(path)
    if scheme in ("postgres", "postgresql") and sep and rest.split("/", 1)[0]:
        base, mark, query = dsn.partition("?")
        if "/" not in base[len(scheme) + 3 :]:
            base += "/kubernetes"
        return PostgresKine(base + mark + query)
    if scheme == "mysql" and sep:
        try:
            return MySQLKine(parse(dsn))
        except DSNError as exc:
            raise EndpointError(f"invalid --from {dsn!r}: {exc}") from exc
    raise EndpointError(
        f"invalid --from {dsn!r}: expected kine's sqlite://PATH, postgres://user@host/db "
        "or mysql://user:pass@tcp(host:port)/db"
    )
