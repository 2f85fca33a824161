"""The narrow interface between the MVCC store and a SQL database.

A driver owns SQL and nothing else: it stores rows of a log-structured key table and a few named
counters, and gives the store two kinds of transaction. Every revision rule, every etcd semantic and
every error message lives in the store; a driver never decides what a revision means.

The key table holds one row per change of a key:

    key, create_revision, mod_revision, version, value, lease, sub, next_revision

`version == 0` marks a deletion (a tombstone). `sub` orders the changes made by one revision; one
key may change twice in one revision (etcd applies `Txn{put k, delete k}`), and then its first row's
`next_revision` is its own `mod_revision`. `next_revision` is the revision of the key's following
row, or NULL while the row is the newest: the state at revision R is then "rows with mod_revision
<= R < next_revision", and compaction to R may drop every row whose `next_revision <= R` and every
tombstone at or below R.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Collection
from contextlib import AbstractAsyncContextManager
from typing import Any, NamedTuple

#: 2: changes of one key within one revision (a Txn that puts and deletes it) are ordered by
#: `sub`, so (key, mod_revision) is no longer unique; "never compacted" is -1, as in etcd.
#: 3: alarms are kept as etcd keeps them, one row of kine_alarm per raised (member id, alarm
#: type), instead of one NOSPACE flag in kine_meta.
#: 4: etcd's auth store: users and roles as rows of kine_auth (etcd's authpb messages, as its
#: authUsers and authRoles buckets hold them), the enabled flag and auth revision in kine_meta.
SCHEMA_VERSION = 4

#: Sentinel end of range: every key at or after the start key.
OPEN_END = b""


class Row(NamedTuple):
    """One row of the key table; field order matches etcd's mvccpb.KeyValue."""

    key: bytes
    create_revision: int
    mod_revision: int
    version: int
    value: bytes
    lease: int


class ChangeRow(NamedTuple):
    """A row as the event log sees it: a Row plus its position within its revision."""

    key: bytes
    create_revision: int
    mod_revision: int
    version: int
    value: bytes
    lease: int
    sub: int


class RawRow(NamedTuple):
    """A row of the key table exactly as stored (snapshots copy these)."""

    key: bytes
    create_revision: int
    mod_revision: int
    version: int
    value: bytes
    lease: int
    sub: int
    next_revision: int | None


class Change(NamedTuple):
    """One row of history and the live row it replaced (None for a create)."""

    row: ChangeRow
    prev: Row | None


def change(record: tuple[Any, ...]) -> Change:
    """A Change from the 12 columns of sql.changes_template (bytes already converted)."""
    key = record[0]
    row = ChangeRow(key, *record[1:7])
    if record[8] is None:
        return Change(row, None)
    return Change(row, Row(key, record[7], record[8], record[9], record[10], record[11]))


class Counters(NamedTuple):
    """The store's counters as one consistent read.

    revision: the newest committed store revision.
    compact_revision: reads below it are refused (what etcd calls the compact revision); -1
        while the store has never been compacted, as etcd's compactMainRev.
    compacted_through: history at or below it has been physically removed.
    auth_generation: counts the auth store's changes (auth/store.py): the writer compares a
        request's with it, under the revision lock (see WriteSide).
    """

    revision: int
    compact_revision: int
    compacted_through: int
    auth_generation: int = 0


class DriverError(Exception):
    """The database could not be reached, or gave up for a reason a retry may cure: the
    connection is gone, a timeout, a lock held too long. Clients are told UNAVAILABLE and retry."""

    retryable = True


class StatementError(DriverError):
    """The database refused a statement or its data (a constraint, a value out of range): the
    same request would fail again, so it is an internal error, never a reason to retry."""

    retryable = False


class DatabaseUnreachable(DriverError):
    """The database gave no answer: unreachable, no reply in time, or the connection was lost.

    No request is at fault, so none is worth retrying on its own at once: it would only wait for
    the same silence again."""


