"""Wires the store to the gRPC services and runs them: listen, serve, shut down cleanly."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
import shutil
import signal
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Sequence

import grpc
from prometheus_client import generate_latest

from kine_server import errors
from kine_server.api import decoding
from kine_server.api.auth import AuthService
from kine_server.api.cluster import ClusterService
from kine_server.api.common import Member
from kine_server.api.health import HealthService
from kine_server.api.kv import KVService
from kine_server.api.lease import LeaseService
from kine_server.api.maintenance import MaintenanceService
from kine_server.api.watch import WatchService, WatchSettings
from kine_server.config import GRPC_OVERHEAD_BYTES, Config
from kine_server.drivers import DatabaseTLS, Driver, DriverError, EndpointError, make_driver
from kine_server.gateway.service import CORS_HEADERS, Gateway
from kine_server.httpd import HttpListener
from kine_server.metrics import HttpEndpoint, Metrics, health
from kine_server.pb import health_pb2_grpc, rpc_pb2_grpc
from kine_server.store.compactor import CompactionSettings, Compactor
from kine_server.store.frontend import FrontendStore
from kine_server.store.store import Storage, Store

log = logging.getLogger(__name__)


class StartupError(Exception):
    """The server cannot start; the message is the one line the operator sees."""


def grpc_address(listen_address: str) -> str:
    """kine's listen syntax (HOST:PORT or unix://PATH) to gRPC's."""
    if listen_address.startswith("unix://"):
        return "unix:" + listen_address[len("unix://") :]
    _, sep, port = listen_address.rpartition(":")
    if not sep or not port.isdigit():
        raise StartupError(
            f"invalid --listen-address {listen_address!r}: expected HOST:PORT or unix://PATH"
        )
    return listen_address


def check_port_free(listen_address: str) -> None:
    """Fail with one clear line before gRPC would log its own multi-line bind error."""
    if listen_address.startswith("unix://"):
        return
    host, _, port = listen_address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError as exc:
        raise StartupError(f"cannot listen on {listen_address}: {exc}") from exc
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # As gRPC's own bind: connections of a previous run in TIME_WAIT must not block a
        # restart (a live listener still does).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            raise StartupError(f"cannot listen on {listen_address}: {exc.strerror}") from exc


def client_url(listen_address: str, port: int, tls: bool) -> str:
    if listen_address.startswith("unix://"):
        return listen_address
    host = listen_address.rpartition(":")[0] or "127.0.0.1"
    if host in ("0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{'https' if tls else 'http'}://{host}:{port}"


def gateway_address(config: Config) -> str:
    """--listen-gateway-urls as HOST:PORT. Its scheme must say what the listener serves: the
    gateway follows the gRPC listener's TLS settings, so https:// exactly when it has TLS."""
    url = config.listen_gateway_urls
    tls = bool(config.server_cert_file)
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = ("https" if tls else "http"), url
    where = f"--listen-gateway-urls {url}"
    if scheme not in ("http", "https"):
        raise StartupError(f"{where}: must be http://HOST:PORT or https://HOST:PORT")
    if scheme == "https" and not tls:
        raise StartupError(f"{where}: https needs --server-cert-file and --server-key-file")
    if scheme == "http" and tls:
        raise StartupError(f"{where}: the gateway serves TLS as the gRPC listener does: use https")
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise StartupError(f"{where}: needs HOST:PORT with a port from 0 to 65535")
    return f"{host}:{port}"


def metrics_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The metrics listener follows the gRPC listener's TLS settings."""
    if not config.server_cert_file:
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


