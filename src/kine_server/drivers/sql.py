"""Every statement of the store, written once, and `Statements`: all of them rendered for one dialect.

The templates use `?` placeholders and the words of dialect.Dialect ({greatest}, {now_ms},
{id_list}, {int64_cast}, {for_update}); a dialect may replace a whole statement (`overrides`).
The statements whose text depends on the request (a range, a count, a page of history, the
set-based deletes) come in a few shapes: single key, open-ended or bounded range, newest or at
a revision, limited or not. `Statements` renders every shape once, when a driver is made, so a
request only looks its text up (PostgreSQL's `$n` numbering was a regex on every call) and
PostgreSQL's prepared statements are reused across requests.
"""

from __future__ import annotations

import itertools
from typing import Any

from kine_server.drivers import schema
from kine_server.drivers.base import OPEN_END
from kine_server.drivers.dialect import Conflict, Dialect

ROW_COLUMNS = "key, create_revision, mod_revision, version, value, lease"
KEY_COLUMNS = "key, create_revision, mod_revision, version, NULL AS value, lease"

COUNTERS = (
    "SELECT name, value FROM kine_meta "
    "WHERE name IN ('revision', 'compact_revision', 'compacted_through', 'auth_generation')"
)
#: A writer locks the revision row (writers commit in revision order) and the compact revision's
#: (a periodic compaction cannot move it, and delete the history a write Txn's range at an old
#: revision is reading, until the writer commits: at READ COMMITTED each statement would see the
#: deletions). The compactor takes compacted_through first and the compact revision second, so
#: no two lock orders cross. The auth generation is locked too, not only read: a row locked
#: after a wait is read again as committed, where the statement's snapshot, taken before the
#: wait, could miss an auth change another instance committed meanwhile (every writer locks
#: the three in the same order). One round trip returns all the counters.
LOCK_COUNTERS = (
    "WITH locked AS (SELECT name, value FROM kine_meta "
    "WHERE name IN ('auth_generation', 'compact_revision', 'revision') ORDER BY name"
    "{for_update}) "
    "SELECT name, value FROM locked "
    "UNION ALL SELECT name, value FROM kine_meta WHERE name = 'compacted_through'"
)
META = "SELECT value FROM kine_meta WHERE name = ?"
SET_META = "UPDATE kine_meta SET value = ? WHERE name = ?"
LOCK_COMPACT_REVISION = "SELECT value FROM kine_meta WHERE name = 'compact_revision'{for_update}"
ADVANCE_COMPACT_REVISION = (
    "UPDATE kine_meta SET value = {greatest}(value, ?) WHERE name = 'compact_revision'"
)

