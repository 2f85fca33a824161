"""On MariaDB every statement that reads rows by key walks the key index, whatever InnoDB's
statistics say.

InnoDB recomputes a table's statistics only after a tenth of its rows changed, and at most every
ten seconds: a table that grew quickly is, for a while, planned as the small table it was.
MariaDB then read a LIST's range (and a DeleteRange's rows) through the next_revision index,
whose NULL entries are every live row, with a lookup of each: a LIST of 10 000 keys loaded
just before cost the database twice its CPU until the statistics caught up (the bench's LIST
right after its load; mysql.DIALECT.by_key). Here the statistics of 30 keys are kept
(STATS_AUTO_RECALC=0) while 10 000 more are loaded, and each statement's plan is read back."""

from __future__ import annotations

from typing import Any

import asyncmy
import pytest

from kine_server.drivers import sql
from kine_server.drivers.base import OPEN_END
from kine_server.drivers.mysql import DIALECT, MySQLDriver
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.conftest import MYSQL
from tests.support.client import Client
from tests.test_big_requests import fill

KEY_INDEX = "kine_kv_key_rev_sub"
KEYS = 10_000


def statements_by_key(at: int, keys: list[bytes]) -> dict[str, tuple[str, list[Any]]]:
    """Every statement shape that selects kine_kv rows by key, with parameters over b/ (the
    loaded `keys`), at the newest revision or at `at`."""
    statements = sql.Statements(DIALECT)
    shapes: dict[str, tuple[str, list[Any]]] = {}
    for name, revision in (("newest", None), ("at", at)):
        shapes[f"page {name}"] = statements.range(b"b/", b"b0", revision, 501, True)
        shapes[f"keys {name}"] = statements.range(b"b/", b"b0", revision, 0, False)
        shapes[f"open page {name}"] = statements.range(b"b/", OPEN_END, revision, 501, True)
        shapes[f"count {name}"] = statements.count(b"b/", b"b0", revision)
    tombstones, supersede = statements.delete_range(b"b/", b"b0", at + 1, 0)
    shapes["delete range: tombstones"] = tombstones
    shapes["delete range: supersede"] = supersede
    assert statements.newest_many is not None
    shapes["newest of a batch"] = (statements.newest_many, [DIALECT.encode_keys(keys[::100])])
    return shapes


@pytest.mark.parametrize("dsn", [MYSQL], indirect=True)
async def test_reads_by_key_walk_the_key_index_while_the_statistics_are_stale(
    server: SingleProcess, kine: Client
) -> None:
    driver = server.driver
    assert isinstance(driver, MySQLDriver)
    at = driver.endpoint
    conn = await asyncmy.connect(
        host=at.host, port=at.port, user=at.user, password=at.password, database=at.database
    )
    try:
        await fill(kine.kv, b"b/a", 30)
        async with conn.cursor() as cursor:
            # The statistics of a table of 30 keys, kept.
            await cursor.execute("ALTER TABLE kine_kv STATS_AUTO_RECALC=0")
            await cursor.execute("ANALYZE TABLE kine_kv")
            await cursor.fetchall()
        keys = await fill(kine.kv, b"b/b", KEYS)
        loaded = await kine.kv.Range(pb.RangeRequest(key=b"b/", count_only=True))
        plans = {}
        async with conn.cursor() as cursor:
            await cursor.execute(
                "SELECT n_rows FROM mysql.innodb_table_stats "
                "WHERE database_name = DATABASE() AND table_name = 'kine_kv'"
            )
            [(n_rows,)] = await cursor.fetchall()
            assert n_rows == 30  # still those of 30 keys
            for name, (text, params) in statements_by_key(loaded.header.revision, keys).items():
                await cursor.execute("EXPLAIN " + text, params)
                columns = [d[0] for d in cursor.description]
                rows = [dict(zip(columns, row, strict=True)) for row in await cursor.fetchall()]
                plans[name] = {row["key"] for row in rows if row["table"] == "kine_kv"}
    finally:
        conn.close()
    assert plans == {name: {KEY_INDEX} for name in plans}
