"""What PostgreSQL's (asyncpg's and the network's) errors mean to the store.

Three answers (base.py): no answer came at all, so the connection is dropped and clients hear
UNAVAILABLE (`DatabaseUnreachable`); the server answered with an error a retry may cure
(`DriverError`: a serialization failure, a lock or statement timeout, a shutdown); or the
statement itself is at fault (`StatementError`). Also how connect errors read in a log line.
"""

from __future__ import annotations

import socket
import ssl as ssl_module

import asyncpg

from kine_server.drivers.base import DatabaseUnreachable, DriverError, StatementError
from kine_server.drivers.postgres_hosts import NoUsableHost

#: What asyncpg and the network raise when the database is unreachable or a statement fails.
DATABASE_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,  # TimeoutError and ConnectionError included
)

#: Of those, the ones that mean no answer came (as opposed to an error the server answered with):
#: the connection cannot be trusted any more, and no request is at fault.
UNANSWERED = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
)

#: SQLSTATE classes a retry may cure: connection exceptions, transaction rollbacks (serialization,
#: deadlock), insufficient resources, operator intervention (shutdown, statement timeout), system
#: errors; and lock_not_available, and read_only_sql_transaction (a write that reached a standby
#: not yet promoted, or a primary being demoted: another server of the DSN takes it). Every other
#: class (data, integrity, syntax) is the statement's.
_RETRYABLE_CLASSES = ("08", "40", "53", "57", "58", "XX")
_RETRYABLE_STATES = ("55P03", "25006")


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer from PostgreSQL in time"
    return str(exc) or type(exc).__name__


def unreachable(exc: BaseException) -> bool:
    """Connecting failed in a way waiting may cure: nobody listens yet, no route or no name yet
    (a pod that starts beside its database), no answer in time, or a server still starting."""
    if isinstance(exc, ssl_module.SSLError):  # a certificate does not get better by waiting
        return False
    return isinstance(
        exc, OSError | asyncpg.CannotConnectNowError | asyncpg.PostgresConnectionError
    )


def describe_connect_error(exc: BaseException) -> str:
    """A connect error in a few words: asyncpg joins one per address it tried ("Multiple
    exceptions: [Errno 111] Connect call failed ('127.0.0.1', 5432), ..."); several servers'
    failures say each server's."""
    if isinstance(exc, NoUsableHost):
        return str(exc)
    if isinstance(exc, ConnectionRefusedError) or "Errno 111" in str(exc):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host: {exc.strerror}"
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, TimeoutError):
        return exc.strerror
    return describe(exc)


def unanswered(exc: BaseException) -> bool:
    """No answer came: the connection cannot be trusted any more. Not asyncpg's DataError,
    although it is an InterfaceError: a value asyncpg cannot encode (e.g. past int64) is refused
    before anything is sent, and the connection is as good as before."""
    return isinstance(exc, UNANSWERED) and not isinstance(exc, asyncpg.DataError)


def read_only_refusal(exc: BaseException) -> bool:
    """The server refused a write because it is read-only: a standby (hot standby answers reads
    and refuses every write), or default_transaction_read_only."""
    return isinstance(exc, asyncpg.ReadOnlySQLTransactionError)


def driver_error(exc: BaseException) -> DriverError:
    """What an asyncpg or network error means to the store: no answer at all, an error a
    retry may cure, or the statement's own fault."""
    if isinstance(exc, asyncpg.DataError):
        return StatementError(f"{type(exc).__name__}: {exc}")
    if unanswered(exc):
        return DatabaseUnreachable(describe(exc))
    if isinstance(exc, asyncpg.PostgresError):
        state = exc.sqlstate or ""
        if not (state[:2] in _RETRYABLE_CLASSES or state in _RETRYABLE_STATES):
            return StatementError(f"{type(exc).__name__}: {exc}")
    return DriverError(describe(exc))
