"""The Auth calls that change users, roles or the enabled flag, as etcd's authStore makes them.

A `Change` applies one call to a copy of the state read inside the writer's transaction (so
changes are serialised with every other write, on the state the database holds), then writes
only the records it touched; the auth revision moves as etcd moves it, the generation on every
change (auth/store.py).
"""

from __future__ import annotations

import base64
import logging
import secrets
from typing import Any

from google.protobuf.message import Message

from kine_server import errors
from kine_server.auth.permissions import ROLE, ROOT, SECRET, USER, AuthState, Identity, raw_name
from kine_server.drivers.base import WriteTx
from kine_server.pb import auth_pb2, rpc_pb2

log = logging.getLogger(__name__)


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
        user = auth_pb2.User(name=raw_name(req.name))
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
        self.roles[req.name] = auth_pb2.Role(name=raw_name(req.name))
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

    async def write(self, tx: WriteTx) -> int:
        """Write the change; the auth store's generation now."""
        for kind, name in sorted(self.written):
            record = self.users[name] if kind == USER else self.roles[name]
            await tx.put_auth_record(kind, raw_name(name), record.SerializeToString())
        for kind, name in sorted(self.deleted):
            await tx.delete_auth_record(kind, raw_name(name))
        if self.secret is not None:
            await tx.put_auth_record(SECRET, b"simple-token", self.secret)
        await tx.set_meta("auth_enabled", int(self.enabled))
        await tx.set_meta("auth_revision", self.revision)
        await tx.set_meta("auth_generation", self.state.generation + 1)
        return self.state.generation + 1


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
