"""Auth as etcd has it: users, roles, permissions, tokens and the checks of every call, compared
with a real etcd through the real etcdctl and through raw gRPC, on both databases, with
kine-server run as operators run it by default (a writer and two front-ends)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from kine_server.pb import auth_pb2, rpc_pb2
from tests.support.client import Client, connect, normalized
from tests.support.etcd import RealEtcd
from tests.support.process import KineProcess
from tests.test_etcdctl import etcdctl

ROOT = "--user root:rootpw"
U1 = "--user u1:pw1"

#: One etcdctl invocation per line, run against both servers in order.
SESSION = [
    # Users and roles, before auth is on.
    "user add root:rootpw",
    "user add root:again",
    "role add r1",
    "role add r1",
    "role grant-permission r1 readwrite a b",
    "role grant-permission r1 read --prefix p/",
    "role grant-permission r1 write --from-key z",
    "role grant-permission r1 read k1",
    "role grant-permission r1 write k1",
    "role grant-permission nothing read x",
    "role get r1",
    "role get nothing",
    "role list",
    "user add u1:pw1",
    "user grant-role u1 r1",
    "user grant-role u1 r1",
    "user grant-role u1 nothing",
    "user grant-role nobody r1",
    "user get u1",
    "user get nobody",
    "user list",
    "user add u2:pw2",
    "user delete u2",
    "user delete u2",
    "user revoke-role u1 nothing",
    "user add cert-only --no-password",
    "put a 0",
    # etcdctl makes the root role and grants it to root when auth enable says it is missing.
    "auth enable",
    "auth enable",
    "role list",
    "user get root",
    # Without a user, with a wrong one, with a right one.
    "get a",
    "put a 1",
    "--user u1:wrong get a",
    "--user nobody:pw get a",
    "--user cert-only:x get a",
    f"{U1} put a 1",
    f"{U1} get a",
    f"{U1} get a --prefix",
    f"{U1} get a b",
    f"{U1} get a c",
    f"{U1} put b 1",
    f"{U1} get p/x",
    f"{U1} get --prefix p/",
    f"{U1} get --prefix p",
    f"{U1} put p/x 1",
    f"{U1} put zz 1",
    f"{U1} put z 1",
    f"{U1} put y 1",
    f"{U1} get zz",
    f"{U1} get k1",
    f"{U1} put k1 v",
    f"{U1} get k1 --prefix",
    f"{U1} del a --prev-kv",
    f"{U1} del zz",
    f"{U1} del zz --prev-kv",
    f"{U1} del --prefix p/",
    f"{U1} del --prefix a",
    f'{U1} txn -i <<mod("a") > "0"\n\nput a 2\n\nput b 2\n\n',
    f'{U1} txn -i <<mod("a") > "0"\n\nput a 3\n\nget k1\n\n',
    f'{U1} txn -i <<mod("q") > "0"\n\nput a 3\n\n\n',
    # What a user may ask about itself, and what only root may do.
    f"{U1} user get u1",
    f"{U1} user get root",
    f"{U1} user list",
    f"{U1} role get r1",
    f"{U1} role get root",
    f"{U1} role list",
    f"{U1} user add u3:pw3",
    f"{U1} role add r3",
    f"{U1} auth disable",
    f"{U1} auth enable",
    f"{U1} alarm list",
    f"{U1} defrag",
    f"{U1} endpoint hashkv",
    f"{ROOT} get a",
    f"{ROOT} put anything 1",
    f"{ROOT} role get root",
    f"{ROOT} user list",
    # Root's rules while auth is on.
    f"{ROOT} user revoke-role root root",
    f"{ROOT} user delete root",
    f"{ROOT} role delete root",
    # A revoked permission, a revoked role, a deleted role, a deleted user.
    f"{ROOT} role revoke-permission r1 a b",
    f"{ROOT} role revoke-permission r1 a b",
    f"{U1} get a",
    f"{U1} get k1",
    f"{ROOT} role grant-permission r1 read a",
    f"{U1} get a",
    f"{ROOT} user revoke-role u1 r1",
    f"{ROOT} user revoke-role u1 r1",
    f"{U1} get a",
    f"{ROOT} user grant-role u1 r1",
    f"{ROOT} role delete r1",
    f"{U1} get a",
    f"{ROOT} user get u1",
    f"{ROOT} user delete u1",
    f"{U1} get a",
    f"{ROOT} role list",
    f"{ROOT} user list",
    f"{ROOT} auth disable",
    "auth disable",
    "get a",
    "user list",
]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_etcdctl_auth_session_same_as_etcd(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from tests.conftest import fresh_dsn

    endpoint = fresh_dsn(kind, tmp_path, request)
    with RealEtcd() as etcd, KineProcess(endpoint, tmp_path, "--workers", "2") as kine:
        theirs = [etcdctl(etcd.endpoint, c).replace(etcd.endpoint, "ENDPOINT") for c in SESSION]
        ours = [etcdctl(kine.address, c).replace(kine.address, "ENDPOINT") for c in SESSION]
    for mine, expected in zip(ours, theirs, strict=True):
        assert mine == expected
    assert "Traceback" not in kine.log()


class Session:
    """Calls on one server with a chosen token, each outcome recorded as a line of text (the
    tokens themselves differ between servers and are left out)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transcript: list[str] = []
        self.tokens: dict[str, str] = {}

    async def __call__(self, method: str, request: Any, as_user: str | None = None) -> Any:
        service, name = method.split(".")
        stub = getattr(getattr(self.client, service), name)
        metadata = (("token", self.tokens.get(as_user, as_user)),) if as_user else None
        try:
            response = await stub(request, timeout=30, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            self.transcript.append(f"{as_user} {method} -> {exc.code().name}: {exc.details()}")
            return None
        if name == "Authenticate":
            self.tokens[request.name] = response.token
            response.token = "TOKEN"
        # A Status names the server's version, sizes and raft indexes: only its coming counts.
        # etcd 3.4 leaves an Alarm answer's header revision at 0 while auth is on (its auth
        # applier answers without a header): the alarms listed are what is compared.
        if name == "Alarm":
            response.ClearField("header")
        shown = "answered" if name == "Status" else normalized(response)
        self.transcript.append(f"{as_user} {method} -> {shown}")
        return response

    async def watch(self, as_user: str, **create: Any) -> str:
        """The first response to one watch create, as text."""
        request = rpc_pb2.WatchRequest(create_request=rpc_pb2.WatchCreateRequest(**create))
        metadata = (("token", self.tokens[as_user]),)
        call = self.client.watch.Watch(iter([request]), metadata=metadata)
        try:
            response = await asyncio.wait_for(call.read(), 10)
        finally:
            call.cancel()
        text = f"{as_user} Watch {create} -> {normalized(response)}"
        self.transcript.append(text)
        return text


RW = auth_pb2.Permission.READWRITE


async def grpc_scenario(s: Session) -> None:
    """The same calls in the same order on either server."""
    await s("auth.AuthEnable", rpc_pb2.AuthEnableRequest())
    await s("auth.UserAdd", rpc_pb2.AuthUserAddRequest(name="root", password="rootpw"))
    await s("auth.AuthEnable", rpc_pb2.AuthEnableRequest())
    await s("auth.UserGrantRole", rpc_pb2.AuthUserGrantRoleRequest(user="root", role="root"))
    await s("auth.UserAdd", rpc_pb2.AuthUserAddRequest(name="u1", password="pw1"))
    await s("auth.UserAdd", rpc_pb2.AuthUserAddRequest(name="", password="x"))
    no_password = rpc_pb2.AuthUserAddRequest(
        name="cert-only", password="ignored", options=auth_pb2.UserAddOptions(no_password=True)
    )
    await s("auth.UserAdd", no_password)
    await s("auth.RoleAdd", rpc_pb2.AuthRoleAddRequest(name=""))
    await s("auth.RoleAdd", rpc_pb2.AuthRoleAddRequest(name="r1"))
    await s(
        "auth.RoleGrantPermission",
        rpc_pb2.AuthRoleGrantPermissionRequest(
            name="r1", perm=auth_pb2.Permission(permType=RW, key=b"a", range_end=b"b")
        ),
    )
    await s("auth.UserGrantRole", rpc_pb2.AuthUserGrantRoleRequest(user="u1", role="r1"))
    await s("auth.Authenticate", rpc_pb2.AuthenticateRequest(name="root", password="rootpw"))
    await s("auth.AuthEnable", rpc_pb2.AuthEnableRequest())
    await s("auth.Authenticate", rpc_pb2.AuthenticateRequest(name="root", password="rootpw"))
    await s("auth.Authenticate", rpc_pb2.AuthenticateRequest(name="u1", password="pw1"))
    await s("auth.Authenticate", rpc_pb2.AuthenticateRequest(name="u1", password="bad"))
    await s("auth.Authenticate", rpc_pb2.AuthenticateRequest(name="nobody", password="x"))
    await s("auth.Authenticate", rpc_pb2.AuthenticateRequest(name="cert-only", password="ignored"))
    await s("auth.Authenticate", rpc_pb2.AuthenticateRequest(name="cert-only", password=""))
    # Tokens: none, a made-up one, a real one.
    await s("kv.Range", rpc_pb2.RangeRequest(key=b"a"))
    await s("kv.Range", rpc_pb2.RangeRequest(key=b"a"), "made-up-token")
    await s("kv.Range", rpc_pb2.RangeRequest(key=b"a"), "u1")
    await s("kv.Put", rpc_pb2.PutRequest(key=b"a", value=b"1"), "u1")
    await s("kv.Put", rpc_pb2.PutRequest(key=b"b", value=b"1"), "u1")
    await s("kv.Put", rpc_pb2.PutRequest(key=b"b", value=b"1"), "root")
    await s("kv.Range", rpc_pb2.RangeRequest(key=b"a", range_end=b"c"), "u1")
    await s("kv.DeleteRange", rpc_pb2.DeleteRangeRequest(key=b"b"), "u1")
    # Leases: revoking, or attaching to, a lease needs write access to every key it holds.
    await s("lease.LeaseGrant", rpc_pb2.LeaseGrantRequest(ID=1000, TTL=60), "root")
    await s("lease.LeaseGrant", rpc_pb2.LeaseGrantRequest(ID=1001, TTL=60), "u1")
    await s("kv.Put", rpc_pb2.PutRequest(key=b"x", value=b"1", lease=1000), "root")
    await s("kv.Put", rpc_pb2.PutRequest(key=b"a", value=b"2", lease=1000), "u1")
    await s("kv.Put", rpc_pb2.PutRequest(key=b"a", value=b"2", lease=1001), "u1")
    await s("lease.LeaseRevoke", rpc_pb2.LeaseRevokeRequest(ID=1000), "u1")
    await s("lease.LeaseRevoke", rpc_pb2.LeaseRevokeRequest(ID=1001), "u1")
    await s("lease.LeaseRevoke", rpc_pb2.LeaseRevokeRequest(ID=1000), "root")
    # A Txn is checked as a whole: both branches, every compare.
    compare = rpc_pb2.Compare(key=b"a", target=rpc_pb2.Compare.VERSION, version=0)
    put_b = rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"b", value=b"t"))
    put_a = rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"a", value=b"t"))
    await s("kv.Txn", rpc_pb2.TxnRequest(compare=[compare], success=[put_a], failure=[put_b]), "u1")
    await s("kv.Txn", rpc_pb2.TxnRequest(compare=[compare], success=[put_a], failure=[put_a]), "u1")
    other = rpc_pb2.Compare(key=b"b", target=rpc_pb2.Compare.VERSION, version=0)
    await s("kv.Txn", rpc_pb2.TxnRequest(compare=[other], success=[put_a]), "u1")
    # Watches on what the user may not read are created and canceled at once.
    await s.watch("u1", key=b"a")
    await s.watch("u1", key=b"a", range_end=b"b")
    await s.watch("u1", key=b"x")
    await s.watch("u1", key=b"a", range_end=b"c", watch_id=7)
    # Maintenance: the admin calls, answered as etcd's maintenance server answers them.
    await s("maintenance.Status", rpc_pb2.StatusRequest(), "u1")
    await s("maintenance.Defragment", rpc_pb2.DefragmentRequest(), "u1")
    await s("maintenance.Defragment", rpc_pb2.DefragmentRequest())
    await s("maintenance.HashKV", rpc_pb2.HashKVRequest(), "u1")
    await s("maintenance.Alarm", rpc_pb2.AlarmRequest(action=rpc_pb2.AlarmRequest.GET), "u1")
    # Changes of users and roles: tokens issued before them.
    await s("auth.UserList", rpc_pb2.AuthUserListRequest(), "u1")
    await s("auth.UserGet", rpc_pb2.AuthUserGetRequest(name="u1"), "u1")
    await s("auth.RoleGet", rpc_pb2.AuthRoleGetRequest(role="r1"), "u1")
    await s("auth.RoleGet", rpc_pb2.AuthRoleGetRequest(role="root"), "root")
    await s(
        "auth.RoleRevokePermission",
        rpc_pb2.AuthRoleRevokePermissionRequest(role="r1", key=b"a", range_end=b"b"),
        "root",
    )
    await s("kv.Range", rpc_pb2.RangeRequest(key=b"a"), "u1")
    await s(
        "auth.RoleGrantPermission",
        rpc_pb2.AuthRoleGrantPermissionRequest(
            name="r1", perm=auth_pb2.Permission(permType=RW, key=b"a")
        ),
        "root",
    )
    await s("kv.Range", rpc_pb2.RangeRequest(key=b"a"), "u1")
    change = rpc_pb2.AuthUserChangePasswordRequest(name="u1", password="pw2")
    await s("auth.UserChangePassword", change, "u1")
    await s("auth.UserChangePassword", change, "root")
    await s("kv.Range", rpc_pb2.RangeRequest(key=b"a"), "u1")
    await s("auth.Authenticate", rpc_pb2.AuthenticateRequest(name="u1", password="pw2"))
    await s("kv.Range", rpc_pb2.RangeRequest(key=b"a"), "u1")
    await s("auth.UserDelete", rpc_pb2.AuthUserDeleteRequest(name="u1"), "root")
    await s("kv.Range", rpc_pb2.RangeRequest(key=b"a"), "u1")
    await s("auth.UserDelete", rpc_pb2.AuthUserDeleteRequest(name="root"), "root")
    await s("auth.AuthDisable", rpc_pb2.AuthDisableRequest(), "root")
    await s("auth.Authenticate", rpc_pb2.AuthenticateRequest(name="root", password="rootpw"))
    await s("kv.Range", rpc_pb2.RangeRequest(key=b"a"))


