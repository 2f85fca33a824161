"""Start-up checks and the listeners every kind of process binds: one clear line if anything fails.

Addresses, TLS files and ports are checked before the database is opened, so that a mistake in
a flag ends the process at once with one line naming the flag (`StartupError`), never a
traceback or gRPC's multi-line bind error; a database still starting beside the server is
waited for (--datastore-connect-timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator

import grpc

from kine_server import addresses
from kine_server.addresses import Address
from kine_server.config import Config
from kine_server.drivers import DatabaseTLS, Driver, DriverError, EndpointError, make_driver
from kine_server.drivers.base import DatabaseUnreachable
from kine_server.durations import format_duration
from kine_server.metrics import HttpEndpoint, Metrics
from kine_server.store.store import Store

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The server cannot start; the message is the one line the operator sees."""


#: How start-up errors name the gateway's listener: "cannot serve the gateway on ADDRESS: ...".
GATEWAY = "serve the gateway on"


def listen_addresses(config: Config) -> list[Address]:
    """The gRPC listeners, each checked against the TLS settings: one line if anything is off."""
    try:
        listening = config.listen_addresses()
    except ValueError as exc:
        raise StartupError(str(exc)) from exc
    for address in listening:
        if address.scheme == "https" and not config.server_cert_file:
            raise StartupError(
                f"cannot listen on {address}: https needs --server-cert-file and --server-key-file"
            )
    return listening


def advertise_check(config: Config, listening: list[Address]) -> None:
    """--advertise-client-urls, checked before anything starts."""
    try:
        config.advertise_urls(listening)
    except ValueError as exc:
        raise StartupError(str(exc)) from exc


#: Start-up's retries of an unreachable database: the first after this long, doubling up to
#: the most; the operator hears about it once it has lasted CONNECT_PATIENCE seconds.
CONNECT_RETRY_FIRST = 0.1
CONNECT_RETRY_MOST = 2.0
CONNECT_PATIENCE = 5.0


async def open_database(driver: Driver, timeout: float) -> None:
    """Open `driver`, retrying with backoff for up to `timeout` seconds while the database
    cannot be reached (--datastore-connect-timeout): a database started beside the server (by
    compose, a pod) may take a moment. Other errors (a password, TLS) fail at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay, warned = CONNECT_RETRY_FIRST, False
    while True:
        try:
            await driver.open()
            return
        except DatabaseUnreachable as exc:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise StartupError(
                    f"{exc} (gave up after --datastore-connect-timeout {format_duration(timeout)})"
                ) from exc
            if not warned and timeout - remaining >= CONNECT_PATIENCE:
                log.warning("%s; retrying for up to %s", exc, format_duration(timeout))
                warned = True
            log.debug("%s; retrying in %.1fs", exc, delay)
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, CONNECT_RETRY_MOST)
        except DriverError as exc:
            raise StartupError(str(exc)) from exc


def check_port_free(address: Address, what: str = "listen on") -> None:
    """Fail with one clear line ("cannot `what` ADDRESS: why") before gRPC would log its own
    multi-line bind error."""
    if address.is_unix:
        return
    try:
        addresses.bind(address).close()
    except OSError as exc:
        raise StartupError(f"cannot {what} {address}: {addresses.bind_error(exc)}") from exc


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Files created in the block get at most ~mask (the umask is the process's: only for a
    moment at start-up, when nothing else creates files)."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def _loopback(address: Address) -> bool:
    """Reachable only from this machine: a unix socket, localhost, 127.0.0.0/8 or ::1. A
    wildcard or a name that is not localhost counts as reachable from elsewhere."""
    if address.is_unix:
        return True
    host = address.host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_warnings(
    config: Config, listening: list[Address], gateway: Address | None, auth_enabled: bool = False
) -> list[str]:
    """What an operator must hear about the client listeners (gRPC and the gateway), as etcd
    warns: one reachable from other machines without TLS lets anyone on the network read and
    change every key (Kubernetes Secrets included), and see passwords and tokens; one with TLS
    but no client certificates lets anyone who can connect do the same, unless auth is on."""
    tls = bool(config.server_cert_file)
    listeners = [a for a in [*listening, *([gateway] if gateway else [])] if not _loopback(a)]
    warnings = []
    for address in listeners:
        url = address.url(tls)
        if not address.tls(tls):
            warnings.append(
                f"serving insecure client requests on {url}, this is strongly discouraged! "
                "Anyone who can reach it can read and change every key: serve TLS "
                "(--server-cert-file, --server-key-file) with client certificates "
                "(--trusted-ca-file)"
            )
        elif not config.trusted_ca_file and not auth_enabled:
            warnings.append(
                f"serving client requests on {url} without client certificates: anyone who can "
                "connect can read and change every key (auth is off); require them with "
                "--trusted-ca-file"
            )
    return warnings


def gateway_address(config: Config) -> Address:
    """--listen-gateway-urls. Its scheme must say what the listener serves: the gateway
    follows the gRPC listener's TLS settings, so https:// exactly when it has TLS."""
    url = config.listen_gateway_urls
    tls = bool(config.server_cert_file)
    where = f"--listen-gateway-urls {url}"
    try:
        address = addresses.parse(url)
    except ValueError as exc:
        raise StartupError(f"{where}: {exc}") from exc
    if address.scheme == "https" and not tls:
        raise StartupError(f"{where}: https needs --server-cert-file and --server-key-file")
    if address.scheme == "http" and tls:
        raise StartupError(f"{where}: the gateway serves TLS as the gRPC listener does: use https")
    # With --workers every listener is bound with SO_REUSEPORT, so the same port for the
    # gateway and gRPC would not fail to bind: the two would share it, each answering a part
    # of the connections. Refuse it, as a single process's busy port is refused.
    if address.port:
        with contextlib.suppress(ValueError):  # a malformed listen address fails on its own
            for grpc_listener in config.listen_addresses():
                if grpc_listener.port == address.port and not grpc_listener.is_unix:
                    raise StartupError(
                        f"{where}: the port is the gRPC listener's ({grpc_listener})"
                    )
    return address