NEWEST = (
    f"SELECT {ROW_COLUMNS} FROM kine_kv WHERE key = ? ORDER BY mod_revision DESC, sub DESC LIMIT 1"
)
#: The newest row of each of several keys, tombstones included (the one whose next_revision is
#: still NULL): a group commit reads its requests' keys in one statement (dialect.key_list).
NEWEST_MANY = (
    f"SELECT {ROW_COLUMNS} FROM kine_kv{{by_key}} "
    "WHERE key IN ({key_list}) AND next_revision IS NULL"
)
#: Run before the new rows go in (SQLWrite writes new rows with INSERT_RAW, next_revision set
#: when the same batch superseded them): a key changed twice in one revision has two rows at
#: that mod_revision, and only the newest of them (next_revision still NULL) is superseded.
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
    "INSERT INTO kine_lease (id, ttl, expires_at) "
    "VALUES (?, ?, {now_ms} + CAST(? AS {int64_cast}) * 1000)"
)
# An expired lease is not renewed, even before the expiry pass has revoked it (as etcd's Renew).
#: `{id_list}`: the ids as one parameter, so that one statement (cached once) renews any number.
RENEW_LEASES = (
    "UPDATE kine_lease SET expires_at = {now_ms} + ttl * 1000 "
    "WHERE id IN ({id_list}) AND expires_at > {now_ms} RETURNING id, ttl"
)
#: Without UPDATE ... RETURNING (dialect.update_returning): the renewable leases, locked, then
#: RENEW_LOCKED of exactly those.
RENEWABLE_LEASES = (
    "SELECT id, ttl FROM kine_lease WHERE id IN ({id_list}) AND expires_at > {now_ms}{for_update}"
)
RENEW_LOCKED_LEASES = (
    "UPDATE kine_lease SET expires_at = {now_ms} + ttl * 1000 WHERE id IN ({id_list})"
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
LEASED = f"SELECT {ROW_COLUMNS} FROM kine_kv WHERE lease = ? AND {schema.LIVE} ORDER BY key"

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
#: (MySQL cannot read the table an UPDATE writes in a subquery: its dialect overrides this.)
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

#: Users and roles, as etcd's authUsers and authRoles buckets hold them.
AUTH_RECORDS = "SELECT kind, name, value FROM kine_auth ORDER BY kind, name"
PUT_AUTH_RECORD = "INSERT INTO kine_auth (kind, name, value) VALUES (?, ?, ?)"
DELETE_AUTH_RECORD = "DELETE FROM kine_auth WHERE kind = ? AND name = ?"

#: Alarms, as etcd's alarm bucket holds them: one row per raised (member id, alarm type).
ALARMS = "SELECT member_id, alarm FROM kine_alarm"
RAISE_ALARM = "INSERT INTO kine_alarm (member_id, alarm) VALUES (?, ?)"
CLEAR_ALARM = "DELETE FROM kine_alarm WHERE member_id = ? AND alarm = ?"

SEED_META = "INSERT INTO kine_meta (name, value) VALUES (?, ?)"


def stored_member(member_id: int) -> int:
    """etcd's member ids are uint64, the databases' integers int64: the one with the same bits."""
    return member_id - 2**64 if member_id >= 2**63 else member_id


def member_of(stored: int) -> int:
    """The uint64 member id a stored int64 stands for."""
    return stored % 2**64


# The shapes of the statements that depend on the request. `end` is one of three kinds:
#: A single key (end None), every key from `key` on (end OPEN_END), or [key, end).
SINGLE, OPEN, BOUNDED = 0, 1, 2
_END_KINDS = (SINGLE, OPEN, BOUNDED)


def end_kind(end: bytes | None) -> int:
    if end is None:
        return SINGLE
    return OPEN if end == OPEN_END else BOUNDED


def _key_filter(kind: int, column: str = "key") -> str:
    if kind == SINGLE:
        return f"{column} = ?"
    if kind == OPEN:
        return f"{column} >= ?"
    return f"{column} >= ? AND {column} < ?"


def _visible(historical: bool) -> str:
    # The newest-row predicate matches the partial index kine_kv_live word for word.
    if not historical:
        return schema.LIVE
    return "mod_revision <= ? AND (next_revision IS NULL OR next_revision > ?) AND version > 0"


def _params(key: bytes, end: bytes | None, at: int | None) -> list[Any]:
    params: list[Any] = [key]
    if end:
        params.append(end)
    if at is not None:
        params += [at, at]
    return params


def _history_params(
    first: int, second: int, key: bytes, end: bytes | None, limit: int
) -> list[Any]:
    """changes_template's parameters: its two bounds on the rows, the key range, the limit."""
    params: list[Any] = [first, second, key]
    if end:
        params.append(end)
    params.append(limit)
    return params


def range_template(kind: int, historical: bool, limited: bool, with_values: bool) -> str:
    columns = ROW_COLUMNS if with_values else KEY_COLUMNS
    text = (
        f"SELECT {columns} FROM kine_kv{{by_key}} WHERE {_key_filter(kind)} "
        f"AND {_visible(historical)} ORDER BY key"
    )
    return text + " LIMIT ?" if limited else text


def count_template(kind: int, historical: bool) -> str:
    return (
        f"SELECT count(*) FROM kine_kv{{by_key}} WHERE {_key_filter(kind)} "
        f"AND {_visible(historical)}"
    )


def changes_template(kind: int, one_revision: bool = False) -> str:
    """History in (after, through] for a key range, each row with the live row it replaced.

    As etcd's watch, the previous value is the key's state just before the change's revision:
    the final row of the key's last earlier revision (one seek on kine_kv_key_rev_sub), unless
    that is a tombstone; a create (version 1) has none, even when the same revision deleted the
    key first. The page is chosen first and only its rows are joined: a planner that joined every
    row of the range before sorting and limiting took 240 ms per 100-row page of a 50 000-change
    range.

    With `one_revision`, the changes of one revision after a sub (its parameters are the
    revision and that sub): one revision can be larger than any statement should read at once.
    """
    rows = (
        "mod_revision = ? AND sub > ?" if one_revision else "mod_revision > ? AND mod_revision <= ?"
    )
    return (
        "SELECT c.key, c.create_revision, c.mod_revision, c.version, c.value, c.lease, c.sub, "
        "p.create_revision, p.mod_revision, p.version, p.value, p.lease "
        "FROM (SELECT key, create_revision, mod_revision, version, value, lease, sub "
        "FROM kine_kv "
        f"WHERE {rows} AND {_key_filter(kind)} "
        "ORDER BY mod_revision, sub LIMIT ?) c "
        "LEFT JOIN kine_kv p ON p.key = c.key AND c.version <> 1 AND p.version > 0 AND "
        "(p.next_revision IS NULL OR p.next_revision > p.mod_revision) AND "
        "p.mod_revision = (SELECT max(q.mod_revision) FROM kine_kv q "
        "WHERE q.key = c.key AND q.mod_revision < c.mod_revision) "
        "ORDER BY c.mod_revision, c.sub"
    )


def delete_live_templates(where: str, by_key: bool) -> tuple[str, str]:
    """The statements that delete every live row matching `where` at a revision: a tombstone
    for each (subs from a first one on, in key order, as range() and LEASED return the rows),
    then the rows superseded. Set-based: a statement per key (SUPERSEDE and INSERT) cost about
    90 microseconds a key, 12 s for a DeleteRange of 130 000 keys. The tombstones go in first,
    while the rows they delete are still the live ones; being tombstones, they are not live.
    `by_key`: `where` selects by key (the dialect's by_key hint applies).
    (row_number() OVER: SQLite 3.25+, PostgreSQL, MySQL 8, MariaDB 10.2.)"""
    table = "kine_kv{by_key}" if by_key else "kine_kv"
    live = f"WHERE {where} AND {schema.LIVE}"
    tombstones = (
        "INSERT INTO kine_kv (key, create_revision, mod_revision, version, value, lease, sub) "
        f"SELECT key, 0, ?, 0, ?, 0, ? + row_number() OVER (ORDER BY key) - 1 FROM {table} {live}"
    )
    supersede = f"UPDATE {table} SET next_revision = ? {live}"
    return tombstones, supersede


Batch = list[tuple[str, list[Any]]]


class Statements:
    """Every statement rendered for one dialect, once; the request-shaped ones in tables keyed
    by their shape. Immutable once made: a driver builds one and shares it with every
    transaction."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        unknown = set(dialect.overrides) - set(_FIXED)
        if unknown:
            raise ValueError(f"{dialect.name}: no statement named {sorted(unknown)}")

        def render(name: str) -> str:
            if name in dialect.overrides:
                return dialect.render(dialect.overrides[name])
            conflict = _CONFLICTS.get(name)
            template = _FIXED[name]
            return dialect.render(dialect.insert(template, conflict) if conflict else template)

        fixed = {name: render(name) for name in _FIXED}
        self.counters = fixed["counters"]
        self.lock_counters = fixed["lock_counters"]
        self.meta = fixed["meta"]
        self.set_meta = fixed["set_meta"]
        self.lock_compact_revision = fixed["lock_compact_revision"]
        self.advance_compact_revision = fixed["advance_compact_revision"]
        self.newest = fixed["newest"]
        self.supersede = fixed["supersede"]
        self.lease = fixed["lease"]
        self.leases = fixed["leases"]
        self.any_lease = fixed["any_lease"]
        self.expired_leases = fixed["expired_leases"]
        self.insert_lease = fixed["insert_lease"]
        self.renew_leases = fixed["renew_leases"]
        self.renewable_leases = fixed["renewable_leases"]
        self.renew_locked_leases = fixed["renew_locked_leases"]
        self.delete_lease = fixed["delete_lease"]
        self.delete_expired_lease = fixed["delete_expired_lease"]
        self.resume_leases = fixed["resume_leases"]
        self.leases_served_until = fixed["leases_served_until"]
        self.leased = fixed["leased"]
        self.dump = fixed["dump"]
        self.insert_raw = fixed["insert_raw"]
        self.link_history = fixed["link_history"]
        self.all_leases = fixed["all_leases"]
        self.all_meta = fixed["all_meta"]
        self.delete_superseded = fixed["delete_superseded"]
        self.delete_tombstones = fixed["delete_tombstones"]
        self.claim_compacted = fixed["claim_compacted"]
        self.auth_records = fixed["auth_records"]
        self.put_auth_record = fixed["put_auth_record"]
        self.delete_auth_record = fixed["delete_auth_record"]
        self.alarms = fixed["alarms"]
        self.raise_alarm = fixed["raise_alarm"]
        self.clear_alarm = fixed["clear_alarm"]
        self.seed_meta = fixed["seed_meta"]
        self.newest_many = dialect.render(NEWEST_MANY) if dialect.key_list else None
        notify = dialect.notify_commit
        self.notify_commit = dialect.render(notify) if notify is not None else None

        flags = (False, True)
        self._range = {
            shape: dialect.render(range_template(*shape))
            for shape in itertools.product(_END_KINDS, flags, flags, flags)
        }
        self._count = {
            shape: dialect.render(count_template(*shape))
            for shape in itertools.product(_END_KINDS, flags)
        }
        self._changes = {kind: dialect.render(changes_template(kind)) for kind in _END_KINDS}
        self._revision_changes = {
            kind: dialect.render(changes_template(kind, one_revision=True)) for kind in _END_KINDS
        }
        self._delete_range = {
            kind: tuple(dialect.render(t) for t in delete_live_templates(_key_filter(kind), True))
            for kind in _END_KINDS
        }
        self._delete_leased = tuple(
            dialect.render(t) for t in delete_live_templates("lease = ?", False)
        )
        self.schema = schema.ddl(dialect)
        self.migrations = schema.migrations(dialect)

    def range(
        self, key: bytes, end: bytes | None, at: int | None, limit: int, with_values: bool
    ) -> tuple[str, list[Any]]:
        text = self._range[end_kind(end), at is not None, limit > 0, with_values]
        params = _params(key, end, at)
        if limit > 0:
            params.append(limit)
        return text, params

    def count(self, key: bytes, end: bytes | None, at: int | None) -> tuple[str, list[Any]]:
        return self._count[end_kind(end), at is not None], _params(key, end, at)

    def changes(
        self, after: int, through: int, key: bytes, end: bytes | None, limit: int
    ) -> tuple[str, list[Any]]:
        return self._changes[end_kind(end)], _history_params(after, through, key, end, limit)

    def revision_changes(
        self, revision: int, after_sub: int, key: bytes, end: bytes | None, limit: int
    ) -> tuple[str, list[Any]]:
        params = _history_params(revision, after_sub, key, end, limit)
        return self._revision_changes[end_kind(end)], params

    def delete_range(self, key: bytes, end: bytes | None, revision: int, first_sub: int) -> Batch:
        tombstones, supersede = self._delete_range[end_kind(end)]
        params = _params(key, end, None)
        return [(tombstones, [revision, b"", first_sub, *params]), (supersede, [revision, *params])]

    def delete_leased(self, lease: int, revision: int, first_sub: int) -> Batch:
        tombstones, supersede = self._delete_leased
        return [(tombstones, [revision, b"", first_sub, lease]), (supersede, [revision, lease])]


#: The INSERTs whose conflict clause is the dialect's (dialect.insert_on_conflict).
_CONFLICTS = {
    "insert_lease": Conflict(("id",)),
    "put_auth_record": Conflict(("kind", "name"), update=("value",)),
    "raise_alarm": Conflict(()),
    "seed_meta": Conflict(("name",)),
}

#: The statements of one text whatever the request, by their name in `Statements` (which is
#: also the name a dialect's `overrides` replaces them by).
_FIXED = {
    "counters": COUNTERS,
    "lock_counters": LOCK_COUNTERS,
    "meta": META,
    "set_meta": SET_META,
    "lock_compact_revision": LOCK_COMPACT_REVISION,
    "advance_compact_revision": ADVANCE_COMPACT_REVISION,
    "newest": NEWEST,
    "supersede": SUPERSEDE,
    "lease": LEASE,
    "leases": LEASES,
    "any_lease": ANY_LEASE,
    "expired_leases": EXPIRED_LEASES,
    "insert_lease": INSERT_LEASE,
    "renew_leases": RENEW_LEASES,
    "renewable_leases": RENEWABLE_LEASES,
    "renew_locked_leases": RENEW_LOCKED_LEASES,
    "delete_lease": DELETE_LEASE,
    "delete_expired_lease": DELETE_EXPIRED_LEASE,
    "resume_leases": RESUME_LEASES,
    "leases_served_until": LEASES_SERVED_UNTIL,
    "leased": LEASED,
    "dump": DUMP,
    "insert_raw": INSERT_RAW,
    "link_history": LINK_HISTORY,
    "all_leases": ALL_LEASES,
    "all_meta": ALL_META,
    "delete_superseded": DELETE_SUPERSEDED,
    "delete_tombstones": DELETE_TOMBSTONES,
    "claim_compacted": CLAIM_COMPACTED,
    "auth_records": AUTH_RECORDS,
    "put_auth_record": PUT_AUTH_RECORD,
    "delete_auth_record": DELETE_AUTH_RECORD,
    "alarms": ALARMS,
    "raise_alarm": RAISE_ALARM,
    "clear_alarm": CLEAR_ALARM,
    "seed_meta": SEED_META,
}