async def test_grpc_auth_same_as_etcd(dsn: str, tmp_path: Path) -> None:
    with RealEtcd() as etcd, KineProcess(dsn, tmp_path, "--workers", "2") as kine:
        sessions = []
        for endpoint in (etcd.endpoint, kine.address):
            session = Session(connect(endpoint))
            try:
                await grpc_scenario(session)
            finally:
                await session.client.close()
            sessions.append(session)
    theirs, ours = (s.transcript for s in sessions)
    for mine, expected in zip(ours, theirs, strict=True):
        assert mine == expected


async def setup_users(client: Client) -> tuple[str, str]:
    """root (with the root role) and u1 (read-write on [a, b)); auth on. Their tokens."""
    auth = client.auth
    await auth.UserAdd(rpc_pb2.AuthUserAddRequest(name="root", password="rootpw"))
    await auth.UserGrantRole(rpc_pb2.AuthUserGrantRoleRequest(user="root", role="root"))
    await auth.UserAdd(rpc_pb2.AuthUserAddRequest(name="u1", password="pw1"))
    await auth.RoleAdd(rpc_pb2.AuthRoleAddRequest(name="r1"))
    perm = auth_pb2.Permission(permType=RW, key=b"a", range_end=b"b")
    await auth.RoleGrantPermission(rpc_pb2.AuthRoleGrantPermissionRequest(name="r1", perm=perm))
    await auth.UserGrantRole(rpc_pb2.AuthUserGrantRoleRequest(user="u1", role="r1"))
    await auth.AuthEnable(rpc_pb2.AuthEnableRequest())
    return await token(client, "root", "rootpw"), await token(client, "u1", "pw1")


