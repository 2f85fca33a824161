"""What MySQL's and MariaDB's (asyncmy's and the network's) errors mean to the store.

Three answers, as for PostgreSQL (base.py): no answer came at all, so the connection is dropped
and clients hear UNAVAILABLE (`DatabaseUnreachable`); the server answered with an error a retry
may cure (`DriverError`: a deadlock, a lock wait or statement timeout, a shutdown, a server that
went read-only for a failover); or the statement itself is at fault (`StatementError`). MySQL has
no SQLSTATE classes worth the name (most errors are HY000), so the server's error numbers decide,
the same on MySQL 8 and MariaDB wherever both have the error.
"""

from __future__ import annotations

import asyncio
import socket
import ssl as ssl_module

from asyncmy import errors as my

from kine_server.drivers.base import DatabaseUnreachable, DriverError, StatementError

#: What asyncmy and the network raise when the database is unreachable or a statement fails.
DATABASE_ERRORS = (
    my.MySQLError,
    OSError,  # TimeoutError and ConnectionError included
    asyncio.IncompleteReadError,  # the server closed the connection within a packet
)

#: The client library's own numbers (2000-2999: CR_*): the server is gone or never answered.
_CLIENT_ERRORS = range(2000, 3000)

#: Error numbers a retry may cure. Both databases: deadlock (1213, also a Galera certification
#: failure), lock wait timeout (1205), query interrupted by KILL QUERY (1317), server shutdown
#: (1053), too many connections (1040, 1203), out of memory (1037, 1041), read-only server
#: (1290, 1836: a replica during a failover), lock table full (1206), an error of the storage
#: engine's commit or rollback (1180, 1181), a Galera node not ready (1047). MariaDB: statement
#: time exceeded (1969), connection killed (1927). MySQL 8: statement execution time exceeded
#: (3024), a connection closed for inactivity (4031).
RETRYABLE = frozenset(
    {1037, 1040, 1041, 1047, 1053, 1180, 1181, 1203, 1205, 1206, 1213, 1290, 1317, 1836}
    | {1927, 1969}
    | {3024, 4031}
)

#: Of those, the ones that mean the session itself is gone: its connection is dropped.
SESSION_GONE = frozenset({1053, 1927, 4031})

#: The server's own trouble with its files, disk and memory, which a retry may cure as it may
#: PostgreSQL's classes 53 (insufficient resources) and 58 (system error): below 1000, the
#: "global errors" of the server's file layer (EE_*: a file it could not create, read, write or
#: delete, such as a temporary table's; out of memory; disk full), and can't create a file
#: (1004), disk full (1021), error reading or writing a file (1024, 1026), an error from the
#: storage engine (1030), a table or temporary table full (1114). None is the statement's fault.
SERVER_TROUBLE = frozenset(range(1, 1000)) | {1004, 1021, 1024, 1026, 1030, 1114}


def errno(exc: BaseException) -> int:
    """The MySQL error number of an asyncmy error, 0 for anything else."""
    if isinstance(exc, my.MySQLError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    return 0


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer from MySQL in time"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "MySQL closed the connection"
    if isinstance(exc, my.MySQLError) and len(exc.args) >= 2:
        return f"({exc.args[0]}) {exc.args[1]}"
    return str(exc) or type(exc).__name__


def unanswered(exc: BaseException) -> bool:
    """No answer came, or the session is gone: the connection cannot be trusted any more, and
    no request is at fault."""
    if isinstance(exc, OSError | asyncio.IncompleteReadError | my.InterfaceError):
        return True
    number = errno(exc)
    return number in _CLIENT_ERRORS or number in SESSION_GONE


def unreachable(exc: BaseException) -> bool:
    """Connecting failed in a way waiting may cure: nobody listens yet, no route or no name yet
    (a pod that starts beside its database), no answer in time, a server still starting or
    shutting down, or out of connections for now. Not a refused password or certificate."""
    # asyncmy reports a failed TLS handshake as "can't connect" (2003), the SSLError its cause.
    if isinstance(exc, ssl_module.SSLError) or isinstance(exc.__cause__, ssl_module.SSLError):
        return False
    if isinstance(exc, OSError | asyncio.IncompleteReadError):
        return True
    number = errno(exc)
    return number in _CLIENT_ERRORS or number in (1040, 1053, 1203, 1047)


def describe_connect_error(exc: BaseException) -> str:
    """A connect error in a few words."""
    cause = exc.__cause__ or exc.__context__
    for error in (exc, cause):
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(error, socket.gaierror):
            return f"cannot resolve the host: {error.strerror}"
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, TimeoutError):
        return exc.strerror
    if "Connection refused" in str(exc):
        return "connection refused"
    return describe(exc)


def driver_error(exc: BaseException) -> DriverError:
    """What an asyncmy or network error means to the store: no answer at all, an error a retry
    may cure (RETRYABLE, SERVER_TROUBLE), or the statement's own fault (a value out of range, a
    key too long, a syntax error, a constraint)."""
    if unanswered(exc):
        return DatabaseUnreachable(describe(exc))
    number = errno(exc)
    if number in RETRYABLE or number in SERVER_TROUBLE:
        return DriverError(describe(exc))
    return StatementError(f"{type(exc).__name__}: {describe(exc)}")