class ReadTx(abc.ABC):
    """A consistent snapshot of the store.

    `at=None` asks for the newest rows of the snapshot; an integer asks for the state as of that
    revision. `end=None` is a single key, `end == OPEN_END` every key from `key` on, otherwise [key, end).
    """

    #: The longest key the database can index, if it has a limit.
    max_key_bytes: int | None = None

    @abc.abstractmethod
    async def counters(self) -> Counters: ...

    @abc.abstractmethod
    async def range(
        self, key: bytes, end: bytes | None, at: int | None, limit: int, with_values: bool = True
    ) -> list[Row]:
        """Live rows in key order; `limit <= 0` means no limit; values are b'' without `with_values`."""

    @abc.abstractmethod
    async def count(self, key: bytes, end: bytes | None, at: int | None) -> int: ...

    def count_soon(self, key: bytes, end: bytes | None, at: int | None) -> Awaitable[int]:
        """`count`, started now and awaited later: a driver that can run it beside the caller's
        own work (building a response) overrides this; by default it runs when awaited."""
        return self.count(key, end, at)

    @abc.abstractmethod
    async def lease(self, lease_id: int) -> tuple[int, int] | None:
        """(granted TTL in seconds, milliseconds left by the database's clock), or None."""

    @abc.abstractmethod
    async def leases(self) -> list[int]: ...

    @abc.abstractmethod
    async def any_lease(self) -> bool: ...

    @abc.abstractmethod
    async def expired_leases(self, limit: int) -> list[int]:
        """Leases whose deadline has passed by the database's clock, soonest first."""

    @abc.abstractmethod
    async def dump(self, after: tuple[int, int], limit: int) -> list[RawRow]:
        """Rows after (mod_revision, sub), in that order, exactly as stored."""

    @abc.abstractmethod
    async def all_leases(self) -> list[tuple[int, int, int]]:
        """(id, ttl, deadline ms) of every lease."""

    @abc.abstractmethod
    async def all_meta(self) -> dict[str, int]: ...

    @abc.abstractmethod
    async def alarms(self) -> list[tuple[int, int]]:
        """Every raised alarm as (member id, alarm type), the id as etcd's uint64."""

    @abc.abstractmethod
    async def auth_records(self) -> list[tuple[str, bytes, bytes]]:
        """Every (kind, name, value) of the auth store: kind "user" or "role", the value an
        authpb.User or authpb.Role."""

    @abc.abstractmethod
    async def leased(self, lease_id: int) -> list[Row]:
        """The live keys attached to a lease, in key order."""

    @abc.abstractmethod
    async def changes(
        self, after: int, through: int, key: bytes, end: bytes | None, limit: int
    ) -> list[Change]:
        """History of a key range with after < mod_revision <= through, in (revision, sub) order,
        tombstones included; at most `limit` rows."""

    @abc.abstractmethod
    async def revision_changes(
        self, revision: int, after_sub: int, key: bytes, end: bytes | None, limit: int
    ) -> list[Change]:
        """The changes of a key range in one revision with sub > after_sub, in sub order; at
        most `limit` rows."""


