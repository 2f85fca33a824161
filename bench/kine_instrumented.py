"""kine-server with counters around its writer and its SQLite threads, for profiling runs (run.py
--instrument PATH). Nothing in src/ changes: this wraps two functions at start-up, then runs the
normal `kine-server` command. On exit (SIGTERM) it writes a JSON summary to $BENCH_KINE_STATS:

- writer: batches, requests per batch, time per batch (from the first statement to the commit)
- gc: collections per generation, their total and longest pause
- loop_lag: how late a 1 ms timer on the event loop fires (p50, p99, max), i.e. how long the
  loop was busy with other callbacks
- sql: calls handed to a connection's thread, per role: "writer" (the writer connection's own
  thread: COMMIT, and BEGIN when it must wait; its other statements run inline on the loop) and
  "other" (readers and the compactor), with the time each took on the thread (`exec`)
  and the whole round trip as the event loop saw it (`round_trip`): the difference is the cost of
  handing the call to the thread and the result back.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import os
import sys
import time
from typing import Any

from kine_server.drivers import sqlite_link
from kine_server.mvcc import writer as writer_module
from kine_server.process import single as server_module

perf = time.perf_counter

stats: dict[str, Any] = {
    "batches": 0,
    "requests": 0,
    "batch_sizes": {},
    "batch_seconds": 0.0,
    "sql": {},
    "gc": {},
}
_lags: list[float] = []
_gc_began = [0.0]


def _on_gc(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _gc_began[0] = perf()
        return
    pause = perf() - _gc_began[0]
    bucket = stats["gc"].setdefault(
        f"gen{info['generation']}", {"count": 0, "ms": 0.0, "max_ms": 0.0}
    )
    bucket["count"] += 1
    bucket["ms"] += pause * 1e3
    bucket["max_ms"] = max(bucket["max_ms"], pause * 1e3)


async def _watch_loop() -> None:
    while True:
        t = perf()
        await asyncio.sleep(0.001)
        _lags.append(perf() - t - 0.001)


_original_start = server_module.SingleProcess.start


async def _start(self: Any) -> None:
    await _original_start(self)
    self._bench_lag_task = asyncio.create_task(_watch_loop())


def _sql_bucket(role: str) -> dict[str, float]:
    return stats["sql"].setdefault(role, {"statements": 0, "exec": 0.0, "round_trip": 0.0})


_original_commit = writer_module.Writer._commit


async def _commit(self: Any, batch: list[Any]) -> None:
    start = perf()
    try:
        await _original_commit(self, batch)
    finally:
        stats["batches"] += 1
        stats["requests"] += len(batch)
        stats["batch_seconds"] += perf() - start
        sizes = stats["batch_sizes"]
        sizes[len(batch)] = sizes.get(len(batch), 0) + 1


_original_submit = sqlite_link.Link.submit


def _submit(self: Any, fn: Any) -> Any:
    """Every hand-off to a connection's thread: its time on the thread and its round trip."""
    bucket = _sql_bucket("writer" if isinstance(self, sqlite_link.WriterLink) else "other")
    spent = [0.0]

    def timed(conn: Any) -> Any:
        t = perf()
        try:
            return fn(conn)
        finally:
            spent[0] = perf() - t

    start = perf()

    def done(_: Any) -> None:
        bucket["statements"] += 1
        bucket["round_trip"] += perf() - start
        bucket["exec"] += spent[0]

    future = _original_submit(self, timed)
    future.add_done_callback(done)
    return future


def _dump() -> None:
    path = os.environ.get("BENCH_KINE_STATS")
    if not path:
        return
    out = dict(stats)
    if stats["batches"]:
        out["requests_per_batch"] = stats["requests"] / stats["batches"]
        out["ms_per_batch"] = stats["batch_seconds"] / stats["batches"] * 1e3
    for bucket in stats["sql"].values():
        n = bucket["statements"] or 1
        bucket["exec_us_each"] = bucket["exec"] / n * 1e6
        bucket["round_trip_us_each"] = bucket["round_trip"] / n * 1e6
    if stats["requests"] and "writer" in stats["sql"]:
        out["writer_thread_calls_per_batch"] = stats["sql"]["writer"]["statements"] / max(
            1, stats["batches"]
        )
    if _lags:
        lags = sorted(_lags)
        out["loop_lag_ms"] = {
            "p50": lags[len(lags) // 2] * 1e3,
            "p99": lags[int(len(lags) * 0.99)] * 1e3,
            "max": lags[-1] * 1e3,
        }
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)


writer_module.Writer._commit = _commit  # type: ignore[method-assign]
sqlite_link.Link.submit = _submit  # type: ignore[method-assign]
server_module.SingleProcess.start = _start  # type: ignore[method-assign]
gc.callbacks.append(_on_gc)
atexit.register(_dump)

if __name__ == "__main__":
    from kine_server.cli import main

    sys.argv[0] = "kine-server"
    sys.exit(main())
