"""Every address flag's syntax, in one place: what a listener binds and what it advertises.

Accepted, on every flag (unix:// only where a listener can serve one):
  HOST:PORT, :PORT (every interface, as kine), [::1]:PORT, http://HOST:PORT, https://HOST:PORT
  (etcd's URL style, optionally with a trailing /), unix://PATH.
A port is 0 to 65535 (0: the kernel picks one). A malformed address is a ValueError whose text
says what is wrong in a few words; the caller puts the flag's name in front.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from dataclasses import dataclass, replace
from typing import Any

#: Hosts that mean every interface: advertised as something a client can reach instead.
WILDCARDS = frozenset({"", "0.0.0.0", "::"})


@dataclass(frozen=True)
class Address:
    """One parsed address. `scheme` is "" for kine's bare HOST:PORT (TLS follows the server's
    certificate flags), "http" or "https" (TLS decided by the URL), or "unix"."""

    scheme: str
    #: Without IPv6 brackets; "" is every interface.
    host: str = ""
    port: int = 0
    #: The socket's path, for unix:// only.
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return self.scheme == "unix"

    @property
    def host_port(self) -> str:
        """HOST:PORT with IPv6 in brackets; every interface is 0.0.0.0, which gRPC binds as
        dual-stack [::] where the host has IPv6 (as Go's ":PORT")."""
        host = self.host if self.host not in WILDCARDS else "0.0.0.0"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def grpc_target(self) -> str:
        """What grpc's add_*_port takes."""
        return f"unix:{self.path}" if self.is_unix else self.host_port

    def with_port(self, port: int) -> Address:
        return replace(self, port=port)

    def tls(self, server_tls: bool) -> bool:
        """Whether this listener serves TLS: an http:// or https:// URL says so itself (as
        etcd's --listen-client-urls); otherwise the server's certificate flags decide."""
        if self.scheme == "https":
            return True
        if self.scheme == "http":
            return False
        return server_tls

    def url(self, server_tls: bool) -> str:
        """As etcd writes it: http(s)://HOST:PORT, or unix://PATH."""
        if self.is_unix:
            return f"unix://{self.path}"
        scheme = "https" if self.tls(server_tls) else "http"
        return f"{scheme}://{self.host_port}"

    def __str__(self) -> str:
        if self.is_unix:
            return f"unix://{self.path}"
        prefix = f"{self.scheme}://" if self.scheme else ""
        return prefix + self.host_port


def parse(text: str, *, unix: bool = False) -> Address:
    """One address (see the module's docstring); `unix`: whether unix://PATH is allowed."""
    scheme, sep, rest = text.strip().partition("://")
    if not sep:
        scheme, rest = "", text.strip()
    elif scheme == "unix":
        if not unix:
            raise ValueError("a unix:// socket cannot be served here: use HOST:PORT")
        if not rest:
            raise ValueError("unix:// needs a socket path")
        return Address("unix", path=rest)
    elif scheme not in ("http", "https"):
        expected = (
            "http://, https:// or unix:// URLs" if unix else "http://HOST:PORT or https://HOST:PORT"
        )
        raise ValueError(f"unsupported scheme {scheme!r}: must be {expected}")
    if sep:
        rest = rest.removesuffix("/")
        if "/" in rest or "?" in rest or "@" in rest:
            raise ValueError("a listen URL has only a host and a port, no path or user")
    host, port = _split_host_port(rest)
    return Address(scheme, host, port)


def _split_host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise ValueError("expected [IPv6]:PORT")
        if not _is_ipv6(host):
            raise ValueError(f"{host!r} in brackets is not an IPv6 address")
        return host, _port(tail[1:])
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError("needs HOST:PORT, :PORT or a URL such as http://HOST:PORT")
    if ":" in host:
        raise ValueError("an IPv6 host goes in brackets: [::1]:PORT")
    if any(char.isspace() for char in host):
        raise ValueError(f"{host!r} is not a host name")
    return host, _port(port)


def _port(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"port {text!r} is not a number" if text else "no port")
    port = int(text)
    if port > 65535:
        raise ValueError(f"port {port} is out of range: needs a port from 0 to 65535")
    return port


def _is_ipv6(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        return False
    return True


def parse_list(text: str, *, unix: bool = False) -> list[Address]:
    """etcd's comma-separated URL lists (--listen-client-urls, --advertise-client-urls)."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise ValueError("no address given")
    if not all(parts):
        raise ValueError("an empty entry in the comma-separated list")
    addresses = []
    for part in parts:
        try:
            addresses.append(parse(part, unix=unix))
        except ValueError as exc:
            if len(parts) == 1:
                raise
            raise ValueError(f"{part!r}: {exc}") from None
    return addresses


def bind(address: Address, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound (not listening) to `address`: every interface is dual-stack [::]
    where the host has IPv6, else 0.0.0.0 (as gRPC binds it). OSError if it cannot be bound."""
    if address.host in WILDCARDS:
        with contextlib.suppress(OSError):
            return _bound(socket.AF_INET6, ("::", address.port), reuse_port, dual_stack=True)
        return _bound(socket.AF_INET, ("0.0.0.0", address.port), reuse_port)
    infos = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    family, _, _, _, sockaddr = infos[0]
    return _bound(family, sockaddr, reuse_port)


def _bound(family: int, sockaddr: Any, reuse_port: bool, dual_stack: bool = False) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As gRPC's own bind: connections of a previous run in TIME_WAIT must not block a
        # restart (a live listener still does).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if dual_stack:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_error(exc: OSError) -> str:
    """An OSError of bind() or getaddrinfo() in a few words."""
    if exc.errno == errno.EADDRINUSE:
        return "address already in use"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host: {exc.strerror}"
    return exc.strerror or str(exc)


def advertised(address: Address, server_tls: bool) -> str:
    """The URL clients are told to use for a listener (etcd's --advertise-client-urls when it
    is not given): every-interface hosts become this machine's address on its default route,
    the one other machines most likely reach it by."""
    if address.is_unix or address.host not in WILDCARDS:
        return address.url(server_tls)
    return replace(address, host=outward_address()).url(server_tls)


def outward_address() -> str:
    """This host's IPv4 address on the default route (a UDP connect sends nothing); without a
    route, the host name; without a resolvable host name, loopback."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere for real
        host: str = probe.getsockname()[0]
        if host != "0.0.0.0":
            return host
    name = socket.gethostname()
    with contextlib.suppress(OSError):
        socket.getaddrinfo(name, None)
        return name
    return "127.0.0.1"
