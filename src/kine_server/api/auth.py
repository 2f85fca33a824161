"""etcdserverpb.Auth, and who each call comes from.

`Credentials` finds a call's user as etcd does: its token (gRPC metadata `token`, or
`authorization` as etcd's gateway forwards it), else, when client certificates are verified,
the certificate's Common Name. The checks themselves (what a user may do) are auth/'s
(auth/permissions.py); this module only translates.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, TypeAlias

import bcrypt
import grpc

from kine_server import errors
from kine_server.api.common import Member, etcd_errors
from kine_server.auth.changes import message_types
from kine_server.auth.permissions import AuthState, Caller, Identity
from kine_server.auth.tokens import Tokens
from kine_server.pb import rpc_pb2, rpc_pb2_grpc, workers_pb2
from kine_server.store.commands import AUTH_CHANGE
from kine_server.store.store import Store

Context: TypeAlias = grpc.aio.ServicerContext

#: etcd's --bcrypt-cost default (bcrypt's own default cost).
DEFAULT_BCRYPT_COST = 10


class Credentials:
    """Who a call comes from, checked against the store's current auth state."""

    def __init__(self, store: Store, tokens: Tokens, certificate_users: bool) -> None:
        self._store = store
        self.tokens = tokens
        #: Client certificates are verified (--trusted-ca-file): a CN names the user.
        self._certificate_users = certificate_users

    @property
    def state(self) -> AuthState:
        return self._store.auth.state

    def identify(self, context: Context, state: AuthState | None = None) -> Identity | None:
        """The call's user, None if it names none; a token that is not (or no longer) valid is
        etcd's "invalid auth token". Nothing is looked at while auth is off."""
        if state is None:
            state = self.state
        if not state.enabled:
            return None
        token = None
        for key, value in context.invocation_metadata() or ():
            if key in ("token", "authorization") and isinstance(value, str):
                token = value
                break
        if token is not None:
            who = self.tokens.identify(state, token)
            if who is None:
                raise errors.InvalidAuthToken()
            return who
        if self._certificate_users:
            names = (context.auth_context() or {}).get("x509_common_name")
            if names:
                return Identity(names[0].decode(errors="replace"), state.revision)
        return None

    async def checked(self, context: Context) -> tuple[AuthState, Identity | None]:
        """(state, user) for a call's permission checks, both taken at the same moment, from
        the newest state this process knows of."""
        state = await self._store.auth.current()
        return state, self.identify(context, state)

    async def admin(self, context: Context) -> Identity | None:
        """Refuse the call unless it comes from a user with the root role (or auth is off);
        the user."""
        state, who = await self.checked(context)
        state.check_admin(who)
        return who

    async def maintainer(self, context: Context) -> None:
        """`admin`, with the errors as etcd's Maintenance service sends them (see
        errors.unmapped: etcd does not translate them there)."""
        try:
            await self.admin(context)
        except errors.EtcdError as exc:
            raise errors.unmapped(exc) from exc


async def hash_password(password: str, cost: int) -> str:
    """bcrypt at etcd's cost, off the event loop (it takes tens of milliseconds on purpose),
    base64-encoded as etcd 3.5 passes hashedPassword on."""
    hashed = await asyncio.to_thread(bcrypt.hashpw, password.encode(), bcrypt.gensalt(cost))
    return base64.b64encode(hashed).decode()


async def password_matches(password: str, hashed: bytes) -> bool:
    try:
        return await asyncio.to_thread(bcrypt.checkpw, password.encode(), hashed)
    except ValueError:  # not a bcrypt hash (e.g. a user restored without one)
        return False


