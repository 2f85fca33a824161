"""The generic SQL layer: statements rendered once per dialect, DDL from one table definition, and
the fallbacks that a dialect without the optional features (as MySQL/MariaDB would be: no partial
indexes, no UPDATE ... RETURNING, `key` a reserved word) runs, on a real SQLite database."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from kine_server.drivers import postgres, sql, sqlite
from kine_server.drivers.base import OPEN_END, ChangeRow
from kine_server.drivers.dialect import Dialect
from kine_server.drivers.sqlite import SQLiteDriver

#: SQLite as a database without the optional features would run the store.
RESTRICTED = dataclasses.replace(
    sqlite.DIALECT, partial_indexes=False, update_returning=False, reserved=("key",)
)


def test_each_statement_shape_is_rendered_once_per_dialect() -> None:
    statements = sql.Statements(postgres.DIALECT)
    first, params = statements.range(b"a", b"b", 5, 10, True)
    again, _ = statements.range(b"c", b"d", 6, 3, True)
    assert first is again  # looked up, not rendered again
    assert params == [b"a", b"b", 5, 5, 10]
    assert "?" not in first and "$5" in first
    single, _ = statements.range(b"a", None, None, 0, True)
    assert single != first and "$2" not in single
    counted, _ = statements.count(b"a", OPEN_END, None)
    assert counted is statements.count(b"b", OPEN_END, None)[0]


def test_the_ddl_of_one_definition_per_dialect() -> None:
    lite = "\n".join(sql.Statements(sqlite.DIALECT).schema)
    pg = "\n".join(sql.Statements(postgres.DIALECT).schema)
    assert "INCLUDE" not in lite and "kine_kv_key_state" in lite  # SQLite's covering index
    assert "INCLUDE (next_revision, version)" in pg and "kine_kv_key_state" not in pg
    assert "id INTEGER PRIMARY KEY" in lite  # the rowid itself
    assert "key BYTEA NOT NULL" in pg and "key BLOB NOT NULL" in lite
    restricted = "\n".join(sql.Statements(RESTRICTED).schema)
    assert " WHERE " not in restricted and '"key" BLOB NOT NULL' in restricted


def test_a_dialect_override_must_name_a_statement() -> None:
    with pytest.raises(ValueError, match="no statement named"):
        sql.Statements(dataclasses.replace(sqlite.DIALECT, overrides={"no_such": "SELECT 1"}))


async def _scenario(path: Path, dialect: Dialect) -> dict[str, Any]:
    """Writes, lease renewals, a range delete, reads and a compaction batch: what they return."""
    driver = SQLiteDriver(str(path), readers=1, dialect=dialect)
    await driver.open()
    seen: dict[str, Any] = {}
    try:
        async with driver.write() as tx:
            seen["locked"] = await tx.lock()
            rows = [ChangeRow(k, 2, 2, 1, v, 0, n) for n, (k, v) in enumerate(_KEYS)]
            await tx.append(rows, [])
            await tx.set_revision(2)
            seen["granted"] = [await tx.insert_lease(1, 60), await tx.insert_lease(2, 0)]
            seen["granted_again"] = await tx.insert_lease(1, 60)
            await tx.put_auth_record("user", b"root", b"v1")
            await tx.put_auth_record("user", b"root", b"v2")
            seen["raised"] = [
                await tx.raise_alarm(2**64 - 1, 1),
                await tx.raise_alarm(2**64 - 1, 1),
            ]
        async with driver.write() as tx:
            seen["renewed"] = await tx.renew_leases([1, 2, 3])
            await tx.delete_range(b"a", b"c", 3, 0)
            await tx.set_revision(3)
        async with driver.read() as tx:
            seen["live"] = await tx.range(b"", OPEN_END, None, 0)
            seen["at_2"] = [r.key for r in await tx.range(b"", OPEN_END, 2, 0, with_values=False)]
            seen["count"] = await tx.count_soon(b"", OPEN_END, None)
            seen["changes"] = await tx.changes(2, 3, b"", OPEN_END, 10)
            seen["expired"] = await tx.expired_leases(10)
            seen["auth"] = await tx.auth_records()
            seen["alarms"] = await tx.alarms()
        async with driver.compact(5.0) as compact:
            seen["compacted"] = await compact.delete_history(0, 3)
            seen["claimed"] = await compact.claim(0, 3)
    finally:
        await driver.close()
    return seen


_KEYS = [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")]


async def test_the_fallbacks_of_a_dialect_without_optional_features_answer_the_same(
    tmp_path: Path,
) -> None:
    full = await _scenario(tmp_path / "full.db", sqlite.DIALECT)
    restricted = await _scenario(tmp_path / "restricted.db", RESTRICTED)
    assert restricted == full
    assert full["renewed"] == {1: 60}  # 2 is past its deadline, 3 does not exist
    assert full["granted"] == [True, True] and full["granted_again"] is False
    assert [r.key for r in full["live"]] == [b"c"]
    assert full["at_2"] == [b"a", b"b", b"c"]
    assert full["count"] == 1
    assert [(c.row.key, c.row.version, c.prev is not None) for c in full["changes"]] == [
        (b"a", 0, True),
        (b"b", 0, True),
    ]
    assert full["expired"] == [2]
    assert full["auth"] == [("user", b"root", b"v2")]
    assert full["raised"] == [True, False] and full["alarms"] == [(2**64 - 1, 1)]
    assert full["compacted"] == 4 and full["claimed"] is True  # a and b: the rows and tombstones

    conn = sqlite3.connect(tmp_path / "restricted.db")
    try:
        indexes = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'index'").fetchall()
    finally:
        conn.close()
    made = [text for (text,) in indexes if text]
    assert made and not [text for text in made if " WHERE " in text]
