"""The `--workers` writer process: the store's write side, the metrics, and the front-ends.

One Python process serves gRPC on one core (its interpreter lock). With `--workers`, the process
started by the operator becomes the writer: it owns the database's writes (one writer, so group
commit stays one transaction and one fsync per batch for every client), compaction, lease
expiry, the quota and the metrics listener, and serves no gRPC itself. Its front-end processes
each serve gRPC on the same ports (reserved here with SO_REUSEPORT; the kernel spreads
connections over them), read from the database themselves, and send their write commands here
(process/channel.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import tempfile

from kine_server.addresses import Address
from kine_server.config import Config
from kine_server.flags import aliases
from kine_server.metrics import HttpEndpoint
from kine_server.process.channel import WriterChannel
from kine_server.process.parts import writing_store
from kine_server.process.startup import (
    GATEWAY,
    advertise_check,
    bind_metrics,
    describe,
    gateway_address,
    insecure_warnings,
    listen_addresses,
    metrics_address,
    metrics_ssl_context,
    open_database,
    open_driver,
    reserve_port,
    server_credentials,
)
from kine_server.process.supervisor import Frontends

log = logging.getLogger(__name__)


class WriterProcess:
    """The parent of `--workers` front-ends; `argv` is the command line they are started with."""

    def __init__(self, config: Config, argv: list[str]) -> None:
        self.config = config
        self.driver = open_driver(config)
        parts = writing_store(config, self.driver)
        self.store, self.write_side, self.metrics = parts.store, parts.side, parts.metrics
        self._argv = argv
        self._directory = tempfile.mkdtemp(prefix="kine-server-")  # 0700
        self.frontends = Frontends(config.worker_count(), self._frontend_command)
        self._channel = WriterChannel(
            self.write_side, os.path.join(self._directory, "writer.sock"), self.frontends.ready
        )
        self._reservations: list[socket.socket] = []
        #: The listen addresses with the ports every front-end serves (port 0 made concrete).
        self.addresses: list[Address] = []
        #: --listen-gateway-urls with the port every front-end serves it on.
        self._gateway_at: Address | None = None
        self.http: HttpEndpoint | None = None
        self._store_started = False

    @property
    def port(self) -> int:
        return self.addresses[0].port if self.addresses else 0

    async def start(self) -> None:
        """As a single process: addresses, TLS files and ports first, then the database, the
        store, and the front-ends; whatever fails, one line."""
        config = self.config
        listening = listen_addresses(config)
        # Fail here, in one line, on TLS settings every front-end would refuse.
        server_credentials(config)
        metrics_address(config)
        metrics_ssl_context(config)
        advertise_check(config, listening)
        try:
            for address in listening:
                reservation, bound = reserve_port(address)
                self._reservations.append(reservation)
                self.addresses.append(bound)
            if config.listen_gateway_urls:
                reservation, self._gateway_at = reserve_port(gateway_address(config), GATEWAY)
                self._reservations.append(reservation)
            self.http = bind_metrics(
                config,
                self.metrics,
                self.store,
                lambda: (0, 0, 0),  # the front-ends count their watches
                self._channel.scrape,
                lambda: self._channel.frontends > 0,
            )
            await open_database(self.driver, config.datastore_connect_timeout)
            self._store_started = True
            await self.store.start()
            if self.http is not None:
                self.http.accept()
            await self._channel.start()
            await self.frontends.start()
        except BaseException:
            await self._undo()
            raise
        tls = bool(config.server_cert_file)
        log.info(
            "kine-server %s",
            describe(
                config,
                [address.url(tls) for address in self.addresses],
                self.driver.location,
                None if self.http is None else self.http.address,
                self._gateway_url(),
                self.frontends.count,
                config.advertise_urls(self.addresses),
            ),
        )
        enabled = self.store.auth.state.enabled
        for warning in insecure_warnings(config, self.addresses, self._gateway_at, enabled):
            log.warning(warning)

    def _gateway_url(self) -> str:
        """The gateway's URL with its reserved port; empty when it is not served."""
        tls = bool(self.config.server_cert_file)
        return "" if self._gateway_at is None else self._gateway_at.url(tls)

    def _frontend_command(self, worker: int) -> list[str]:
        """The command line's flags, then what this process decided: the ports reserved (over
        whichever of kine's or etcd's names the command line used), no metrics listener."""
        return [
            sys.executable,
            "-m",
            "kine_server",
            "frontend",
            self._channel.path,
            str(worker),
            *self._argv,
            *aliases("listen_address", ",".join(map(str, self.addresses))),
            *aliases("metrics_bind_address", "0"),
            "--listen-gateway-urls",
            self._gateway_url(),
            "--workers",
            str(self.frontends.count),  # sizes its database pool (see open_driver)
        ]

    async def stop(self) -> None:
        """Front-ends first (they finish their requests, whose writes this process applies),
        then the writer: everything within --shutdown-grace."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace
        await self.frontends.stop(self.config.shutdown_grace)
        await self._undo(max(0.0, deadline - loop.time()))

    async def _undo(self, timeout: float | None = None) -> None:
        await self.frontends.kill()
        await self._channel.stop()
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self._store_started:
            await self.store.stop(timeout)
            self._store_started = False
        await self.driver.close()
        for reservation in self._reservations:
            reservation.close()
        self._reservations.clear()
        with contextlib.suppress(OSError):
            os.unlink(self._channel.path)
        with contextlib.suppress(OSError):
            os.rmdir(self._directory)