async def token(client: Client, name: str, password: str) -> str:
    request = rpc_pb2.AuthenticateRequest(name=name, password=password)
    return str((await client.auth.Authenticate(request)).token)


def as_user(value: str) -> tuple[tuple[str, str]]:
    return (("token", value),)


async def refused(call: Any, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert (caught.value.code(), caught.value.details()) == (code, message)


DENIED = (grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied")
OLD_REVISION = (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: revision of auth store is old")


async def test_kine_server_is_stricter_than_etcd_where_etcd_lets_a_user_past_its_rights(
    kine_workers: Client,
) -> None:
    """Where etcd 3.4/3.5 let a user do what its roles do not allow, kine-server refuses: a
    from-key watch (etcd checks only its first key), a Txn nested in a Txn (etcd checks only
    the outer one), Compact and alarm changes (root only, as the issue asks: one user's compaction
    or NOSPACE alarm affects every other user), a Put with a lease inside a Txn (checked as a plain
    Put is), and the keys LeaseTimeToLive lists (etcd 3.5.9's check)."""
    client = kine_workers
    root, u1 = await setup_users(client)
    watch = client.watch.Watch(
        iter(
            [
                rpc_pb2.WatchRequest(
                    create_request=rpc_pb2.WatchCreateRequest(key=b"a", range_end=b"\0")
                )
            ]
        ),
        metadata=as_user(u1),
    )
    created = await asyncio.wait_for(watch.read(), 10)
    watch.cancel()
    assert (created.canceled, created.watch_id) == (True, -1)
    assert created.cancel_reason.endswith("etcdserver: permission denied")
    put_x = rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"x", value=b"1"))
    inner = rpc_pb2.RequestOp(request_txn=rpc_pb2.TxnRequest(success=[put_x]))
    await refused(client.kv.Txn(rpc_pb2.TxnRequest(success=[inner]), metadata=as_user(u1)), *DENIED)
    assert not (await client.kv.Range(rpc_pb2.RangeRequest(key=b"x"), metadata=as_user(root))).kvs
    await client.kv.Put(rpc_pb2.PutRequest(key=b"a", value=b"1"), metadata=as_user(u1))
    await refused(
        client.kv.Compact(rpc_pb2.CompactionRequest(revision=2), metadata=as_user(u1)), *DENIED
    )
    await client.kv.Compact(rpc_pb2.CompactionRequest(revision=2), metadata=as_user(root))
    nospace = rpc_pb2.AlarmRequest(
        action=rpc_pb2.AlarmRequest.ACTIVATE, memberID=0, alarm=rpc_pb2.NOSPACE
    )
    await refused(client.maintenance.Alarm(nospace, metadata=as_user(u1)), *DENIED)
    listed = await client.maintenance.Alarm(
        rpc_pb2.AlarmRequest(action=rpc_pb2.AlarmRequest.GET), metadata=as_user(u1)
    )
    assert not listed.alarms
    await client.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(ID=7, TTL=60), metadata=as_user(root))
    await client.kv.Put(rpc_pb2.PutRequest(key=b"x", value=b"1", lease=7), metadata=as_user(root))
    put_a = rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"a", value=b"2", lease=7))
    await refused(client.kv.Txn(rpc_pb2.TxnRequest(success=[put_a]), metadata=as_user(u1)), *DENIED)
    ttl = rpc_pb2.LeaseTimeToLiveRequest(ID=7, keys=True)
    await refused(client.lease.LeaseTimeToLive(ttl, metadata=as_user(u1)), *DENIED)
    assert (await client.lease.LeaseTimeToLive(ttl, metadata=as_user(root))).keys == [b"x"]


