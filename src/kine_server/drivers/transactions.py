"""The read, write and compaction transactions and schema creation, written once for every database.

A database's driver provides a `Connection`: a handful of primitives that run rendered
statements on one connection inside a transaction the driver began. Everything the store asks
of a transaction (base.ReadTx, WriteTx, CompactTx) is built here from those primitives and the
dialect's `sql.Statements`, so the two drivers differ only in how they connect, where each
statement runs (SQLite: inline on the event loop or on the connection's thread; PostgreSQL:
asyncpg, with its timeouts) and how their errors read.

The primitives say what a statement is like, not how to run it: `fetch_rows` may return many
rows (the driver converts them off the event loop, or in chunks), `execute_all` is a batch of
statements that may touch many rows when `bulk` (the SQLite writer sends it to its thread in
one hop; a later driver may send it in one round trip).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, Protocol, TypeVar

from kine_server.drivers import schema
from kine_server.drivers.base import (
    SCHEMA_VERSION,
    Change,
    ChangeRow,
    CompactTx,
    Counters,
    DriverError,
    RawRow,
    ReadTx,
    Row,
    WriteTx,
    change,
)
from kine_server.drivers.sql import Batch, Statements, member_of, stored_member

T = TypeVar("T")
Record = Sequence[Any]


class Connection(Protocol):
    """One database connection inside a transaction, as the generic layer uses it. Statements
    come rendered (sql.Statements); `params` are in placeholder order. Errors are the database
    library's own: the driver's transaction maps them (its `driver_error`)."""

    async def fetch(self, query: str, params: Sequence[Any]) -> list[Record]:
        """Every row of a query that returns a few."""

    async def fetch_rows(
        self, query: str, params: Sequence[Any], convert: Callable[[Record], T]
    ) -> list[T]:
        """Every row of a query that may return many, each through `convert`, which the
        connection may run away from the event loop (a thread) or a chunk at a time."""

    def fetch_soon(self, query: str, params: Sequence[Any]) -> Awaitable[list[Record]]:
        """`fetch`, started now if the connection can run it beside the caller's own work;
        otherwise when awaited."""

    async def execute(self, query: str, params: Sequence[Any]) -> int:
        """Run one statement; the number of rows it changed."""

    async def executemany(self, query: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each of `rows`."""

    async def execute_all(self, statements: Batch, bulk: bool) -> None:
        """Run the statements in order; `bulk`: they may touch many rows."""


#: Records converted between two turns of the event loop by `converted`: asyncpg and asyncmy
#: hand over a 50 000-row result at once, and converting it in one go held the loop for every
#: other client.
CONVERT_CHUNK = 1000


async def converted(records: Sequence[Record], convert: Callable[[Record], T]) -> list[T]:
    """`convert` of each record, yielding to the event loop between chunks (fetch_rows of a
    connection whose library reads the whole result on the loop)."""
    rows: list[T] = []
    for start in range(0, len(records), CONVERT_CHUNK):
        if start:
            await asyncio.sleep(0)
        rows += [convert(r) for r in records[start : start + CONVERT_CHUNK]]
    return rows


def to_row(record: Record) -> Row:
    """A Row from ROW_COLUMNS or KEY_COLUMNS (whose value is NULL). The connection hands over
    byte strings as `bytes` (sqlite3 and asyncpg both do): no copy here, once per row."""
    key, create, mod, version, value, lease = record
    return Row(key, create, mod, version, value if value is not None else b"", lease)


def to_change(record: Record) -> Change:
    return change(tuple(record))


def _counters(records: list[Record]) -> Counters:
    values = {r[0]: r[1] for r in records}
    return Counters(
        values["revision"],
        values["compact_revision"],
        values["compacted_through"],
        values.get("auth_generation", 0),
    )


async def _first_int(rows: Awaitable[list[Record]]) -> int:
    return int((await rows)[0][0])


