"""The whole server in one process (`--workers 1`): gRPC, the store with its write side, metrics.

The lowest latency for a single sequential client (no hop between processes), and what the
in-process tests run.
"""

from __future__ import annotations

import asyncio
import logging

from kine_server.api.watch import WatchService
from kine_server.config import Config
from kine_server.drivers import Driver
from kine_server.metrics import HttpEndpoint
from kine_server.process.parts import writing_store
from kine_server.process.serving import GrpcServer
from kine_server.process.startup import (
    GATEWAY,
    advertise_check,
    bind_metrics,
    check_port_free,
    describe,
    gateway_address,
    insecure_warnings,
    listen_addresses,
    open_database,
    open_driver,
)

log = logging.getLogger(__name__)


class SingleProcess:
    """One kine-server process serving everything."""

    def __init__(self, config: Config, driver: Driver | None = None) -> None:
        self.config = config
        self.driver = driver or open_driver(config)
        parts = writing_store(config, self.driver)
        #: What the gRPC services use.
        self.store = parts.store
        #: The writer, compactor, lessor, alarms and quota (tests reach into them).
        self.write_side = parts.side
        self.metrics = parts.metrics
        self.grpc: GrpcServer | None = None
        self.http: HttpEndpoint | None = None
        self._store_started = False

    @property
    def port(self) -> int:
        """The first listen URL's port (the kernel's choice for port 0)."""
        return self.grpc.port if self.grpc is not None else 0

    @property
    def watch(self) -> WatchService | None:
        services = self.grpc.services if self.grpc is not None else None
        return services.watch if services is not None else None

    def _watch_stats(self) -> tuple[int, int, int]:
        watch = self.watch  # made once the port is open; until then there are no watches
        if watch is None:
            return 0, 0, 0
        return watch.stats.streams, watch.stats.watchers, watch.buffered_events()

    async def start(self) -> None:
        """Check and bind what can fail cheaply (addresses, TLS files, ports) before the
        database is opened and the store's tasks run: a failed start prints one line only.
        The gRPC port opens last: once a client can connect, the store, its background tasks
        and the metrics listener are all up (a TCP probe means ready)."""
        config = self.config
        listening = listen_addresses(config)
        grpc = GrpcServer(config, self.store, self.metrics, shared_port=False)
        advertise_check(config, listening)
        for address in listening:
            check_port_free(address)
        if config.listen_gateway_urls:
            check_port_free(gateway_address(config), GATEWAY)
        try:
            self.http = bind_metrics(config, self.metrics, self.store, self._watch_stats)
            await open_database(self.driver, config.datastore_connect_timeout)
            cluster_id = await self.driver.meta("cluster_id") or 1
            self._store_started = True
            await self.store.start()
            if self.http is not None:
                self.http.accept()
            self.grpc = grpc
            await grpc.start(listening, cluster_id)
        except BaseException:
            await self._undo_start()
            raise
        log.info(
            "kine-server %s",
            describe(
                config,
                grpc.listening_urls,
                self.driver.location,
                None if self.http is None else self.http.address,
                grpc.gateway_url,
                1,
                grpc.advertised,
            ),
        )
        gateway = None if grpc.gateway_listener is None else grpc.gateway_listener.address
        enabled = self.store.auth.state.enabled
        for warning in insecure_warnings(config, grpc.bound, gateway, enabled):
            log.warning(warning)

    async def _undo_start(self) -> None:
        """A start that failed half way: stop what did start, in order, so that its only output
        is the error that stopped it (not the store's tasks failing on a closed driver)."""
        if self.grpc is not None:
            await self.grpc.stop(0)
            self.grpc = None
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self._store_started:
            await self.store.stop()
            self._store_started = False
        await self.driver.close()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, then close the store and the database:
        all within --shutdown-grace (and the second the database connections get to close)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self.grpc is not None:
            await self.grpc.stop(self.config.shutdown_grace)
            self.grpc = None
        await self.store.stop(max(0.0, deadline - loop.time()))
        await self.driver.close()

    async def wait(self) -> None:
        if self.grpc is not None:
            await self.grpc.wait()
