"""The writer process's front-ends: started, kept running, and stopped first.

A front-end that dies is started again (its clients reconnect, to any front-end), waiting longer
while it keeps dying at once (a broken database or a bug must not become a fork loop); SIGTERM
stops the front-ends before the writer, so their in-flight writes still have a writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from kine_server.process.startup import StartupError

log = logging.getLogger(__name__)

#: How long front-ends get to start before the server gives up.
START_TIMEOUT = 60.0
#: A front-end that ran at least this long before it died is restarted at once.
STABLE_SECONDS = 10.0


class Frontends:
    """`count` front-end processes, each started with `command(worker)`."""

    def __init__(self, count: int, command: Callable[[int], list[str]]) -> None:
        self.count = count
        self._command = command
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._ready = asyncio.Event()
        self._supervisors: set[asyncio.Task[None]] = set()
        self._stopping = False

    def ready(self, worker: int) -> None:
        """Front-end `worker` says it serves gRPC (through the writer's channel)."""
        log.debug("front-end process %d serves", worker)
        self._ready.set()

    async def start(self) -> None:
        """Start every front-end; return once one serves (clients are served from then on, and
        a TCP probe of the port means ready, as with one process). One that fails before any
        serves fails the start: its error (on stderr) is what every front-end would hit."""
        for worker in range(1, self.count + 1):
            await self._spawn(worker)
        ready = asyncio.ensure_future(self._ready.wait())
        exits = {asyncio.ensure_future(process.wait()) for process in self._processes.values()}
        try:
            done, _ = await asyncio.wait(
                {ready, *exits}, timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for future in (ready, *exits):
                future.cancel()
        if not self._ready.is_set():
            if done:
                raise StartupError("a front-end process could not start (its error is above)")
            raise StartupError(f"front-end processes did not start within {START_TIMEOUT:.0f}s")
        for worker in self._processes:
            task = asyncio.create_task(self._keep_running(worker), name=f"kine-frontend-{worker}")
            self._supervisors.add(task)
            task.add_done_callback(self._supervisors.discard)

    async def _spawn(self, worker: int) -> None:
        self._processes[worker] = await asyncio.create_subprocess_exec(
            *self._command(worker), stdin=asyncio.subprocess.DEVNULL
        )

    async def _keep_running(self, worker: int) -> None:
        """Start front-end `worker` again whenever it dies."""
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

    async def stop(self, timeout: float) -> None:
        """SIGTERM every front-end and wait up to `timeout` seconds for them (they finish their
        requests); kill what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
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
        await self.kill()

    async def kill(self) -> None:
        """Kill every front-end still running (a start given up, or a stop out of time)."""
        self._stopping = True
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
