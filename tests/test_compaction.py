"""Compaction that fails and recovers: injected faults at every stage of a batch, real lock
contention, concurrent compactors, and a minute of failures under load. On SQLite and
PostgreSQL; on MariaDB all but the minute (its failures are injected into the generic compactor;
the database's own part is in the others).

The compactor's `hook(stage, after, through)` runs inside each batch's transaction: raising at
"begin" fails the batch before it deletes anything, raising at "commit" fails it after its
deletions, in place of a failed commit.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kine_server.drivers import make_driver
from kine_server.mvcc.compactor import CompactionSettings, Compactor
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.conftest import fresh_dsn, test_config
from tests.support.client import Client, connect
from tests.support.watching import WatchStream
from tests.test_store import all_rows
from tests.test_watch import collect, key_range

KEYS = 5


class Faults:
    """An injectable hook: fails the chosen batches and records the ones that committed."""

    def __init__(self) -> None:
        self.fail: set[tuple[str, int]] = set()  # (stage, after) pairs that fail once
        self.always = False
        self.committed: list[tuple[int, int]] = []
        self.injected = 0
        self.delay = 0.0  # seconds each batch spends inside its transaction

    async def __call__(self, stage: str, after: int, through: int) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.always or (stage, after) in self.fail:
            self.fail.discard((stage, after))
            self.injected += 1
            raise RuntimeError(f"injected {stage} failure")
        if stage == "commit":
            self.committed.append((after, through))


async def start(dsn: str, **settings: object) -> tuple[SingleProcess, Client, Faults]:
    server = SingleProcess(test_config(dsn))
    faults = Faults()
    server.write_side.compactor.settings = CompactionSettings(**settings)  # type: ignore[arg-type]
    server.write_side.compactor.hook = faults
    await server.start()
    return server, connect(f"127.0.0.1:{server.port}"), faults


@pytest.fixture
async def compacting(dsn: str) -> AsyncIterator[tuple[SingleProcess, Client, Faults]]:
    server, client, faults = await start(dsn, interval=0, min_retain=10, batch_size=20, timeout=2)
    yield server, client, faults
    await client.close()
    await server.stop()


async def hold_row_locks(driver: object, where: str) -> Any:
    """Another MySQL session's transaction holding row locks on the kine_kv rows `where`."""
    import asyncmy

    from kine_server.drivers.mysql import MySQLDriver

    assert isinstance(driver, MySQLDriver)
    at = driver.endpoint
    conn = await asyncmy.connect(
        host=at.host, port=at.port, user=at.user, password=at.password, database=at.database
    )
    async with conn.cursor() as cursor:
        await cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        await cursor.execute("START TRANSACTION")
        await cursor.execute(f"SELECT 1 FROM kine_kv WHERE {where} FOR UPDATE")
        await cursor.fetchall()
    return conn


async def write_history(client: Client, count: int = 200) -> list[tuple[bytes, int]]:
    """`count` puts round-robin over KEYS keys: revisions 2 .. count+1."""
    writes = []
    for n in range(count):
        key = b"/c/%d" % (n % KEYS)
        response = await client.kv.Put(pb.PutRequest(key=key, value=b"%d" % n))
        writes.append((key, response.header.revision))
    return writes


def expected_rows(writes: list[tuple[bytes, int]], target: int) -> list[tuple[bytes, int]]:
    """What compaction to `target` keeps: each key's row as of target, and everything after."""
    kept = [w for w in writes if w[1] > target]
    for key in {k for k, _ in writes}:
        at_target = [r for k, r in writes if k == key and r <= target]
        if at_target:
            kept.append((key, max(at_target)))
    return sorted(kept)


async def rows(server: SingleProcess) -> list[tuple[bytes, int]]:
    return sorted((key, revision) for key, revision, _ in await all_rows(server))


async def counters(server: SingleProcess) -> tuple[int, int, int]:
    c = await server.store.counters()
    return c.revision, c.compact_revision, c.compacted_through


