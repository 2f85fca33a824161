"""Several kine-server instances on one PostgreSQL, or one MariaDB, behave as one etcd."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from kine_server.mvcc.history import REVISION_PIECE
from kine_server.pb import kv_pb2
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.conftest import fresh_dsn, test_config
from tests.support.client import Client, connect
from tests.support.process import KineProcess
from tests.support.procs import state
from tests.support.watching import WatchStream
from tests.test_big_requests import fill, value
from tests.test_store import cas_increment
from tests.test_watch import collect, key_range

C = pb.Compare


@pytest.fixture(params=["postgres", "mysql"])
def shared_dsn(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return fresh_dsn(request.param, tmp_path, request)


async def cluster(dsn: str, count: int = 3, **overrides: object) -> list[SingleProcess]:
    servers = []
    for _ in range(count):
        server = SingleProcess(test_config(dsn, **overrides))
        await server.start()
        servers.append(server)
    return servers


async def shut_down(servers: list[SingleProcess], clients: list[Client]) -> None:
    for client in clients:
        await client.close()
    for server in servers:
        await server.stop()


@pytest.fixture
async def three(shared_dsn: str) -> AsyncIterator[tuple[list[SingleProcess], list[Client]]]:
    servers = await cluster(shared_dsn)
    clients = [connect(f"127.0.0.1:{s.port}") for s in servers]
    yield servers, clients
    await shut_down(servers, clients)


async def test_creates_and_cas_over_three_instances_reach_every_watcher_in_order(
    three: tuple[list[SingleProcess], list[Client]],
) -> None:
    servers, clients = three
    rng = random.Random(3)
    ranges = [key_range(low, low + rng.randrange(5, 40)) for low in rng.sample(range(60), 30)]
    streams = []
    for i, client in enumerate(clients):  # ten watchers on every instance
        stream = WatchStream(client)
        for w in range(10):
            await stream.create(*ranges[i * 10 + w], watch_id=w + 1)
        for _ in range(10):
            assert (await stream.read()) is not None
        streams.append(stream)

    committed: list[tuple[int, int, bytes]] = []

    async def worker(n: int) -> None:
        wrng = random.Random(n)
        kv = clients[n % 3].kv
        for _ in range(6):
            key = b"/s/%03d" % wrng.randrange(0, 100)
            if wrng.random() < 0.5:
                create = await kv.Txn(
                    pb.TxnRequest(
                        compare=[C(key=key, target=C.MOD, result=C.EQUAL, mod_revision=0)],
                        success=[pb.RequestOp(request_put=pb.PutRequest(key=key, value=b"0"))],
                    )
                )
                if create.succeeded:
                    committed.append((create.header.revision, 0, key))
            else:
                await cas_increment(kv, key, wrng)

    await asyncio.gather(*(worker(n) for n in range(64)))
    final = (await clients[0].kv.Range(pb.RangeRequest(key=b"/s/"))).header.revision
    # Every revision's events, read back from instance 0's history, as the reference.
    history = WatchStream(clients[0])
    await history.create(b"/s/", b"/s0", start_revision=2, watch_id=99)
    reference = (await collect(history, {99}, final))[99]
    await history.close()
    assert sorted({r for r, _, _ in reference}) == list(range(2, final + 1))  # dense
    assert set(committed) <= set(reference)
    for i, stream in enumerate(streams):
        got = await collect(stream, set(range(1, 11)), final)
        for w in range(10):
            key, end = ranges[i * 10 + w]
            assert got[w + 1] == [e for e in reference if key <= e[2] < end], (i, w)
        await stream.close()
    assert sum(s.write_side.poller.published_revisions for s in servers) > 0


async def test_a_write_acknowledged_by_one_instance_is_read_by_the_others(
    three: tuple[list[SingleProcess], list[Client]],
) -> None:
    _, clients = three
    for n in range(100):
        writer, reader = clients[n % 3], clients[(n + 1) % 3]
        put = await writer.kv.Put(pb.PutRequest(key=b"raw", value=b"%d" % n))
        got = await reader.kv.Range(pb.RangeRequest(key=b"raw"))
        assert got.kvs[0].value == b"%d" % n
        assert got.header.revision >= put.header.revision


async def test_without_notifications_the_poll_still_delivers(shared_dsn: str) -> None:
    servers = []
    for _ in range(2):
        server = SingleProcess(test_config(shared_dsn, poll_interval=0.2))
        server.driver.listen_enabled = False  # type: ignore[attr-defined]
        await server.start()
        servers.append(server)
    a, b = (connect(f"127.0.0.1:{s.port}") for s in servers)
    try:
        stream = WatchStream(b)
        await stream.create(b"n/", b"n0")
        assert (await stream.read()) is not None
        puts = [await a.kv.Put(pb.PutRequest(key=b"n/%d" % i, value=b"x")) for i in range(20)]
        got = await collect(stream, {0}, puts[-1].header.revision)
        assert [r for r, _, _ in got[0]] == [p.header.revision for p in puts]
        assert servers[1].write_side.poller.published_revisions >= 20
        await stream.close()
    finally:
        await shut_down(servers, [a, b])


async def test_lease_expires_exactly_once_with_three_instances(
    three: tuple[list[SingleProcess], list[Client]],
) -> None:
    servers, clients = three
    grant = await clients[0].lease.LeaseGrant(pb.LeaseGrantRequest(TTL=2))
    for i in range(3):
        put = await clients[i].kv.Put(pb.PutRequest(key=b"/l/%d" % i, value=b"x", lease=grant.ID))
    streams = []
    for client in clients:
        stream = WatchStream(client)
        await stream.create(b"/l/", b"/l0", start_revision=put.header.revision + 1)
        assert (await stream.read()) is not None
        streams.append(stream)
    # Keep-alives through another instance count: 3 s of them keep the 2 s lease alive.
    for _ in range(6):
        call = clients[1].lease.LeaseKeepAlive()
        await call.write(pb.LeaseKeepAliveRequest(ID=grant.ID))
        assert (await call.read()).TTL == 2
        await call.done_writing()
        await asyncio.sleep(0.5)
    assert (await clients[2].kv.Range(pb.RangeRequest(key=b"/l/", range_end=b"/l0"))).count == 3
    for stream in streams:
        response = await stream.read(timeout=5)
        assert response is not None
        assert len(response.events) == 3 and {e.type for e in response.events} == {1}
        assert await stream.read(timeout=1.5) is None  # exactly one expiry
        await stream.close()
    assert sum(s.write_side.lessor.expired_total for s in servers) == 1


@dataclass
class Victim:
    """Writes to the instance that is killed, as its clients saw them."""

    acked: int = 0
    in_flight: int = 0
    #: Requests issued while the process was frozen, not yet answered: none can be.
    in_flight_frozen: int = 0
    #: Requests issued while the process was frozen that were answered: must stay 0.
    answered_frozen: int = 0
    #: Requests issued before the kill that never got an answer.
    cut_off: int = 0
    frozen: bool = False
    killed: bool = False


async def test_kill_9_of_one_instance_loses_no_acknowledged_write(
    shared_dsn: str, tmp_path: Path
) -> None:
    """16 writers spread Puts over three instances; one is killed with SIGKILL once it has
    acknowledged 20 writes, at a moment writes to it are in flight (checked: some issued before
    the kill were never answered), and the writers fail over. Every acknowledged write is
    there, on the survivors and on the killed instance restarted."""
    procs = [KineProcess(shared_dsn, tmp_path) for _ in range(3)]
    for proc in procs:
        proc.start()
    clients = [connect(p.address) for p in procs]
    acked: list[bytes] = []
    victim = Victim()
    try:

        async def put_to_victim(key: bytes) -> None:
            sent_before_kill = not victim.killed
            sent_frozen = victim.frozen and sent_before_kill
            victim.in_flight += 1
            victim.in_flight_frozen += sent_frozen
            try:
                await clients[0].kv.Put(pb.PutRequest(key=key, value=b"x"), timeout=5)
            except Exception:
                if sent_before_kill:
                    victim.cut_off += 1
                raise
            finally:
                victim.in_flight -= 1
                victim.in_flight_frozen -= sent_frozen
            victim.acked += 1
            victim.answered_frozen += sent_frozen

        async def writer(n: int) -> None:
            for i in range(40):
                target = clients[(n + i) % 3]
                key = b"/k9/%d/%d" % (n, i)
                try:
                    if target is clients[0]:
                        await put_to_victim(key)
                    else:
                        await target.kv.Put(pb.PutRequest(key=key, value=b"x"), timeout=5)
                except Exception:  # the killed instance's clients fail over
                    target = clients[(n + i + 1) % 3] if target is clients[0] else target
                    await target.kv.Put(pb.PutRequest(key=key, value=b"x"), timeout=5)
                acked.append(key)

        async def killer() -> None:
            # Mid-write: after 20 acknowledged writes, at a moment some are in flight, the
            # writer process is frozen (SIGSTOP: it answers nothing more), and killed while a
            # write issued after the freeze is waiting (the same as a SIGKILL at the moment it
            # was frozen). A write in flight at the freeze may already have been answered, so
            # the killer issues one itself once the process is stopped: that one is sure to be
            # cut off. The freeze stays that short: a writer frozen inside its transaction holds
            # the revision row, and the other instances' writes wait for it.
            while not (victim.acked >= 20 and victim.in_flight > 0):
                await asyncio.sleep(0.001)
            process = procs[0].proc
            assert process is not None
            process.send_signal(signal.SIGSTOP)
            while state(process.pid) != "T":
                await asyncio.sleep(0.001)
            victim.frozen = True
            probe = asyncio.create_task(put_to_victim(b"/k9/probe"))
            while victim.in_flight_frozen == 0:
                await asyncio.sleep(0.001)
            process.send_signal(signal.SIGKILL)
            victim.killed = True
            await asyncio.to_thread(process.wait)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await probe

        await asyncio.gather(*(writer(n) for n in range(16)), killer())
        # The kill landed mid-write: requests issued before it were never answered.
        assert victim.cut_off > 0 and victim.answered_frozen == 0, victim
        listing = await clients[1].kv.Range(
            pb.RangeRequest(key=b"/k9/", range_end=b"/k90", keys_only=True)
        )
        assert {kv.key for kv in listing.kvs} == set(acked)
        assert len(acked) == 16 * 40
        # The killed instance, restarted, catches up from the table.
        procs[0].proc = None
        procs[0].start()
        restarted = connect(procs[0].address)
        again = await restarted.kv.Range(
            pb.RangeRequest(key=b"/k9/", range_end=b"/k90", count_only=True),
            wait_for_ready=True,
            timeout=10,
        )
        assert again.count == len(acked)
        stream = WatchStream(restarted)
        await stream.create(b"/k9/", b"/k90", start_revision=2)
        assert (await stream.read()) is not None
        got = await collect(stream, {0}, again.header.revision)
        assert {k for _, _, k in got[0]} == set(acked)
        await stream.close()
        await restarted.close()
    finally:
        for client in clients:
            await client.close()
        for proc in procs:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.proc.kill()
                proc.proc.wait()


async def test_a_delete_range_larger_than_a_statement_reads_reaches_the_other_instance(
    shared_dsn: str,
) -> None:
    """One revision of more changes than one statement may read (history.REVISION_PIECE): the
    other instance's poller reads it in pieces and its watchers get every event of it, with
    the value each key had, in key order, as etcd sends them."""
    count = REVISION_PIECE + 1000
    servers = await cluster(shared_dsn, count=2)
    a, b = (connect(f"127.0.0.1:{s.port}") for s in servers)
    try:
        keys = await fill(a.kv, b"big/", count)
        loaded = await a.kv.Range(pb.RangeRequest(key=b"big/", count_only=True))
        stream = WatchStream(b)
        start = loaded.header.revision + 1  # not B's newest: B may not have seen A's last yet
        await stream.create(b"big/", b"big0", prev_kv=True, start_revision=start)
        assert (await stream.read()) is not None
        deleted = await a.kv.DeleteRange(pb.DeleteRangeRequest(key=b"big/", range_end=b"big0"))
        assert deleted.deleted == count
        events: list[kv_pb2.Event] = []
        while len(events) < count:
            response = await stream.read(timeout=60)
            assert response is not None, f"{len(events)} of {count} delete events arrived"
            events += response.events
        assert len(events) == count
        assert {e.kv.mod_revision for e in events} == {deleted.header.revision}
        assert [e.kv.key for e in events] == keys
        assert all(e.type == kv_pb2.Event.DELETE for e in events)
        assert [e.prev_kv.value for e in events] == [value(k) for k in keys]
        assert servers[1].write_side.poller.published_revisions >= 1
        await stream.close()
    finally:
        await shut_down(servers, [a, b])
