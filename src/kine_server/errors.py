"""etcd's errors, each with the gRPC status code and message etcd sends for it.

The store raises these; the gRPC layer turns them into a status. Keeping codes and messages in one
module is what lets clients that match on etcd's strings (clientv3, kube-apiserver) work unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from kine_server.drivers.base import DriverError


class EtcdError(Exception):
    """An error a client sees as the gRPC status `code` with `message` as its details."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    message: str = "etcdserver: unknown error"

    def __init__(self, message: str | None = None) -> None:
        if message is not None:
            self.message = message
        super().__init__(self.message)


def _error(name: str, code: grpc.StatusCode, message: str) -> type[EtcdError]:
    return type(name, (EtcdError,), {"code": code, "message": message, "__doc__": message})


_IA = grpc.StatusCode.INVALID_ARGUMENT

EmptyKey = _error("EmptyKey", _IA, "etcdserver: key is not provided")
KeyNotFound = _error("KeyNotFound", _IA, "etcdserver: key not found")
ValueProvided = _error("ValueProvided", _IA, "etcdserver: value is provided")
LeaseProvided = _error("LeaseProvided", _IA, "etcdserver: lease is provided")
TooManyOps = _error("TooManyOps", _IA, "etcdserver: too many operations in txn request")
DuplicateKey = _error("DuplicateKey", _IA, "etcdserver: duplicate key given in txn request")
InvalidSortOption = _error("InvalidSortOption", _IA, "etcdserver: invalid sort option")
RequestTooLarge = _error("RequestTooLarge", _IA, "etcdserver: request is too large")
Compacted = _error(
    "Compacted",
    grpc.StatusCode.OUT_OF_RANGE,
    "etcdserver: mvcc: required revision has been compacted",
)
FutureRevision = _error(
    "FutureRevision",
    grpc.StatusCode.OUT_OF_RANGE,
    "etcdserver: mvcc: required revision is a future revision",
)
LeaseNotFound = _error(
    "LeaseNotFound", grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found"
)
LeaseExists = _error(
    "LeaseExists", grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: lease already exists"
)
LeaseTTLTooLarge = _error(
    "LeaseTTLTooLarge", grpc.StatusCode.OUT_OF_RANGE, "etcdserver: too large lease TTL"
)
NoSpace = _error(
    "NoSpace", grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded"
)
Corrupt = _error("Corrupt", grpc.StatusCode.DATA_LOSS, "etcdserver: corrupt cluster")

# The auth store's errors (etcd's rpctypes, as its server maps auth's errors onto them).
_FP = grpc.StatusCode.FAILED_PRECONDITION
RootUserNotExist = _error("RootUserNotExist", _FP, "etcdserver: root user does not exist")
RootRoleNotExist = _error("RootRoleNotExist", _FP, "etcdserver: root user does not have root role")
UserAlreadyExist = _error("UserAlreadyExist", _FP, "etcdserver: user name already exists")
UserEmpty = _error("UserEmpty", _IA, "etcdserver: user name is empty")
UserNotFound = _error("UserNotFound", _FP, "etcdserver: user name not found")
RoleAlreadyExist = _error("RoleAlreadyExist", _FP, "etcdserver: role name already exists")
RoleNotFound = _error("RoleNotFound", _FP, "etcdserver: role name not found")
RoleEmpty = _error("RoleEmpty", _IA, "etcdserver: role name is empty")
AuthFailed = _error(
    "AuthFailed", _IA, "etcdserver: authentication failed, invalid user ID or password"
)
PermissionNotGiven = _error("PermissionNotGiven", _IA, "etcdserver: permission not given")
PermissionDenied = _error(
    "PermissionDenied", grpc.StatusCode.PERMISSION_DENIED, "etcdserver: permission denied"
)
RoleNotGranted = _error("RoleNotGranted", _FP, "etcdserver: role is not granted to the user")
PermissionNotGranted = _error(
    "PermissionNotGranted", _FP, "etcdserver: permission is not granted to the role"
)
AuthNotEnabled = _error("AuthNotEnabled", _FP, "etcdserver: authentication is not enabled")
InvalidAuthToken = _error(
    "InvalidAuthToken", grpc.StatusCode.UNAUTHENTICATED, "etcdserver: invalid auth token"
)
InvalidAuthMgmt = _error("InvalidAuthMgmt", _IA, "etcdserver: invalid auth management")
AuthOldRevision = _error("AuthOldRevision", _IA, "etcdserver: revision of auth store is old")
# etcd has no gRPC errors for these two: its auth package's text goes out as UNKNOWN.
NoPasswordUser = _error(
    "NoPasswordUser",
    grpc.StatusCode.UNKNOWN,
    "auth: authentication failed, password was given for no password user",
)
VerifyOnly = _error(
    "VerifyOnly", grpc.StatusCode.UNKNOWN, "auth: token signing attempted with verify-only key"
)

