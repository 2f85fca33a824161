"""The statements both drivers share, written once with `?` placeholders.

The query shapes are the same on SQLite and PostgreSQL; only DDL, locking and placeholder syntax
differ, and those stay in each driver. `numbered()` turns `?` into PostgreSQL's `$1, $2, ...`.
Three dialect words are filled in by each driver: `{greatest}` (a two-argument maximum),
`{now_ms}` (the database's clock in milliseconds: lease deadlines are the database's, so every
instance on one PostgreSQL agrees on them whatever its own clock says) and `{id_list}` (a
subquery of the ids given as one parameter: a JSON array on SQLite, an array on PostgreSQL).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from kine_server.drivers.base import OPEN_END, SCHEMA_VERSION

ROW_COLUMNS = "key, create_revision, mod_revision, version, value, lease"
KEY_COLUMNS = "key, create_revision, mod_revision, version, NULL AS value, lease"

COUNTERS = (
    "SELECT name, value FROM kine_meta "
    "WHERE name IN ('revision', 'compact_revision', 'compacted_through')"
)
META = "SELECT value FROM kine_meta WHERE name = ?"
SET_META = "UPDATE kine_meta SET value = ? WHERE name = ?"
LOCK_COMPACT_REVISION = "SELECT value FROM kine_meta WHERE name = 'compact_revision'"
#: {greatest} is the dialect's two-argument maximum (SQLite max, PostgreSQL GREATEST).
ADVANCE_COMPACT_REVISION = (
    "UPDATE kine_meta SET value = {greatest}(value, ?) WHERE name = 'compact_revision'"
)

NEWEST = (
    f"SELECT {ROW_COLUMNS} FROM kine_kv WHERE key = ? ORDER BY mod_revision DESC, sub DESC LIMIT 1"
)
INSERT = (
    "INSERT INTO kine_kv (key, create_revision, mod_revision, version, value, lease, sub) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
#: Run before the new rows go in: a key changed twice in one revision has two rows at that
#: mod_revision, and only the newest of them (next_revision still NULL) is superseded.
SUPERSEDE = (
    "UPDATE kine_kv SET next_revision = ? "
    "WHERE key = ? AND mod_revision = ? AND next_revision IS NULL"
)

# Leases: deadlines are milliseconds of the database's clock, shared by every instance.
LEASE = "SELECT ttl, expires_at - {now_ms} FROM kine_lease WHERE id = ?"
LEASES = "SELECT id FROM kine_lease ORDER BY id"
ANY_LEASE = "SELECT EXISTS (SELECT 1 FROM kine_lease)"
EXPIRED_LEASES = (
    "SELECT id FROM kine_lease WHERE expires_at <= {now_ms} ORDER BY expires_at LIMIT ?"
)
INSERT_LEASE = (
    "INSERT INTO kine_lease (id, ttl, expires_at) VALUES (?, ?, {now_ms} + CAST(? AS BIGINT) * 1000) "
    "ON CONFLICT (id) DO NOTHING"
)
# An expired lease is not renewed, even before the expiry pass has revoked it (as etcd's Renew).
#: `{id_list}`: the ids as one parameter, so that one statement (cached once) renews any number.
RENEW_LEASES = (
    "UPDATE kine_lease SET expires_at = {now_ms} + ttl * 1000 "
    "WHERE id IN ({id_list}) AND expires_at > {now_ms} RETURNING id, ttl"
)
DELETE_LEASE = "DELETE FROM kine_lease WHERE id = ?"
DELETE_EXPIRED_LEASE = "DELETE FROM kine_lease WHERE id = ? AND expires_at <= {now_ms}"
#: Time no instance served does not count against a lease: `lease_served_until` is how long the
#: instances promised to be counting (each renews it while leases exist; a clean stop sets it to
#: now), and deadlines move on by however long the store has been unserved since.
_SERVED_UNTIL = "(SELECT value FROM kine_meta WHERE name = 'lease_served_until')"
RESUME_LEASES = (
    f"UPDATE kine_lease SET expires_at = expires_at + {{greatest}}(0, {{now_ms}} - {_SERVED_UNTIL}) "
    f"WHERE {_SERVED_UNTIL} > 0"
)
#: Only while leases exist (a grant renews it first): an idle store is not written to.
LEASES_SERVED_UNTIL = (
    "UPDATE kine_meta SET value = {now_ms} + ? WHERE name = 'lease_served_until' "
    "AND EXISTS (SELECT 1 FROM kine_lease)"
)
LEASED = (
    f"SELECT {ROW_COLUMNS} FROM kine_kv "
    "WHERE lease = ? AND next_revision IS NULL AND version > 0 ORDER BY key"
)

# Snapshots copy the tables row for row, next_revision included.
RAW_COLUMNS = f"{ROW_COLUMNS}, sub, next_revision"
#: The leading `mod_revision >= ?` lets both databases seek the (mod_revision, sub) index to the
#: page; with only the OR, SQLite scanned from the first row for every page (a snapshot of 10^6
#: revisions took 54 s; 6.3 s with the seek).
DUMP = (
    f"SELECT {RAW_COLUMNS} FROM kine_kv WHERE mod_revision >= ? AND (mod_revision > ? OR sub > ?) "
    "ORDER BY mod_revision, sub LIMIT ?"
)
INSERT_RAW = f"INSERT INTO kine_kv ({RAW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
#: After rows were inserted without it (a restore of another format): each row's
#: next_revision is the revision of its key's next row, as the writer would have set it.
LINK_HISTORY = (
    "UPDATE kine_kv SET next_revision = ("
    "SELECT n.mod_revision FROM kine_kv n WHERE n.key = kine_kv.key AND "
    "(n.mod_revision > kine_kv.mod_revision OR "
    "(n.mod_revision = kine_kv.mod_revision AND n.sub > kine_kv.sub)) "
    "ORDER BY n.mod_revision, n.sub LIMIT 1)"
)
ALL_LEASES = "SELECT id, ttl, expires_at FROM kine_lease ORDER BY id"
ALL_META = "SELECT name, value FROM kine_meta"

DELETE_SUPERSEDED = "DELETE FROM kine_kv WHERE next_revision > ? AND next_revision <= ?"
DELETE_TOMBSTONES = (
    "DELETE FROM kine_kv WHERE version = 0 AND mod_revision > ? AND mod_revision <= ?"
)
CLAIM_COMPACTED = "UPDATE kine_meta SET value = ? WHERE name = 'compacted_through' AND value = ?"


#: From schema 1: (key, mod_revision) stops being unique (see base.SCHEMA_VERSION), and a store
#: that was never compacted says so the way etcd does.
MIGRATE_1_TO_2 = [
    "DROP INDEX IF EXISTS kine_kv_key_rev",
    "UPDATE kine_meta SET value = -1 WHERE name = 'compact_revision' AND value = 0",
    "INSERT INTO kine_meta (name, value) VALUES ('lease_served_until', 0) "
    "ON CONFLICT (name) DO NOTHING",
    "UPDATE kine_meta SET value = 2 WHERE name = 'schema_version'",
]

#: From schema 2: the one NOSPACE flag becomes a row of kine_alarm. It did not say which
#: instance raised it, so it becomes member 0's (what `etcdctl alarm disarm` clears as well).
MIGRATE_2_TO_3 = [
    "INSERT INTO kine_alarm (member_id, alarm) "
    "SELECT 0, 1 FROM kine_meta WHERE name = 'alarm_nospace' AND value <> 0",
    "DELETE FROM kine_meta WHERE name = 'alarm_nospace'",
    "UPDATE kine_meta SET value = 3 WHERE name = 'schema_version'",
]

#: From schema 3: the auth store (its table is created with the others); auth off, at etcd's
#: first auth revision.
MIGRATE_3_TO_4 = [
    "INSERT INTO kine_meta (name, value) VALUES ('auth_enabled', 0) ON CONFLICT (name) DO NOTHING",
    "INSERT INTO kine_meta (name, value) VALUES ('auth_revision', 1) ON CONFLICT (name) DO NOTHING",
    "INSERT INTO kine_meta (name, value) VALUES ('auth_generation', 0) "
    "ON CONFLICT (name) DO NOTHING",
    "UPDATE kine_meta SET value = 4 WHERE name = 'schema_version'",
]

#: Users and roles, as etcd's authUsers and authRoles buckets hold them.
AUTH_RECORDS = "SELECT kind, name, value FROM kine_auth ORDER BY kind, name"
PUT_AUTH_RECORD = (
    "INSERT INTO kine_auth (kind, name, value) VALUES (?, ?, ?) "
    "ON CONFLICT (kind, name) DO UPDATE SET value = excluded.value"
)
DELETE_AUTH_RECORD = "DELETE FROM kine_auth WHERE kind = ? AND name = ?"

#: Alarms, as etcd's alarm bucket holds them: one row per raised (member id, alarm type).
ALARMS = "SELECT member_id, alarm FROM kine_alarm"
RAISE_ALARM = "INSERT INTO kine_alarm (member_id, alarm) VALUES (?, ?) ON CONFLICT DO NOTHING"
CLEAR_ALARM = "DELETE FROM kine_alarm WHERE member_id = ? AND alarm = ?"


def stored_member(member_id: int) -> int:
    """etcd's member ids are uint64, both databases' integers int64: the one with the same bits."""
    return member_id - 2**64 if member_id >= 2**63 else member_id


def member_of(stored: int) -> int:
    """The uint64 member id a stored int64 stands for."""
    return stored % 2**64


def seed_meta(cluster_id: int) -> tuple[str, list[tuple[str, int]]]:
    """Rows a new store starts with: etcd's first revision is 1, nothing compacted."""
    rows = [
        ("schema_version", SCHEMA_VERSION),
        ("revision", 1),
        ("compact_revision", -1),
        ("compacted_through", 0),
        ("cluster_id", cluster_id),
        ("lease_served_until", 0),
        ("auth_enabled", 0),
        ("auth_revision", 1),
        ("auth_generation", 0),
    ]
    return "INSERT INTO kine_meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING", rows


