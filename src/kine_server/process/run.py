"""Entry points of the processes: run until SIGTERM or SIGINT, then stop within the grace.

`serve` runs what the operator started: one process (`--workers 1`) or the writer process with
its front-ends; `serve_frontend` runs one front-end, started by the writer process.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Sequence

from kine_server import sd_notify
from kine_server.config import Config
from kine_server.process.frontend import FrontendProcess
from kine_server.process.single import SingleProcess
from kine_server.process.writer import WriterProcess

log = logging.getLogger(__name__)

#: The cyclic garbage collector's generation-0 threshold (Python's default: 700). Every request
#: allocates a few hundred objects (messages, coroutines, futures), so at 700 the collector ran
#: several times per request batch and took 4-7% of each process's time in profiles; at this
#: threshold, with the start-up objects frozen out of its scans, about a tenth less CPU per Put.
GC_THRESHOLD = (50_000, 50, 100)


#: A front-end's exit status when it lost its writer process.
WRITER_GONE_EXIT = 1


def settle_garbage_collector() -> None:
    """Once started: what exists now (modules, descriptors, the server) lives as long as the
    process, so the collector need never scan it again."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (handled from before any port opens: none is missed)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(config: Config, argv: Sequence[str] = ()) -> None:
    """Run as one process, or with `--workers` as a writer process and its front-ends, which
    are started with `argv` (the command line's flags) and the front-end's own."""
    stop = _stop_on_signals()
    if config.worker_count() > 1:
        writer = WriterProcess(config, list(argv))
        if await _started_unless_stopped(writer.start(), stop, config.shutdown_grace):
            settle_garbage_collector()
            await sd_notify.serving_until(stop, os.environ)
            log.info("kine-server shutting down")
            await writer.stop()
        return
    server = SingleProcess(config)
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


async def serve_frontend(config: Config, writer_socket: str, worker: int) -> None:
    """A `--workers` front-end process: serve until told to stop, or until the writer is gone."""
    stop = _stop_on_signals()

    def on_lost() -> None:
        # The writer process is gone (a crash: an orderly stop stops the front-ends first), so
        # the server is gone too: exit as it did, at once. Clients' connections then reset
        # and their calls fail UNAVAILABLE, which they retry. A graceful stop kept the port
        # for its grace while gRPC core cancelled the calls still arriving on open connections
        # (CANCELLED, which clients do not retry: seen in the kill -9 soak).
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(WRITER_GONE_EXIT)

    frontend = FrontendProcess(config, writer_socket, worker, on_lost)
    await frontend.start()
    settle_garbage_collector()
    await stop.wait()
    await frontend.stop()
