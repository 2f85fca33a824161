"""etcd's auth model: users, roles and their key permissions, the enabled flag and the auth
revision as one immutable `AuthState`, and the permission checks every call makes, with etcd
3.5's rules and errors (its auth/store.go and range_perm_cache.go).

The state is in the database (kine_auth's rows, kine_meta's auth_enabled, auth_revision and
auth_generation), so every process and every instance sharing a PostgreSQL database sees the
same users and roles. Each process checks requests against an immutable `AuthState` read at one
generation, and reads it again when the generation moves: at once after a change it made
itself, within `POLL_INTERVAL` after anyone else's. A revoked permission or a deleted user thus
stops working everywhere within that time, for tokens already issued too (a token names a user;
what the user may do is looked up in the current state on every request).

The generation counts every change, the auth revision only those etcd counts (etcd leaves it
alone on AuthEnable, and clients compare it with JWT tokens' `revision` claim).
"""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kine_server import errors
from kine_server.drivers.base import ReadTx
from kine_server.pb import auth_pb2, rpc_pb2

ROOT = "root"
#: kine_auth's kinds: etcd's users and roles, and the key that signs simple tokens (kine-server's
#: own; never exported to etcd's format).
USER, ROLE, SECRET = "user", "role", "secret"

Interval = tuple[bytes, bytes | None]
"""[start, end) of keys; end None: every key from start on."""


def interval(key: bytes, range_end: bytes) -> Interval:
    """A request's or a permission's keys: no range_end is the one key, "\\0" every key from
    `key` on, anything else [key, range_end)."""
    if not range_end:
        return key, key + b"\0"
    if range_end == b"\0":
        return key, None
    return key, range_end


class Ranges:
    """The union of a user's permitted intervals of one kind, merged into disjoint intervals
    sorted by start: checking a request is one binary search (etcd keeps an interval tree)."""

    def __init__(self, intervals: list[Interval]) -> None:
        merged: list[list[Any]] = []
        for start, end in sorted(intervals, key=lambda i: i[0]):
            if end is not None and end <= start:
                continue
            last = merged[-1] if merged else None
            if last is not None and (last[1] is None or start <= last[1]):
                if last[1] is not None and (end is None or end > last[1]):
                    last[1] = end
                continue
            merged.append([start, end])
        self._starts = [m[0] for m in merged]
        self._ends: list[bytes | None] = [m[1] for m in merged]

    def covers(self, start: bytes, end: bytes | None) -> bool:
        """Whether every key of [start, end) is in the union (etcd's Contains)."""
        if end is not None and end <= start:
            return False
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0:
            return False
        found = self._ends[i]
        if found is None:
            return True
        return start < found and end is not None and end <= found


@dataclass(frozen=True)
class Identity:
    """Who makes a request, and the auth revision their credentials were checked at."""

    user: str
    revision: int


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request (None: no user, or auth off) and the generation of the auth state
    its permissions were checked against: what etcd's RequestHeader carries to its applier."""

    who: Identity | None
    generation: int


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def raw_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


