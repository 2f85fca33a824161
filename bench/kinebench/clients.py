"""The client side as the orchestrator sees it: worker processes that run `loadgen` jobs, and
measuring what the machine, the server and the clients did while a set of jobs ran."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loadgen.worker import serve

from .paths import BenchError
from .procs import machine_busy, ours_cpu
from .servers import Server

Job = tuple["Worker", str, dict[str, Any]]
"""A worker, the name of a `loadgen` job and its arguments."""

Pids = Callable[[], tuple[list[int], list[int]]]
"""Every process the benchmark started: single processes, and roots of whole trees."""


class Worker:
    """One client process (multiprocessing, spawn) serving `loadgen` jobs over a pipe."""

    def __init__(self, ctx: Any, index: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=serve, args=(child,), daemon=True, name=f"bench-client-{index}"
        )
        self.proc.start()
        child.close()

    def submit(self, name: str, **kwargs: Any) -> None:
        self.conn.send((name, kwargs))

    def go(self, start_at: float) -> None:
        self.conn.send(start_at)

    def wait(self, want: str, timeout: float) -> Any:
        """The next message of kind `want` ("ready", "progress" or "ok"); raises on an error."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"client process {self.proc.name}: no {want!r} in {timeout:.0f}s")
            if not self.conn.poll(min(remaining, 1.0)):
                if not self.proc.is_alive():
                    raise BenchError(f"client process {self.proc.name} died")
                continue
            kind, payload = self.conn.recv()
            if kind == "error":
                raise BenchError(f"client job failed in {self.proc.name}:\n{payload}")
            if kind == want:
                return payload
            raise BenchError(f"{self.proc.name}: {kind!r} while waiting for {want!r}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(None)
        self.proc.join(3)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def call(worker: Worker, name: str, timeout: float = 300.0, **kwargs: Any) -> Any:
    """An unmeasured job on one worker."""
    worker.submit(name, **kwargs)
    return worker.wait("ok", timeout)


@dataclass
class Window:
    """What the machine, the server and the client did while one measured job ran."""

    wall: float
    server_cpu: float
    db_cpu: float
    machine_cpu: float
    ours_cpu: float
    """CPU of every process the benchmark started (all servers, clients) and its own."""
    client_cpu: float = 0.0

    @property
    def other_cpu(self) -> float:
        """Busy CPU not ours: other programs on the machine (noise if high)."""
        return max(0.0, self.machine_cpu - self.ours_cpu)

    def cores(self, seconds: float) -> float:
        return seconds / self.wall if self.wall > 0 else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "wall_s": self.wall,
            "server_cpu_s": self.server_cpu,
            "db_cpu_s": self.db_cpu,
            "client_cpu_s": self.client_cpu,
            "machine_cpu_s": self.machine_cpu,
            "server_cores": self.cores(self.server_cpu + self.db_cpu),
            "client_cores": self.cores(self.client_cpu),
            "other_cores": self.cores(self.other_cpu),
        }


class Stopwatch:
    """CPU counters at the start of a window; `stop()` makes the Window up to now. The
    benchmark's own processes are those `all_pids` lists at the start. The wall time spans
    both samples (reading /proc takes a few ms, and a window can be as short as 50 ms)."""

    def __init__(self, server: Server, all_pids: Pids) -> None:
        self.t0 = time.monotonic()
        self.server = server
        self.cpu0, self.db0 = server.cpu()
        self.pids, self.trees = all_pids()
        self.ours0 = ours_cpu(self.pids, self.trees)
        self.machine0 = machine_busy()

    def stop(self) -> Window:
        machine1 = machine_busy()
        cpu1, db1 = self.server.cpu()
        ours1 = ours_cpu(self.pids, self.trees)
        return Window(
            time.monotonic() - self.t0,
            cpu1 - self.cpu0,
            db1 - self.db0,
            machine1 - self.machine0,
            ours1 - self.ours0,
        )


def measured(
    server: Server,
    jobs: list[Job],
    timeout: float,
    all_pids: Pids,
    on_ready: Callable[[], None] | None = None,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[Any], Window]:
    """Run jobs that each call sync(): when all are ready, start them together and measure."""
    for worker, name, kwargs in jobs:
        worker.submit(name, **kwargs)
    for worker, _, _ in jobs:
        worker.wait("ready", 180)
    if on_ready is not None:
        on_ready()
    start_at = time.monotonic() + 0.05
    for worker, _, _ in jobs:
        worker.go(start_at)
    while time.monotonic() < start_at:
        time.sleep(0.001)
    watch = Stopwatch(server, all_pids)
    try:
        results = [worker.wait("ok", timeout) for worker, _, _ in jobs]
    finally:
        if on_done is not None:
            on_done()
    window = watch.stop()
    window.client_cpu = sum(r.get("client_cpu", 0.0) for r in results)
    return results, window
