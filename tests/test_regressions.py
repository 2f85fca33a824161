"""Regression tests for defects found in review, each proven first against the old code."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import asyncpg
import grpc
import pytest

from kine_server.drivers.base import OPEN_END
from kine_server.drivers.sqlite import SQLiteDriver
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.support.client import Client, Recorder
from tests.support.watching import WatchStream


@pytest.mark.parametrize("cancel_after", [0, 1, 2, 3])
async def test_a_cancelled_read_does_not_leave_its_connection_in_a_transaction(
    tmp_path: Path, cancel_after: int
) -> None:
    driver = SQLiteDriver(str(tmp_path / "s.db"), readers=1)
    await driver.open()
    try:

        async def read() -> int:
            # A point read runs inline on the loop (nothing to cancel in it); a range goes to
            # the reader's thread, mid-transaction: the cancellation lands there.
            async with driver.read() as tx:
                revision = (await tx.counters()).revision
                await tx.range(b"\x00", OPEN_END, None, 0)
                return revision

        task = asyncio.create_task(read())
        for _ in range(cancel_after):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(3):
            assert await read() == 1
    finally:
        await driver.close()


async def test_compact_revision_never_moves_backwards(server: SingleProcess, kine: Client) -> None:
    for i in range(60):
        await kine.kv.Put(pb.PutRequest(key=b"a", value=b"%d" % i))
    compactor = server.write_side.compactor
    compactor.settings = type(compactor.settings)(interval=0, min_retain=10, batch_size=1000)
    assert await compactor.tick() is True  # a periodic tick compacts to 61 - 10 = 51
    recorder = Recorder(kine)
    await recorder("kv.Compact", pb.CompactionRequest(revision=40))
    await recorder("kv.Range", pb.RangeRequest(key=b"a", revision=45))
    assert recorder.transcript == [
        "kv.Compact -> OUT_OF_RANGE: etcdserver: mvcc: required revision has been compacted",
        "kv.Range -> OUT_OF_RANGE: etcdserver: mvcc: required revision has been compacted",
    ]
    assert (await server.store.counters()).compact_revision == 51


@pytest.mark.one_process  # the stream protocol; a front-end's watches: test_watch_differential
async def test_a_reused_watch_id_gets_its_events(kine: Client) -> None:
    for i in range(30):
        await kine.kv.Put(pb.PutRequest(key=b"w", value=b"%d" % i))
    stream = WatchStream(kine)
    await stream.create(b"w", start_revision=2, watch_id=5)
    await stream.cancel(5)
    await stream.create(b"w", watch_id=5)
    put = await kine.kv.Put(pb.PutRequest(key=b"w", value=b"after"))
    seen: list[int] = []
    while put.header.revision not in seen:
        response = await stream.read(timeout=5)
        assert response is not None, f"never received the put; saw revisions {seen}"
        seen += [e.kv.mod_revision for e in response.events]
    await stream.close()


@pytest.mark.one_process  # the stream protocol; a front-end's watches: test_watch_differential
async def test_a_half_closed_watch_stream_keeps_sending(kine: Client) -> None:
    await kine.kv.Put(pb.PutRequest(key=b"h", value=b"1"))
    call = kine.watch.Watch()
    create = pb.WatchCreateRequest(key=b"h", start_revision=2)
    await call.write(pb.WatchRequest(create_request=create))
    await call.done_writing()
    assert (await call.read()).created
    response = await asyncio.wait_for(call.read(), 5)
    assert [e.kv.mod_revision for e in response.events] == [2]
    put = await kine.kv.Put(pb.PutRequest(key=b"h", value=b"2"))
    response = await asyncio.wait_for(call.read(), 5)
    assert [e.kv.mod_revision for e in response.events] == [put.header.revision]
    call.cancel()


@pytest.mark.one_process  # validation in api/, the same code in a front-end
async def test_nested_txn_ops_count_against_the_outer_limit(kine: Client) -> None:
    nested = pb.TxnRequest(
        success=[pb.RequestOp(request_put=pb.PutRequest(key=b"n%d" % i)) for i in range(50)]
    )
    outer = [pb.RequestOp(request_range=pb.RangeRequest(key=b"r%d" % i)) for i in range(99)]
    recorder = Recorder(kine)
    await recorder("kv.Txn", pb.TxnRequest(success=[*outer, pb.RequestOp(request_txn=nested)]))
    assert recorder.transcript == [
        "kv.Txn -> INVALID_ARGUMENT: etcdserver: too many operations in txn request"
    ]


async def refuse_puts_of(dsn: str, key: bytes) -> None:
    """Make the database itself refuse every row of `key` (a trigger): a statement error of one
    request, which kine-server cannot see coming, on either database."""
    if dsn.startswith("sqlite://"):

        def create() -> None:
            with contextlib.closing(sqlite3.connect(dsn.removeprefix("sqlite://"))) as db:
                db.execute(
                    f"CREATE TRIGGER refuse BEFORE INSERT ON kine_kv WHEN NEW.key = X'{key.hex()}' "
                    "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
                )

        # In a thread: the server's writer may hold the lock and need this event loop to let go.
        await asyncio.to_thread(create)
        return
    pg = await asyncpg.connect(dsn)
    try:
        await pg.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF NEW.key = '\\x{key.hex()}'::bytea THEN RAISE EXCEPTION 'refused by the test'; "
            "END IF; RETURN NEW; END $$"
        )
        await pg.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON kine_kv FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    finally:
        await pg.close()


async def test_one_bad_request_does_not_fail_its_batch(
    dsn: str, server: SingleProcess, kine: Client
) -> None:
    """A Put the database refuses, in the middle of one group commit of 21 Puts: it alone fails
    (INTERNAL), the other 20 commit together, with dense revisions. The writer is held while
    the 21 queue up, so they are sure to share a batch; the database's refusal is real (before,
    the "bad" key was a 4000-byte one, which SQLite accepts and PostgreSQL's length check
    refuses before any statement: no statement of a batch ever failed)."""
    await refuse_puts_of(dsn, b"bad")
    writer = server.write_side.writer
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold(applier: object) -> None:
        holding.set()
        await release.wait()

    held = asyncio.ensure_future(writer.submit(hold))
    await holding.wait()
    batches = writer.batches
    keys = [b"g%02d" % i for i in range(10)] + [b"bad"] + [b"g%02d" % i for i in range(10, 20)]
    calls = [asyncio.ensure_future(kine.kv.Put(pb.PutRequest(key=k, value=b"v"))) for k in keys]
    deadline = asyncio.get_running_loop().time() + 30
    while len(writer._queue) < len(keys):  # every Put is queued behind the held batch
        assert asyncio.get_running_loop().time() < deadline, len(writer._queue)
        await asyncio.sleep(0.01)
    release.set()
    await held
    results = await asyncio.gather(*calls, return_exceptions=True)
    bad = results.pop(10)
    assert isinstance(bad, grpc.aio.AioRpcError), bad
    assert bad.code() == grpc.StatusCode.INTERNAL, bad
    assert all(isinstance(r, pb.PutResponse) for r in results), results
    revisions = sorted(r.header.revision for r in results)  # type: ignore[union-attr]
    assert revisions == list(range(2, 22))
    assert writer.batches - batches == 2  # the held one, then the 20 in one transaction
    assert (await kine.kv.Range(pb.RangeRequest(key=b"bad"))).count == 0


async def test_keep_alive_does_not_revive_an_expired_lease(server: SingleProcess, kine: Client) -> None:
    server.write_side.lessor._interval = 3600  # expiry pass stopped: expired, not yet revoked
    grant = await kine.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=2))
    await asyncio.sleep(2.2)
    call = kine.lease.LeaseKeepAlive()
    await call.write(pb.LeaseKeepAliveRequest(ID=grant.ID))
    assert (await call.read()).TTL == 0
    await call.done_writing()


@pytest.mark.one_process  # api/ and the reader, the same code in a front-end
async def test_read_only_txn_is_not_size_checked_and_unknown_targets_compare_as_equal(
    kine: Client,
) -> None:
    await kine.kv.Put(pb.PutRequest(key=b"a", value=b"x"))
    big = pb.Compare(key=b"a", target=pb.Compare.VALUE, value=b"x" * (1600 * 1024))
    response = await kine.kv.Txn(pb.TxnRequest(compare=[big]))
    assert response.succeeded is False
    odd = pb.Compare(key=b"a", target=7, result=pb.Compare.NOT_EQUAL)  # type: ignore[arg-type]
    assert (await kine.kv.Txn(pb.TxnRequest(compare=[odd]))).succeeded is False