def _key_filter(end: bytes | None, column: str = "key") -> str:
    if end is None:
        return f"{column} = ?"
    if end == OPEN_END:
        return f"{column} >= ?"
    return f"{column} >= ? AND {column} < ?"


def _visible(at: int | None) -> str:
    # The newest-row predicate matches the partial index kine_kv_live word for word.
    if at is None:
        return "next_revision IS NULL AND version > 0"
    return "mod_revision <= ? AND (next_revision IS NULL OR next_revision > ?) AND version > 0"


def _params(key: bytes, end: bytes | None, at: int | None) -> list[Any]:
    params: list[Any] = [key]
    if end:
        params.append(end)
    if at is not None:
        params += [at, at]
    return params


def range_query(
    key: bytes, end: bytes | None, at: int | None, limit: int, with_values: bool
) -> tuple[str, list[Any]]:
    columns = ROW_COLUMNS if with_values else KEY_COLUMNS
    sql = f"SELECT {columns} FROM kine_kv WHERE {_key_filter(end)} AND {_visible(at)} ORDER BY key"
    params = _params(key, end, at)
    if limit > 0:
        sql += " LIMIT ?"
        params.append(limit)
    return sql, params


def changes_query(
    after: int, through: int, key: bytes, end: bytes | None, limit: int
) -> tuple[str, list[Any]]:
    """History in (after, through] for a key range, each row with the live row it replaced.

    As etcd's watch, the previous value is the key's state just before the change's revision:
    the final row of the key's last earlier revision (one seek on kine_kv_key_rev_sub), unless
    that is a tombstone; a create (version 1) has none, even when the same revision deleted the
    key first. The page is chosen first and only its rows are joined: a planner that joined every
    row of the range before sorting and limiting took 240 ms per 100-row page of a 50 000-change
    range.
    """
    sql = (
        "SELECT c.key, c.create_revision, c.mod_revision, c.version, c.value, c.lease, c.sub, "
        "p.create_revision, p.mod_revision, p.version, p.value, p.lease "
        "FROM (SELECT key, create_revision, mod_revision, version, value, lease, sub "
        "FROM kine_kv "
        f"WHERE mod_revision > ? AND mod_revision <= ? AND {_key_filter(end)} "
        "ORDER BY mod_revision, sub LIMIT ?) c "
        "LEFT JOIN kine_kv p ON p.key = c.key AND c.version <> 1 AND p.version > 0 AND "
        "(p.next_revision IS NULL OR p.next_revision > p.mod_revision) AND "
        "p.mod_revision = (SELECT max(q.mod_revision) FROM kine_kv q "
        "WHERE q.key = c.key AND q.mod_revision < c.mod_revision) "
        "ORDER BY c.mod_revision, c.sub"
    )
    params: list[Any] = [after, through, key]
    if end:
        params.append(end)
    params.append(limit)
    return sql, params


