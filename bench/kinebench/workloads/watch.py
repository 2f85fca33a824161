"""Workload 5: watchers on a prefix while Puts are offered at a fixed rate (open loop)."""

from __future__ import annotations

import itertools
import math

from ..clients import call
from ..report import percentile
from .base import Bench


def run(b: Bench) -> None:
    a = b.args
    procs = max(1, min(a.client_procs, len(b.workers) - 1))
    per_proc = b.split(a.watchers, procs)
    channels = b.split(a.channels, procs)
    for s in b.order():
        prefix = b"/registry/events/watch-%s-r%d/" % (s.name.encode(), b.rep)
        sentinel = prefix + b"zz-end"
        revision = call(b.workers[0], "current_revision", endpoint=s.target)
        b.log(f"5 {a.watchers} watchers, {a.watch_writes} writes on {s.name}")
        duration = a.time_cap + 30
        jobs = [
            (
                b.workers[i],
                "watchers",
                dict(
                    endpoint=s.target,
                    prefix=prefix,
                    sentinel=sentinel,
                    count=per_proc[i],
                    channels=max(1, channels[i]),
                    start_revision=revision + 1,
                    max_duration=duration,
                ),
            )
            for i in range(procs)
        ]
        jobs.append(
            (
                b.workers[procs],
                "watch_writer",
                dict(
                    endpoint=s.target,
                    prefix=prefix,
                    sentinel=sentinel,
                    count=a.watch_writes,
                    rate=a.watch_rate,
                    max_inflight=64,
                    value_size=a.value_size,
                    time_cap=a.time_cap,
                ),
            )
        )
        rs, win = b.measure("5 watch", s, jobs, duration + 60)
        writer = rs[-1]
        b.results.errors("5 watch", s.name, [r["errors"] for r in rs])
        written = {rev: (key, sent, acked) for rev, key, sent, acked in writer["writes"]}
        after_ack: list[float] = []
        after_send: list[float] = []
        lost = dup = disorder = wrong = unexpected = 0
        streams = 0
        for r in rs[:-1]:
            for events in r["received"]:
                streams += 1
                revs = [rev for rev, _, _ in events]
                seen = set(revs)
                dup += len(revs) - len(seen)
                lost += len(set(written) - seen)
                disorder += sum(1 for x, y in itertools.pairwise(revs) if y <= x)
                for rev, key, t in events:
                    w = written.get(rev)
                    if w is None:
                        unexpected += 1
                        continue
                    if w[0] != key:
                        wrong += 1
                    after_send.append(t - w[1])
                    after_ack.append(t - w[2])
        missing_streams = a.watchers - streams
        for what, n in (
            ("events lost", lost),
            ("events duplicated", dup),
            ("events out of revision order", disorder),
            ("events with the wrong key for their revision", wrong),
            ("events for revisions nobody wrote", unexpected),
            ("watch streams missing", missing_streams),
        ):
            if n:
                b.results.problems.append(f"5 watch on {s.name}: {n} {what}")
        writes_wall = writer["wall"]
        b.results.put(
            "w5.p50",
            "5 watch latency p50 (after ack)",
            "ms",
            s.name,
            percentile(after_ack, 50) * 1e3,
        )
        b.results.put(
            "w5.p99",
            "5 watch latency p99 (after ack)",
            "ms",
            s.name,
            percentile(after_ack, 99) * 1e3,
        )
        b.results.put(
            "w5.p50s",
            "5 watch latency p50 (after send)",
            "ms",
            s.name,
            percentile(after_send, 50) * 1e3,
        )
        b.results.put(
            "w5.p99s",
            "5 watch latency p99 (after send)",
            "ms",
            s.name,
            percentile(after_send, 99) * 1e3,
        )
        b.results.put(
            "w5.lost",
            "5 watch events lost (must be 0)",
            "count",
            s.name,
            lost + missing_streams * len(written),
            False,
        )
        b.results.put(
            "w5.rate",
            "5 watch writes achieved",
            "ops/s",
            s.name,
            len(written) / writes_wall if writes_wall else math.nan,
        )
        b.results.put(
            "w5.client", "5 client CPU", "cores", s.name, win.cores(win.client_cpu), False
        )
        b.results.detail(
            "w5",
            s.name,
            {
                "writes": len(written),
                "events_received": len(after_ack),
                "expected_events": len(written) * a.watchers,
                "streams_finished": sum(r["finished"] for r in rs[:-1]),
                "events_per_response": len(after_ack)
                / max(1, sum(r["responses"] for r in rs[:-1])),
                "lost": lost,
                "duplicates": dup,
                "out_of_order": disorder,
                "write_wall_s": writes_wall,
                **win.summary(),
            },
        )
