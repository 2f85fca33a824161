"""`--workers N`: one writer process and N front-end processes sharing the gRPC port.

One Python process serves gRPC on one core (its interpreter lock). With `--workers`, this
process becomes the writer: it owns the database's writes (one writer, so group commit stays
one transaction and one fsync per batch for every client), compaction, lease expiry, the quota
and the metrics listener, and it serves no gRPC itself. N front-end processes each serve gRPC on
the same port (the kernel spreads connections over them, SO_REUSEPORT), read from the database
themselves, and send their writes here (store/channel.py).

Supervision: a front-end that dies is started again (its clients reconnect, to any front-end);
a front-end whose writer process is gone exits, so the server never runs without its writer;
SIGTERM stops the front-ends first (their in-flight writes still have a writer), then the writer,
all within --shutdown-grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable

from kine_server import addresses
from kine_server.addresses import Address
from kine_server.cli import aliases
from kine_server.config import Config
from kine_server.process.channel import WriterChannel
from kine_server.server import (
    GATEWAY,
    Server,
    StartupError,
    advertise_check,
    check_port_free,
    gateway_address,
    insecure_warnings,
    listen_addresses,
    metrics_address,
    metrics_ssl_context,
    open_database,
    server_credentials,
)

log = logging.getLogger(__name__)

#: How long front-ends get to start before the server gives up.
START_TIMEOUT = 60.0
#: A front-end that ran at least this long before it died is restarted at once.
STABLE_SECONDS = 10.0


def reserve_port(address: Address, what: str = "listen on") -> tuple[socket.socket, Address]:
    """Bind (without listening) a TCP address with SO_REUSEPORT: the port stays this
    server's while front-ends come and go, and port 0 becomes one concrete port for all."""
    check_port_free(address, what)
    try:
        reservation = addresses.bind(address, reuse_port=True)
    except OSError as exc:
        raise StartupError(f"cannot {what} {address}: {addresses.bind_error(exc)}") from exc
    return reservation, address.with_port(reservation.getsockname()[1])


class WriterProcess(Server):
    """The parent of `--workers`: the store, the metrics listener, and the front-ends."""

    def __init__(self, config: Config, argv: list[str]) -> None:
        super().__init__(config)
        self.count = config.worker_count()
        self._argv = argv
        self._directory = tempfile.mkdtemp(prefix="kine-server-")  # 0700
        self._channel = WriterChannel(
            self.store, os.path.join(self._directory, "writer.sock"), self._ready
        )
        self._reservations: list[socket.socket] = []
        #: The listen addresses with the ports every front-end serves (port 0 made concrete).
        self.addresses: list[Address] = []
        #: --listen-gateway-urls with the port every front-end serves it on.
        self._gateway_at: Address | None = None
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._ready_event = asyncio.Event()
        self._supervisors: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def start(self) -> None:
        """As Server.start: addresses, TLS files and ports first, then the database, the
        store, and the front-ends; whatever fails, one line."""
        listening = listen_addresses(self.config)
        self._credentials_check()
        advertise_check(self.config, listening)
        try:
            for address in listening:
                reservation, bound = reserve_port(address)
                self._reservations.append(reservation)
                self.addresses.append(bound)
            self.port = self.addresses[0].port
            if self.config.listen_gateway_urls:
                reservation, self._gateway_at = reserve_port(gateway_address(self.config), GATEWAY)
                self._reservations.append(reservation)
            self._bind_metrics()
            await open_database(self.driver, self.config.datastore_connect_timeout)
            self._store_started = True
            await self.store.start()
            if self.http is not None:
                self.http.accept()
            await self._channel.start()
            await self._start_frontends()
        except BaseException:
            await self._undo()
            raise
        tls = bool(self.config.server_cert_file)
        self.listening_urls = [address.url(tls) for address in self.addresses]
        self.advertised = self.config.advertise_urls(self.addresses)
        log.info("kine-server %s", self.describe(self.count, self._gateway_url()))
        enabled = self.store.auth.state.enabled
        for warning in insecure_warnings(self.config, self.addresses, self._gateway_at, enabled):
            log.warning(warning)

    def _gateway_url(self) -> str:
        """The gateway's URL with its reserved port; empty when it is not served."""
        tls = bool(self.config.server_cert_file)
        return "" if self._gateway_at is None else self._gateway_at.url(tls)

    def _other_processes(
        self,
    ) -> tuple[Callable[[], Awaitable[list[tuple[int, bytes]]]] | None, Callable[[], bool] | None]:
        return self._channel.scrape, lambda: self._channel.frontends > 0

    def _credentials_check(self) -> None:
        """Fail here, in one line, on TLS settings every front-end would refuse."""
        server_credentials(self.config)
        metrics_address(self.config)
        metrics_ssl_context(self.config)

    async def _start_frontends(self) -> None:
        """Start every front-end; return once one serves (clients are served from then on, and
        a TCP probe of the port means ready, as with one process). One that fails before any
        serves fails the start: its error (on stderr) is what every front-end would hit."""
        for worker in range(1, self.count + 1):
            await self._spawn(worker)
        ready = asyncio.ensure_future(self._ready_event.wait())
        exits = {asyncio.ensure_future(process.wait()) for process in self._processes.values()}
        try:
            done, _ = await asyncio.wait(
                {ready, *exits}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for future in (ready, *exits):
                future.cancel()
        if not self._ready_event.is_set():
            if done:
                raise StartupError("a front-end process could not start (its error is above)")
            raise StartupError(f"front-end processes did not start within {START_TIMEOUT:.0f}s")
        for worker in self._processes:
            self._supervise(worker)

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
            str(self.count),  # sizes its database pool (see open_driver)
        ]

    async def _spawn(self, worker: int) -> None:
        self._processes[worker] = await asyncio.create_subprocess_exec(
            *self._frontend_command(worker), stdin=asyncio.subprocess.DEVNULL
        )

    def _ready(self, worker: int) -> None:
        log.debug("front-end process %d serves", worker)
        self._ready_event.set()

    def _supervise(self, worker: int) -> None:
        task = asyncio.create_task(self._keep_running(worker), name=f"kine-frontend-{worker}")
        self._supervisors.add(task)
        task.add_done_callback(self._supervisors.discard)

    async def _keep_running(self, worker: int) -> None:
        """Start front-end `worker` again whenever it dies, waiting longer while it keeps dying
        at once (a broken database or a bug must not become a fork loop)."""
        loop = asyncio.get_running_loop()
        backoff = 0.5
        while True:
            began = loop.time()
            code = await self._processes[worker].wait()
            if self._stopping:
                return
            if loop.time() - began >= STABLE_SECONDS:
                backoff = 0.5
            log.warning(
                "front-end process %d exited (%s); starting it again in %.1fs",
                worker,
                _describe(code),
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            if self._stopping:
                return
            try:
                await self._spawn(worker)
            except OSError as exc:
                log.error("cannot start front-end process %d: %s", worker, exc)

    async def stop(self) -> None:
        """Front-ends first (they finish their requests, whose writes this process applies),
        then the writer: everything within --shutdown-grace."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_grace
        self._stopping = True
        for task in self._supervisors:
            task.cancel()
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        for worker, process in self._processes.items():
            try:
                await asyncio.wait_for(process.wait(), max(0.1, deadline - loop.time()))
            except TimeoutError:
                log.warning("front-end process %d did not stop in time: killing it", worker)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        await self._undo(max(0.0, deadline - loop.time()))

    async def _undo(self, timeout: float | None = None) -> None:
        self._stopping = True
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
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


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
