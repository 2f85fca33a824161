"""Alarms as etcd keeps them: raised (member id, alarm type) pairs, compared with a real etcd.

The same Alarm calls, and the writes each alarm refuses or lets through, go to kine-server and
to a real etcd; the answers must be the same. Two things legitimately differ and are normalised:
each server's own member id (written SELF) and the order of a GET's list and of the alarms Status
lists in its errors (etcd's come from a Go map, in no order). etcd 3.4, the oracle here, sends
AlarmResponse without a header; 3.5 heads it, as kine-server does, so the header is checked on
its own.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from kine_server.drivers.base import SCHEMA_VERSION
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.conftest import fresh_dsn, test_config
from tests.support.client import Client, Recorder, connect
from tests.support.process import KineProcess
from tests.test_etcdctl import etcdctl
from tests.test_metrics import get, sample

A = pb.AlarmRequest
#: Stands for the server's own member id in a scenario and in its transcript.
SELF = -1
#: The largest member id a client can name (etcd's ids are uint64).
TOP = 2**64 - 1
LEASE = 7000


class Session(Recorder):
    """Calls on one server, each outcome recorded as a line with SELF for its own member id."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, render=lambda response: f"revision {response.header.revision}")
        self.member = 0

    async def start(self) -> None:
        status = await self.client.maintenance.Status(pb.StatusRequest())
        self.member = status.header.member_id

    async def alarm(self, action: int, member: int, alarm: int) -> None:
        request = A(action=action, memberID=self.member if member == SELF else member, alarm=alarm)  # type: ignore[arg-type]
        response = await self.client.maintenance.Alarm(request)
        listed = sorted(
            ("SELF" if a.memberID == self.member else str(a.memberID), pb.AlarmType.Name(a.alarm))
            for a in response.alarms
        )
        name = A.AlarmAction.Name(action)
        who = "SELF" if member == SELF else member
        self.transcript.append(f"Alarm {name} {who} {pb.AlarmType.Name(alarm)} -> {listed}")
        # Status lists every raised alarm in `errors`, in etcd's words (etcd 3.5's
        # server/etcdserver/api/v3rpc/maintenance.go Status appends each AlarmMember's String(),
        # as 3.4 does), in the alarm store's map order: sorted here.
        status = await self.client.maintenance.Status(pb.StatusRequest())
        errors = [e.replace(f"memberID:{self.member} ", "memberID:SELF ") for e in status.errors]
        self.transcript.append(f"Status errors -> {sorted(errors)}")

    async def call(self, method: str, request: Any) -> None:
        await self(method, request)


def writes() -> list[tuple[str, Any]]:
    """One of each request an alarm may refuse, and reads it must not."""
    put_txn = pb.TxnRequest(success=[pb.RequestOp(request_put=pb.PutRequest(key=b"t", value=b"v"))])
    delete_txn = pb.TxnRequest(
        success=[pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"gone"))]
    )
    read_txn = pb.TxnRequest(success=[pb.RequestOp(request_range=pb.RangeRequest(key=b"k"))])
    return [
        ("kv.Put", pb.PutRequest(key=b"k", value=b"v")),
        ("kv.Range", pb.RangeRequest(key=b"k")),
        ("kv.DeleteRange", pb.DeleteRangeRequest(key=b"gone")),
        ("kv.Txn", put_txn),
        ("kv.Txn", delete_txn),
        ("kv.Txn", read_txn),
        ("lease.LeaseGrant", pb.LeaseGrantRequest(ID=LEASE + 1, TTL=600)),
        ("kv.Compact", pb.CompactionRequest(revision=1)),
    ]


async def scenario(session: Session) -> None:
    alarm, call = session.alarm, session.call
    await call("kv.Put", pb.PutRequest(key=b"k", value=b"before"))
    await call("lease.LeaseGrant", pb.LeaseGrantRequest(ID=LEASE, TTL=600))
    await alarm(A.GET, 0, pb.NONE)
    # Activating the same alarm again answers it again; another member's is a second alarm.
    await alarm(A.ACTIVATE, 0, pb.NOSPACE)
    await alarm(A.ACTIVATE, 0, pb.NOSPACE)
    await alarm(A.ACTIVATE, SELF, pb.NOSPACE)
    await alarm(A.GET, 0, pb.NONE)
    await alarm(A.GET, 12345, pb.NOSPACE)  # GET ignores the member id
    await alarm(A.GET, 0, pb.CORRUPT)
    for method, request in writes():
        await call(method, request)
    # DEACTIVATE clears exactly the pair it names, and answers it only if it was raised.
    await alarm(A.DEACTIVATE, 0, pb.NONE)
    await alarm(A.DEACTIVATE, 7, pb.NOSPACE)
    await alarm(A.DEACTIVATE, 0, pb.CORRUPT)
    await alarm(A.DEACTIVATE, 0, pb.NOSPACE)
    await alarm(A.DEACTIVATE, 0, pb.NOSPACE)
    await alarm(A.GET, 0, pb.NONE)
    await call("kv.Put", pb.PutRequest(key=b"k", value=b"still refused"))
    await alarm(A.DEACTIVATE, SELF, pb.NOSPACE)
    await alarm(A.GET, 0, pb.NONE)
    await call("kv.Put", pb.PutRequest(key=b"k", value=b"after"))
    # Any member id, the largest uint64 included.
    await alarm(A.ACTIVATE, TOP, pb.NOSPACE)
    await alarm(A.GET, 0, pb.NOSPACE)
    await alarm(A.DEACTIVATE, TOP, pb.NOSPACE)
    # CORRUPT refuses every write; reads go on.
    await alarm(A.ACTIVATE, 5, pb.CORRUPT)
    await alarm(A.GET, 0, pb.NONE)
    for method, request in writes():
        await call(method, request)
    await call("lease.LeaseRevoke", pb.LeaseRevokeRequest(ID=LEASE))
    await alarm(A.DEACTIVATE, 5, pb.CORRUPT)
    await alarm(A.GET, 0, pb.NONE)
    for method, request in writes():
        await call(method, request)
    await call("lease.LeaseRevoke", pb.LeaseRevokeRequest(ID=LEASE))


