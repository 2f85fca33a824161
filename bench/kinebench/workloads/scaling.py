"""Workload 8: does a server use a second core? Workload 2's create Txn at 64 clients against
a fresh kine-server (SQLite) pinned to core 0, then to cores 0 and 1; etcd likewise, for
reference (Go's GOMAXPROCS follows the affinity set).

Each server is started for this workload alone, on a fresh store, under `taskset -c`, so every
process it starts inherits the set (kine-server's `--workers` defaults to its size). The client
processes are not pinned: with one core the server has core 0 and shares it with part of the
client; with two, server and client share both. On a 2-core machine the second core is
therefore never all the server's: the client-CPU rows show how much of it the client took.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import ExitStack

from ..servers import Server
from .base import Bench
from .create import Level, create_level
from .fresh import start_etcd, start_kine

CORE_SETS = (("c1", "0", "1 core"), ("c2", "0,1", "2 cores"))
"""Metric id part, `taskset -c` list, label."""


def run(b: Bench) -> None:
    a = b.args
    if not {0, 1} <= os.sched_getaffinity(0):
        b.results.problems.append("8 scaling: needs cores 0 and 1, this process may not use both")
        return
    kinds: list[tuple[str, Callable[[ExitStack, str, str], Server]]] = []
    if not a.no_etcd:
        kinds.append(("etcd", lambda stack, cpus, tag: start_etcd(b, stack, tag, cpus)))
    if not a.no_sqlite:
        kinds.append(("kine-sqlite", lambda stack, cpus, tag: start_kine(b, stack, tag, cpus)))
    throughput: dict[str, dict[str, float]] = {name: {} for name, _ in kinds}
    for mid, cpus, label in CORE_SETS:
        turn = b.rotation % max(1, len(kinds))
        b.rotation += 1
        for name, start in kinds[turn:] + kinds[:turn]:
            tag = f"scale-{name}-{mid}-r{b.rep}"
            b.log(f"8 scaling: fresh {name} on cores {cpus}")
            with ExitStack() as stack:
                s = start(stack, cpus, tag)
                b.extra_trees.append(s.pid)
                stack.callback(b.extra_trees.remove, s.pid)
                affinity = sorted(os.sched_getaffinity(s.pid))
                workers = b.kine_flags.workers(s.pid) if name != "etcd" else None
                m = create_level(b, s, a.scale_clients, tag, a.scale_time)
            put_level(b, name, mid, cpus, label, m)
            throughput[name][mid] = m.throughput
            b.results.detail(
                f"w8.{mid}",
                name,
                {"cpus": cpus, "affinity": affinity, "workers": workers, **m.detail},
            )
    for name, per in throughput.items():
        one, two = per.get("c1", math.nan), per.get("c2", math.nan)
        b.results.put(
            "w8.ratio",
            "8 scaling: 2 cores / 1 core (goal >= 1.7)",
            "x",
            name,
            two / one if one > 0 else math.nan,
            False,
        )


def put_level(b: Bench, name: str, mid: str, cpus: str, label: str, m: Level) -> None:
    x = b.args.scale_clients
    win = m.window
    b.results.put(
        f"w8.{mid}.ops", f"8 create x{x}, {label} (taskset -c {cpus})", "ops/s", name, m.throughput
    )
    b.results.put(
        f"w8.{mid}.server",
        f"8 server CPU, {label}",
        "cores",
        name,
        win.cores(win.server_cpu + win.db_cpu),
        False,
    )
    b.results.put(
        f"w8.{mid}.client",
        f"8 client CPU, {label}",
        "cores",
        name,
        win.cores(win.client_cpu),
        False,
    )
    errors = m.detail["not_created"]
    if errors:
        b.results.problems.append(f"8 scaling on {name}, {label}: {errors} creates not created")
