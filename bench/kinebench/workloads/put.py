"""Workload 1: sequential Puts from one client (latency p50/p99, rate)."""

from __future__ import annotations

from ..report import percentile
from .base import Bench


def run(b: Bench) -> None:
    a = b.args
    for s in b.order():
        b.log(f"1 sequential Put on {s.name}")
        [r], win = b.measure(
            "1 put",
            s,
            [
                (
                    b.workers[0],
                    "put_sequential",
                    dict(
                        endpoint=s.target,
                        prefix=b"/bench/put/r%d/" % b.rep,
                        count=a.put_count,
                        warmup=50,
                        value_size=a.value_size,
                        time_cap=a.time_cap,
                    ),
                )
            ],
            timeout=a.time_cap + 120,
        )
        lat = r["latencies"]
        b.results.errors("1 put", s.name, [r["errors"]])
        b.results.put("w1.p50", "1 seq Put p50", "ms", s.name, percentile(lat, 50) * 1e3)
        b.results.put("w1.p99", "1 seq Put p99", "ms", s.name, percentile(lat, 99) * 1e3)
        b.results.put("w1.ops", "1 seq Put rate", "ops/s", s.name, len(lat) / r["wall"])
        b.results.put(
            "w1.client", "1 client CPU", "cores", s.name, win.cores(win.client_cpu), False
        )
        b.results.detail("w1", s.name, {"ops": len(lat), **win.summary()})
