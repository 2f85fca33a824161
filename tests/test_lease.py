"""Leases on both databases: compared with a real etcd, then expiry, revocation at scale,
restarts and keep-alive streams."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from kine_server.api.lease import READ_AHEAD
from kine_server.pb import rpc_pb2 as pb
from kine_server.pb import rpc_pb2_grpc
from kine_server.process.single import SingleProcess
from tests.conftest import test_config
from tests.support.client import Client, Recorder, connect
from tests.support.etcd import RealEtcd
from tests.support.process import KineProcess
from tests.support.watching import WatchStream
from tests.test_etcdctl import etcdctl

pytestmark = pytest.mark.mysql


async def keep_alive(client: Client, ids: list[int]) -> list[tuple[int, int]]:
    """One keep-alive stream: a request per id, the (ID, TTL) of each response."""
    call = client.lease.LeaseKeepAlive()
    answers = []
    for lease_id in ids:
        await call.write(pb.LeaseKeepAliveRequest(ID=lease_id))
        response = await call.read()
        answers.append((response.ID, response.TTL))
    await call.done_writing()
    return answers


async def lease_scenario(call: Recorder) -> None:
    await call("lease.LeaseGrant", pb.LeaseGrantRequest(ID=100, TTL=60))
    await call("lease.LeaseGrant", pb.LeaseGrantRequest(ID=100, TTL=30))
    await call("lease.LeaseGrant", pb.LeaseGrantRequest(ID=101, TTL=1))
    await call("lease.LeaseGrant", pb.LeaseGrantRequest(ID=102, TTL=9_000_000_001))
    for key, lease in ((b"k1", 100), (b"k2", 100), (b"k3", 101), (b"k4", 0)):
        await call("kv.Put", pb.PutRequest(key=key, value=b"v", lease=lease))
    await call("kv.Put", pb.PutRequest(key=b"k5", value=b"v", lease=4242))
    await call(
        "kv.Txn",
        pb.TxnRequest(success=[pb.RequestOp(request_put=pb.PutRequest(key=b"k6", lease=4242))]),
    )
    await call("kv.Put", pb.PutRequest(key=b"k4", ignore_value=True, lease=101))
    await call("kv.Put", pb.PutRequest(key=b"k4", value=b"w", ignore_lease=True))
    await call("kv.Range", pb.RangeRequest(key=b"k", range_end=b"l"))
    status = await call.client.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=100, keys=True))
    call.note(
        f"ttl 100: granted {status.grantedTTL}, keys {sorted(status.keys)}, "
        f"remaining close to granted: {status.grantedTTL - 2 <= status.TTL <= status.grantedTTL}"
    )
    await call("lease.LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=999, keys=True))
    leases = await call.client.lease.LeaseLeases(pb.LeaseLeasesRequest())
    call.note(f"leases {sorted(s.ID for s in leases.leases)}")
    await call("kv.Put", pb.PutRequest(key=b"k1", value=b"detached"))
    await call("kv.DeleteRange", pb.DeleteRangeRequest(key=b"k2"))
    status = await call.client.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=100, keys=True))
    call.note(f"keys of 100 now {sorted(status.keys)}")
    await call("lease.LeaseRevoke", pb.LeaseRevokeRequest(ID=100))
    await call("lease.LeaseRevoke", pb.LeaseRevokeRequest(ID=100))
    await call("lease.LeaseRevoke", pb.LeaseRevokeRequest(ID=101))
    await call("kv.Range", pb.RangeRequest(key=b"k", range_end=b"l"))
    call.note(f"keepalive {await keep_alive(call.client, [101, 103])}")


async def test_lease_api_same_as_etcd(kine: Client, etcd: Client) -> None:
    await etcd.lease.LeaseGrant(pb.LeaseGrantRequest(ID=103, TTL=100))
    await kine.lease.LeaseGrant(pb.LeaseGrantRequest(ID=103, TTL=100))
    ours, theirs = Recorder(kine), Recorder(etcd)
    await lease_scenario(ours)
    await lease_scenario(theirs)
    assert ours.transcript == theirs.transcript


def test_etcdctl_lease_commands_same_as_etcd(tmp_path: Path) -> None:
    session = [
        "lease grant 600",
        "put /l/a 1 --lease=LEASE",
        "put /l/b 2 --lease=LEASE",
        "lease timetolive LEASE --keys",
        "lease list",
        "lease keep-alive --once LEASE",
        "lease revoke LEASE",
        "lease revoke LEASE",
        "lease timetolive LEASE",
        "get --prefix /l/",
        "lease keep-alive --once LEASE",
    ]

    def run(endpoint: str) -> list[str]:
        out = []
        lease = ""
        asked = 0.0  # when the grant was sent: the TTL counts down from somewhere after it
        for command in session:
            if command == "lease grant 600":
                asked = time.monotonic()
            text = etcdctl(endpoint, command.replace("LEASE", lease or "0"))
            if command == "lease grant 600":
                found = re.search(r"lease ([0-9a-f]+) granted", text)
                assert found is not None, text
                lease = found.group(1)
            out.append(settle(text.replace(lease, "LEASE") if lease else text, asked))
        return out

    def settle(text: str, asked: float) -> str:
        """A remaining TTL still counting down becomes a marker when it is what the time since
        the grant allows (at most 600 s, at least 600 s less the elapsed seconds rounded up, less
        one for rounding); any other value stays, and fails the comparison. etcd lists a lease's
        keys in no fixed order: sort them."""
        floor = 600 - math.ceil(time.monotonic() - asked) - 1

        def remaining(match: re.Match[str]) -> str:
            seconds = int(match.group(1))
            return "remaining(counting)" if floor <= seconds <= 600 else match.group(0)

        text = re.sub(r"remaining\((\d+)s\)", remaining, text)
        return re.sub(
            r"attached keys\(\[([^\]]*)\]\)",
            lambda m: "attached keys([" + " ".join(sorted(m.group(1).split())) + "])",
            text,
        )

    with RealEtcd() as etcd, KineProcess(f"sqlite://{tmp_path}/s.db", tmp_path) as kine:
        assert run(kine.address) == run(etcd.endpoint)


async def test_expiry_deletes_keys_in_one_revision_within_a_second(
    server: SingleProcess, kine: Client
) -> None:
    asked = time.monotonic()  # the TTL runs from the grant, somewhere after this
    grant = await kine.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=2))
    granted = time.monotonic()
    for i in range(5):
        await kine.kv.Put(pb.PutRequest(key=b"/t/%d" % i, value=b"x", lease=grant.ID))
    await kine.kv.Put(pb.PutRequest(key=b"/t/keep", value=b"x"))
    stream = WatchStream(kine)
    await stream.create(b"/t/", b"/t0")
    assert (await stream.read()).created  # type: ignore[union-attr]
    response = await stream.read(timeout=5)
    assert response is not None
    expired_at = time.monotonic()
    # Never early; expired within the second after it is due.
    assert asked + 2 - 0.1 <= expired_at <= granted + 2 + 1.0
    assert [(e.type, e.kv.key) for e in response.events] == [(1, b"/t/%d" % i) for i in range(5)]
    assert {e.kv.mod_revision for e in response.events} == {response.header.revision}
    left = await kine.kv.Range(pb.RangeRequest(key=b"/t/", range_end=b"/t0"))
    assert [kv.key for kv in left.kvs] == [b"/t/keep"]
    ttl = await kine.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=grant.ID))
    assert ttl.TTL == -1
    assert server.write_side.lessor.expired_total == 1
    await stream.close()


async def test_revoke_1000_keys_is_one_revision_with_1000_delete_events(kine: Client) -> None:
    grant = await kine.lease.LeaseGrant(pb.LeaseGrantRequest(ID=7, TTL=600))
    for n in range(10):
        ops = [
            pb.RequestOp(
                request_put=pb.PutRequest(key=b"/r/%04d" % (n * 100 + i), value=b"v", lease=7)
            )
            for i in range(100)
        ]
        await kine.kv.Txn(pb.TxnRequest(success=ops))
    before = await kine.kv.Range(pb.RangeRequest(key=b"/r/", range_end=b"/r0", count_only=True))
    assert before.count == 1000
    stream = WatchStream(kine)
    await stream.create(b"/r/", b"/r0", prev_kv=True)
    assert (await stream.read()).created  # type: ignore[union-attr]
    revoke = await kine.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=grant.ID))
    events: list[Any] = []
    while len(events) < 1000:
        response = await stream.read()
        assert response is not None
        events += list(response.events)
    assert len(events) == 1000
    assert {e.kv.mod_revision for e in events} == {revoke.header.revision}
    assert revoke.header.revision == before.header.revision + 1
    assert sorted(e.kv.key for e in events) == [b"/r/%04d" % i for i in range(1000)]
    assert all(e.type == 1 and e.prev_kv.lease == 7 for e in events)
    assert await stream.read(timeout=0.3) is None
    after = await kine.kv.Range(pb.RangeRequest(key=b"/r/", range_end=b"/r0", count_only=True))
    assert after.count == 0
    await stream.close()


async def test_leases_survive_restart_with_their_keys_and_a_fresh_ttl(dsn: str) -> None:
    first = SingleProcess(test_config(dsn))
    await first.start()
    client = connect(f"127.0.0.1:{first.port}")
    await client.lease.LeaseGrant(pb.LeaseGrantRequest(ID=55, TTL=3))
    await client.kv.Put(pb.PutRequest(key=b"held", value=b"x", lease=55))
    await client.close()
    await first.stop()
    await asyncio.sleep(3.5)  # longer than the TTL while no server runs

    second = SingleProcess(test_config(dsn))
    await second.start()
    client = connect(f"127.0.0.1:{second.port}")
    try:
        status = await client.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=55, keys=True))
        assert status.grantedTTL == 3 and 1 <= status.TTL <= 3
        assert list(status.keys) == [b"held"]
        assert (await keep_alive(client, [55])) == [(55, 3)]
        await asyncio.sleep(4.5)  # no more keep-alives: now it expires
        gone = await client.kv.Range(pb.RangeRequest(key=b"held"))
        assert gone.count == 0
    finally:
        await client.close()
        await second.stop()


async def test_keep_alive_stream_with_many_leases(kine: Client) -> None:
    ids = list(range(1000, 1300))
    await asyncio.gather(*(kine.lease.LeaseGrant(pb.LeaseGrantRequest(ID=i, TTL=30)) for i in ids))
    answers = await keep_alive(kine, [*ids, 77])
    assert answers == [(i, 30) for i in ids] + [(77, 0)]
    listed = await kine.lease.LeaseLeases(pb.LeaseLeasesRequest())
    assert sorted(s.ID for s in listed.leases) == ids


@pytest.mark.one_process  # the lessor's rule; a front-end's grant: test_lease_api_same_as_etcd
@pytest.mark.parametrize("ttl", [0, 1, 2])
async def test_short_ttls_are_raised_to_etcds_minimum(kine: Client, ttl: int) -> None:
    grant = await kine.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=ttl))
    assert grant.TTL == 2 and grant.ID > 0


async def pipelined(call: Any, ids: list[int]) -> list[str]:
    """Write a keep-alive for each of `ids` without waiting, then read one answer per request:
    each as `ID TTL revision` (the header's revision, which is the store's as of the answer)."""
    for lease_id in ids:
        await call.write(pb.LeaseKeepAliveRequest(ID=lease_id))
    answers = []
    for _ in ids:
        response = await call.read()
        answers.append(f"{response.ID} {response.TTL} {response.header.revision}")
    return answers


async def pipelined_scenario(client: Client) -> list[str]:
    """Keep-alives pipelined for several leases (one unknown, one named many times in a row), two
    of them revoked while the stream is open, then revoked again while requests are in flight."""
    held = [301, 302, 303, 304, 305]
    for lease_id in held:
        await client.lease.LeaseGrant(pb.LeaseGrantRequest(ID=lease_id, TTL=60 + lease_id % 10))
        await client.kv.Put(pb.PutRequest(key=b"/p/%d" % lease_id, value=b"v", lease=lease_id))
    call = client.lease.LeaseKeepAlive()
    cycle = [*held, 999, 303, 303, 303]
    transcript = await pipelined(call, cycle * 60)
    for lease_id in (302, 304):
        await client.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease_id))
    transcript += await pipelined(call, cycle * 60)
    # Revoked while its keep-alives are in flight: each answer is the full TTL until the
    # revocation and 0 from then on; which request the revocation lands between is the servers'.
    for lease_id in [303, 301] * 300:
        await call.write(pb.LeaseKeepAliveRequest(ID=lease_id))
    await client.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=303))
    await call.write(pb.LeaseKeepAliveRequest(ID=303))
    ttls: dict[int, list[int]] = {301: [], 303: []}
    for _ in range(601):
        response = await call.read()
        ttls[response.ID].append(response.TTL)
    await call.done_writing()
    left = []
    while (response := await call.read()) is not grpc.aio.EOF:
        left.append(response)
    transcript.append(f"answers after the last request: {len(left)}")
    transcript.append(f"301: {sorted(set(ttls[301]))} over {len(ttls[301])}")
    renewed = ttls[303].count(63)
    transcript.append(
        f"303: {len(ttls[303])}, {ttls[303] == [63] * renewed + [0] * (301 - renewed)}"
    )
    transcript.append(f"303 last: {ttls[303][-1]}")
    return transcript


async def test_pipelined_keep_alives_answered_in_order_as_etcd(kine: Client, etcd: Client) -> None:
    """etcd's clients send a keep-alive per lease every TTL/3 on one stream, whether or not the
    previous ones are answered: each request gets exactly one answer, in order, with etcd's TTL
    (0 for a lease that is gone) and revision, however the server batches the renewals."""
    ours = await pipelined_scenario(kine)
    assert ours == await pipelined_scenario(etcd)


async def test_pipelined_keep_alives_share_writer_transactions(
    server: SingleProcess, kine: Client
) -> None:
    """One commit per keep-alive held a stream to the database's commit rate."""
    ids = list(range(1, 21))
    await asyncio.gather(*(kine.lease.LeaseGrant(pb.LeaseGrantRequest(ID=i, TTL=60)) for i in ids))
    writer = server.write_side.writer
    before = writer.requests
    answers = await pipelined(kine.lease.LeaseKeepAlive(), ids * 100)
    assert [a.split()[:2] for a in answers] == [[str(i), "60"] for i in ids] * 100
    assert writer.requests - before < len(answers)
    # The expiry loop submits writes of its own (a pass, a promise) whenever it wakes: stopped,
    # the count below is this call's alone.
    await server.write_side.lessor.stop()
    before = writer.requests
    ttls = await server.write_side.lessor.keep_alive_many([3, 77, 3, 5])
    assert (ttls, writer.requests - before) == ([60, 0, 60, 60], 1)