#: The auth package's own words for its errors, where etcd passes them on without turning them
#: into its gRPC errors (Maintenance's admin checks): the client sees UNKNOWN and this text.
_AUTH_TEXT = {
    UserEmpty: "auth: user name is empty",
    UserNotFound: "auth: user not found",
    PermissionDenied: "auth: permission denied",
    InvalidAuthToken: "auth: invalid auth token",
    AuthOldRevision: "auth: revision in header is old",
}


def unmapped(exc: EtcdError) -> EtcdError:
    """`exc` as etcd's Maintenance service answers it: UNKNOWN, in the auth package's words."""
    text = _AUTH_TEXT.get(type(exc))
    if text is None:
        return exc
    error = EtcdError(text)
    error.code = grpc.StatusCode.UNKNOWN
    return error


class WatchRefused(Exception):
    """A watch create etcd refuses without ending the stream: the create is answered as created
    and canceled, with `reason` (etcd's mvcc error text) as its cancel_reason."""

    reason = "mvcc: watch refused"

    def __init__(self) -> None:
        super().__init__(self.reason)


class DuplicateWatchId(WatchRefused):
    reason = "mvcc: duplicate watch ID provided on the WatchStream"


class EmptyWatchRange(WatchRefused):
    reason = "mvcc: watcher range is empty"


class WatchDenied(WatchRefused):
    """The stream's user may not watch the range: etcd 3.5 cancels the watch with the text of
    the status error its check gave (`rpc error: code = PermissionDenied desc = ...`)."""

    def __init__(self, cause: EtcdError) -> None:
        code = "".join(part.capitalize() for part in cause.code.name.split("_"))
        self.reason = f"rpc error: code = {code} desc = {cause.message}"
        Exception.__init__(self, self.reason)


class KeyTooLong(EtcdError):
    """Longer than the database can index (etcd itself has no such limit)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, limit: int) -> None:
        super().__init__(f"kine-server: key is too long for this database (at most {limit} bytes)")


class Unavailable(EtcdError):
    """The database cannot be reached; the client should retry (clientv3 retries UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE
    message = "kine-server: database unavailable"

    @classmethod
    def database(cls, cause: Exception) -> Unavailable:
        """The error for a failed database call, naming its cause."""
        return cls(f"kine-server: database unavailable: {cause}")


class Internal(EtcdError):
    """A fault of this server or of one statement: retrying the same request would not help, so
    it is not UNAVAILABLE (which clients retry forever)."""

    code = grpc.StatusCode.INTERNAL
    message = "kine-server: internal error"

    @classmethod
    def of(cls, cause: BaseException) -> Internal:
        return cls(f"kine-server: internal error: {cause}")


def database(exc: DriverError) -> EtcdError:
    """The client's answer to a failed database call: UNAVAILABLE when a retry may succeed (the
    database is unreachable, busy or timed out), INTERNAL when the statement itself failed."""
    if exc.retryable:
        return Unavailable.database(exc)
    return Internal.of(exc)


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """Turn a DriverError raised inside the block into the client's answer (see `database`)."""
    try:
        yield
    except DriverError as exc:
        raise database(exc) from exc


class Unsupported(EtcdError):
    """A call etcd has and this server does not implement; the message names the call."""

    code = grpc.StatusCode.UNIMPLEMENTED

    def __init__(self, method: str) -> None:
        super().__init__(f"kine-server: {method} is not supported")


#: Every gRPC status code by its number, for errors relayed between processes.
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class Relayed(EtcdError):
    """An error another kine-server process answered (`--workers`): passed on unchanged."""

    def __init__(self, code: int, message: str) -> None:
        self.code = _CODES.get(code, grpc.StatusCode.UNKNOWN)
        super().__init__(message)