class SQLRead(ReadTx):
    """A consistent snapshot, over a driver's connection."""

    def __init__(self, conn: Connection, statements: Statements) -> None:
        self._conn = conn
        self._s = statements
        self.max_key_bytes = statements.dialect.max_key_bytes

    async def counters(self) -> Counters:
        return _counters(await self._conn.fetch(self._s.counters, ()))

    async def range(
        self, key: bytes, end: bytes | None, at: int | None, limit: int, with_values: bool = True
    ) -> list[Row]:
        query, params = self._s.range(key, end, at, limit, with_values)
        if end is None:  # one key: one row at most
            return [to_row(r) for r in await self._conn.fetch(query, params)]
        return await self._conn.fetch_rows(query, params, to_row)

    async def count(self, key: bytes, end: bytes | None, at: int | None) -> int:
        query, params = self._s.count(key, end, at)
        return int((await self._conn.fetch(query, params))[0][0])

    def count_soon(self, key: bytes, end: bytes | None, at: int | None) -> Awaitable[int]:
        query, params = self._s.count(key, end, at)
        return _first_int(self._conn.fetch_soon(query, params))

    async def changes(
        self, after: int, through: int, key: bytes, end: bytes | None, limit: int
    ) -> list[Change]:
        query, params = self._s.changes(after, through, key, end, limit)
        return await self._conn.fetch_rows(query, params, to_change)

    async def revision_changes(
        self, revision: int, after_sub: int, key: bytes, end: bytes | None, limit: int
    ) -> list[Change]:
        query, params = self._s.revision_changes(revision, after_sub, key, end, limit)
        return await self._conn.fetch_rows(query, params, to_change)

    async def lease(self, lease_id: int) -> tuple[int, int] | None:
        rows = await self._conn.fetch(self._s.lease, (lease_id,))
        return (rows[0][0], rows[0][1]) if rows else None

    async def leases(self) -> list[int]:
        return [r[0] for r in await self._conn.fetch(self._s.leases, ())]

    async def any_lease(self) -> bool:
        return bool((await self._conn.fetch(self._s.any_lease, ()))[0][0])

    async def expired_leases(self, limit: int) -> list[int]:
        return [r[0] for r in await self._conn.fetch(self._s.expired_leases, (limit,))]

    async def dump(self, after: tuple[int, int], limit: int) -> list[RawRow]:
        rows = await self._conn.fetch(self._s.dump, (after[0], after[0], after[1], limit))
        return [RawRow(*r) for r in rows]

    async def all_leases(self) -> list[tuple[int, int, int]]:
        return [(r[0], r[1], r[2]) for r in await self._conn.fetch(self._s.all_leases, ())]

    async def all_meta(self) -> dict[str, int]:
        return {r[0]: r[1] for r in await self._conn.fetch(self._s.all_meta, ())}

    async def alarms(self) -> list[tuple[int, int]]:
        return [(member_of(r[0]), r[1]) for r in await self._conn.fetch(self._s.alarms, ())]

    async def auth_records(self) -> list[tuple[str, bytes, bytes]]:
        rows = await self._conn.fetch(self._s.auth_records, ())
        return [(r[0], bytes(r[1]), bytes(r[2])) for r in rows]

    async def leased(self, lease_id: int) -> list[Row]:
        return await self._conn.fetch_rows(self._s.leased, (lease_id,), to_row)