def delete_live(
    revision: int, first_sub: int, where: str, params: list[Any]
) -> list[tuple[str, list[Any]]]:
    """The statements that delete every live row matching `where` at `revision`: a tombstone
    for each (subs from `first_sub` on, in key order, as range() and LEASED return the rows),
    then the rows superseded. Set-based: a statement per key (SUPERSEDE and INSERT) cost about
    90 microseconds a key, 12 s for a DeleteRange of 130 000 keys. The tombstones go in first,
    while the rows they delete are still the live ones; being tombstones, they are not live."""
    live = f"WHERE {where} AND next_revision IS NULL AND version > 0"
    tombstones = (
        "INSERT INTO kine_kv (key, create_revision, mod_revision, version, value, lease, sub) "
        f"SELECT key, 0, ?, 0, ?, 0, ? + row_number() OVER (ORDER BY key) - 1 FROM kine_kv {live}"
    )
    supersede = f"UPDATE kine_kv SET next_revision = ? {live}"
    return [(tombstones, [revision, b"", first_sub, *params]), (supersede, [revision, *params])]


def delete_range(
    key: bytes, end: bytes | None, revision: int, first_sub: int
) -> list[tuple[str, list[Any]]]:
    return delete_live(revision, first_sub, _key_filter(end), _params(key, end, None))


def delete_leased(lease: int, revision: int, first_sub: int) -> list[tuple[str, list[Any]]]:
    return delete_live(revision, first_sub, "lease = ?", [lease])


def count_query(key: bytes, end: bytes | None, at: int | None) -> tuple[str, list[Any]]:
    sql = f"SELECT count(*) FROM kine_kv WHERE {_key_filter(end)} AND {_visible(at)}"
    return sql, _params(key, end, at)


@dataclass(frozen=True)
class Dialect:
    """What one database spells its own way in the shared statements."""

    greatest: str
    now_ms: str
    #: A subquery of the ids passed as one parameter (its value is the driver's to encode).
    id_list: str
    numbered: bool

    def __call__(self, statement: str) -> str:
        """`statement` with the dialect's words and placeholders."""
        text = statement.format(greatest=self.greatest, now_ms=self.now_ms, id_list=self.id_list)
        return numbered(text) if self.numbered else text


_PLACEHOLDER = re.compile(r"\?")


def numbered(sql: str) -> str:
    """`?` placeholders to PostgreSQL's numbered `$n` ones."""
    counter = itertools.count(1)
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)