async def transcript(client: Client) -> list[str]:
    session = Session(client)
    await session.start()
    await scenario(session)
    return session.transcript


async def check_header(client: Client) -> None:
    """etcd 3.5 heads an AlarmResponse with the cluster, the member and the revision."""
    status = await client.maintenance.Status(pb.StatusRequest())
    response = await client.maintenance.Alarm(A(action=A.GET))
    assert response.header.cluster_id == status.header.cluster_id != 0
    assert response.header.member_id == status.header.member_id != 0
    assert response.header.revision == status.header.revision
    assert response.header.raft_term == status.header.raft_term


async def test_alarms_same_as_etcd(kine: Client, etcd: Client) -> None:
    theirs = await transcript(etcd)
    ours = await transcript(kine)
    assert ours == theirs
    await check_header(kine)


async def test_activating_alarm_none_changes_nothing(kine: Client) -> None:
    """etcd 3.5 ignores ACTIVATE of alarm NONE (3.4, the oracle, crashes on it)."""
    for member in (0, 99):
        response = await kine.maintenance.Alarm(A(action=A.ACTIVATE, memberID=member))
        assert list(response.alarms) == []
    assert list((await kine.maintenance.Alarm(A(action=A.GET))).alarms) == []
    await kine.kv.Put(pb.PutRequest(key=b"k"))


async def test_each_alarm_refuses_writes_until_it_is_cleared(kine: Client) -> None:
    """With NOSPACE and CORRUPT both raised, clearing one leaves the other in force (etcd 3.5
    forgets it until a restart, which is why this is not compared with etcd)."""
    put = pb.PutRequest(key=b"k")
    for first, second, refused in (
        (pb.NOSPACE, pb.CORRUPT, "database space exceeded"),
        (pb.CORRUPT, pb.NOSPACE, "corrupt cluster"),
    ):
        for kind in (pb.NOSPACE, pb.CORRUPT):
            await kine.maintenance.Alarm(A(action=A.ACTIVATE, memberID=3, alarm=kind))
        await kine.maintenance.Alarm(A(action=A.DEACTIVATE, memberID=3, alarm=second))
        with pytest.raises(grpc.aio.AioRpcError, match=refused):
            await kine.kv.Put(put)
        await kine.maintenance.Alarm(A(action=A.DEACTIVATE, memberID=3, alarm=first))
        await kine.kv.Put(put)


async def test_the_metric_shows_nospace_while_any_member_has_it(
    server: SingleProcess, kine: Client
) -> None:
    assert server.http is not None
    url = f"http://127.0.0.1:{server.http.port}/metrics"
    own = (await kine.maintenance.Status(pb.StatusRequest())).header.member_id
    for member in (0, own):
        await kine.maintenance.Alarm(A(action=A.ACTIVATE, memberID=member, alarm=pb.NOSPACE))
    for member, shown in ((0, 1), (own, 0)):
        await kine.maintenance.Alarm(A(action=A.DEACTIVATE, memberID=member, alarm=pb.NOSPACE))
        assert sample((await get(url))[1], "kine_alarm_nospace") == shown


async def test_the_quota_raises_nospace_for_the_server_itself(dsn: str) -> None:
    server = SingleProcess(test_config(dsn, quota_backend_bytes=1))
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    try:
        own = (await client.maintenance.Status(pb.StatusRequest())).header.member_id
        with pytest.raises(grpc.aio.AioRpcError, match="database space exceeded"):
            await client.kv.Put(pb.PutRequest(key=b"k"))
        listed = (await client.maintenance.Alarm(A(action=A.GET))).alarms
        assert [(a.memberID, a.alarm) for a in listed] == [(own, pb.NOSPACE)]
    finally:
        await client.close()
        await server.stop()