class SQLWrite(SQLRead, WriteTx):
    """The one write transaction. The driver's BEGIN and `lock()` serialise writers: SQLite's
    BEGIN IMMEDIATE holds the database's one write lock, PostgreSQL's `lock_counters` locks
    the revision row (see sql.LOCK_COUNTERS).

    The rows a group commit appends are buffered and written with one statement per kind at
    the first read of the key table or at `flush` (before COMMIT): two statements a batch
    instead of two a request, and on PostgreSQL two round trips instead of two a request. A
    key's newest row is answered from the buffer when the buffer holds it, and a row the same
    batch supersedes gets its next_revision in the buffer, before it is written."""

    def __init__(self, conn: Connection, statements: Statements) -> None:
        super().__init__(conn, statements)
        #: Rows to insert (RAW_COLUMNS: next_revision last, set when a later one supersedes).
        self._rows: list[list[Any]] = []
        #: Each buffered key's newest row: its index in `_rows`.
        self._newest_row: dict[bytes, int] = {}
        #: (superseding revision, key, mod_revision) of rows already in the table.
        self._superseded: list[tuple[int, bytes, int]] = []

    def take_buffered(self) -> list[tuple[str, Sequence[Sequence[Any]]]]:
        """The statements that write what is buffered (each with its rows, for executemany),
        in order; the buffer is empty afterwards. A driver that commits on a thread runs them
        in the same hop as its COMMIT."""
        statements: list[tuple[str, Sequence[Sequence[Any]]]] = []
        if self._superseded:
            statements.append((self._s.supersede, self._superseded))
            self._superseded = []
        if self._rows:
            statements.append((self._s.insert_raw, self._rows))
            self._rows = []
            self._newest_row.clear()
        return statements

    async def flush(self) -> None:
        for statement, rows in self.take_buffered():
            await self._conn.executemany(statement, rows)

    async def lock(self) -> Counters:
        return _counters(await self._conn.fetch(self._s.lock_counters, ()))

    async def newest(self, key: bytes) -> Row | None:
        index = self._newest_row.get(key)
        if index is not None:
            row = self._rows[index]
            return Row(row[0], row[1], row[2], row[3], row[4], row[5])
        rows = await self._conn.fetch(self._s.newest, (key,))
        return to_row(rows[0]) if rows else None

    async def newest_many(self, keys: Collection[bytes]) -> dict[bytes, Row | None]:
        found: dict[bytes, Row | None] = {}
        missing = []
        for key in keys:
            if key in self._newest_row:
                found[key] = await self.newest(key)
            else:
                missing.append(key)
        statement = self._s.newest_many
        if statement is None or len(missing) < 2:
            for key in missing:
                found[key] = await self.newest(key)
            return found
        found.update(dict.fromkeys(missing))
        encoded = self._s.dialect.encode_keys(missing)
        for record in await self._conn.fetch(statement, (encoded,)):
            row = to_row(record)
            found[row.key] = row
        return found

    async def append(self, rows: list[ChangeRow], superseded: list[tuple[bytes, int]]) -> None:
        revision = rows[0].mod_revision
        buffered, newest = self._rows, self._newest_row
        for key, mod_revision in superseded:
            index = newest.get(key)
            if index is None:
                self._superseded.append((revision, key, mod_revision))
            elif buffered[index][2] == mod_revision:
                buffered[index][7] = revision
            else:  # not the newest row: never asked for, but then the table must answer
                await self.flush()
                self._superseded.append((revision, key, mod_revision))
        for row in rows:
            newest[row.key] = len(buffered)
            buffered.append([*row, None])
        if self.write_through:
            await self.flush()

    # Every other statement that reads or writes the key table sees the buffered rows first.

    async def range(
        self, key: bytes, end: bytes | None, at: int | None, limit: int, with_values: bool = True
    ) -> list[Row]:
        await self.flush()
        return await super().range(key, end, at, limit, with_values)

    async def count(self, key: bytes, end: bytes | None, at: int | None) -> int:
        await self.flush()
        return await super().count(key, end, at)

    def count_soon(self, key: bytes, end: bytes | None, at: int | None) -> Awaitable[int]:
        return self.count(key, end, at)

    async def changes(
        self, after: int, through: int, key: bytes, end: bytes | None, limit: int
    ) -> list[Change]:
        await self.flush()
        return await super().changes(after, through, key, end, limit)

    async def revision_changes(
        self, revision: int, after_sub: int, key: bytes, end: bytes | None, limit: int
    ) -> list[Change]:
        await self.flush()
        return await super().revision_changes(revision, after_sub, key, end, limit)

    async def dump(self, after: tuple[int, int], limit: int) -> list[RawRow]:
        await self.flush()
        return await super().dump(after, limit)

    async def leased(self, lease_id: int) -> list[Row]:
        await self.flush()
        return await super().leased(lease_id)

    async def delete_range(
        self, key: bytes, end: bytes | None, revision: int, first_sub: int
    ) -> None:
        await self.flush()
        statements = self._s.delete_range(key, end, revision, first_sub)
        await self._conn.execute_all(statements, bulk=end is not None)  # one key: as a Put

    async def delete_leased(self, lease_id: int, revision: int, first_sub: int) -> None:
        await self.flush()
        await self._conn.execute_all(self._s.delete_leased(lease_id, revision, first_sub), True)

    async def insert_raw(self, rows: list[RawRow]) -> None:
        await self.flush()
        await self._conn.executemany(self._s.insert_raw, rows)

    async def link_history(self) -> None:
        await self.flush()
        await self._conn.execute(self._s.link_history, ())

    async def insert_lease(self, lease_id: int, ttl: int) -> bool:
        return await self._conn.execute(self._s.insert_lease, (lease_id, ttl, ttl)) == 1

    async def renew_leases(self, lease_ids: Collection[int]) -> dict[int, int]:
        encode = self._s.dialect.encode_ids
        if self._s.dialect.update_returning:
            rows = await self._conn.fetch(self._s.renew_leases, (encode(list(lease_ids)),))
        else:
            rows = await self._conn.fetch(self._s.renewable_leases, (encode(list(lease_ids)),))
            if rows:
                renewable = [int(r[0]) for r in rows]
                await self._conn.execute(self._s.renew_locked_leases, (encode(renewable),))
        return {int(lease_id): int(ttl) for lease_id, ttl in rows}

    async def delete_lease(self, lease_id: int, expired_only: bool) -> bool:
        statement = self._s.delete_expired_lease if expired_only else self._s.delete_lease
        return await self._conn.execute(statement, (lease_id,)) == 1

    async def resume_leases(self, promise_ms: int) -> None:
        await self._conn.execute(self._s.resume_leases, ())
        await self.serve_leases(promise_ms)

    async def serve_leases(self, promise_ms: int) -> None:
        await self._conn.execute(self._s.leases_served_until, (promise_ms,))

    async def set_revision(self, revision: int) -> None:
        await self._conn.execute(self._s.set_meta, (revision, "revision"))
        notify = self._s.notify_commit
        if notify is not None:
            # Delivered at commit: other instances' pollers wake at once, not at their interval.
            await self._conn.execute(notify, (str(revision),))

    async def set_meta(self, name: str, value: int) -> None:
        await self._conn.execute(self._s.set_meta, (value, name))

    async def raise_alarm(self, member_id: int, alarm: int) -> bool:
        params = (stored_member(member_id), alarm)
        return await self._conn.execute(self._s.raise_alarm, params) == 1

    async def clear_alarm(self, member_id: int, alarm: int) -> bool:
        params = (stored_member(member_id), alarm)
        return await self._conn.execute(self._s.clear_alarm, params) == 1

    async def put_auth_record(self, kind: str, name: bytes, value: bytes) -> None:
        await self._conn.execute(self._s.put_auth_record, (kind, name, value))

    async def delete_auth_record(self, kind: str, name: bytes) -> None:
        await self._conn.execute(self._s.delete_auth_record, (kind, name))

    async def lock_compact_revision(self) -> int:
        return int((await self._conn.fetch(self._s.lock_compact_revision, ()))[0][0])

    async def advance_compact_revision(self, revision: int) -> None:
        await self._conn.execute(self._s.advance_compact_revision, (revision,))


