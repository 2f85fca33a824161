"""Auth as etcd has it: users, roles, permissions, tokens and the checks of every call, compared
with a real etcd through the real etcdctl and through raw gRPC, on both databases, with
kine-server run as operators run it by default (a writer and two front-ends)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