async def test_instances_on_one_database_share_the_alarms(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    dsn = fresh_dsn("postgres", tmp_path, request)
    servers = [SingleProcess(test_config(dsn, name=name)) for name in ("one", "two")]
    for server in servers:
        await server.start()
    a, b = (connect(f"127.0.0.1:{s.port}") for s in servers)
    try:
        ids = [(await c.maintenance.Status(pb.StatusRequest())).header.member_id for c in (a, b)]
        assert ids[0] != ids[1]
        for client, member in zip((a, b), ids, strict=True):
            await client.maintenance.Alarm(A(action=A.ACTIVATE, memberID=member, alarm=pb.NOSPACE))
        for client in (a, b):  # a GET reads them from the database
            listed = (await client.maintenance.Alarm(A(action=A.GET))).alarms
            assert sorted((m.memberID, m.alarm) for m in listed) == sorted(
                (member, pb.NOSPACE) for member in ids
            )
        # One instance clears the other's alarm; its own still refuses writes on both.
        cleared = await b.maintenance.Alarm(
            A(action=A.DEACTIVATE, memberID=ids[0], alarm=pb.NOSPACE)
        )
        assert [(m.memberID, m.alarm) for m in cleared.alarms] == [(ids[0], pb.NOSPACE)]
        for client in (a, b):
            listed = (await client.maintenance.Alarm(A(action=A.GET))).alarms
            assert [(m.memberID, m.alarm) for m in listed] == [(ids[1], pb.NOSPACE)]
            with pytest.raises(grpc.aio.AioRpcError, match="database space exceeded"):
                await client.kv.Put(pb.PutRequest(key=b"k"))
        await a.maintenance.Alarm(A(action=A.DEACTIVATE, memberID=ids[1], alarm=pb.NOSPACE))
        for client in (a, b):
            assert list((await client.maintenance.Alarm(A(action=A.GET))).alarms) == []
            await client.kv.Put(pb.PutRequest(key=b"k"))
    finally:
        await a.close()
        await b.close()
        for server in servers:
            await server.stop()


async def make_schema_2_store(dsn: str, tmp_path: Path, nospace: int) -> None:
    """A store as kine-server with schema 2 left it: the NOSPACE flag in kine_meta, no
    kine_alarm table."""
    with KineProcess(dsn, tmp_path) as kine:
        assert "[exit 0]" in etcdctl(kine.address, "put /kept value")
    statements = [
        "DROP TABLE kine_alarm",
        f"INSERT INTO kine_meta (name, value) VALUES ('alarm_nospace', {nospace})",
        "UPDATE kine_meta SET value = 2 WHERE name = 'schema_version'",
    ]
    if dsn.startswith("sqlite://"):
        conn = sqlite3.connect(dsn.removeprefix("sqlite://"), isolation_level=None)
        try:
            for statement in statements:
                conn.execute(statement)
        finally:
            conn.close()
    else:
        pg = await asyncpg.connect(dsn)
        try:
            for statement in statements:
                await pg.execute(statement)
        finally:
            await pg.close()


async def meta_rows(dsn: str) -> dict[str, int]:
    query = "SELECT name, value FROM kine_meta"
    if dsn.startswith("sqlite://"):
        conn = sqlite3.connect(dsn.removeprefix("sqlite://"))
        try:
            return dict(conn.execute(query).fetchall())
        finally:
            conn.close()
    pg = await asyncpg.connect(dsn)
    try:
        return {r[0]: r[1] for r in await pg.fetch(query)}
    finally:
        await pg.close()


async def test_a_schema_2_nospace_flag_becomes_member_0s_alarm(dsn: str, tmp_path: Path) -> None:
    await make_schema_2_store(dsn, tmp_path, nospace=1)
    with KineProcess(dsn, tmp_path) as kine:
        # etcdctl prints an alarm as protobuf text: member 0's has no memberID field.
        listed = "alarm:NOSPACE \n"
        assert etcdctl(kine.address, "alarm list") == f"$ etcdctl alarm list [exit 0]\n{listed}"
        assert "database space exceeded" in etcdctl(kine.address, "put /new x")
        disarmed = etcdctl(kine.address, "alarm disarm")
        assert disarmed == f"$ etcdctl alarm disarm [exit 0]\n{listed}"
        assert "[exit 0]" in etcdctl(kine.address, "put /new x")
        assert "value" in etcdctl(kine.address, "get /kept")
    meta = await meta_rows(dsn)
    assert meta["schema_version"] == SCHEMA_VERSION
    assert "alarm_nospace" not in meta


async def test_a_schema_2_store_without_the_flag_has_no_alarm(dsn: str, tmp_path: Path) -> None:
    await make_schema_2_store(dsn, tmp_path, nospace=0)
    with KineProcess(dsn, tmp_path) as kine:
        assert etcdctl(kine.address, "alarm list") == "$ etcdctl alarm list [exit 0]\n"
        assert "[exit 0]" in etcdctl(kine.address, "put /new x")
        # Schema 4's auth store came with the upgrade: off, at etcd's first auth revision.
        assert etcdctl(kine.address, "user add root:pw") == (
            "$ etcdctl user add root:pw [exit 0]\nUser root created\n"
        )
    meta = await meta_rows(dsn)
    assert meta["schema_version"] == SCHEMA_VERSION
    # Two changes: the simple-token key made at start, then the user (etcd's revision counts
    # only the user).
    assert (meta["auth_enabled"], meta["auth_revision"], meta["auth_generation"]) == (0, 2, 2)
