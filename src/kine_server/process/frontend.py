"""One `--workers` front-end process: serves gRPC on the port it shares with the others, reads
from the database itself and sends every write command to the writer process."""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import generate_latest

from kine_server import errors
from kine_server.config import Config
from kine_server.metrics import Metrics
from kine_server.process.parts import frontend_store
from kine_server.process.serving import GrpcServer
from kine_server.process.startup import (
    StartupError,
    advertise_check,
    listen_addresses,
    open_database,
    open_driver,
)

log = logging.getLogger(__name__)


class FrontendProcess:
    """Front-end number `worker`; `on_lost` is told when the writer process is gone."""

    def __init__(
        self, config: Config, writer_socket: str, worker: int, on_lost: Callable[[], None]
    ) -> None:
        self.config = config
        self.worker = worker
        self.driver = open_driver(config, read_only=True)
        self.store, self.link = frontend_store(config, self.driver, writer_socket, on_lost)
        self.metrics = Metrics(self.store)
        self.link.scrape = self._scrape
        self.grpc: GrpcServer | None = None
        self._store_started = False

    def _scrape(self) -> bytes:
        """This process's own metrics, for the writer's scrapes: requests it served, its
        watches."""
        state = self.metrics.state
        services = self.grpc.services if self.grpc is not None else None
        if services is not None:
            watch = services.watch
            state.streams, state.watchers = watch.stats.streams, watch.stats.watchers
            state.buffered_events = watch.buffered_events()
        return bytes(generate_latest(self.metrics.registry))

    async def start(self) -> None:
        """Connect to the writer, then serve; the writer hears once this one serves."""
        config = self.config
        listening = listen_addresses(config)
        grpc = GrpcServer(config, self.store, self.metrics, shared_port=True)
        advertise_check(config, listening)
        try:
            await open_database(self.driver, config.datastore_connect_timeout)
            cluster_id = await self.driver.meta("cluster_id") or 1
            self._store_started = True
            await self.store.start()
            self.grpc = grpc
            await grpc.start(listening, cluster_id)
        except errors.EtcdError as exc:
            await self._undo_start()
            raise StartupError(f"front-end {self.worker}: {exc.message}") from exc
        except BaseException:
            await self._undo_start()
            raise
        log.debug("front-end %d serving on %s", self.worker, ", ".join(grpc.listening_urls))
        self.link.ready(self.worker)

    async def _undo_start(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop(0)
            self.grpc = None
        if self._store_started:
            await self.store.stop()
            self._store_started = False
        await self.driver.close()

    async def stop(self) -> None:
        """Stop accepting and let in-flight requests finish (their writes still have a
        writer: the writer process stops after its front-ends), then close."""
        if self.grpc is not None:
            await self.grpc.stop(self.config.shutdown_grace)
            self.grpc = None
        await self.store.stop(self.config.shutdown_grace)
        await self.driver.close()