class SQLCompact(CompactTx):
    """One compaction batch, on a connection of its own (the driver bounds its waits)."""

    def __init__(self, conn: Connection, statements: Statements) -> None:
        self._conn = conn
        self._s = statements

    async def counters(self) -> Counters:
        return _counters(await self._conn.fetch(self._s.counters, ()))

    async def delete_history(self, after: int, through: int) -> int:
        superseded = await self._conn.execute(self._s.delete_superseded, (after, through))
        tombstones = await self._conn.execute(self._s.delete_tombstones, (after, through))
        return superseded + tombstones

    async def claim(self, expected: int, through: int) -> bool:
        return await self._conn.execute(self._s.claim_compacted, (through, expected)) == 1

    async def advance_compact_revision(self, revision: int) -> None:
        await self._conn.execute(self._s.advance_compact_revision, (revision,))


class SchemaTooNew(DriverError):
    """The database was made by a newer kine-server: this one must not touch it."""


async def create_schema(conn: Connection, statements: Statements, cluster_id: int) -> None:
    """Create what is missing, seed a new store's counters (`cluster_id` is a new store's),
    migrate an older schema. Inside the driver's transaction, and whatever lock keeps two
    instances from doing it at once."""
    for statement in statements.schema:
        await conn.execute(statement, ())
    await conn.executemany(statements.seed_meta, schema.seed_meta(cluster_id))
    found = int((await conn.fetch(statements.meta, ("schema_version",)))[0][0])
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"schema version {found} is newer than this kine-server ({SCHEMA_VERSION})"
        )
    for version in range(max(found, 1), SCHEMA_VERSION):
        for statement in statements.migrations[version]:
            await conn.execute(statement, ())
