"""The gRPC server of a process that serves clients (one process, or a `--workers` front-end).

It binds every listen URL as a port of one grpc.aio server (TLS or not as each URL says), the
gateway's HTTP listener and its private gRPC port, registers etcd's services on the process's
store, and on stop ends the streams that never finish by themselves.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import grpc

from kine_server.addresses import Address
from kine_server.api.common import Member
from kine_server.api.registry import Services, services
from kine_server.config import GRPC_OVERHEAD_BYTES, Config
from kine_server.gateway.service import CORS_HEADERS, Gateway
from kine_server.httpd import HttpListener
from kine_server.maintenance.alarms import member_id
from kine_server.metrics import Metrics, health
from kine_server.process.startup import (
    GATEWAY,
    StartupError,
    gateway_address,
    metrics_ssl_context,
    server_credentials,
    umask,
)
from kine_server.store.store import Store

#: Gateway connections served at once: each watch over HTTP holds one for as long as it lasts.
GATEWAY_MAX_CONNECTIONS = 1000


def grpc_options(config: Config, shared_port: bool) -> list[tuple[str, int]]:
    """The server's channel options (bench/floor.py serves with the same)."""
    return [
        # A busy port must fail, not be shared; --workers front-ends share theirs.
        ("grpc.so_reuseport", int(shared_port)),
        ("grpc.max_receive_message_length", config.max_request_bytes + GRPC_OVERHEAD_BYTES),
        ("grpc.max_send_message_length", 2**31 - 1),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        # The aio server asks gRPC core for one incoming call at a time; calls that arrive
        # faster wait in core's pending queue, which by default sheds them past 1,000 (every
        # one past 3,000) by dropping the call: the client sees CANCELLED, which it does not
        # retry. etcd queues them (a goroutine per stream); so do we.
        ("grpc.server.max_pending_requests", 2**31 - 1),
        ("grpc.server.max_pending_requests_hard_limit", 2**31 - 1),
    ]


class GrpcServer:
    """etcd's gRPC services of one process on its listen URLs, and the HTTP/JSON gateway."""

    def __init__(self, config: Config, store: Store, metrics: Metrics, shared_port: bool) -> None:
        """`shared_port`: a `--workers` front-end, whose ports the others share (SO_REUSEPORT);
        otherwise a busy port fails the start."""
        self._config = config
        self._store = store
        self._metrics = metrics
        self._shared_port = shared_port
        self._credentials = server_credentials(config)
        self._server: grpc.aio.Server | None = None
        self.services: Services | None = None
        self._gateway: Gateway | None = None
        self.gateway_listener: HttpListener | None = None
        self._gateway_directory: str | None = None
        #: The listen addresses with the ports bound (port 0 made concrete).
        self.bound: list[Address] = []
        self.listening_urls: list[str] = []
        self.advertised: list[str] = []

    @property
    def port(self) -> int:
        return self.bound[0].port if self.bound else 0

    @property
    def gateway_url(self) -> str:
        """The gateway's URL with its bound port; empty when it is not served."""
        listener = self.gateway_listener
        return "" if listener is None else listener.address.url(self._credentials is not None)

    async def start(self, listening: list[Address], cluster_id: int) -> None:
        """Bind and serve. gRPC core listens as soon as a port is added, not at start(): the
        gateway's listener opens first, so that a client that reaches the gRPC port reaches it
        too; from the first port to server.start() nothing awaits, so connections wait in the
        listen backlog until every service is registered."""
        server = grpc.aio.server(options=grpc_options(self._config, self._shared_port))
        if self._config.listen_gateway_urls:
            self._bind_gateway(self._add_gateway_port(server))
        self._add_ports(server, listening)
        name = self._config.member_name()
        member = Member(
            cluster_id=cluster_id,
            member_id=member_id(cluster_id, name),
            name=name,
            client_urls=self.advertised,
        )
        self.services = services(self._config, self._store, member, self._metrics)
        server.add_generic_rpc_handlers(self.services.handlers)
        self._server = server
        await server.start()
        for address in listening:
            if address.is_unix:
                os.chmod(address.path, 0o600)
        if self.gateway_listener is not None:
            self.gateway_listener.accept()

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
                with umask(0o177) if address.is_unix else contextlib.nullcontext():
                    if address.tls(tls) and self._credentials is not None:
                        port = server.add_secure_port(target, self._credentials)
                    else:
                        port = server.add_insecure_port(target)
            except RuntimeError as exc:
                raise StartupError(f"cannot listen on {address}: {exc}") from exc
            if port == 0 and not address.is_unix:
                raise StartupError(f"cannot listen on {address}: address already in use")
            bound.append(address if address.is_unix else address.with_port(port))
        self.bound = bound
        self.listening_urls = [address.url(tls) for address in bound]
        self.advertised = self._config.advertise_urls(bound)

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
        config = self._config
        address = gateway_address(config)
        store = self._store
        self._gateway = Gateway(
            target,
            config.emulated_etcd_version,
            lambda: health(store),
            config.max_request_bytes + GRPC_OVERHEAD_BYTES,
            tls=bool(config.server_cert_file),
        )
        self.gateway_listener = HttpListener(
            "gateway",
            address,
            self._gateway.handle,
            metrics_ssl_context(config),
            max_connections=GATEWAY_MAX_CONNECTIONS,
            # Bytes travel as base64 (a third larger) in JSON's quotes and escapes: the gRPC
            # server's own limit, on the decoded request, is the one that decides.
            max_body=2 * (config.max_request_bytes + GRPC_OVERHEAD_BYTES),
            headers=CORS_HEADERS,
            reuse_port=self._shared_port,
        )
        try:
            self.gateway_listener.bind()
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot {GATEWAY} {address}: {exc}") from exc

    async def stop(self, grace: float) -> None:
        """Stop accepting, end the streams (UNAVAILABLE, so that clients go to another endpoint
        or retry, instead of the grace being waited out), and let unary calls finish within
        `grace` seconds."""
        await self._stop_gateway()
        if self._server is not None:
            if self.services is not None:
                self.services.shutdown()
            await self._server.stop(grace)
            self._server = None

    async def _stop_gateway(self) -> None:
        if self.gateway_listener is not None:
            await self.gateway_listener.stop()
            self.gateway_listener = None
        if self._gateway is not None:
            await self._gateway.close()
            self._gateway = None
        if self._gateway_directory is not None:
            shutil.rmtree(self._gateway_directory, ignore_errors=True)
            self._gateway_directory = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