@pytest.mark.mysql
async def test_first_batch_failing_leaves_everything_for_the_next_tick(
    compacting: tuple[SingleProcess, Client, Faults],
) -> None:
    server, client, faults = compacting
    writes = await write_history(client)
    faults.fail.add(("begin", 0))
    compactor = server.write_side.compactor

    assert await compactor.tick() is False
    assert await counters(server) == (201, -1, 0)  # nothing moved (-1: never compacted)
    assert await rows(server) == sorted(writes)
    assert compactor.status.failures_total == 1
    assert compactor.status.consecutive_failures == 1
    assert compactor.status.last_error == "RuntimeError: injected begin failure"

    assert await compactor.tick() is True
    assert await counters(server) == (201, 191, 191)
    assert await rows(server) == expected_rows(writes, 191)
    assert compactor.status.consecutive_failures == 0
    assert compactor.status.failures_total == 1
    old = client.kv.Range(pb.RangeRequest(key=b"/c/0", revision=190))
    with pytest.raises(Exception, match="required revision has been compacted"):
        await old
    assert (await client.kv.Range(pb.RangeRequest(key=b"/c/0", revision=191))).count == 1


@pytest.mark.mysql
async def test_a_later_batch_failing_resumes_from_the_database(
    compacting: tuple[SingleProcess, Client, Faults],
) -> None:
    server, client, faults = compacting
    writes = await write_history(client)
    faults.fail.add(("begin", 40))  # the third batch
    compactor = server.write_side.compactor

    assert await compactor.tick() is False
    assert await counters(server) == (201, 191, 40)
    assert faults.committed == [(0, 20), (20, 40)]
    assert compactor.status.batches_total == 2

    assert await compactor.tick() is True
    assert await counters(server) == (201, 191, 191)
    # Every range committed exactly once, contiguous: nothing deleted twice, nothing skipped.
    bounds = [0] + [through for _, through in faults.committed]
    assert faults.committed == list(itertools.pairwise(bounds))
    assert bounds[-1] == 191
    assert await rows(server) == expected_rows(writes, 191)
    assert compactor.status.rows_deleted_total == len(writes) - len(expected_rows(writes, 191))
    assert compactor.status.failures_total == 1


@pytest.mark.mysql
async def test_a_failed_commit_hides_its_deletions_and_the_next_tick_redoes_them(
    compacting: tuple[SingleProcess, Client, Faults],
) -> None:
    server, client, faults = compacting
    writes = await write_history(client)
    faults.fail.add(("commit", 20))
    compactor = server.write_side.compactor

    assert await compactor.tick() is False
    assert await counters(server) == (201, 191, 20)
    assert await rows(server) == sorted(expected_rows(writes, 20))  # (20, 40] untouched
    assert await compactor.tick() is True
    assert await counters(server) == (201, 191, 191)
    assert await rows(server) == expected_rows(writes, 191)
    assert [a for a, _ in faults.committed] == [0, 20, 40, 60, 80, 100, 120, 140, 160, 180]


