"""A write checked against an auth state that changed before it was applied is checked again.

A `--workers` front-end checks a request's permissions against its own view of the auth state,
then sends it to the writer; a revocation committed in between must not let it through. etcd
carries the caller's auth revision in each request's header and its applier checks again
(etcd 3.5 server/etcdserver/apply_auth.go, authApplierV3, and auth/store.go isOpPermitted:
"revision of auth store is old"); kine-server carries the caller and the generation its check
used (store/local.py). The race is made certain here: the request is submitted with the
generation of a state the revocation has since replaced, exactly what a front-end that checked
a moment before the revocation sends.
"""

from __future__ import annotations

import pytest

from kine_server.auth.permissions import Caller, Identity
from kine_server.errors import EtcdError
from kine_server.pb import auth_pb2, rpc_pb2
from kine_server.process.single import SingleProcess
from kine_server.store.commands import DELETE_RANGE, LEASE_REVOKE, PUT
from tests.support.client import Client
from tests.test_auth import as_user, setup_users

OLD_REVISION = "etcdserver: revision of auth store is old"


async def checked_then_revoked(server: SingleProcess, kine: Client) -> Caller:
    """u1 may write [a, b) when its request is checked; then its role loses the permission.
    The caller as a front-end checked it, before the revocation."""
    root, _ = await setup_users(kine)
    caller = await checked_as(server, "u1")
    revoke = rpc_pb2.AuthRoleRevokePermissionRequest(role="r1", key=b"a", range_end=b"b")
    await kine.auth.RoleRevokePermission(revoke, metadata=as_user(root))
    assert (await server.store.auth.current()).generation > caller.generation
    return caller


async def checked_as(server: SingleProcess, user: str) -> Caller:
    """`user` as a front-end's check of a request identifies them now (a token's Identity
    carries the auth revision it was checked at), with the state's generation."""
    state = await server.store.auth.current()
    return Caller(Identity(user, state.revision), state.generation)


async def refused(write: object) -> str:
    with pytest.raises(EtcdError) as caught:
        await write  # type: ignore[misc]
    return caught.value.message


async def test_a_put_checked_before_a_revocation_is_refused_at_apply(
    server: SingleProcess, kine: Client
) -> None:
    caller = await checked_then_revoked(server, kine)
    put = rpc_pb2.PutRequest(key=b"a1", value=b"v")
    assert await refused(server.store.submit(PUT, put, caller)) == OLD_REVISION
    assert (await server.store.range(rpc_pb2.RangeRequest(key=b"a1"))).count == 0


async def test_a_delete_and_a_lease_revocation_checked_before_it_are_refused(
    server: SingleProcess, kine: Client
) -> None:
    root, _ = await setup_users(kine)
    await kine.kv.Put(rpc_pb2.PutRequest(key=b"a2", value=b"v"), metadata=as_user(root))
    grant = await kine.lease.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=60))
    await kine.kv.Put(rpc_pb2.PutRequest(key=b"a3", lease=grant.ID), metadata=as_user(root))
    caller = await checked_as(server, "u1")
    revoke = rpc_pb2.AuthRoleRevokePermissionRequest(role="r1", key=b"a", range_end=b"b")
    await kine.auth.RoleRevokePermission(revoke, metadata=as_user(root))
    delete = rpc_pb2.DeleteRangeRequest(key=b"a2")
    assert await refused(server.store.submit(DELETE_RANGE, delete, caller)) == OLD_REVISION
    lease = rpc_pb2.LeaseRevokeRequest(ID=grant.ID)
    assert await refused(server.store.submit(LEASE_REVOKE, lease, caller)) == OLD_REVISION
    found = await server.store.range(rpc_pb2.RangeRequest(key=b"a", range_end=b"b"))
    assert [kv.key for kv in found.kvs] == [b"a2", b"a3"]


async def test_a_request_checked_at_the_state_in_force_is_applied(
    server: SingleProcess, kine: Client
) -> None:
    """The usual case, and one where the state changed in a way that still allows it: a new
    state, checked again, with the caller's credentials as of that state."""
    root, _ = await setup_users(kine)
    caller = await checked_as(server, "u1")
    put = rpc_pb2.PutRequest(key=b"a4", value=b"v")
    assert (await server.store.submit(PUT, put, caller)).header.revision > 0
    # Any change moves the auth revision, as in etcd: a request checked before it is old.
    role = auth_pb2.Permission(permType=auth_pb2.Permission.READ, key=b"x")
    grant = rpc_pb2.AuthRoleGrantPermissionRequest(name="r1", perm=role)
    await kine.auth.RoleGrantPermission(grant, metadata=as_user(root))
    assert await refused(server.store.submit(PUT, put, caller)) == OLD_REVISION
    fresh = await checked_as(server, "u1")
    assert (await server.store.submit(PUT, put, fresh)).header.revision > 0


async def test_a_request_checked_while_auth_was_off_is_refused_once_it_is_on(
    server: SingleProcess, kine: Client
) -> None:
    """etcd: a request with no user (auth revision 0) applied after AuthEnable gets
    "user name is empty" (isOpPermitted)."""
    caller = Caller(None, (await server.store.auth.current()).generation)
    await setup_users(kine)
    put = rpc_pb2.PutRequest(key=b"a5", value=b"v")
    assert await refused(server.store.submit(PUT, put, caller)) == "etcdserver: user name is empty"


def test_the_caller_travels_to_the_writer_process_as_it_was_checked() -> None:
    """A front-end's link puts the caller in the Command; the writer's channel reads it back."""
    from kine_server.pb import workers_pb2
    from kine_server.process.frames import CALLER_FIELD, decode_caller, encode_caller
    from kine_server.wire import length_delimited

    for caller in (Caller(Identity("u1", 7), 12), Caller(None, 3)):
        encoded = length_delimited(CALLER_FIELD, encode_caller(caller))
        assert decode_caller(workers_pb2.Command.FromString(encoded)) == caller
    assert decode_caller(workers_pb2.Command()) is None
