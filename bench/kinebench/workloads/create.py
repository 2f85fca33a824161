"""Workload 2: kube-apiserver's create Txn on new keys at several concurrency levels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..clients import Window
from ..report import percentile
from ..servers import Server
from .base import Bench, Hooks


@dataclass
class Level:
    """One measured level: every create's latency, the successful writes, the window."""

    latencies: list[float]
    wall: float
    writes: int
    window: Window
    detail: dict[str, Any]

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall if self.wall else math.nan


def create_level(
    b: Bench, s: Server, level: int, tag: str, time_cap: float, hooks: Hooks | None = None
) -> Level:
    """`level` clients creating new keys `/registry/pods/<tag>-…` until the ops cap or
    `time_cap`; the clients are spread over the client processes (one for a single client)."""
    a = b.args
    procs = 1 if level == 1 else min(a.client_procs, level, len(b.workers))
    clients = b.split(level, procs)
    channels = b.split(min(a.channels, level), procs)
    quotas = b.split(a.create_ops, procs)
    b.log(f"2 create Txn x{level} on {s.name} ({procs} client processes)")
    jobs = [
        (
            b.workers[i],
            "create_txns",
            dict(
                endpoint=s.target,
                tag=f"{tag}-{i}",
                clients=clients[i],
                channels=max(1, channels[i]),
                quota=quotas[i],
                value_size=a.value_size,
                time_cap=time_cap,
            ),
        )
        for i in range(procs)
    ]
    rs, win = b.measure(f"2 create x{level}", s, jobs, time_cap + 120, *(hooks or (None, None)))
    lat = [x for r in rs for x in r["latencies"]]
    b.results.errors(f"2 create x{level}", s.name, [r["errors"] for r in rs])
    detail = {
        "ops": len(lat),
        "writes": sum(r["writes"] for r in rs),
        "not_created": sum(r["not_created"] for r in rs),
        "client_processes": procs,
        "channels": channels,
        "mean_ms": sum(lat) / len(lat) * 1e3 if lat else math.nan,
        **win.summary(),
    }
    return Level(lat, max(r["wall"] for r in rs), detail["writes"], win, detail)


def run(b: Bench) -> None:
    a = b.args
    totals: dict[str, list[float]] = {s.name: [0.0, 0.0] for s in b.servers}
    for level in a.levels:
        for s in b.order():
            tag = f"{s.name}-{level}-r{b.rep}"
            m = create_level(b, s, level, tag, a.level_time, b.profile_hook(s.name, level))
            lat, win, writes = m.latencies, m.window, m.writes
            p = f"w2.c{level}"
            lbl = f"2 create x{level}"
            b.results.put(f"{p}.ops", f"{lbl} throughput", "ops/s", s.name, m.throughput)
            b.results.put(f"{p}.p50", f"{lbl} p50", "ms", s.name, percentile(lat, 50) * 1e3)
            b.results.put(f"{p}.p99", f"{lbl} p99", "ms", s.name, percentile(lat, 99) * 1e3)
            cpu = win.server_cpu + win.db_cpu
            b.results.put(
                f"w6.cpu.c{level}",
                f"6 server CPU / 1000 writes, x{level}",
                "cpu-s",
                s.name,
                cpu / writes * 1000 if writes else math.nan,
            )
            b.results.put(
                f"{p}.server", f"{lbl} server CPU", "cores", s.name, win.cores(cpu), False
            )
            b.results.put(
                f"{p}.client",
                f"{lbl} client CPU",
                "cores",
                s.name,
                win.cores(win.client_cpu),
                False,
            )
            b.results.put(
                f"{p}.other", f"{lbl} other load", "cores", s.name, win.cores(win.other_cpu), False
            )
            totals[s.name][0] += cpu
            totals[s.name][1] += writes
            b.results.detail(f"w2.c{level}", s.name, m.detail)
    for name, (all_cpu, all_writes) in totals.items():
        if all_writes:
            b.results.put(
                "w6.cpu",
                "6 server CPU / 1000 writes, all",
                "cpu-s",
                name,
                all_cpu / all_writes * 1000,
            )