async def test_client_leaving_mid_stream_leaves_no_task_and_logs_no_error(
    server: SingleProcess, kine: Client, caplog: pytest.LogCaptureFixture
) -> None:
    await kine.lease.LeaseGrant(pb.LeaseGrantRequest(ID=9, TTL=60))
    caplog.set_level(logging.WARNING)

    def stream_tasks() -> list[asyncio.Task[Any]]:
        names = ("LeaseKeepAlive", "_ReadAhead")
        return [t for t in asyncio.all_tasks() if any(n in repr(t.get_coro()) for n in names)]

    for reads in (0, 1, 50):
        call = kine.lease.LeaseKeepAlive()
        for _ in range(2000):
            await call.write(pb.LeaseKeepAliveRequest(ID=9))
        for _ in range(reads):
            assert (await call.read()).TTL == 60
        call.cancel()
    # A client that sends without reading: the answers fill the stream's flow-control window
    # (a small one, so that this comes soon), the server stops reading ahead (grpc still takes
    # the requests in), and then the client goes away.
    small_window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=small_window)
    call = rpc_pb2_grpc.LeaseStub(channel).LeaseKeepAlive()
    for _ in range(5 * READ_AHEAD):
        await call.write(pb.LeaseKeepAliveRequest(ID=9))
    await asyncio.sleep(0.5)
    call.cancel()
    await channel.close()
    deadline = time.monotonic() + 20
    while stream_tasks() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert stream_tasks() == []
    gc.collect()  # "Task exception was never retrieved" is logged when the task is collected
    await asyncio.sleep(0.1)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]