@dataclass
class AuthState:
    """The auth store as of one generation. Treated as immutable once built: a change makes a
    new one (see `Change`)."""

    enabled: bool = False
    revision: int = 1
    generation: int = 0
    users: dict[str, auth_pb2.User] = field(default_factory=dict)
    roles: dict[str, auth_pb2.Role] = field(default_factory=dict)
    secret: bytes = b""
    _permissions: dict[str, tuple[Ranges, Ranges]] = field(default_factory=dict, repr=False)

    @classmethod
    async def read(cls, tx: ReadTx) -> AuthState:
        meta = await tx.all_meta()
        state = cls(
            enabled=bool(meta.get("auth_enabled", 0)),
            revision=meta.get("auth_revision", 1),
            generation=meta.get("auth_generation", 0),
        )
        for kind, name, value in await tx.auth_records():
            if kind == USER:
                state.users[_name(name)] = auth_pb2.User.FromString(value)
            elif kind == ROLE:
                state.roles[_name(name)] = auth_pb2.Role.FromString(value)
            elif kind == SECRET:
                state.secret = value
        return state

    def is_root(self, user: str) -> bool:
        found = self.users.get(user)
        return found is not None and ROOT in found.roles

    def permissions(self, user: str) -> tuple[Ranges, Ranges]:
        """(read, write) ranges of the user's roles, built once per state (etcd's cache)."""
        cached = self._permissions.get(user)
        if cached is None:
            read: list[Interval] = []
            write: list[Interval] = []
            found = self.users.get(user)
            for role_name in found.roles if found is not None else ():
                role = self.roles.get(role_name)
                for perm in role.keyPermission if role is not None else ():
                    span = interval(perm.key, perm.range_end)
                    if perm.permType in (auth_pb2.Permission.READ, auth_pb2.Permission.READWRITE):
                        read.append(span)
                    if perm.permType in (auth_pb2.Permission.WRITE, auth_pb2.Permission.READWRITE):
                        write.append(span)
            cached = self._permissions[user] = (Ranges(read), Ranges(write))
        return cached

    def check(self, who: Identity | None, key: bytes, range_end: bytes, write: bool) -> None:
        """etcd's isOpPermitted: may `who` read (or write) these keys?"""
        if not self.enabled:
            return
        if who is None:
            raise errors.UserEmpty()
        if who.revision < self.revision:
            raise errors.AuthOldRevision()
        if who.user not in self.users:
            raise errors.PermissionDenied()
        if self.is_root(who.user):
            return
        read, written = self.permissions(who.user)
        if not (written if write else read).covers(*interval(key, range_end)):
            raise errors.PermissionDenied()

    def check_admin(self, who: Identity | None) -> None:
        """etcd's IsAdminPermitted: calls that change the cluster need the root role."""
        if not self.enabled:
            return
        if who is None or not who.user:
            raise errors.UserEmpty()
        if who.user not in self.users:
            raise errors.UserNotFound()
        if not self.is_root(who.user):
            raise errors.PermissionDenied()


# What each call needs, as etcd's authApplierV3 checks it.

LeasedKeys = Callable[[int], Awaitable[list[bytes]]]
"""The keys attached to a lease (none if it does not exist)."""


async def check_lease_keys(
    state: AuthState, who: Identity | None, lease_id: int, leased: LeasedKeys
) -> None:
    """etcd's checkLeasePuts: attaching to or revoking a lease needs write access to every key
    the lease holds."""
    if not state.enabled or lease_id == 0 or (who is not None and state.is_root(who.user)):
        return
    for key in await leased(lease_id):
        state.check(who, key, b"", write=True)


def check_range(state: AuthState, who: Identity | None, req: rpc_pb2.RangeRequest) -> None:
    state.check(who, req.key, req.range_end, write=False)


async def check_put(
    state: AuthState, who: Identity | None, req: rpc_pb2.PutRequest, leased: LeasedKeys
) -> None:
    state.check(who, req.key, b"", write=True)
    await check_lease_keys(state, who, req.lease, leased)
    if req.prev_kv:
        state.check(who, req.key, b"", write=False)


def check_delete(state: AuthState, who: Identity | None, req: rpc_pb2.DeleteRangeRequest) -> None:
    if req.prev_kv:
        state.check(who, req.key, req.range_end, write=False)
    state.check(who, req.key, req.range_end, write=True)


async def check_txn(
    state: AuthState, who: Identity | None, req: rpc_pb2.TxnRequest, leased: LeasedKeys
) -> None:
    """Every compare and every operation of both branches, nested Txns included: a Txn is
    allowed as a whole or not at all, whichever branch it would take."""
    if not state.enabled:
        return
    for compare in req.compare:
        state.check(who, compare.key, compare.range_end, write=False)
    for op in [*req.success, *req.failure]:
        kind = op.WhichOneof("request")
        if kind == "request_range":
            check_range(state, who, op.request_range)
        elif kind == "request_put":
            state.check(who, op.request_put.key, b"", write=True)
            await check_lease_keys(state, who, op.request_put.lease, leased)
        elif kind == "request_delete_range":
            check_delete(state, who, op.request_delete_range)
        elif kind == "request_txn":
            await check_txn(state, who, op.request_txn, leased)
