"""Wires the store to the gRPC services and runs them: listen, serve, shut down cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import shutil
import signal
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence

import grpc
from prometheus_client import generate_latest

from kine_server import addresses, errors, sd_notify
from kine_server.addresses import Address
from kine_server.api import decoding
from kine_server.api.auth import AuthService, Credentials
from kine_server.api.cluster import ClusterService
from kine_server.api.common import Member
from kine_server.api.health import HealthService
from kine_server.api.kv import KVService
from kine_server.api.lease import LeaseService
from kine_server.api.maintenance import MaintenanceService
from kine_server.api.watch import WatchService, WatchSettings
from kine_server.config import GRPC_OVERHEAD_BYTES, Config
from kine_server.drivers import DatabaseTLS, Driver, DriverError, EndpointError, make_driver
from kine_server.drivers.base import DatabaseUnreachable
from kine_server.durations import format_duration
from kine_server.gateway.service import CORS_HEADERS, Gateway
from kine_server.httpd import HttpListener
from kine_server.metrics import HttpEndpoint, Metrics, health
from kine_server.pb import health_pb2_grpc, rpc_pb2_grpc
from kine_server.store.alarms import member_id
from kine_server.store.compactor import CompactionSettings, Compactor
from kine_server.store.frontend import FrontendStore
from kine_server.store.store import Storage, Store
from kine_server.store.tokens import make_tokens

log = logging.getLogger(__name__)


#: How start-up errors name the gateway's listener: "cannot serve the gateway on ADDRESS: ...".
GATEWAY = "serve the gateway on"


class StartupError(Exception):
    """The server cannot start; the message is the one line the operator sees."""


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
def _umask(mask: int) -> Iterator[None]:
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


class _Services:
    """Stands in for the server while the generated code registers a service: keeps each method,
    with a deserializer that never raises and timed for metrics, in a generic handler only.

    grpcio's aio server waits, for every incoming call, on one request future per *registered*
    method (an asyncio.wait over some 50 futures here: 12% of the event loop at 2,000 writes/s);
    all generic handlers share one future and are found by method name.
    """

    def __init__(self, metrics: Metrics, max_txn_ops: int) -> None:
        self._metrics = metrics
        self._max_txn_ops = max_txn_ops
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        pass  # the same methods come to add_registered_method_handlers, where they can be timed

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.add(service, handlers)

    def add(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        timed = {
            name: self._metrics.timed(
                name, decoding.guarded(f"/{service}/{name}", handler, self._max_txn_ops)
            )
            for name, handler in handlers.items()
        }
        self.handlers.append(grpc.method_handlers_generic_handler(service, timed))


#: Reader connections of all --workers front-ends together, at most (each has at least 2): on
#: PostgreSQL every one is a server process, and its default max_connections is 100.
FRONTEND_READERS = 16
#: Gateway connections served at once: each watch over HTTP holds one for as long as it lasts.
GATEWAY_MAX_CONNECTIONS = 1000


def open_driver(config: Config, read_only: bool = False) -> Driver:
    """The driver of `config`; `read_only`: a --workers front-end's, with its share of readers."""
    readers = max(2, FRONTEND_READERS // config.worker_count()) if read_only else None
    try:
        tls = DatabaseTLS(config.ca_file, config.cert_file, config.key_file, config.skip_verify)
        return make_driver(config.endpoint, tls, config.datastore_timeout, read_only, readers)
    except EndpointError as exc:
        raise StartupError(str(exc)) from exc


def make_store(config: Config, driver: Driver) -> Store:
    """The store that does the writes, with the settings of `config`."""
    return Store(
        driver,
        Compactor(
            driver,
            CompactionSettings(
                interval=config.compact_interval,
                jitter_percent=config.compact_interval_jitter,
                min_retain=config.compact_min_retain,
                batch_size=config.compact_batch_size,
                timeout=config.compact_timeout,
            ),
        ),
        poll_interval=config.poll_interval,
        poll_batch_size=config.poll_batch_size,
        quota_bytes=config.quota_backend_bytes,
        member_name=config.member_name(),
    )


class Server:
    """One kine-server process serving gRPC: the whole server, or one of `--workers` front-ends."""

    def __init__(self, config: Config, driver: Driver | None = None) -> None:
        self.config = config
        self.driver = driver or open_driver(config)
        self.store = make_store(config, self.driver)
        self._init_serving(self.store)
        self.store.writer.observe = self.metrics.observe_batch
        self.store.writer.slow_threshold = config.slow_sql_threshold
        self.store.slow_threshold = config.slow_sql_threshold

    def _init_serving(self, store: Storage) -> None:
        self.serving: Storage = store
        #: gRPC's port is shared with the other front-ends (SO_REUSEPORT); else it must be free.
        self.shared_port = False
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self._credentials: grpc.ServerCredentials | None = None
        self.watch: WatchService | None = None
        self.lease: LeaseService | None = None
        self.metrics = Metrics(store)
        self.http: HttpEndpoint | None = None
        self._gateway: Gateway | None = None
        self._gateway_listener: HttpListener | None = None
        self._gateway_directory: str | None = None
        self._store_started = False
        self.listening_urls: list[str] = []
        self._bound: list[Address] = []
        self.advertised: list[str] = []

    async def start(self) -> None:
        """Check and bind what can fail cheaply (addresses, TLS files, ports) before the
        database is opened and the store's tasks run: a failed start prints one line only."""
        listening = listen_addresses(self.config)
        self._credentials = server_credentials(self.config)
        advertise_check(self.config, listening)
        if not self.shared_port:
            for address in listening:
                check_port_free(address)
            if self.config.listen_gateway_urls:
                check_port_free(gateway_address(self.config), GATEWAY)
        try:
            self._bind_metrics()
            await open_database(self.driver, self.config.datastore_connect_timeout)
            await self._serve(listening)
        except BaseException:
            await self._undo_start()
            raise
        self._started()

    def _started(self) -> None:
        log.info("kine-server %s", self.describe())
        gateway = None if self._gateway_listener is None else self._gateway_listener.address
        enabled = self.serving.auth.state.enabled
        for warning in insecure_warnings(self.config, self._bound, gateway, enabled):
            log.warning(warning)

    def describe(self, workers: int = 1, gateway: str = "") -> str:
        """The first line of the log: what is served where."""
        metrics = "off" if self.http is None else str(self.http.address)
        parts = [
            f"serving etcd v3 on {', '.join(self.listening_urls)}",
            f"data in {self.driver.location}",
            f"metrics on {metrics}",
        ]
        if self._gateway_listener is not None:
            gateway = self._gateway_listener.address.url(self._credentials is not None)
        if gateway:
            parts.append(f"gateway on {gateway}")
        parts += [
            f"{workers} worker{'s' if workers != 1 else ''}",
            f"TLS {'on' if self._credentials is not None else 'off'}"
            + (" (client certificates required)" if self.config.trusted_ca_file else ""),
            f"member {self.config.member_name()!r} advertising {', '.join(self.advertised)}",
        ]
        return "; ".join(parts)

    async def _serve(self, listening: list[Address]) -> None:
        """Start everything, the gRPC port last: once a client can connect, the store, its
        background tasks and the metrics listener are all up (a TCP probe means ready)."""
        cluster_id = await self.driver.meta("cluster_id") or 1
        name = self.config.member_name()
        self._store_started = True
        await self.serving.start()
        if self.http is not None:
            self.http.accept()
        server = grpc.aio.server(
            options=[
                # A busy port must fail, not be shared; --workers front-ends share theirs.
                ("grpc.so_reuseport", int(self.shared_port)),
                (
                    "grpc.max_receive_message_length",
                    self.config.max_request_bytes + GRPC_OVERHEAD_BYTES,
                ),
                ("grpc.max_send_message_length", 2**31 - 1),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
                # The aio server asks gRPC core for one incoming call at a time; calls that
                # arrive faster wait in core's pending queue, which by default sheds them past
                # 1,000 (every one past 3,000) by dropping the call: the client sees CANCELLED,
                # which it does not retry. etcd queues them (a goroutine per stream); so do we.
                ("grpc.server.max_pending_requests", 2**31 - 1),
                ("grpc.server.max_pending_requests_hard_limit", 2**31 - 1),
            ],
        )
        # gRPC core listens as soon as a port is added, not at start(): the gateway's
        # listener opens first, so that a client that reaches the gRPC port reaches it too.
        if self.config.listen_gateway_urls:
            self._bind_gateway(self._add_gateway_port(server))
        self._add_ports(server, listening)
        # From here to server.start() nothing awaits: connections wait in the listen backlog.
        member = Member(
            cluster_id=cluster_id,
            member_id=member_id(cluster_id, name),
            name=name,
            client_urls=self.advertised,
        )
        store = self.serving
        credentials = Credentials(
            store,
            make_tokens(self.config.auth_token, self.config.auth_token_ttl),
            certificate_users=bool(self.config.trusted_ca_file),
        )
        services = _Services(self.metrics, self.config.max_txn_ops)
        rpc_pb2_grpc.add_KVServicer_to_server(
            KVService(
                store,
                member,
                credentials,
                self.config.max_request_bytes,
                self.config.max_txn_ops,
            ),
            services,
        )
        rpc_pb2_grpc.add_MaintenanceServicer_to_server(
            MaintenanceService(store, member, credentials, self.config.emulated_etcd_version),
            services,
        )
        rpc_pb2_grpc.add_ClusterServicer_to_server(ClusterService(store, member), services)
        self.watch = WatchService(
            store,
            member,
            credentials,
            WatchSettings(
                progress_interval=self.config.watch_progress_notify_interval,
                # etcd fragments above the same limit its gRPC layer accepts.
                max_response_bytes=self.config.max_request_bytes + GRPC_OVERHEAD_BYTES,
            ),
        )
        services.add("etcdserverpb.Watch", {"Watch": self.watch.handler()})
        self.lease = LeaseService(store, member, credentials)
        rpc_pb2_grpc.add_LeaseServicer_to_server(self.lease, services)
        rpc_pb2_grpc.add_AuthServicer_to_server(
            AuthService(store, member, credentials, self.config.bcrypt_cost), services
        )
        health_pb2_grpc.add_HealthServicer_to_server(HealthService(store), services)
        server.add_generic_rpc_handlers(services.handlers)
        self._server = server
        await server.start()
        for address in listening:
            if address.is_unix:
                os.chmod(address.path, 0o600)
        if self._gateway_listener is not None:
            self._gateway_listener.accept()

    def _add_ports(self, server: grpc.aio.Server, listening: list[Address]) -> None:
        """One port of the same server per listen URL, each with TLS or not as its scheme (or
        the certificate flags) say; port 0 becomes the kernel's choice, in the URLs reported."""
        tls = self._credentials is not None
        bound = []
        for address in listening:
            target = address.grpc_target()
            try:
                # gRPC binds a unix socket here, and it would be created with the umask's mode
                # (often 0755) until the chmod after start: created 0600, it is never open to
                # others, not even for the moment a connection could be made and kept.
                with _umask(0o177) if address.is_unix else contextlib.nullcontext():
                    if address.tls(tls) and self._credentials is not None:
                        port = server.add_secure_port(target, self._credentials)
                    else:
                        port = server.add_insecure_port(target)
            except RuntimeError as exc:
                raise StartupError(f"cannot listen on {address}: {exc}") from exc
            if port == 0 and not address.is_unix:
                raise StartupError(f"cannot listen on {address}: address already in use")
            bound.append(address if address.is_unix else address.with_port(port))
        self._bound = bound
        self.port = bound[0].port
        self.listening_urls = [address.url(tls) for address in bound]
        self.advertised = self.config.advertise_urls(bound)

    def _add_gateway_port(self, server: grpc.aio.Server) -> str:
        """A second, private port of the gRPC server for the gateway to call: a unix socket in
        a directory only this process's user can enter."""
        self._gateway_directory = tempfile.mkdtemp(prefix="kine-gateway-")  # 0700
        target = f"unix:{self._gateway_directory}/grpc.sock"
        server.add_insecure_port(target)
        return target

    def _bind_gateway(self, target: str) -> None:
        """Open the gateway's port before gRPC's: once a client can connect to the gRPC port,
        the gateway's accepts too (its connections wait until `accept`)."""
        address = gateway_address(self.config)
        self._gateway = Gateway(
            target,
            self.config.emulated_etcd_version,
            lambda: health(self.serving),
            self.config.max_request_bytes + GRPC_OVERHEAD_BYTES,
            tls=bool(self.config.server_cert_file),
        )
        self._gateway_listener = HttpListener(
            "gateway",
            address,
            self._gateway.handle,
            metrics_ssl_context(self.config),
            max_connections=GATEWAY_MAX_CONNECTIONS,
            # Bytes travel as base64 (a third larger) in JSON's quotes and escapes: the gRPC
            # server's own limit, on the decoded request, is the one that decides.
            max_body=2 * (self.config.max_request_bytes + GRPC_OVERHEAD_BYTES),
            headers=CORS_HEADERS,
            reuse_port=self.shared_port,
        )
        try:
            self._gateway_listener.bind()
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot {GATEWAY} {address}: {exc}") from exc

    async def _stop_gateway(self) -> None:
        if self._gateway_listener is not None:
            await self._gateway_listener.stop()
            self._gateway_listener = None
        if self._gateway is not None:
            await self._gateway.close()
            self._gateway = None
        if self._gateway_directory is not None:
            shutil.rmtree(self._gateway_directory, ignore_errors=True)
            self._gateway_directory = None

    async def _undo_start(self) -> None:
        """A start that failed half way: stop what did start, in order, so that its only output
        is the error that stopped it (not the store's tasks failing on a closed driver)."""
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
        if self.http is not None:
            await self.http.stop()
            self.http = None
        await self._stop_gateway()
        if self._store_started:
            await self.serving.stop()
            self._store_started = False
        await self.driver.close()

    def _bind_metrics(self) -> None:
        """Bind the metrics listener (it accepts once the store runs: `self.http.accept()`)."""
        address = metrics_address(self.config)
        if address is None:
            return

        def watch_stats() -> tuple[int, int, int]:
            watch = self.watch  # made once the port is open; until then there are no watches
            if watch is None:
                return 0, 0, 0
            return watch.stats.streams, watch.stats.watchers, watch.buffered_events()

        tls = address.tls(bool(self.config.server_cert_file))
        self.http = HttpEndpoint(
            self.metrics,
            self.serving,
            address,
            metrics_ssl_context(self.config, tls),
            watch_stats,
            *self._other_processes(),
        )
        try:
            self.http.bind()
        except OSError as exc:
            self.http = None
            raise StartupError(
                f"cannot serve metrics on {address}: {addresses.bind_error(exc)}"
            ) from exc

    def _other_processes(
        self,
    ) -> tuple[Callable[[], Awaitable[list[tuple[int, bytes]]]] | None, Callable[[], bool] | None]:
        """For the metrics listener: other processes' metrics, and whether any serves gRPC
        (--workers' writer process; a single process has none)."""
        return None, None

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, then close the store and the database:
        all within --shutdown-grace (and the second the database connections get to close)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace
        if self.http is not None:
            await self.http.stop()
            self.http = None
        await self._stop_gateway()
        if self._server is not None:
            # Streams never finish by themselves: end them now (UNAVAILABLE, so that clients
            # go to another endpoint or retry) instead of waiting out the grace period.
            for service in (self.watch, self.lease):
                if service is not None:
                    service.shutdown()
            await self._server.stop(self.config.shutdown_grace)
            self._server = None
        await self.serving.stop(max(0.0, deadline - loop.time()))
        await self.driver.close()

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


class FrontendServer(Server):
    """One of `--workers` front-end processes: serves gRPC on the port it shares with the
    others, reads from the database itself and hands every write to the writer process."""

    def __init__(
        self, config: Config, writer_socket: str, worker: int, on_lost: Callable[[], None]
    ) -> None:
        self.config = config
        self.driver = open_driver(config, read_only=True)
        self.frontend = FrontendStore(self.driver, writer_socket, on_lost)
        self.frontend.slow_threshold = config.slow_sql_threshold
        self.worker = worker
        self._init_serving(self.frontend)
        self.shared_port = True

        self.frontend.scrape = self._scrape

    def _scrape(self) -> bytes:
        """This process's own metrics: requests it served, its watches."""
        state = self.metrics.state
        watch = self.watch
        if watch is not None:
            state.streams, state.watchers = watch.stats.streams, watch.stats.watchers
            state.buffered_events = watch.buffered_events()
        return bytes(generate_latest(self.metrics.registry))

    def _started(self) -> None:
        log.debug("front-end %d serving on %s", self.worker, ", ".join(self.listening_urls))
        self.frontend.ready(self.worker)


#: The cyclic garbage collector's generation-0 threshold (Python's default: 700). Every request
#: allocates a few hundred objects (messages, coroutines, futures), so at 700 the collector ran
#: several times per request batch and took 4-7% of each process's time in profiles; at this
#: threshold, with the start-up objects frozen out of its scans, about a tenth less CPU per Put.
GC_THRESHOLD = (50_000, 50, 100)


def settle_garbage_collector() -> None:
    """Once started: what exists now (modules, descriptors, the server) lives as long as the
    process, so the collector need never scan it again."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


async def serve(config: Config, argv: Sequence[str] = ()) -> None:
    """Run until SIGTERM or SIGINT (handled from before the port opens, so none is missed):
    as one process, or with `--workers` as a writer process and its front-ends, which are
    started with `argv` (the command line's flags) and the front-end's own."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.worker_count() > 1:
        from kine_server.workers import WriterProcess

        writer = WriterProcess(config, list(argv))
        if await _started_unless_stopped(writer.start(), stop, config.shutdown_grace):
            settle_garbage_collector()
            await sd_notify.serving_until(stop, os.environ)
            log.info("kine-server shutting down")
            await writer.stop()
        return
    server = Server(config)
    await server.start()
    settle_garbage_collector()
    await sd_notify.serving_until(stop, os.environ)
    log.info("kine-server shutting down")
    await server.stop()


async def _started_unless_stopped(
    start: Awaitable[None], stop: asyncio.Event, grace: float
) -> bool:
    """Await `start`; if `stop` is set first (starting front-ends takes a while), give it up to
    `grace` seconds more to finish, then cancel it, which undoes what it started. Whether it
    started (then the caller stops it as usual)."""
    starting = asyncio.ensure_future(start)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not starting.done():
        await asyncio.wait({starting}, timeout=grace)
    if not starting.done():
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        return False
    starting.result()
    return True


class WriterGone(Exception):
    """A front-end lost its writer process: it stopped, and exits non-zero."""


async def serve_frontend(config: Config, writer_socket: str, worker: int) -> None:
    """A `--workers` front-end process: serve until told to stop, or until the writer is gone."""
    stop = asyncio.Event()
    lost = False

    def on_lost() -> None:
        nonlocal lost
        lost = True
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = FrontendServer(config, writer_socket, worker, on_lost)
    try:
        await server.start()
    except errors.EtcdError as exc:
        raise StartupError(f"front-end {worker}: {exc.message}") from exc
    settle_garbage_collector()
    await stop.wait()
    await server.stop()
    if lost:
        raise WriterGone()
