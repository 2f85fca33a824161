"""etcd's auth store: users, roles and their key permissions, the enabled flag and the auth
revision; the changes the Auth service makes to them, and the permission checks every call
makes, with etcd 3.5's rules and errors (its auth/store.go and range_perm_cache.go).

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

import asyncio
import base64
import bisect
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message

from kine_server import errors
from kine_server.drivers.base import Driver, ReadTx, WriteTx
from kine_server.mvcc.applier import Applier
from kine_server.mvcc.writer import Writer
from kine_server.pb import auth_pb2, rpc_pb2

log = logging.getLogger(__name__)

ROOT = "root"
#: How often a process looks for changes made elsewhere (another front-end, another instance).
POLL_INTERVAL = 0.1
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


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _raw(name: str) -> bytes:
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


# The changes, as etcd's authStore makes them.


class Change:
    """One Auth call applied to a copy of the state: what to write, and the answer."""

    def __init__(self, state: AuthState) -> None:
        self.state = state
        self.users: dict[str, auth_pb2.User] = {n: _copy(u) for n, u in state.users.items()}
        self.roles: dict[str, auth_pb2.Role] = {n: _copy(r) for n, r in state.roles.items()}
        self.enabled = state.enabled
        self.revision = state.revision
        self.secret: bytes | None = None
        self.written: set[tuple[str, str]] = set()
        self.deleted: set[tuple[str, str]] = set()
        self.changed = False

    def _commit_revision(self) -> None:
        self.revision += 1
        self.changed = True

    def _put(self, kind: str, name: str) -> None:
        self.written.add((kind, name))
        self.deleted.discard((kind, name))

    def _delete(self, kind: str, name: str) -> None:
        self.deleted.add((kind, name))
        self.written.discard((kind, name))

    def apply(self, method: str, req: Any, who: Identity | None) -> Message:
        """Carry out `method` for `who`, whose root role is checked here again: on the state
        the change is made to, as etcd checks at apply (the caller's view may be older)."""
        handler = getattr(self, "_" + method, None)
        if handler is None:
            raise errors.Internal(f"kine-server: unknown auth change {method!r}")
        self.state.check_admin(who)
        response: Message = handler(req)
        return response

    def _AuthEnable(self, req: rpc_pb2.AuthEnableRequest) -> Message:
        if self.enabled:
            return rpc_pb2.AuthEnableResponse()
        root = self.users.get(ROOT)
        if root is None:
            raise errors.RootUserNotExist()
        if ROOT not in root.roles:
            raise errors.RootRoleNotExist()
        self.enabled = True
        self.secret = secrets.token_bytes(32)  # tokens of an earlier enable are void
        self.changed = True
        log.info("enabled authentication")
        return rpc_pb2.AuthEnableResponse()

    def _AuthDisable(self, req: rpc_pb2.AuthDisableRequest) -> Message:
        if self.enabled:
            self.enabled = False
            self.secret = secrets.token_bytes(32)  # every token issued is void, as etcd's
            self._commit_revision()
            log.info("disabled authentication")
        return rpc_pb2.AuthDisableResponse()

    def _UserAdd(self, req: rpc_pb2.AuthUserAddRequest) -> Message:
        if not req.name:
            raise errors.UserEmpty()
        if req.name in self.users:
            raise errors.UserAlreadyExist()
        user = auth_pb2.User(name=_raw(req.name))
        user.options.no_password = req.options.no_password
        if not req.options.no_password:
            user.password = _hashed(req.hashedPassword)
        self.users[req.name] = user
        self._put(USER, req.name)
        self._commit_revision()
        log.info("added user %r", req.name)
        return rpc_pb2.AuthUserAddResponse()

    def _UserDelete(self, req: rpc_pb2.AuthUserDeleteRequest) -> Message:
        if self.enabled and req.name == ROOT:
            raise errors.InvalidAuthMgmt()
        if req.name not in self.users:
            raise errors.UserNotFound()
        del self.users[req.name]
        self._delete(USER, req.name)
        self._commit_revision()
        log.info("deleted user %r", req.name)
        return rpc_pb2.AuthUserDeleteResponse()

    def _UserChangePassword(self, req: rpc_pb2.AuthUserChangePasswordRequest) -> Message:
        user = self._user(req.name)
        user.password = b"" if user.options.no_password else _hashed(req.hashedPassword)
        self._put(USER, req.name)
        self._commit_revision()
        log.info("changed the password of user %r", req.name)
        return rpc_pb2.AuthUserChangePasswordResponse()

    def _UserGrantRole(self, req: rpc_pb2.AuthUserGrantRoleRequest) -> Message:
        user = self._user(req.user)
        if req.role != ROOT and req.role not in self.roles:
            raise errors.RoleNotFound()
        if req.role in user.roles:
            return rpc_pb2.AuthUserGrantRoleResponse()
        roles = sorted([*user.roles, req.role])
        del user.roles[:]
        user.roles.extend(roles)
        self._put(USER, req.user)
        self._commit_revision()
        log.info("granted role %r to user %r", req.role, req.user)
        return rpc_pb2.AuthUserGrantRoleResponse()

    def _UserRevokeRole(self, req: rpc_pb2.AuthUserRevokeRoleRequest) -> Message:
        if self.enabled and req.name == ROOT and req.role == ROOT:
            raise errors.InvalidAuthMgmt()
        user = self._user(req.name)
        if req.role not in user.roles:
            raise errors.RoleNotGranted()
        _drop_role(user, req.role)
        self._put(USER, req.name)
        self._commit_revision()
        log.info("revoked role %r from user %r", req.role, req.name)
        return rpc_pb2.AuthUserRevokeRoleResponse()

    def _RoleAdd(self, req: rpc_pb2.AuthRoleAddRequest) -> Message:
        if not req.name:
            raise errors.RoleEmpty()
        if req.name in self.roles:
            raise errors.RoleAlreadyExist()
        self.roles[req.name] = auth_pb2.Role(name=_raw(req.name))
        self._put(ROLE, req.name)
        self._commit_revision()
        log.info("added role %r", req.name)
        return rpc_pb2.AuthRoleAddResponse()

    def _RoleDelete(self, req: rpc_pb2.AuthRoleDeleteRequest) -> Message:
        if self.enabled and req.role == ROOT:
            raise errors.InvalidAuthMgmt()
        if req.role not in self.roles:
            raise errors.RoleNotFound()
        del self.roles[req.role]
        self._delete(ROLE, req.role)
        for name, user in self.users.items():
            if req.role in user.roles:
                _drop_role(user, req.role)
                self._put(USER, name)
        self._commit_revision()
        log.info("deleted role %r", req.role)
        return rpc_pb2.AuthRoleDeleteResponse()

    def _RoleGrantPermission(self, req: rpc_pb2.AuthRoleGrantPermissionRequest) -> Message:
        if not req.HasField("perm"):
            raise errors.PermissionNotGiven()
        key, end = req.perm.key, req.perm.range_end
        if not key or (end and end != b"\0" and end <= key):  # etcd 3.5.8's isValidPermissionRange
            raise errors.InvalidAuthMgmt()
        role = self.roles.get(req.name)
        if role is None:
            raise errors.RoleNotFound()
        for perm in role.keyPermission:
            if perm.key == req.perm.key and perm.range_end == req.perm.range_end:
                perm.permType = req.perm.permType
                break
        else:
            perms = sorted([*role.keyPermission, req.perm], key=lambda p: p.key)
            del role.keyPermission[:]
            role.keyPermission.extend(perms)
        self._put(ROLE, req.name)
        self._commit_revision()
        log.info("granted a permission to role %r", req.name)
        return rpc_pb2.AuthRoleGrantPermissionResponse()

    def _RoleRevokePermission(self, req: rpc_pb2.AuthRoleRevokePermissionRequest) -> Message:
        role = self.roles.get(req.role)
        if role is None:
            raise errors.RoleNotFound()
        kept = [p for p in role.keyPermission if (p.key, p.range_end) != (req.key, req.range_end)]
        if len(kept) == len(role.keyPermission):
            raise errors.PermissionNotGranted()
        del role.keyPermission[:]
        role.keyPermission.extend(kept)
        self._put(ROLE, req.role)
        self._commit_revision()
        log.info("revoked a permission of role %r", req.role)
        return rpc_pb2.AuthRoleRevokePermissionResponse()

    def _user(self, name: str) -> auth_pb2.User:
        user = self.users.get(name)
        if user is None:
            raise errors.UserNotFound()
        return user

    async def write(self, tx: WriteTx) -> None:
        for kind, name in sorted(self.written):
            record = self.users[name] if kind == USER else self.roles[name]
            await tx.put_auth_record(kind, _raw(name), record.SerializeToString())
        for kind, name in sorted(self.deleted):
            await tx.delete_auth_record(kind, _raw(name))
        if self.secret is not None:
            await tx.put_auth_record(SECRET, b"simple-token", self.secret)
        await tx.set_meta("auth_enabled", int(self.enabled))
        await tx.set_meta("auth_revision", self.revision)
        await tx.set_meta("auth_generation", self.state.generation + 1)


def _drop_role(user: auth_pb2.User, role: str) -> None:
    kept = [name for name in user.roles if name != role]
    del user.roles[:]
    user.roles.extend(kept)


def _hashed(encoded: str) -> bytes:
    """A request's hashedPassword: the bcrypt hash, base64-encoded (as etcd 3.5's clients and
    its own API layer send it)."""
    try:
        return base64.b64decode(encoded, validate=True)
    except ValueError as exc:
        raise errors.AuthFailed() from exc


def _copy(message: Any) -> Any:
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def message_types(method: str) -> tuple[type[Message], type[Message]]:
    """(request, response) classes of an Auth method that changes the store ("UserAdd":
    AuthUserAddRequest, AuthUserAddResponse)."""
    stem = method if method.startswith("Auth") else "Auth" + method
    request: type[Message] = getattr(rpc_pb2, stem + "Request")
    response: type[Message] = getattr(rpc_pb2, stem + "Response")
    return request, response


class AuthStore:
    """This process's view of the auth store: the state requests are checked against, read
    again whenever the generation in the database moves."""

    def __init__(self, driver: Driver, poll_interval: float = POLL_INTERVAL) -> None:
        self._driver = driver
        self._poll_interval = poll_interval
        self.state = AuthState()
        self._poller: asyncio.Task[None] | None = None
        self._reading: asyncio.Lock | None = None
        self._loaded = False
        #: A generation this process has heard exists (`expect`) and may not have read yet.
        self._expected = 0
        #: Told each new generation this process reads (the writer tells its front-ends).
        self.observers: list[Callable[[int], None]] = []

    def expect(self, generation: int) -> None:
        """Another process changed the store (to `generation`): requests wait for it to be
        read (see `current`) instead of being checked against what it replaced."""
        self._expected = max(self._expected, generation)

    async def current(self) -> AuthState:
        """The state to check a request against: the one in force, read again first if a newer
        one is known to exist. Costs nothing when none is."""
        if self._expected > self.state.generation:
            await self.reload()
        return self.state

    async def start(self) -> None:
        await self.reload()
        self._poller = asyncio.create_task(self._poll(), name="kine-auth-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    async def reload(self) -> AuthState:
        """Read the state again (one at a time: concurrent callers share the newest)."""
        if self._reading is None:
            self._reading = asyncio.Lock()
        async with self._reading:
            with errors.database_errors():
                async with self._driver.read() as tx:
                    state = await AuthState.read(tx)
            # The same generation keeps the state in force, with the permissions it has built.
            if not self._loaded or state.generation > self.state.generation:
                self.state, self._loaded = state, True
                for observer in self.observers:
                    observer(state.generation)
            return self.state

    async def _poll(self) -> None:
        """Another process's or instance's changes: read again when the generation moves. A
        database that cannot be reached leaves the last state in force until it can."""
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                generation = await self._driver.meta("auth_generation")
                if generation is not None and generation != self.state.generation:
                    await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("cannot read the auth store's generation: %s", exc)

    async def change(self, writer: Writer, method: str, req: Any, who: Identity | None) -> Message:
        """Apply one Auth call through the writer (serialised with every other write, on the
        state as the database holds it in that transaction), then use the new state."""

        async def apply(applier: Applier) -> Message:
            tx = applier.write_tx
            change = Change(await AuthState.read(tx))
            response = change.apply(method, req, who)
            if change.changed:
                await change.write(tx)
            return response

        response = await writer.submit(apply)
        await self.reload()
        return response

    async def ensure_secret(self, writer: Writer) -> None:
        """Give the store a key for simple tokens if it has none: one restored from etcd's
        snapshot (etcd keeps its tokens in memory) or made before there was auth. In the
        writer's transaction, so instances starting together agree on one key."""
        if (await self.reload()).secret:
            return

        async def apply(applier: Applier) -> None:
            change = Change(await AuthState.read(applier.write_tx))
            if not change.state.secret:
                change.secret = secrets.token_bytes(32)
                await change.write(applier.write_tx)

        await writer.submit(apply)
        await self.reload()