class WriteTx(ReadTx):
    """The one write transaction in flight. It holds the revision lock from `lock()` to commit."""

    @abc.abstractmethod
    async def lock(self) -> Counters:
        """Take the revision lock (serialising writers, across processes too) and read the counters."""

    @abc.abstractmethod
    async def newest(self, key: bytes) -> Row | None:
        """The key's newest row, tombstone included (version 0), or None if it has no history."""

    async def newest_many(self, keys: Collection[bytes]) -> dict[bytes, Row | None]:
        """`newest` of each key (None for a key without history), in as few statements as the
        database allows: a group commit reads its requests' keys at once."""
        return {key: await self.newest(key) for key in keys}

    @abc.abstractmethod
    async def append(self, rows: list[ChangeRow], superseded: list[tuple[bytes, int]]) -> None:
        """Mark each key's newest row, (key, its mod_revision), superseded by the revision of
        `rows`, then insert `rows` (all of one revision). The rows may be buffered until the
        next statement that reads the key table, or `flush`: every read of this transaction
        sees them, and the driver flushes before COMMIT."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Write what `append` buffered. A statement error surfaces here, for the rows of every
        request buffered since the last flush (see `write_through`)."""

    #: Write each `append` at once, so that a statement error surfaces in the request that made
    #: it: the writer redoes a batch this way when a buffered write failed.
    write_through: bool = False

    @abc.abstractmethod
    async def delete_range(
        self, key: bytes, end: bytes | None, revision: int, first_sub: int
    ) -> None:
        """Delete every live key of the range at `revision`, as `append` of a tombstone for each
        would (subs from `first_sub` on, in key order), in a few statements however many keys."""

    @abc.abstractmethod
    async def delete_leased(self, lease_id: int, revision: int, first_sub: int) -> None:
        """Delete every live key attached to the lease, as `delete_range` deletes a range."""

    @abc.abstractmethod
    async def insert_raw(self, rows: list[RawRow]) -> None: ...

    @abc.abstractmethod
    async def link_history(self) -> None:
        """Set every row's next_revision from the rows after it (see sql.LINK_HISTORY)."""

    @abc.abstractmethod
    async def insert_lease(self, lease_id: int, ttl: int) -> bool:
        """A lease due `ttl` seconds from now (the database's clock); False if the id is taken."""

    @abc.abstractmethod
    async def renew_leases(self, lease_ids: Collection[int]) -> dict[int, int]:
        """Move each lease's deadline to now + its TTL, in one statement (a keep-alive stream
        renews many at once); the TTL of each one renewed. A lease that does not exist, or is
        already past its deadline, is left out."""

    @abc.abstractmethod
    async def delete_lease(self, lease_id: int, expired_only: bool) -> bool:
        """Delete the lease (with `expired_only`, only if its deadline has passed); False if
        nothing was deleted."""

    @abc.abstractmethod
    async def resume_leases(self, promise_ms: int) -> None:
        """Move every deadline on by the time no instance has served the store (since the
        `lease_served_until` the last one promised), then promise `promise_ms` from now."""

    @abc.abstractmethod
    async def serve_leases(self, promise_ms: int) -> None:
        """Promise that an instance counts lease time for `promise_ms` from now (0: a clean stop)."""

    @abc.abstractmethod
    async def set_revision(self, revision: int) -> None: ...

    @abc.abstractmethod
    async def set_meta(self, name: str, value: int) -> None:
        """Set a named integer of the meta table (alarms and the like)."""

    @abc.abstractmethod
    async def raise_alarm(self, member_id: int, alarm: int) -> bool:
        """Record the alarm (`member_id` a uint64); False if it was raised already."""

    @abc.abstractmethod
    async def clear_alarm(self, member_id: int, alarm: int) -> bool:
        """Remove the alarm; False if it was not raised."""

    @abc.abstractmethod
    async def put_auth_record(self, kind: str, name: bytes, value: bytes) -> None:
        """Insert or replace one user or role (see `auth_records`)."""

    @abc.abstractmethod
    async def delete_auth_record(self, kind: str, name: bytes) -> None: ...

    @abc.abstractmethod
    async def lock_compact_revision(self) -> int:
        """The compact revision, locked until commit: a compactor raising it meanwhile waits."""

    @abc.abstractmethod
    async def advance_compact_revision(self, revision: int) -> None:
        """Raise the compact revision to `revision`; it never moves backwards."""


class CompactTx(abc.ABC):
    """One compaction batch: a short transaction of its own, separate from the writer's."""

    @abc.abstractmethod
    async def counters(self) -> Counters: ...

    @abc.abstractmethod
    async def delete_history(self, after: int, through: int) -> int:
        """Drop rows superseded in (after, through] and tombstones in (after, through]; return the count."""

    @abc.abstractmethod
    async def claim(self, expected: int, through: int) -> bool:
        """Advance compacted_through from `expected` to `through`; False if someone else moved it."""

    @abc.abstractmethod
    async def advance_compact_revision(self, revision: int) -> None:
        """Raise the compact revision to `revision`; it never moves backwards."""


class Driver(abc.ABC):
    """A database holding one kine-server store."""

    #: A short name for logs and metrics: "sqlite" or "postgres".
    name: str

    @property
    def location(self) -> str:
        """Where the data is, for the start-up log line: never a password."""
        return self.name

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect, create the database and schema if missing, check the schema version."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def read(self) -> AbstractAsyncContextManager[ReadTx]: ...

    @abc.abstractmethod
    def write(self) -> AbstractAsyncContextManager[WriteTx]:
        """A write transaction; committed when the block exits normally, rolled back otherwise."""

    @abc.abstractmethod
    def compact(self, timeout: float) -> AbstractAsyncContextManager[CompactTx]:
        """A compaction transaction; waiting for locks and running statements give up after
        `timeout` seconds, so a batch never holds on for longer."""

    @abc.abstractmethod
    async def defragment(self) -> None:
        """Give the space of deleted rows back (SQLite VACUUM, PostgreSQL VACUUM of the tables)."""

    @abc.abstractmethod
    async def checkpoint(self) -> None:
        """Return space freed by compaction to the database file's reuse (SQLite: WAL checkpoint)."""

    async def listen(self, on_commit: Callable[[int], None]) -> None:  # noqa: B027 - optional
        """Call `on_commit(revision)` when any process commits a write, if the database can
        tell; by default it cannot, and the poller's interval is all there is."""

    @abc.abstractmethod
    async def meta(self, name: str) -> int | None:
        """A named integer from the meta table (e.g. the cluster id), outside any transaction."""

    @abc.abstractmethod
    async def size(self) -> tuple[int, int]:
        """(bytes the database occupies, bytes in use)."""