@pytest.mark.mysql
async def test_compaction_waits_out_a_held_lock_then_succeeds(dsn: str) -> None:
    server, client, faults = await start(
        dsn, interval=0, min_retain=10, batch_size=500, timeout=0.5
    )
    try:
        writes = await write_history(client, 50)
        compactor = server.write_side.compactor
        if dsn.startswith("sqlite"):
            other = sqlite3.connect(dsn.removeprefix("sqlite://"), isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # another writer holds SQLite's one write lock

            def release() -> None:
                other.execute("ROLLBACK")
                other.close()

            expected_error = "locked"
        elif dsn.startswith("mysql"):
            other_my = await hold_row_locks(server.driver, "next_revision <= 41")

            async def release_my() -> None:
                await other_my.rollback()
                other_my.close()

            # InnoDB's lock wait timeout or MariaDB's max_statement_time, both "... exceeded"
            expected_error = "exceeded"
        else:
            import asyncpg

            other_pg = await asyncpg.connect(server.driver.dsn)  # type: ignore[attr-defined]
            holding = other_pg.transaction()
            await holding.start()
            # Row locks on exactly the rows the batch must delete.
            await other_pg.execute("SELECT 1 FROM kine_kv WHERE next_revision <= 41 FOR UPDATE")

            async def release_pg() -> None:
                await holding.rollback()
                await other_pg.close()

            expected_error = "timeout"  # lock_timeout or statement_timeout, both --compact-timeout
        began = time.monotonic()
        assert await compactor.tick() is False
        assert time.monotonic() - began < 3  # timed out on its own, did not hang
        assert expected_error in compactor.status.last_error
        assert await counters(server) == (51, -1, 0)  # -1: never compacted
        if dsn.startswith("sqlite"):
            release()
        elif dsn.startswith("mysql"):
            await release_my()
        else:
            await release_pg()
        assert await compactor.tick() is True
        assert await counters(server) == (51, 41, 41)
        assert await rows(server) == expected_rows(writes, 41)
        assert faults.injected == 0
    finally:
        await client.close()
        await server.stop()


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
async def test_concurrent_compactors_share_the_work_without_errors(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two instances' compactors on one database (one SQLite file has only one server)."""
    dsn = fresh_dsn(kind, tmp_path, request)
    server, client, faults = await start(dsn, interval=0, min_retain=10, batch_size=10, timeout=5)
    other_driver = make_driver(dsn)
    await other_driver.open()
    other_faults = Faults()
    other = Compactor(
        other_driver, CompactionSettings(interval=0, min_retain=10, batch_size=10), other_faults
    )
    faults.delay = other_faults.delay = 0.01  # long enough for the two to interleave
    # Which one wins the claim row after a commit is up to timing; to make sure both take part,
    # the first waits after its first batch (outside any transaction) until the other commits one.
    compactor = server.write_side.compactor
    advanced = compactor._advanced
    other_committed = asyncio.Event()
    other_hook = other_faults.__call__

    async def other_stage(stage: str, after: int, through: int) -> None:
        await other_hook(stage, after, through)
        if stage == "commit":
            other_committed.set()

    async def first_waits(through: int, target: int, deleted: int) -> None:
        await advanced(through, target, deleted)
        await asyncio.wait_for(other_committed.wait(), 30)

    other.hook = other_stage
    compactor._advanced = first_waits  # type: ignore[method-assign]
    try:
        writes = await write_history(client, 300)
        results = await asyncio.gather(compactor.tick(), other.tick())
        assert list(results) == [True, True]
        both = sorted(faults.committed + other_faults.committed)
        bounds = [0] + [through for _, through in both]
        assert both == list(itertools.pairwise(bounds))  # disjoint, contiguous
        assert bounds[-1] == 291
        assert faults.committed and other_faults.committed  # both did some of it
        assert server.write_side.compactor.status.failures_total == other.status.failures_total == 0
        assert await rows(server) == expected_rows(writes, 291)
    finally:
        await other_driver.close()
        await client.close()
        await server.stop()


async def test_a_minute_of_failing_compaction_disturbs_no_writer_and_no_watcher(dsn: str) -> None:
    """Every batch fails for a whole minute while 64 writers and 100 watchers run."""
    server, client, faults = await start(
        dsn, interval=0.5, min_retain=100, batch_size=50, timeout=2
    )
    faults.always = True
    rng = random.Random(5)
    ranges = []
    for _ in range(100):
        low = rng.randrange(0, 90)
        ranges.append(key_range(low, low + rng.randrange(1, 30)))
    streams = []
    try:
        for s in range(10):
            stream = WatchStream(client)
            for w in range(10):
                await stream.create(*ranges[s * 10 + w], watch_id=w + 1)
            for _ in range(10):
                assert (await stream.read()) is not None
            streams.append(stream)

        committed: list[tuple[int, int, bytes]] = []
        errors: list[BaseException] = []
        seconds = float(os.environ.get("KINE_FAULT_SECONDS", "60"))
        deadline = time.monotonic() + seconds
        statuses: list[list[str]] = []

        async def writer(n: int) -> None:
            wrng = random.Random(n)
            while time.monotonic() < deadline:
                key = b"/s/%03d" % wrng.randrange(0, 100)
                try:
                    if wrng.random() < 0.2:
                        response = await client.kv.DeleteRange(pb.DeleteRangeRequest(key=key))
                        if response.deleted:
                            committed.append((response.header.revision, 1, key))
                    else:
                        response = await client.kv.Put(pb.PutRequest(key=key, value=b"%d" % n))
                        committed.append((response.header.revision, 0, key))
                except Exception as exc:
                    errors.append(exc)
                await asyncio.sleep(wrng.random() * 0.2)

        async def observe() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(5)
                status = await client.maintenance.Status(pb.StatusRequest())
                statuses.append(list(status.errors))

        await asyncio.gather(*(writer(n) for n in range(64)), observe())
        status = server.write_side.compactor.status
        assert errors == []
        assert status.batches_total == 0
        # A failure on every tick, and the ticks kept coming every 0.5 s (none skipped).
        assert status.failures_total >= 0.8 * seconds / 0.5
        assert status.consecutive_failures == status.failures_total
        assert status.ticks_total >= status.failures_total
        assert all(s and "compaction failing" in s[0] for s in statuses[1:])

        final = (await client.kv.Range(pb.RangeRequest(key=b"/s/"))).header.revision
        committed.sort()
        assert [c[0] for c in committed] == list(range(2, final + 1))
        for s, stream in enumerate(streams):
            got = await collect(stream, set(range(1, 11)), final)
            for w in range(10):
                key, end = ranges[s * 10 + w]
                assert got[w + 1] == [c for c in committed if key <= c[2] < end]

        faults.always = False  # the faults stop: the next tick catches up
        while status.consecutive_failures or status.compacted_through < final - 100:
            await asyncio.sleep(0.1)
        revision, compact_revision, compacted_through = await counters(server)
        assert compacted_through == compact_revision >= final - 100
        left = await rows(server)
        assert len(left) <= 100 + (revision - compact_revision)
        assert (await client.maintenance.Status(pb.StatusRequest())).errors == []
    finally:
        for stream in streams:
            await stream.close()
        await client.close()
        await server.stop()


async def test_compaction_keeps_up_with_writers_that_never_pause(dsn: str) -> None:
    """16 writers back to back keep the writer's transaction open nearly all the time: each
    compaction batch still gets its turn at the write lock within its timeout (SQLite keeps no
    queue; its busy handler lost to a writer that took the lock again at once, and every batch
    failed with "database is locked"), and compaction keeps the table near the window."""
    server, client, _ = await start(dsn, interval=0.2, min_retain=100, batch_size=100, timeout=0.5)
    status = server.write_side.compactor.status
    stop_at = time.monotonic() + 4

    async def writer(n: int) -> None:
        while time.monotonic() < stop_at:
            await client.kv.Put(pb.PutRequest(key=b"/busy/%02d" % n, value=b"x" * 100))

    try:
        await asyncio.gather(*(writer(n) for n in range(16)))
        revision = (await counters(server))[0]
        assert revision > 1000, "the writers made too few revisions to keep the lock busy"
        assert status.failures_total == 0, status.last_error
        assert status.compacted_through >= revision - 100 - 2000, (status, revision)
    finally:
        await client.close()
        await server.stop()


@pytest.mark.slow
async def test_soak_random_compaction_failures_keep_the_table_bounded(dsn: str) -> None:
    """10 minutes (KINE_SOAK_SECONDS) of writes with a third of all batches failing at random:
    the table ends bounded by the live keys plus the retained window. Run with `make soak`."""
    retain, keys = 500, 200
    server, client, faults = await start(
        dsn, interval=1, min_retain=retain, batch_size=200, timeout=2
    )
    rng = random.Random(11)

    async def flaky(stage: str, after: int, through: int) -> None:
        if rng.random() < 0.33:
            faults.injected += 1
            raise RuntimeError(f"injected random {stage} failure")

    server.write_side.compactor.hook = flaky
    deadline = time.monotonic() + float(os.environ.get("KINE_SOAK_SECONDS", "600"))
    try:

        async def writer(n: int) -> None:
            wrng = random.Random(n)
            while time.monotonic() < deadline:
                key = b"/soak/%03d" % wrng.randrange(keys)
                await client.kv.Put(pb.PutRequest(key=key, value=b"x" * 100))

        await asyncio.gather(*(writer(n) for n in range(16)))
        server.write_side.compactor.hook = None
        status = server.write_side.compactor.status
        revision = (await counters(server))[0]
        while status.compacted_through < revision - retain:
            await asyncio.sleep(0.2)
        assert faults.injected > 0 and status.failures_total == faults.injected
        assert len(await rows(server)) <= keys + retain + (revision - status.compacted_through)
    finally:
        await client.close()
        await server.stop()
