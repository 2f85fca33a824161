"""Connecting to one of the PostgreSQL servers a DSN names, and moving to another when it is lost.

A DSN may name several servers, a primary and its standbys (`postgres://u@h1:5432,h2:5432/db`, or
`?host=h1,h2&port=5432,5432`), and `target_session_attrs` says which of them will do. asyncpg
tries them in turn, but under one timeout for the whole attempt: when the first server's machine
is gone (nothing answers, not even a refusal), every attempt runs out of time still waiting on it,
and the next server is never tried. So kine-server connects host by host itself, each within its
own time (libpq's `connect_timeout` in the DSN, else --datastore-timeout shared out between the
hosts, so that a whole attempt still fits in --datastore-timeout).

A lost machine also leaves every open connection to it hanging, each until its own statement
timeout. So while any transaction has waited longer than `probe_after`, the connector looks (at
most once per `probe_after`) for another server that now meets the target attributes: a standby
promoted in the meantime. Once a connection, a probe's or any other, lands on a server other than
the current one, that server becomes current and every connection to the others is closed at
once: their waits fail (UNAVAILABLE, which clients retry) instead of running out their timeouts,
and new connections go to the current server first. Only `read-write` and `primary` identify one
server, so only then is there anything to probe for; with several hosts, `read-write` is the
default, as kine-server must write and its reads must see every acknowledged write (a standby's
may lag behind), and `standby`, `read-only` and `prefer-standby` are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import urllib.parse
import weakref
from dataclasses import dataclass
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

#: What kine-server can serve on: a server that takes writes (`any` leaves it to the DSN).
USABLE_ATTRS = ("any", "read-write", "primary")
#: Attributes that only one server of a primary and its standbys has: probing can find it.
ONE_SERVER_ATTRS = ("read-write", "primary")
#: A transaction that waits longer than this makes the connector look for a promoted standby.
PROBE_AFTER = 1.0
#: What a connection attempt to one host may raise, the server's refusals included.
CONNECT_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # TargetServerAttributeNotMatched
    OSError,  # TimeoutError, refused, no route
)
#: libpq's default port.
DEFAULT_PORT = 5432


def database_name(dsn: str) -> str:
    """The database a DSN names; kine's default is `kubernetes`."""
    path = urllib.parse.urlsplit(dsn).path.lstrip("/")
    return urllib.parse.unquote(path) or "kubernetes"


def with_database(dsn: str, name: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(name)))


class BadEndpoint(ValueError):
    """What is wrong with the DSN's servers, target attributes or connect_timeout (make_driver
    reports it as an EndpointError: this module cannot import the package, which imports it)."""


