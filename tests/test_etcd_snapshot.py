"""`kine-server restore` of etcd's own snapshots: a real etcd's `etcdctl snapshot save` (a bbolt
file with its SHA-256 trailer) and a data directory's `member/snap/db`, on both databases, then
the same reads answered by both servers: every revision's state, history, leases."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from kine_server.pb import rpc_pb2 as pb
from tests.conftest import fresh_dsn
from tests.support.client import Client, connect
from tests.support.etcd import RealEtcd, etcdctl_binary
from tests.support.process import KineProcess
from tests.test_etcdctl import etcdctl
from tests.test_snapshot import restore

LEASE = 0x1234


async def make_history(client: Client) -> int:
    """Puts, updates, a delete and a re-create, a Txn changing two keys in one revision, a lease
    with keys, and a compaction: returns the compact revision."""
    kv = client.kv
    await kv.Put(pb.PutRequest(key=b"/a", value=b"1"))
    await kv.Put(pb.PutRequest(key=b"/a", value=b"2"))
    await kv.Put(pb.PutRequest(key=b"/b", value=b"x"))
    await kv.Put(pb.PutRequest(key=b"/gone", value=b"soon"))
    await kv.DeleteRange(pb.DeleteRangeRequest(key=b"/gone"))
    compacted = int((await kv.Put(pb.PutRequest(key=b"/a", value=b"3"))).header.revision)
    await kv.Compact(pb.CompactionRequest(revision=compacted, physical=True))
    await client.lease.LeaseGrant(pb.LeaseGrantRequest(ID=LEASE, TTL=900))
    await kv.Put(pb.PutRequest(key=b"/leased", value=b"v", lease=LEASE))
    await kv.DeleteRange(pb.DeleteRangeRequest(key=b"/b"))
    await kv.Put(pb.PutRequest(key=b"/b", value=b"again"))
    await kv.Txn(
        pb.TxnRequest(
            success=[
                pb.RequestOp(request_put=pb.PutRequest(key=b"/t1", value=b"one")),
                pb.RequestOp(request_put=pb.PutRequest(key=b"/t2", value=b"two")),
                pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"/a")),
            ]
        )
    )
    await kv.Put(pb.PutRequest(key=b"/a", value=b"back"))
    return compacted


async def observed(client: Client, compacted: int) -> dict[str, Any]:
    """Everything a client can read that the snapshot must carry: the state at every revision
    from the compact revision on, the history as a watch replays it, the leases, and the error
    for a read below the compaction."""
    status = await client.maintenance.Status(pb.StatusRequest())
    revision = status.header.revision
    states = {}
    for at in range(compacted, revision + 1):
        response = await client.kv.Range(
            pb.RangeRequest(key=b"\x00", range_end=b"\x00", revision=at)
        )
        states[at] = [
            (kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)
            for kv in response.kvs
        ]
    watch = client.watch.Watch()
    create = pb.WatchCreateRequest(
        key=b"\x00", range_end=b"\x00", start_revision=compacted + 1, prev_kv=True
    )
    await watch.write(pb.WatchRequest(create_request=create))
    assert (await watch.read()).created
    events: list[tuple[int, int, bytes, bytes, bytes]] = []
    while not events or events[-1][1] < revision:
        response = await asyncio.wait_for(watch.read(), 10)
        events += [
            (e.type, e.kv.mod_revision, e.kv.key, e.kv.value, e.prev_kv.value)
            for e in response.events
        ]
    watch.cancel()
    leases = []
    for lease in (await client.lease.LeaseLeases(pb.LeaseLeasesRequest())).leases:
        ttl = await client.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease.ID, keys=True))
        leases.append((lease.ID, ttl.grantedTTL, sorted(ttl.keys)))
    try:
        await client.kv.Range(pb.RangeRequest(key=b"/a", revision=compacted - 1))
        below = "no error"
    except grpc.aio.AioRpcError as exc:
        below = f"{exc.code()}: {exc.details()}"
    return {
        "revision": revision,
        "states": states,
        "events": events,
        "leases": leases,
        "below_compaction": below,
    }


async def seen_by(address: str, compacted: int) -> dict[str, Any]:
    client = connect(address)
    try:
        return await observed(client, compacted)
    finally:
        await client.close()


async def test_an_etcd_snapshot_restores_with_every_revision(dsn: str, tmp_path: Path) -> None:
    snapshot = tmp_path / "etcd.snapshot"
    with RealEtcd() as etcd:
        client = connect(etcd.endpoint)
        compacted = await make_history(client)
        await client.close()
        etcd.etcdctl("snapshot", "save", str(snapshot))
        expected = await seen_by(etcd.endpoint, compacted)
    assert expected["leases"] == [(LEASE, 900, [b"/leased"])]  # the history is what was meant
    done = restore(snapshot, dsn)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"restored revision {expected['revision']} into "), done.stdout
    assert " leases, " in done.stdout and "; HashKV " in done.stdout, done.stdout
    with KineProcess(dsn, tmp_path) as kine:
        assert await seen_by(kine.address, compacted) == expected


async def test_an_etcd_data_directory_restores_too(tmp_path: Path) -> None:
    """member/snap/db of a stopped etcd: the same bbolt file without the trailer."""
    with RealEtcd() as etcd:
        client = connect(etcd.endpoint)
        compacted = await make_history(client)
        await client.close()
        expected = await seen_by(etcd.endpoint, compacted)
        database = etcd.data_dir / "member" / "snap" / "db"
        copy = tmp_path / "db"
        etcd.stop_process()
        shutil.copy(database, copy)
    endpoint = f"sqlite://{tmp_path}/store/state.db"
    done = restore(copy, endpoint)
    assert done.returncode == 0, done.stderr
    with KineProcess(endpoint, tmp_path) as kine:
        assert await seen_by(kine.address, compacted) == expected


def test_a_damaged_snapshot_is_one_line(tmp_path: Path) -> None:
    snapshot = tmp_path / "bad"
    snapshot.write_bytes(b"\x00" * 16 + (0xED0CDAED).to_bytes(4, "little") + b"\x00" * 4000)
    done = restore(snapshot, f"sqlite://{tmp_path}/s.db")
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "not a bbolt database" in lines[0], done.stderr


async def test_kine_server_snapshots_are_etcds_own_format_both_ways(
    dsn: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """kine-server → etcdctl snapshot → a real etcd → etcdctl snapshot → kine-server: what
    clients read is the same at every step."""
    first, back = tmp_path / "from-kine.snapshot", tmp_path / "from-etcd.snapshot"
    with KineProcess(dsn, tmp_path) as kine:
        client = connect(kine.address)
        compacted = await make_history(client)
        await client.close()
        expected = await seen_by(kine.address, compacted)
        saved = etcdctl(kine.address, f"snapshot save {first}")
        assert "[exit 0]" in saved, saved
    status = json.loads(etcdctl_json(f"snapshot status {first} -w json"))
    assert status["revision"] == expected["revision"], status
    with RealEtcd(restore_from=first) as etcd:
        assert await seen_by(etcd.endpoint, compacted) == expected
        etcd.etcdctl("snapshot", "save", str(back))
    (tmp_path / "again").mkdir()
    other = fresh_dsn(
        "sqlite" if dsn.startswith("sqlite") else "postgres", tmp_path / "again", request
    )
    done = restore(back, other)
    assert done.returncode == 0, done.stderr
    with KineProcess(other, tmp_path) as kine:
        assert await seen_by(kine.address, compacted) == expected


def etcdctl_json(command: str) -> str:
    """etcdctl's output of a command that needs no server (snapshot status)."""
    ctl = etcdctl_binary()
    assert ctl is not None
    done = subprocess.run(
        [ctl, *command.split()],
        env={"ETCDCTL_API": "3"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout


async def test_a_negative_lease_id_survives_a_snapshot(tmp_path: Path) -> None:
    """etcd lets a client choose any lease id, negative ones too; its backend keys them as
    unsigned 64-bit numbers. A negative one used to fail every snapshot."""
    endpoint, copy = f"sqlite://{tmp_path}/a/state.db", f"sqlite://{tmp_path}/b/state.db"
    snapshot = tmp_path / "s.snapshot"
    with KineProcess(endpoint, tmp_path) as kine:
        client = connect(kine.address)
        for lease in (-5, 3):
            await client.lease.LeaseGrant(pb.LeaseGrantRequest(ID=lease, TTL=600))
        await client.kv.Put(pb.PutRequest(key=b"/neg", value=b"v", lease=-5))
        await client.close()
        saved = etcdctl(kine.address, f"snapshot save {snapshot}")
        assert "[exit 0]" in saved, saved
    done = restore(snapshot, copy)
    assert done.returncode == 0, done.stderr
    with KineProcess(copy, tmp_path) as kine:
        client = connect(kine.address)
        leases = await client.lease.LeaseLeases(pb.LeaseLeasesRequest())
        ttl = await client.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=-5, keys=True))
        await client.close()
    assert sorted(lease.ID for lease in leases.leases) == [-5, 3]
    assert list(ttl.keys) == [b"/neg"]


def test_a_truncated_etcd_snapshot_is_one_line(tmp_path: Path) -> None:
    """Cut short, a bbolt file points at pages that are not there: one line, no traceback."""
    from kine_server.etcd_backend.bbolt import BoltWriter

    whole = tmp_path / "whole.db"
    writer = BoltWriter(str(whole))
    keys = writer.bucket(b"key")
    for revision in range(2, 3000):
        key = revision.to_bytes(8, "big") + b"_" + bytes(8)
        keys.add(key, pb.ResponseHeader(revision=revision).SerializeToString() * 8)
    writer.bucket(b"meta")
    writer.close()
    cut = tmp_path / "cut.db"
    cut.write_bytes(whole.read_bytes()[: 4096 * 20])
    done = restore(cut, f"sqlite://{tmp_path}/s.db")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "damaged" in lines[0] or "past the end" in lines[0], lines[0]