def metrics_address(config: Config) -> Address | None:
    """--metrics-bind-address, None when disabled; an https:// URL needs the server's TLS."""
    try:
        address = config.metrics_address()
    except ValueError as exc:
        raise StartupError(str(exc)) from exc
    if address is not None and address.scheme == "https" and not config.server_cert_file:
        raise StartupError(
            f"cannot serve metrics on {address}: https needs --server-cert-file and "
            "--server-key-file"
        )
    return address


def metrics_ssl_context(config: Config, tls: bool = True) -> ssl.SSLContext | None:
    """The metrics listener and the gateway follow the gRPC listener's TLS settings (`tls`
    False: an http:// URL asked for plaintext)."""
    if not config.server_cert_file or not tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.server_cert_file, config.server_key_file)
    if config.trusted_ca_file:
        context.load_verify_locations(config.trusted_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS from --server-cert-file/--server-key-file; with --trusted-ca-file, clients must
    present a certificate signed by that CA or the handshake fails."""
    if not (config.server_cert_file or config.server_key_file or config.trusted_ca_file):
        return None
    if not (config.server_cert_file and config.server_key_file):
        raise StartupError("TLS needs both --server-cert-file and --server-key-file")
    try:
        with open(config.server_key_file, "rb") as key, open(config.server_cert_file, "rb") as cert:
            pair = (key.read(), cert.read())
        ca = None
        if config.trusted_ca_file:
            with open(config.trusted_ca_file, "rb") as file:
                ca = file.read()
    except OSError as exc:
        raise StartupError(f"cannot read TLS files: {exc}") from exc
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=ca is not None
    )


#: Reader connections of all --workers front-ends together, at most (each has at least 2): on
#: PostgreSQL every one is a server process, and its default max_connections is 100.
FRONTEND_READERS = 16


def open_driver(config: Config, read_only: bool = False) -> Driver:
    """The driver of `config`; `read_only`: a --workers front-end's, with its share of readers."""
    readers = max(2, FRONTEND_READERS // config.worker_count()) if read_only else None
    try:
        tls = DatabaseTLS(config.ca_file, config.cert_file, config.key_file, config.skip_verify)
        return make_driver(config.endpoint, tls, config.datastore_timeout, read_only, readers)
    except EndpointError as exc:
        raise StartupError(str(exc)) from exc


def reserve_port(address: Address, what: str = "listen on") -> tuple[socket.socket, Address]:
    """Bind (without listening) a TCP address with SO_REUSEPORT: the port stays this
    server's while `--workers` front-ends come and go, and port 0 becomes one concrete port
    for all of them."""
    check_port_free(address, what)
    try:
        reservation = addresses.bind(address, reuse_port=True)
    except OSError as exc:
        raise StartupError(f"cannot {what} {address}: {addresses.bind_error(exc)}") from exc
    return reservation, address.with_port(reservation.getsockname()[1])


def describe(
    config: Config,
    listening_urls: list[str],
    location: str,
    metrics: Address | None,
    gateway_url: str,
    workers: int,
    advertised: list[str],
) -> str:
    """The first line of the log: what is served where."""
    tls = bool(config.server_cert_file)
    parts = [
        f"serving etcd v3 on {', '.join(listening_urls)}",
        f"data in {location}",
        f"metrics on {'off' if metrics is None else metrics}",
    ]
    if gateway_url:
        parts.append(f"gateway on {gateway_url}")
    parts += [
        f"{workers} worker{'s' if workers != 1 else ''}",
        f"TLS {'on' if tls else 'off'}"
        + (" (client certificates required)" if config.trusted_ca_file else ""),
        f"member {config.member_name()!r} advertising {', '.join(advertised)}",
    ]
    return "; ".join(parts)


def bind_metrics(
    config: Config,
    metrics: Metrics,
    store: Store,
    watch_stats: Callable[[], tuple[int, int, int]],
    gather: Callable[[], Awaitable[list[tuple[int, bytes]]]] | None = None,
    serving: Callable[[], bool] | None = None,
) -> HttpEndpoint | None:
    """Bind the metrics listener, None when disabled; it accepts once the store runs
    (`accept()`). `gather` and `serving`: with `--workers`, the front-ends' metrics and whether
    any of them serves."""
    address = metrics_address(config)
    if address is None:
        return None
    tls = address.tls(bool(config.server_cert_file))
    endpoint = HttpEndpoint(
        metrics,
        store,
        address,
        metrics_ssl_context(config, tls),
        watch_stats,
        gather,
        serving,
    )
    try:
        endpoint.bind()
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {address}: {addresses.bind_error(exc)}"
        ) from exc
    return endpoint
