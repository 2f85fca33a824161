"""Auth as etcd has it: users, roles, permissions, tokens and the checks of every call, compared
with a real etcd through the real etcdctl and through raw gRPC, on both databases, with
kine-server run as operators run it by default (a writer and two front-ends)."""

from __future__ import annotations

import asyncio
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
    await s("auth.UserAdd", rpc_pb2.AuthUserAddRequest(name="root", password="rootpw"))
    await s("auth.UserGrantRole", rpc_pb2.AuthUserGrantRoleRequest(user="root", role="root"))
    await s("auth.UserAdd", rpc_pb2.AuthUserAddRequest(name="u1", password="pw1"))
    await s("auth.UserAdd", rpc_pb2.AuthUserAddRequest(name="", password="x"))
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