async def test_auth_status_and_bad_permission_ranges(kine_workers: Client) -> None:
    """etcd 3.5's AuthStatus (root only once auth is on) and its refusal of empty or backwards
    permission ranges (3.5.8)."""
    client = kine_workers
    status = await client.auth.AuthStatus(rpc_pb2.AuthStatusRequest())
    assert (status.enabled, status.authRevision) == (False, 1)
    root, u1 = await setup_users(client)
    await refused(
        client.auth.AuthStatus(rpc_pb2.AuthStatusRequest(), metadata=as_user(u1)), *DENIED
    )
    status = await client.auth.AuthStatus(rpc_pb2.AuthStatusRequest(), metadata=as_user(root))
    assert (status.enabled, status.authRevision) == (True, 7)
    mgmt = (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: invalid auth management")
    for key, end in [(b"", b""), (b"b", b"a"), (b"b", b"b")]:
        perm = auth_pb2.Permission(permType=RW, key=key, range_end=end)
        grant = rpc_pb2.AuthRoleGrantPermissionRequest(name="r1", perm=perm)
        await refused(client.auth.RoleGrantPermission(grant, metadata=as_user(root)), *mgmt)
    grant = rpc_pb2.AuthRoleGrantPermissionRequest(name="r1")
    await refused(
        client.auth.RoleGrantPermission(grant, metadata=as_user(root)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "etcdserver: permission not given",
    )


def test_auth_survives_a_restart_with_its_tokens(dsn: str, tmp_path: Path) -> None:
    """Users, roles, the enabled flag and simple tokens are in the database, not the process."""
    with KineProcess(dsn, tmp_path) as kine:
        for command in ["user add root:rootpw", "auth enable", f"{ROOT} put a 1"]:
            assert "[exit 0]" in etcdctl(kine.address, command)
        issued = asyncio.run(_token_of(kine.address))
    with KineProcess(dsn, tmp_path) as again:
        assert "user name is empty" in etcdctl(again.address, "get a")
        assert etcdctl(again.address, f"{ROOT} get a").endswith("a\n1\n")
        assert asyncio.run(_range_with(again.address, issued)) == 1


async def _token_of(endpoint: str) -> str:
    client = connect(endpoint)
    try:
        return await token(client, "root", "rootpw")
    finally:
        await client.close()


async def _range_with(endpoint: str, issued: str) -> int:
    client = connect(endpoint)
    try:
        response = await client.kv.Range(rpc_pb2.RangeRequest(key=b"a"), metadata=as_user(issued))
        return int(response.count)
    finally:
        await client.close()


def test_users_and_roles_travel_in_etcd_snapshots_both_ways(
    dsn: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """kine-server → etcdctl snapshot → a real etcd → etcdctl snapshot → kine-server: the same
    users (their bcrypt hashes work on both), roles, permissions and auth on, at each step."""
    from tests.conftest import fresh_dsn
    from tests.test_snapshot import restore

    first, back = tmp_path / "from-kine.snapshot", tmp_path / "from-etcd.snapshot"
    commands = [
        "user add root:rootpw",
        "role add r1",
        "role grant-permission r1 readwrite a b",
        "user add u1:pw1",
        "user grant-role u1 r1",
        "put a 1",
        "put c 1",
        "auth enable",
    ]
    checks = [f"{U1} get a", f"{U1} get c", "get a", f"{ROOT} role get r1", f"{ROOT} user list"]
    with KineProcess(dsn, tmp_path) as kine:
        for command in commands:
            assert "[exit 0]" in etcdctl(kine.address, command), command
        expected = [etcdctl(kine.address, c) for c in checks]
        assert "[exit 0]" in etcdctl(kine.address, f"{ROOT} snapshot save {first}")
    with RealEtcd(restore_from=first) as etcd:
        assert [etcdctl(etcd.endpoint, c) for c in checks] == expected
        assert "[exit 0]" in etcdctl(etcd.endpoint, f"{ROOT} user add u2:pw2")
        assert "[exit 0]" in etcdctl(etcd.endpoint, f"{ROOT} snapshot save {back}")
    (tmp_path / "again").mkdir()
    kind = "sqlite" if dsn.startswith("sqlite") else "postgres"
    other = fresh_dsn(kind, tmp_path / "again", request)
    done = restore(back, other)
    assert done.returncode == 0, done.stderr
    with KineProcess(other, tmp_path) as kine:
        assert [etcdctl(kine.address, c) for c in checks[:-1]] == expected[:-1]
        assert etcdctl(kine.address, f"{ROOT} user list").endswith("root\nu1\nu2\n")
        # u2, made on etcd, signs in with its password (and has no role yet).
        assert etcdctl(kine.address, "--user u2:pw2 get a").endswith("permission denied")
        assert etcdctl(kine.address, "--user u2:bad get a").endswith("invalid user ID or password")


async def test_instances_on_one_postgresql_share_users_tokens_and_revocations(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two kine-server instances on one database: a token from one is honoured by the other, and
    a permission revoked through one stops working on the other at once. No write passes after
    the revocation: the other instance's writer checks it again in the transaction that would
    apply it, and answers etcd's "revision of auth store is old" (clientv3 refreshes its token
    and retries on it) until that instance has read the new state (within its poll interval:
    measured here); then "permission denied"."""
    from tests.conftest import fresh_dsn

    dsn = fresh_dsn("postgres", tmp_path, request)
    (tmp_path / "b").mkdir()
    with KineProcess(dsn, tmp_path) as first, KineProcess(dsn, tmp_path / "b") as second:
        one, two = connect(first.address), connect(second.address)
        try:
            root, u1 = await setup_users(one)
            put = rpc_pb2.PutRequest(key=b"a", value=b"1")
            await two.kv.Put(put, metadata=as_user(u1))
            revoke = rpc_pb2.AuthRoleRevokePermissionRequest(role="r1", key=b"a", range_end=b"b")
            await one.auth.RoleRevokePermission(revoke, metadata=as_user(root))
            revoked_at = time.monotonic()
            while True:
                with pytest.raises(grpc.aio.AioRpcError) as refusal:
                    await two.kv.Put(put, metadata=as_user(u1))
                answer = (refusal.value.code(), refusal.value.details())
                if answer == DENIED:
                    break
                assert answer == OLD_REVISION
                assert time.monotonic() - revoked_at < 1.0, "the revocation did not reach"
            # The token itself stays valid (etcd's simple tokens outlive role changes).
            response = await two.kv.Range(rpc_pb2.RangeRequest(key=b"x"), metadata=as_user(root))
            assert response.count == 0
        finally:
            await one.close()
            await two.close()


def write_keys(directory: Path, method: str) -> tuple[Path, Path]:
    """A private and a public key for `method` (RS256 or ES256), as PEM files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if method.startswith("RS")
        else ec.generate_private_key(ec.SECP256R1())
    )
    private, public = directory / f"{method}.key", directory / f"{method}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@pytest.mark.parametrize("method", ["RS256", "ES256"])
async def test_jwt_tokens(method: str, tmp_path: Path) -> None:
    """--auth-token jwt,...: tokens are JWTs with etcd's claims, verified by every front-end;
    after a change of users or roles, a token issued before it is etcd's "revision of auth store
    is old" (and etcdctl, which takes a new token then, goes on working)."""
    private, public = write_keys(tmp_path, method)
    option = f"jwt,pub-key={public},priv-key={private},sign-method={method},ttl=1m"
    with KineProcess(
        f"sqlite://{tmp_path}/s.db", tmp_path, "--auth-token", option, "--workers", "2"
    ) as kine:
        client = connect(kine.address)
        try:
            root, u1 = await setup_users(client)
            header, claims, _ = u1.split(".")
            assert json.loads(base64.urlsafe_b64decode(header + "==")) == {
                "alg": method,
                "typ": "JWT",
            }
            fields = json.loads(base64.urlsafe_b64decode(claims + "=="))
            assert (fields["username"], fields["revision"]) == ("u1", 7)
            assert 55 <= fields["exp"] - time.time() <= 61
            await client.kv.Put(rpc_pb2.PutRequest(key=b"a", value=b"1"), metadata=as_user(u1))
            forged = u1[:-4] + ("AAAA" if not u1.endswith("AAAA") else "BBBB")
            await refused(
                client.kv.Range(rpc_pb2.RangeRequest(key=b"a"), metadata=as_user(forged)),
                grpc.StatusCode.UNAUTHENTICATED,
                "etcdserver: invalid auth token",
            )
            await client.auth.RoleAdd(rpc_pb2.AuthRoleAddRequest(name="r2"), metadata=as_user(root))
            await refused(
                client.kv.Range(rpc_pb2.RangeRequest(key=b"a"), metadata=as_user(u1)),
                grpc.StatusCode.INVALID_ARGUMENT,
                "etcdserver: revision of auth store is old",
            )
        finally:
            await client.close()
        assert etcdctl(kine.address, f"{U1} get a").endswith("a\n1\n")


async def test_a_jwt_server_with_only_the_public_key_verifies_but_issues_none(
    tmp_path: Path,
) -> None:
    """etcd's verify-only JWT setup: tokens signed elsewhere are accepted, Authenticate fails
    as etcd's does."""
    private, public = write_keys(tmp_path, "ES256")
    signer_flags = ["--auth-token", f"jwt,priv-key={private},sign-method=ES256"]
    verifier_flags = ["--auth-token", f"jwt,pub-key={public},sign-method=ES256"]
    dsn = f"sqlite://{tmp_path}/s.db"
    with KineProcess(dsn, tmp_path, *signer_flags) as signer:
        client = connect(signer.address)
        try:
            root, _ = await setup_users(client)
        finally:
            await client.close()
    (tmp_path / "v").mkdir()
    with KineProcess(dsn, tmp_path / "v", *verifier_flags) as verifier:
        client = connect(verifier.address)
        try:
            status = await client.auth.AuthStatus(
                rpc_pb2.AuthStatusRequest(), metadata=as_user(root)
            )
            assert status.enabled
            await refused(
                client.auth.Authenticate(rpc_pb2.AuthenticateRequest(name="u1", password="pw1")),
                grpc.StatusCode.UNKNOWN,
                "auth: token signing attempted with verify-only key",
            )
        finally:
            await client.close()


def test_a_bad_auth_token_option_fails_the_start_in_one_line(tmp_path: Path) -> None:
    for option, words in [
        ("magic", "unknown token type 'magic'"),
        ("jwt,sign-method=RS256", "pub-key or priv-key is needed"),
        ("jwt,sign-method=XX1", "sign-method must be one of"),
        ("jwt,pub-key", "invalid auth options"),
        (f"jwt,pub-key={tmp_path}/none,sign-method=RS256", "No such file or directory"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "kine_server", "--auth-token", option],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "--auth-token" in lines[0], lines


def test_a_client_certificates_common_name_is_its_user_as_in_etcd(tmp_path: Path) -> None:
    """With client certificates verified (--trusted-ca-file here, etcd's --client-cert-auth)
    and auth on, a call without a token is made as the user its certificate names; the same
    etcdctl session on a real etcd and on kine-server."""
    from tests.support.certs import issue, make_ca
    from tests.support.etcd import EtcdTLS

    pki = tmp_path / "pki"
    ca = make_ca(pki, "ca")
    server = issue(ca, pki, "server", server=True)
    certs = {name: issue(ca, pki, name, server=False) for name in ("root", "u1", "stranger")}
    flags = [
        *("--server-cert-file", str(server.cert), "--server-key-file", str(server.key)),
        *("--trusted-ca-file", str(ca.cert)),
    ]
    session = [
        ("root", "user add root:rootpw"),
        ("root", "role add r1"),
        ("root", "role grant-permission r1 readwrite a b"),
        ("root", "user add u1:pw1"),
        ("root", "user grant-role u1 r1"),
        ("root", "auth enable"),
        ("u1", "put a 1"),
        ("u1", "get a"),
        ("u1", "put c 1"),
        ("u1", "user list"),
        ("root", "user list"),
        ("stranger", "get a"),
        # A token names its user whatever the certificate says.
        ("root", "--user u1:pw1 user list"),
        ("u1", "--user root:rootpw user list"),
        ("root", "auth disable"),
    ]
    tls = EtcdTLS(ca.cert, server.cert, server.key, certs["root"].cert, certs["root"].key)

    def run(address: str) -> list[str]:
        lines = []
        for name, command in session:
            pair = certs[name]
            with_cert = f"--cacert={ca.cert} --cert={pair.cert} --key={pair.key} {command}"
            out = etcdctl(f"https://{address}", with_cert).replace(address, "ENDPOINT")
            lines.append(out.replace(str(pair.cert), "CERT").replace(str(pair.key), "KEY"))
        return lines

    with RealEtcd(tls=tls) as etcd:
        theirs = run(etcd.endpoint)
    with KineProcess(f"sqlite://{tmp_path}/s.db", tmp_path, *flags, "--workers", "2") as kine:
        ours = run(kine.address)
    for mine, expected in zip(ours, theirs, strict=True):
        assert mine == expected
    assert ours[8].endswith("permission denied") and ours[10].endswith("root\nu1\n")
