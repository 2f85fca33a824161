"""Defragment and HashKV/Hash, with the real etcdctl and across restarts and instances."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.conftest import fresh_dsn, test_config
from tests.support.client import Client, connect
from tests.support.process import KineProcess
from tests.test_etcdctl import etcdctl


def test_etcdctl_defrag_and_hashkv(tmp_path: Path) -> None:
    with KineProcess(f"sqlite://{tmp_path}/s.db", tmp_path) as kine:
        for i in range(20):
            etcdctl(kine.address, f"put /d/{i % 10} {'x' * 1000}")
        out = etcdctl(kine.address, "defrag")
        assert "[exit 0]" in out and f"Finished defragmenting etcd member[{kine.address}]" in out
        first = json.loads(etcdctl(kine.address, "endpoint hashkv -w json").split("\n", 1)[1])
        again = json.loads(etcdctl(kine.address, "endpoint hashkv -w json").split("\n", 1)[1])
    assert first[0]["HashKV"]["hash"] == again[0]["HashKV"]["hash"] != 0


async def test_hashkv_is_stable_across_restarts_and_changes_with_the_data(dsn: str) -> None:
    async def hashes(client: Client) -> tuple[int, int]:
        now = await client.maintenance.HashKV(pb.HashKVRequest())
        old = await client.maintenance.HashKV(pb.HashKVRequest(revision=3))
        return now.hash, old.hash

    server = SingleProcess(test_config(dsn))
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    for i in range(5):
        await client.kv.Put(pb.PutRequest(key=b"h%d" % i, value=b"v%d" % i))
    before = await hashes(client)
    await client.maintenance.Defragment(pb.DefragmentRequest())
    assert await hashes(client) == before
    await client.close()
    await server.stop()

    server = SingleProcess(test_config(dsn))
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    assert await hashes(client) == before
    await client.kv.Put(pb.PutRequest(key=b"h0", value=b"changed"))
    after = await hashes(client)
    assert after[0] != before[0] and after[1] == before[1]  # the past is unchanged
    await client.close()
    await server.stop()


async def test_hashkv_agrees_between_instances(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    dsn = fresh_dsn("postgres", tmp_path, request)
    servers = [SingleProcess(test_config(dsn)) for _ in range(2)]
    for server in servers:
        await server.start()
    a, b = (connect(f"127.0.0.1:{s.port}") for s in servers)
    try:
        for i in range(20):
            await a.kv.Put(pb.PutRequest(key=b"k%02d" % i, value=b"%d" % i))
        ha = await a.maintenance.HashKV(pb.HashKVRequest(revision=15))
        hb = await b.maintenance.HashKV(pb.HashKVRequest(revision=15))
        assert ha.hash == hb.hash
    finally:
        await a.close()
        await b.close()
        for server in servers:
            await server.stop()


async def test_hashkv_at_the_compact_revision_answers_its_hash_as_etcd_35(dsn: str) -> None:
    """etcd 3.5 keeps the hash it computes while compacting (server/mvcc/kvstore_compaction.go
    scheduleCompaction) and answers HashKV at exactly the compact revision with it
    (server/mvcc/hash.go hashStorage.HashByRev looks among the kept hashes first); etcd 3.4, the
    oracle of the differential tests, answered "compacted" there. Here: the hash answered at
    that revision before the compaction, after it, after a restart too; one below is compacted."""
    server = SingleProcess(test_config(dsn))
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    try:
        for i in range(6):  # revisions 2..7
            await client.kv.Put(pb.PutRequest(key=b"h%d" % (i % 3), value=b"v%d" % i))
        before = await client.maintenance.HashKV(pb.HashKVRequest(revision=5))
        await client.kv.Compact(pb.CompactionRequest(revision=5, physical=True))
        at = await client.maintenance.HashKV(pb.HashKVRequest(revision=5))
        assert (at.hash, at.header.revision, at.compact_revision) == (before.hash, 7, 5)
        with pytest.raises(grpc.aio.AioRpcError) as below:
            await client.maintenance.HashKV(pb.HashKVRequest(revision=4))
        assert below.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert below.value.details() == "etcdserver: mvcc: required revision has been compacted"
    finally:
        await client.close()
        await server.stop()
    server = SingleProcess(test_config(dsn))
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    try:
        again = await client.maintenance.HashKV(pb.HashKVRequest(revision=5))
        assert again.hash == before.hash
    finally:
        await client.close()
        await server.stop()
