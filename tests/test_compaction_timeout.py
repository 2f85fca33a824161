"""--compact-timeout bounds a compaction batch that runs long, not only its wait for a lock.

A trigger on the key table's deletions makes every row a batch deletes slow on purpose (SQLite: a
join of a few hundred million rows; PostgreSQL: pg_sleep), so one batch would hold the write lock
for many seconds. The database cuts it short at --compact-timeout: writers, blocked behind it,
resume within the timeout and a second, the batch's failure is reported, nothing it deleted
stays deleted, and once the slowness is gone a later pass completes the compaction.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

import asyncpg

from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.support.client import Client
from tests.test_compaction import counters, expected_rows, rows, start, write_history

TIMEOUT = 1.0  # --compact-timeout
#: Rows of the table the SQLite trigger joins with itself three ways, per deleted row.
SLOW_ROWS = 300


async def make_deletions_slow(server: SingleProcess, dsn: str) -> None:
    if dsn.startswith("sqlite://"):
        conn = sqlite3.connect(dsn.removeprefix("sqlite://"), isolation_level=None)
        try:
            conn.execute("CREATE TABLE slow (x INTEGER)")
            conn.executemany("INSERT INTO slow VALUES (?)", [(i,) for i in range(SLOW_ROWS)])
            conn.execute(
                "CREATE TRIGGER slow_delete AFTER DELETE ON kine_kv "
                "BEGIN SELECT count(*) FROM slow a, slow b, slow c; END"
            )
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(server.driver.dsn)  # type: ignore[attr-defined]
    try:
        await pg.execute(
            "CREATE FUNCTION slow_delete() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(0.2); RETURN OLD; END $$"
        )
        await pg.execute(
            "CREATE TRIGGER slow_delete AFTER DELETE ON kine_kv "
            "FOR EACH ROW EXECUTE FUNCTION slow_delete()"
        )
    finally:
        await pg.close()


async def make_deletions_fast(server: SingleProcess, dsn: str) -> None:
    if dsn.startswith("sqlite://"):
        conn = sqlite3.connect(dsn.removeprefix("sqlite://"), isolation_level=None)
        try:
            conn.execute("DROP TRIGGER slow_delete")
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(server.driver.dsn)  # type: ignore[attr-defined]
    try:
        await pg.execute("DROP TRIGGER slow_delete ON kine_kv")
    finally:
        await pg.close()


async def slowest_put(client: Client, stop: asyncio.Event) -> float:
    """Puts one after another until `stop`; the longest any took."""
    slowest = 0.0
    n = 0
    while not stop.is_set():
        began = time.monotonic()
        await client.kv.Put(pb.PutRequest(key=b"/w/%d" % n, value=b"v"), timeout=60)
        slowest = max(slowest, time.monotonic() - began)
        n += 1
        await asyncio.sleep(0.01)
    return slowest


async def test_a_batch_running_past_the_timeout_is_cut_short_and_writers_go_on(dsn: str) -> None:
    server, client, faults = await start(
        dsn, interval=0, min_retain=10, batch_size=20, timeout=TIMEOUT
    )
    try:
        writes = await write_history(client)
        await make_deletions_slow(server, dsn)
        compactor = server.write_side.compactor
        stop = asyncio.Event()
        writers = [asyncio.create_task(slowest_put(client, stop)) for _ in range(4)]
        await asyncio.sleep(0.3)
        began = time.monotonic()
        assert await compactor.tick() is False
        took = time.monotonic() - began
        stop.set()
        slowest = max(await asyncio.gather(*writers))
        assert slowest < TIMEOUT + 1.0, f"a Put waited {slowest:.1f}s behind the batch"
        assert took < TIMEOUT + 1.0, f"the batch gave up after {took:.1f}s"
        assert compactor.status.consecutive_failures == 1
        assert "timeout" in compactor.status.last_error, compactor.status.last_error
        # The batch's deletions were rolled back with it: nothing was compacted yet.
        revision, compact_revision, compacted_through = await counters(server)
        assert (compact_revision, compacted_through) == (-1, 0)  # -1: never compacted
        assert [r for r in await rows(server) if r[0].startswith(b"/c/")] == sorted(writes)

        await make_deletions_fast(server, dsn)
        assert await compactor.tick() is True
        target = revision - 10
        assert await counters(server) == (revision, target, target)
        kept = [r for r in await rows(server) if r[0].startswith(b"/c/")]
        assert kept == expected_rows(writes, target)
        assert compactor.status.consecutive_failures == 0
        assert faults.injected == 0
    finally:
        await client.close()
        await server.stop()