@dataclass(frozen=True)
class Host:
    """One server of a DSN: a host name or address (or a unix socket directory) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Endpoint:
    """What a PostgreSQL DSN says about where to connect."""

    #: The DSN as asyncpg is given it: `connect_timeout` taken out (asyncpg would send it to the
    #: server as a setting, which the server refuses).
    dsn: str
    #: Every server it names, in its order; empty: none named (asyncpg's defaults: PGHOST, the
    #: local socket).
    hosts: tuple[Host, ...]
    target_session_attrs: str
    #: libpq's `connect_timeout`: the time each host gets; None: not given.
    connect_timeout: float | None


def parse_endpoint(dsn: str) -> Endpoint:
    """The servers, target attributes and per-host timeout of `dsn`, as libpq reads them; an
    BadEndpoint names what is wrong."""
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    settings = dict(query)  # the last of repeated parameters wins, as in asyncpg
    hostspec = parts.netloc.rpartition("@")[2]
    try:
        if hostspec:  # ports from the host list; a `port` parameter is then ignored (asyncpg)
            hosts = _host_list(hostspec.split(","), [], unquote=True)
        elif settings.get("host"):
            ports = [_port(p) for p in settings["port"].split(",")] if settings.get("port") else []
            hosts = _host_list(settings["host"].split(","), ports, unquote=False)
        else:
            hosts = ()
    except ValueError as exc:
        raise BadEndpoint(f"invalid --endpoint: PostgreSQL host list: {exc}") from exc
    attrs = settings.get("target_session_attrs") or os.environ.get("PGTARGETSESSIONATTRS", "")
    # Several servers: kine-server needs the one that takes writes (see the module's docstring).
    attrs = attrs or ("read-write" if len(hosts) > 1 else "any")
    if attrs not in USABLE_ATTRS:
        raise BadEndpoint(
            f"invalid --endpoint: target_session_attrs={attrs} cannot serve kine-server, which "
            f"writes and must read what it wrote; use one of {', '.join(USABLE_ATTRS)}"
        )
    timeout = None
    if "connect_timeout" in settings:
        try:
            timeout = float(settings["connect_timeout"]) or None  # 0: none, as in libpq
        except ValueError:
            timeout = -1.0
        if timeout is not None and timeout < 0:
            raise BadEndpoint(
                f"invalid --endpoint: connect_timeout={settings['connect_timeout']!r} is not "
                "a number of seconds"
            )
        kept = [(name, value) for name, value in query if name != "connect_timeout"]
        parts = parts._replace(query=urllib.parse.urlencode(kept, safe=",/:"))
    return Endpoint(urllib.parse.urlunsplit(parts), hosts, attrs, timeout)


def _host_list(specs: list[str], ports: list[int], unquote: bool) -> tuple[Host, ...]:
    """libpq's host list: `host[:port]` entries (`[v6]:port`, `/socket/dir`), with a port list
    of one port for all or one per host."""
    if ports and len(ports) not in (1, len(specs)):
        raise ValueError(f"{len(ports)} ports for {len(specs)} hosts")
    default = int(os.environ.get("PGPORT", "").split(",")[0] or DEFAULT_PORT)
    hosts = []
    for i, spec in enumerate(specs):
        if spec.startswith("/"):  # a unix socket directory, as asyncpg reads it
            address, port_text = spec, ""
        elif spec.startswith("["):
            address, _, rest = spec[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            address, _, port_text = spec.partition(":")
        if unquote:
            address, port_text = urllib.parse.unquote(address), urllib.parse.unquote(port_text)
        if not address:
            raise ValueError(f"an empty host in {','.join(specs)!r}")
        given = ports[i if len(ports) > 1 else 0] if ports else default
        port = _port(port_text) if port_text else given
        hosts.append(Host(address, port))
    return tuple(hosts)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"port {text!r} is not a port number")
    return int(text)


class _Moved(Exception):
    """The connector moved to another server while an attempt waited on this one."""


class HostConnection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that knows which server of the DSN it is to (a pool hands out
    proxies, which pass the attribute on)."""

    host_index = 0


class NoUsableHost(ConnectionError):
    """No server of the DSN could be used now, for reasons waiting may cure (no answer, refused,
    a standby where the primary is wanted): each host's reason, in the message."""


def _retryable(exc: BaseException) -> bool:
    """A host's failure that waiting may cure, as opposed to the server's definite refusal (a
    password, a missing database) or a TLS error."""
    if isinstance(exc, asyncpg.PostgresError):
        return isinstance(exc, asyncpg.CannotConnectNowError | asyncpg.PostgresConnectionError)
    return isinstance(exc, OSError | asyncpg.InternalClientError) and not isinstance(
        exc, asyncpg.ClientConfigurationError
    )


