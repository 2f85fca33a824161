"""Store behaviour on both real databases: concurrency, density of revisions, restarts, compaction."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

import pytest

from kine_server.drivers import make_driver
from kine_server.drivers.base import OPEN_END, DriverError
from kine_server.drivers.sqlite import SQLiteDriver
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.conftest import test_config
from tests.support.client import Client, connect

C = pb.Compare


async def all_rows(server: SingleProcess) -> list[tuple[bytes, int, int]]:
    """Every row of the key table as (key, mod_revision, version), tombstones included."""
    async with server.driver.read() as tx:
        counters = await tx.counters()
        changes = await tx.changes(0, counters.revision, b"\0", OPEN_END, 1_000_000)
    return [(c.row.key, c.row.mod_revision, c.row.version) for c in changes]


async def cas_increment(
    kv: object, key: bytes, rng: random.Random, read_together: asyncio.Barrier | None = None
) -> int:
    """Increment the integer at `key` with compare-and-swap; returns how many attempts it took.
    With `read_together`, the first read waits there until every other client has read too."""
    attempts = 0
    while True:
        attempts += 1
        current = await kv.Range(pb.RangeRequest(key=key))  # type: ignore[attr-defined]
        if read_together is not None and attempts == 1:
            await read_together.wait()
        kvs = current.kvs
        value = int(kvs[0].value) if kvs else 0
        mod = kvs[0].mod_revision if kvs else 0
        response = await kv.Txn(  # type: ignore[attr-defined]
            pb.TxnRequest(
                compare=[C(key=key, target=C.MOD, result=C.EQUAL, mod_revision=mod)],
                success=[
                    pb.RequestOp(request_put=pb.PutRequest(key=key, value=b"%d" % (value + 1)))
                ],
            )
        )
        if response.succeeded:
            return attempts
        await asyncio.sleep(rng.random() / 1000)


async def test_64_cas_clients_lose_no_update_and_revisions_stay_dense(
    server: SingleProcess, kine: Client
) -> None:
    """64 clients increment 8 counters by compare-and-swap. Their first reads all happen before
    any of them writes, so the clients that read one counter race for it and all but one lose:
    the test is sure to exercise conflicts (64 - 8 of them at least), not only to hope for them."""
    keys = [b"/counter/%d" % i for i in range(8)]
    per_client = 8
    clients = [connect(f"127.0.0.1:{server.port}") for _ in range(8)]
    read_together = asyncio.Barrier(64)

    async def worker(n: int) -> int:
        rng = random.Random(n)
        kv = clients[n % len(clients)].kv
        attempts = await cas_increment(kv, rng.choice(keys), rng, read_together)
        for _ in range(per_client - 1):
            attempts += await cas_increment(kv, rng.choice(keys), rng)
        return attempts

    attempts = await asyncio.gather(*(worker(n) for n in range(64)))
    for client in clients:
        await client.close()

    writes = 64 * per_client
    response = await kine.kv.Range(pb.RangeRequest(key=b"/counter/", range_end=b"/counter0"))
    assert sum(int(kv.value) for kv in response.kvs) == writes
    assert response.header.revision == 1 + writes
    # Each failed attempt is a Txn whose compare saw another client's write: of the clients
    # that read one counter at the same revision, exactly one wins the first round.
    assert sum(attempts) - writes >= 64 - len(keys)
    revisions = sorted({rev for _, rev, _ in await all_rows(server)})
    assert revisions == list(range(2, 2 + writes))


async def test_group_commit_batches_concurrent_writes(server: SingleProcess, kine: Client) -> None:
    writer = server.write_side.writer
    requests_before, batches_before = writer.requests, writer.batches
    responses = await asyncio.gather(
        *(kine.kv.Put(pb.PutRequest(key=b"k%03d" % i, value=b"v")) for i in range(200))
    )
    revisions = sorted(r.header.revision for r in responses)
    assert revisions == list(range(2, 202))
    assert writer.requests - requests_before == 200
    assert writer.batches - batches_before < 200


async def test_data_and_identity_survive_restart(dsn: str) -> None:
    first = SingleProcess(test_config(dsn))
    await first.start()
    client = connect(f"127.0.0.1:{first.port}")
    await client.kv.Put(pb.PutRequest(key=b"a", value=b"1"))
    await client.kv.Put(pb.PutRequest(key=b"a", value=b"2"))
    await client.kv.DeleteRange(pb.DeleteRangeRequest(key=b"a"))
    await client.kv.Put(pb.PutRequest(key=b"b", value=b"3"))
    before = await client.kv.Range(pb.RangeRequest(key=b"\0", range_end=b"\0"))
    await client.close()
    await first.stop()

    second = SingleProcess(test_config(dsn))
    await second.start()
    client = connect(f"127.0.0.1:{second.port}")
    after = await client.kv.Range(pb.RangeRequest(key=b"\0", range_end=b"\0"))
    old = await client.kv.Range(pb.RangeRequest(key=b"a", revision=3))
    put = await client.kv.Put(pb.PutRequest(key=b"c", value=b"4"))
    await client.close()
    await second.stop()
    assert after == before
    assert after.header.revision == 5
    assert [kv.value for kv in old.kvs] == [b"2"]
    assert put.header.revision == 6


async def test_physical_compaction_keeps_only_what_later_revisions_need(
    dsn: str,
) -> None:
    server = SingleProcess(test_config(dsn, compact_batch_size=7))
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    try:
        for i in range(50):
            await client.kv.Put(pb.PutRequest(key=b"hot", value=b"%d" % i))
        await client.kv.Put(pb.PutRequest(key=b"gone", value=b"x"))
        await client.kv.DeleteRange(pb.DeleteRangeRequest(key=b"gone"))
        await client.kv.Put(pb.PutRequest(key=b"cold", value=b"c"))
        target = 53  # "gone" deleted at 53; "cold" written at 54 survives as history-free
        await client.kv.Put(pb.PutRequest(key=b"hot", value=b"after"))
        before = await client.kv.Range(pb.RangeRequest(key=b"\0", range_end=b"\0", revision=target))
        await client.kv.Compact(pb.CompactionRequest(revision=target, physical=True))
        rows = await all_rows(server)
        at_target = await client.kv.Range(
            pb.RangeRequest(key=b"\0", range_end=b"\0", revision=target)
        )
    finally:
        await client.close()
        await server.stop()
    # Left: "hot" as of the target (rev 51) and after it (55), and "cold" (54).
    assert sorted(rows) == [(b"cold", 54, 1), (b"hot", 51, 50), (b"hot", 55, 51)]
    assert at_target.kvs == before.kvs
    status = server.write_side.compactor.status
    assert status.compacted_through == target
    assert status.batches_total >= target // 7
    assert status.failures_total == 0


async def test_compaction_resumes_from_the_database_after_a_failed_batch(dsn: str) -> None:
    failures = {"left": 1}

    async def flaky(stage: str, after: int, through: int) -> None:
        if stage == "begin" and after >= 10 and failures["left"]:
            failures["left"] -= 1
            raise RuntimeError("injected batch failure")

    server = SingleProcess(test_config(dsn, compact_batch_size=5))
    server.write_side.compactor.hook = flaky
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    try:
        for i in range(30):
            await client.kv.Put(pb.PutRequest(key=b"k", value=b"%d" % i))
        await client.kv.Compact(pb.CompactionRequest(revision=25))
        compactor = server.write_side.compactor
        # The pass stops at the failed batch and keeps what earlier batches committed ...
        while compactor.status.failures_total == 0:
            await asyncio.sleep(0.01)
        assert compactor.status.compacted_through == 10
        assert compactor.status.consecutive_failures == 1
        assert "injected batch failure" in compactor.status.last_error
        # ... and the next pass continues from the database's compacted_through.
        assert await compactor.tick(advance=False) is True
        assert compactor.status.compacted_through == 25
        assert compactor.status.consecutive_failures == 0
        rows = await all_rows(server)
        assert [r[1] for r in rows] == [25, 26, 27, 28, 29, 30, 31]
        put = await client.kv.Put(pb.PutRequest(key=b"k", value=b"after"))
        assert put.header.revision == 32
    finally:
        await client.close()
        await server.stop()


async def test_second_server_on_one_sqlite_file_is_refused(tmp_path: object) -> None:
    path = f"{tmp_path}/state.db"
    first = make_driver(f"sqlite://{path}")
    await first.open()
    try:
        second = make_driver(f"sqlite://{path}")
        with pytest.raises(DriverError, match="another kine-server is already using"):
            await second.open()
    finally:
        await first.close()
    third = make_driver(f"sqlite://{path}")
    await third.open()
    await third.close()


async def test_newer_schema_is_refused(dsn: str) -> None:
    driver = make_driver(dsn)
    await driver.open()
    async with driver.write() as tx:
        await tx.lock()
    # Pretend a future kine-server migrated this database.
    async with driver.write() as tx:
        await tx.set_meta("schema_version", 99)
    await driver.close()
    again = make_driver(dsn)
    with pytest.raises(DriverError, match="schema version 99 is newer"):
        await again.open()


async def test_sqlite_writer_waits_for_a_held_write_lock(tmp_path: Path) -> None:
    """The writer takes SQLite's lock inline when it is free; when another connection (as a
    compaction batch does) holds it, the writer waits on its thread instead of failing."""
    path = tmp_path / "s.db"
    driver = SQLiteDriver(str(path), readers=1, busy_timeout_ms=5_000)
    await driver.open()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, other.execute, "COMMIT")
        began = loop.time()
        async with driver.write() as tx:
            counters = await tx.lock()
            await tx.set_revision(counters.revision + 1)
        assert loop.time() - began >= 0.25
        async with driver.read() as tx:
            assert (await tx.counters()).revision == counters.revision + 1
        # Held past the busy timeout: a clear driver error, and the writer still works after.
        short = SQLiteDriver(str(tmp_path / "t.db"), readers=1, busy_timeout_ms=200)
        await short.open()
        blocker = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(DriverError, match="locked"):
            async with short.write() as tx:
                await tx.lock()
        blocker.execute("COMMIT")
        async with short.write() as tx:
            await tx.lock()
        blocker.close()
        await short.close()
    finally:
        other.close()
        await driver.close()
