"""The MySQL/MariaDB DSN forms `--endpoint` accepts, and where they point.

Two forms, so that a K3s user's `--datastore-endpoint` works unchanged:

- kine's (the Go driver's) `mysql://user:pass@tcp(host:port)/db?tls=...`, also `unix(/path)` and
  an empty address (`user:pass@/db`: localhost:3306), the password taken as written (it may hold
  `@` or `:`; the last `@` ends it, the last `/` starts the database);
- the URL form `mysql://user:pass@host:port/db?tls=...`, percent-encoded as URLs are.

The database defaults to kine's `kubernetes`. `tls` is the Go driver's: `true` (verify),
`skip-verify`, `preferred` (as skip-verify: use TLS, trust anything), `false` (the default); the
`--ca-file/--cert-file/--key-file/--skip-verify` flags give TLS as well, and win over it.
"""

from __future__ import annotations

import ssl
import urllib.parse
from dataclasses import dataclass

DEFAULT_DATABASE = "kubernetes"
DEFAULT_PORT = 3306


class DSNError(ValueError):
    """The DSN cannot be read; the message says why."""


@dataclass(frozen=True)
class MySQLEndpoint:
    host: str
    port: int
    user: str
    password: str
    database: str
    #: A unix socket path (`unix(/run/mysqld/mysqld.sock)`), instead of host and port.
    socket: str = ""
    #: The DSN's `tls` parameter: "", "true", "skip-verify", "preferred" or "false".
    tls: str = ""

    @property
    def server(self) -> str:
        if self.socket:
            return self.socket
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def with_database(self, name: str) -> MySQLEndpoint:
        return MySQLEndpoint(
            self.host, self.port, self.user, self.password, name, self.socket, self.tls
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS as the DSN's `tls` asks (None: none)."""
        if self.tls in ("", "false"):
            return None
        context = ssl.create_default_context()
        if self.tls in ("skip-verify", "preferred"):
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def url(self) -> str:
        """The URL form of this endpoint (tests and tools name databases by it)."""
        user = urllib.parse.quote(self.user, safe="")
        password = ":" + urllib.parse.quote(self.password, safe="") if self.password else ""
        query = f"?tls={self.tls}" if self.tls else ""
        database = urllib.parse.quote(self.database, safe="")
        if self.socket:
            return f"mysql://{user}{password}@unix({self.socket})/{database}{query}"
        return f"mysql://{user}{password}@{self.server}/{database}{query}"


def _port(text: str, dsn: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise DSNError(f"invalid port {text!r} in {dsn!r}") from None
    if not 0 < port < 65536:
        raise DSNError(f"invalid port {port} in {dsn!r}")
    return port


def _host_port(address: str, dsn: str) -> tuple[str, int]:
    if address.startswith("["):  # [::1]:3306
        host, _, rest = address[1:].partition("]")
        return host, _port(rest[1:], dsn) if rest.startswith(":") else DEFAULT_PORT
    host, sep, port = address.rpartition(":")
    if not sep:
        return address or "127.0.0.1", DEFAULT_PORT
    return host or "127.0.0.1", _port(port, dsn)


def parse(dsn: str) -> MySQLEndpoint:
    """Read `mysql://...` in either form (see the module's docstring)."""
    scheme, sep, rest = dsn.partition("://")
    if scheme != "mysql" or not sep:
        raise DSNError(f"not a mysql:// DSN: {dsn!r}")
    rest, _, query = rest.partition("?")
    params = urllib.parse.parse_qs(query)
    tls = params.get("tls", [""])[-1]
    if tls not in ("", "true", "false", "skip-verify", "preferred"):
        raise DSNError(f"unsupported tls={tls!r} (use true, skip-verify, preferred or false)")
    at = rest.rfind("@", 0, rest.rfind("/") if rest.rfind("/") >= 0 else len(rest))
    userinfo, address = (rest[:at], rest[at + 1 :]) if at >= 0 else ("", rest)
    go_form = address.startswith(("tcp(", "unix(", "/")) or address in ("", "tcp", "unix")
    if go_form:
        if address.startswith(("tcp(", "unix(")):
            net, _, remainder = address.partition("(")
            location, closing, database = remainder.partition(")")
            if not closing:
                raise DSNError(f"unclosed {net}( in {dsn!r}")
        else:
            net, location, database = "tcp", "", address.removeprefix("tcp").removeprefix("unix")
        database = database.removeprefix("/")
        user, _, password = userinfo.partition(":")
        if net == "unix":
            return MySQLEndpoint(
                "", 0, user, password, database or DEFAULT_DATABASE, socket=location, tls=tls
            )
        host, port = _host_port(location, dsn)
        return MySQLEndpoint(host, port, user, password, database or DEFAULT_DATABASE, tls=tls)
    address, _, database = address.partition("/")
    host, port = _host_port(address, dsn)
    user, _, password = userinfo.partition(":")
    unquote = urllib.parse.unquote
    return MySQLEndpoint(
        host,
        port,
        unquote(user),
        unquote(password),
        unquote(database) or DEFAULT_DATABASE,
        tls=tls,
    )