def _reason(exc: BaseException, limit: float) -> str:
    """Why one host could not be used, in a few words."""
    if isinstance(exc, TimeoutError):
        return f"no answer in {limit:.1f}s"
    if isinstance(exc, asyncpg.TargetServerAttributeNotMatched):
        return "does not match target_session_attrs"
    # asyncpg joins one error per address of a name ("Multiple exceptions: [Errno 111] ...").
    if isinstance(exc, ConnectionRefusedError) or "Errno 111" in str(exc):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class HostConnector:
    """Connects to the first usable server of an Endpoint, each host within its own time, the
    current server first; closes every connection to the others once a connection lands on
    another one (see the module's docstring). One per driver: every pool, the LISTEN
    connection and the database's creation connect through it."""

    def __init__(
        self, endpoint: Endpoint, timeout: float, probe_after: float = PROBE_AFTER
    ) -> None:
        self.endpoint = endpoint
        hosts = max(1, len(endpoint.hosts))
        #: Each host's time: libpq's connect_timeout, else a share of the whole attempt's.
        self.per_host = endpoint.connect_timeout or timeout / hosts
        self.probe_after = min(probe_after, timeout / 2)
        self.probing = len(endpoint.hosts) > 1 and endpoint.target_session_attrs in (
            ONE_SERVER_ATTRS
        )
        #: The server the newest connection went to; tried first.
        self.current = 0
        #: A server that refused a write as read-only: tried last, until one answers again.
        self._avoid: int | None = None
        #: Open connections by the index of their host, to close them at a failover.
        self._open: dict[int, weakref.WeakSet[asyncpg.Connection]] = {}
        self._probe: asyncio.Task[None] | None = None
        self._last_probe = 0.0
        #: Set (and replaced) when the current server changes.
        self._moved = asyncio.Event()
        #: Attempts given up on, left to end by themselves within per_host.
        self._abandoned: set[asyncio.Future[asyncpg.Connection]] = set()
        #: Options every connection gets (TLS, command_timeout), given by the driver.
        self.options: dict[str, Any] = {}

    @property
    def description(self) -> str:
        """Every server, for the log: `h1:5432,h2:5432` (asyncpg's default when none is named)."""
        return ",".join(map(str, self.endpoint.hosts)) or "localhost:5432"

    async def connect(self, dsn: str | None = None, **options: Any) -> asyncpg.Connection:
        """A connection to the first server, the current one first, that answers within its
        time and meets the target attributes. The signature is asyncpg's pool `connect`
        callback's: `dsn` names the database (the pool's or another), `options` are asyncpg's."""
        options = {"connection_class": HostConnection, **self.options, **options}
        options.pop("timeout", None)
        target = self.endpoint.dsn if dsn is None else dsn
        if not self.endpoint.hosts:
            return await asyncpg.connect(target, timeout=self.per_host, **options)
        order = [self.current] + [i for i in range(len(self.endpoint.hosts)) if i != self.current]
        if self._avoid is not None:
            order.remove(self._avoid)
            order.append(self._avoid)
        return await self._first_usable(target, order, options)

    async def _first_usable(
        self, dsn: str, order: list[int], options: dict[str, Any]
    ) -> asyncpg.Connection:
        failures: list[tuple[Host, BaseException]] = []
        pending = list(order)
        while pending:
            index = pending.pop(0)
            host = self.endpoint.hosts[index]
            try:
                conn = await self._attempt(index, dsn, options)
            except _Moved:
                # Another connection found the server to use meanwhile: that one now, and
                # this one again after the rest.
                pending = [self.current, *(i for i in pending if i != self.current), index]
                continue
            except CONNECT_ERRORS as exc:
                log.debug("cannot use PostgreSQL at %s: %s", host, _reason(exc, self.per_host))
                failures.append((host, exc))
                continue
            self._opened(index, conn)
            return conn
        definite = [exc for _, exc in failures if not _retryable(exc)]
        if len(failures) == 1 or definite:
            raise (definite or [failures[0][1]])[0]
        reasons = "; ".join(f"{host}: {_reason(exc, self.per_host)}" for host, exc in failures)
        raise NoUsableHost(f"no usable PostgreSQL server: {reasons}")

    async def _attempt(self, index: int, dsn: str, options: dict[str, Any]) -> asyncpg.Connection:
        """A connection to host `index` within `per_host`. Waiting on the current server past
        `probe_after` makes the connector look for another one; if it moves to another
        meanwhile, this attempt gives up at once (_Moved) and finishes unwatched."""
        host = self.endpoint.hosts[index]
        connecting = asyncio.ensure_future(
            asyncpg.connect(
                dsn,
                host=host.host,
                port=host.port,
                target_session_attrs=self.endpoint.target_session_attrs,
                timeout=self.per_host,
                **options,
            )
        )
        if not self.probing:
            return await connecting
        overdue = Overdue(self) if index == self.current else None
        try:
            while True:
                moved = asyncio.ensure_future(self._moved.wait())
                try:
                    await asyncio.wait({connecting, moved}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    moved.cancel()
                if connecting.done():
                    return connecting.result()
                if self.current != index:
                    raise _Moved
        except BaseException:
            if not connecting.done():
                # Not cancelled (asyncpg cancelled mid-handshake may leave a future nobody
                # reads): it ends within per_host, and a connection it made is closed.
                self._abandoned.add(connecting)
                connecting.add_done_callback(self._dispose)
            raise
        finally:
            if overdue is not None:
                overdue.cancel()

    def _dispose(self, attempt: asyncio.Future[asyncpg.Connection]) -> None:
        self._abandoned.discard(attempt)
        if not attempt.cancelled() and attempt.exception() is None:
            with contextlib.suppress(asyncpg.InterfaceError):
                attempt.result().terminate()

    def _opened(self, index: int, conn: asyncpg.Connection) -> None:
        if isinstance(conn, HostConnection):
            conn.host_index = index
        self._open.setdefault(index, weakref.WeakSet()).add(conn)
        self._avoid = None
        if index == self.current:
            return
        log.warning(
            "PostgreSQL failover: now on %s (was %s); closing the connections to the others",
            self.endpoint.hosts[index],
            self.endpoint.hosts[self.current],
        )
        self.current = index
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()  # attempts waiting on the others give up
        for other, connections in self._open.items():
            if other != index:
                for stale in list(connections):
                    with contextlib.suppress(asyncpg.InterfaceError):
                        stale.terminate()  # its waits fail now; the pool makes new ones
                connections.clear()

    def overdue(self) -> None:
        """A transaction has waited `probe_after`: look for a newly promoted server, unless a
        probe runs or ran less than `probe_after` ago."""
        if not self.probing or (self._probe is not None and not self._probe.done()):
            return
        now = time.monotonic()
        if now - self._last_probe < self.probe_after:
            return
        self._last_probe = now
        self._probe = asyncio.ensure_future(self._look_elsewhere())

    async def _look_elsewhere(self) -> None:
        """Try the servers other than the current one; one that meets the target attributes
        becomes current (which closes the connections to the rest)."""
        others = [i for i in range(len(self.endpoint.hosts)) if i != self.current]
        try:
            options = {"connection_class": HostConnection, **self.options}
            conn = await self._first_usable(self.endpoint.dsn, others, options)
        except CONNECT_ERRORS as exc:
            log.debug("no other PostgreSQL server to move to: %s", exc)
            return
        with contextlib.suppress(Exception):
            await conn.close(timeout=self.per_host)

    def watch(self) -> Overdue | None:
        """A timer that calls `overdue` every `probe_after` until it is cancelled (the end of
        a transaction); None when there is nothing to probe for."""
        if not self.probing:
            return None
        return Overdue(self)

    def avoid(self, conn: asyncpg.Connection) -> None:
        """`conn`'s server refused a write as read-only (a standby, or a primary being
        demoted): new connections try the other servers first, until one connects."""
        index = getattr(conn, "host_index", None)
        if isinstance(index, int) and len(self.endpoint.hosts) > 1:
            self._avoid = index

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
        for attempt in list(self._abandoned):
            attempt.cancel()


class Overdue:
    """Calls its connector's `overdue` every `probe_after` while a transaction lasts."""

    def __init__(self, connector: HostConnector) -> None:
        self._connector = connector
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(connector.probe_after, self._fire)

    def _fire(self) -> None:
        self._connector.overdue()
        self._handle = self._loop.call_later(self._connector.probe_after, self._fire)

    def cancel(self) -> None:
        self._handle.cancel()