class AuthService(rpc_pb2_grpc.AuthServicer):
    def __init__(
        self,
        store: Store,
        member: Member,
        credentials: Credentials,
        bcrypt_cost: int = DEFAULT_BCRYPT_COST,
    ) -> None:
        self._store = store
        self._member = member
        self._credentials = credentials
        self._cost = bcrypt_cost

    def _answer(self, response: Any) -> Any:
        response.header.revision = self._store.hub.revision
        self._member.stamp(response.header)
        return response

    async def _change(self, method: str, request: Any, who: Identity | None) -> Any:
        """An Auth call that changes the store, made by `who` (checked as root by the caller
        and again by the writer), then the writer. Once it is answered, this process checks
        requests against the new state: the client that made the change sees it at once."""
        change = workers_pb2.AuthChange(method=method, request=request.SerializeToString())
        caller = Caller(who, self._store.auth.state.generation)
        answer = await self._store.submit(AUTH_CHANGE, change, caller)
        await self._store.auth.reload()
        return self._answer(message_types(method)[1].FromString(answer.response))

    async def _fresh(self) -> AuthState:
        """The state as the database has it now: reads answer as of the latest change anywhere."""
        return await self._store.auth.reload()

    @etcd_errors
    async def AuthStatus(self, request: Any, context: Context) -> Any:
        state = await self._fresh()
        state.check_admin(self._credentials.identify(context, state))
        response = rpc_pb2.AuthStatusResponse(enabled=state.enabled, authRevision=state.revision)
        return self._answer(response)

    @etcd_errors
    async def Authenticate(self, request: rpc_pb2.AuthenticateRequest, context: Context) -> Any:
        state = await self._fresh()
        if not state.enabled:
            raise errors.AuthNotEnabled()
        user = state.users.get(request.name)
        if user is None:
            raise errors.AuthFailed()
        if user.options.no_password:
            raise errors.NoPasswordUser()
        if not await password_matches(request.password, user.password):
            raise errors.AuthFailed()
        token = self._credentials.tokens.assign(state, request.name)
        return self._answer(rpc_pb2.AuthenticateResponse(token=token))

    @etcd_errors
    async def UserAdd(self, request: rpc_pb2.AuthUserAddRequest, context: Context) -> Any:
        who = await self._credentials.admin(context)  # before the hash: it costs ~70 ms
        if not request.options.no_password:  # as etcd: a hash the client sent is not used
            request.hashedPassword = await hash_password(request.password, self._cost)
        request.password = ""
        return await self._change("UserAdd", request, who)

    @etcd_errors
    async def UserChangePassword(
        self, request: rpc_pb2.AuthUserChangePasswordRequest, context: Context
    ) -> Any:
        who = await self._credentials.admin(context)
        if request.password:
            request.hashedPassword = await hash_password(request.password, self._cost)
        request.password = ""
        return await self._change("UserChangePassword", request, who)

    @etcd_errors
    async def UserGet(self, request: rpc_pb2.AuthUserGetRequest, context: Context) -> Any:
        state = await self._fresh()
        who = self._credentials.identify(context, state)
        if who is None or who.user != request.name:  # a user may read their own roles
            state.check_admin(who)
        user = state.users.get(request.name)
        if user is None:
            raise errors.UserNotFound()
        return self._answer(rpc_pb2.AuthUserGetResponse(roles=list(user.roles)))

    @etcd_errors
    async def UserList(self, request: Any, context: Context) -> Any:
        state = await self._fresh()
        state.check_admin(self._credentials.identify(context, state))
        return self._answer(rpc_pb2.AuthUserListResponse(users=sorted(state.users)))

    @etcd_errors
    async def RoleGet(self, request: rpc_pb2.AuthRoleGetRequest, context: Context) -> Any:
        state = await self._fresh()
        who = self._credentials.identify(context, state)
        user = state.users.get(who.user) if who is not None else None
        if user is None or request.role not in user.roles:  # a user may read their own roles
            state.check_admin(who)
        role = state.roles.get(request.role)
        if role is None:
            raise errors.RoleNotFound()
        # etcd 3.5 lists what is stored, for root too (root may do anything whatever it lists).
        return self._answer(rpc_pb2.AuthRoleGetResponse(perm=list(role.keyPermission)))

    @etcd_errors
    async def RoleList(self, request: Any, context: Context) -> Any:
        state = await self._fresh()
        state.check_admin(self._credentials.identify(context, state))
        return self._answer(rpc_pb2.AuthRoleListResponse(roles=sorted(state.roles)))


def _changer(method: str) -> Any:
    """The handler of an Auth call that changes the store and needs nothing done before: root
    only (once auth is on), then the writer."""

    @etcd_errors
    async def handler(self: AuthService, request: Any, context: Context) -> Any:
        who = await self._credentials.admin(context)
        return await self._change(method, request, who)

    handler.__name__ = method
    return handler


#: Changes with nothing to do before the writer (UserAdd and UserChangePassword hash first).
for _method in (
    "AuthEnable",
    "AuthDisable",
    "UserDelete",
    "UserGrantRole",
    "UserRevokeRole",
    "RoleAdd",
    "RoleDelete",
    "RoleGrantPermission",
    "RoleRevokePermission",
):
    setattr(AuthService, _method, _changer(_method))