def member_id(cluster_id: int, name: str) -> int:
    """A stable member id: the same store served under the same name keeps its id across restarts."""
    digest = hashlib.sha256(f"{cluster_id}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF or 1


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

    async def start(self) -> None:
        address = grpc_address(self.config.listen_address)
        self._credentials = server_credentials(self.config)
        if not self.shared_port:
            check_port_free(self.config.listen_address)
        try:
            await self.driver.open()
        except DriverError as exc:
            raise StartupError(str(exc)) from exc
        try:
            await self._serve(address)
        except BaseException:
            await self._undo_start()
            raise
        self._started()

    def _started(self) -> None:
        log.info(
            "kine-server serving etcd v3 on %s (%s)", self.config.listen_address, self.driver.name
        )

    async def _serve(self, address: str) -> None:
        """Start everything, the gRPC port last: once a client can connect, the store, its
        background tasks and the metrics listener are all up (a TCP probe means ready)."""
        cluster_id = await self.driver.meta("cluster_id") or 1
        name = socket.gethostname()
        self._store_started = True
        await self.serving.start()
        await self._start_metrics()
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
        try:
            if self._credentials is None:
                self.port = server.add_insecure_port(address)
            else:
                self.port = server.add_secure_port(address, self._credentials)
        except RuntimeError as exc:
            raise StartupError(f"cannot listen on {self.config.listen_address}: {exc}") from exc
        if self.port == 0:
            raise StartupError(f"cannot listen on {self.config.listen_address}: address in use")
        if self.config.listen_gateway_urls:
            self._bind_gateway(self._add_gateway_port(server))
        # From here to server.start() nothing awaits: connections wait in the listen backlog.
        member = Member(
            cluster_id=cluster_id,
            member_id=member_id(cluster_id, name),
            name=name,
            client_urls=[
                client_url(self.config.listen_address, self.port, self._credentials is not None)
            ],
        )
        store = self.serving
        services = _Services(self.metrics, self.config.max_txn_ops)
        rpc_pb2_grpc.add_KVServicer_to_server(
            KVService(store, member, self.config.max_request_bytes, self.config.max_txn_ops),
            services,
        )
        rpc_pb2_grpc.add_MaintenanceServicer_to_server(
            MaintenanceService(store, member, self.config.emulated_etcd_version), services
        )
        rpc_pb2_grpc.add_ClusterServicer_to_server(ClusterService(store, member), services)
        self.watch = WatchService(
            store,
            member,
            WatchSettings(
                progress_interval=self.config.watch_progress_notify_interval,
                # etcd fragments above the same limit its gRPC layer accepts.
                max_response_bytes=self.config.max_request_bytes + GRPC_OVERHEAD_BYTES,
            ),
        )
        services.add("etcdserverpb.Watch", {"Watch": self.watch.handler()})
        self.lease = LeaseService(store, member)
        rpc_pb2_grpc.add_LeaseServicer_to_server(self.lease, services)
        rpc_pb2_grpc.add_AuthServicer_to_server(AuthService(), services)
        health_pb2_grpc.add_HealthServicer_to_server(HealthService(store), services)
        server.add_generic_rpc_handlers(services.handlers)
        self._server = server
        await server.start()
        if address.startswith("unix:"):
            os.chmod(address[len("unix:") :], 0o600)
        if self._gateway_listener is not None:
            self._gateway_listener.accept()

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
            raise StartupError(f"cannot serve the gateway on {address}: {exc}") from exc

    @property
    def gateway_port(self) -> int:
        return 0 if self._gateway_listener is None else self._gateway_listener.port

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
        if self.http is not None:
            await self.http.stop()
            self.http = None
        await self._stop_gateway()
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
        if self._store_started:
            await self.serving.stop()
        await self.driver.close()

    async def _start_metrics(self) -> None:
        address = self.config.metrics_bind_address
        if address in ("", "0"):
            return

        def watch_stats() -> tuple[int, int, int]:
            watch = self.watch  # made once the port is open; until then there are no watches
            if watch is None:
                return 0, 0, 0
            return watch.stats.streams, watch.stats.watchers, watch.buffered_events()

        self.http = HttpEndpoint(
            self.metrics,
            self.serving,
            address,
            metrics_ssl_context(self.config),
            watch_stats,
            *self._other_processes(),
        )
        try:
            await self.http.start()
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot serve metrics on {address}: {exc}") from exc

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
        log.debug("front-end %d serving on %s", self.worker, self.config.listen_address)
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
            await stop.wait()
            log.info("kine-server shutting down")
            await writer.stop()
        return
    server = Server(config)
    await server.start()
    settle_garbage_collector()
    await stop.wait()
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
