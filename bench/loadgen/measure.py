"""What a measured job keeps: its window (wall time and this process's CPU), the errors it saw,
and the start barrier every measured job passes (`sync`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

#: A measured job calls `await sync(info)` once it is ready to start; the orchestrator answers
#: with the CLOCK_MONOTONIC instant at which all jobs of the step start.
Sync = Callable[[Any], Awaitable[float]]


class Errors:
    """gRPC errors and semantic problems seen by a job: counts by kind, first few messages."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.samples: list[str] = []

    def add(self, what: str, exc: BaseException | None = None, detail: str = "") -> None:
        if isinstance(exc, grpc.aio.AioRpcError):
            kind = f"{what}: {exc.code().name}"
            detail = detail or str(exc.details())
        elif exc is not None:
            kind = f"{what}: {type(exc).__name__}"
            detail = detail or str(exc)
        else:
            kind = what
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.samples) < 8:
            self.samples.append(f"{kind}: {detail}"[:500])

    def report(self) -> dict[str, Any]:
        return {"counts": self.counts, "samples": self.samples}


class Window:
    """The measured window of one job in this process: wall time and this process's CPU."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.cpu0 = 0.0
        self.wall = 0.0
        self.cpu = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = time.process_time()

    def stop(self) -> None:
        self.wall = time.monotonic() - self.t0
        self.cpu = time.process_time() - self.cpu0

    def report(self) -> dict[str, float]:
        return {"wall": self.wall, "client_cpu": self.cpu, "t_start": self.t0}


async def sleep_until(instant: float) -> None:
    delay = instant - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def open_loop(
    window: Window,
    count: int,
    rate: float,
    max_inflight: int,
    time_cap: float,
    send: Callable[[int], Awaitable[None]],
) -> None:
    """An open-loop writer from `window`'s start: `send(i)` is started at t0 + i/rate (later
    only while `max_inflight` sends are outstanding), until `count` or the time cap; returns
    once every send has finished. A slow server thus sees the same offered rate, not a rate
    that drops to what it can do (as a closed loop's would)."""
    slots = asyncio.Semaphore(max_inflight)
    deadline = window.t0 + time_cap

    async def one(i: int) -> None:
        try:
            await send(i)
        finally:
            slots.release()

    tasks = []
    for i in range(count):
        await sleep_until(window.t0 + i / rate)
        if time.monotonic() >= deadline:
            break
        await slots.acquire()
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
