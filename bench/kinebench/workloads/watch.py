"""Workload 5: watchers on a prefix while Puts are offered at a fixed rate (open loop); and
what a set of watch streams received against what was written (workload 9 checks its
apiserver watches with it too)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from ..clients import call
from ..report import percentile
from .base import Bench


@dataclass
class Delivery:
    """Every stream's events against the writes: latencies, and what went wrong."""

    after_ack: list[float] = field(default_factory=list)
    """Each event's arrival minus when the writer had the write's response."""
    after_send: list[float] = field(default_factory=list)
    """... minus when the writer sent it."""
    lost: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    wrong_key: int = 0
    unexpected: int = 0
    streams: int = 0


def deliveries(
    written: dict[int, tuple[Hashable, float, float]],
    streams: Sequence[Sequence[tuple[int, Hashable, float]]],
) -> Delivery:
    """`written`: revision -> (key, sent, acknowledged); each stream: (revision, key, received)
    of every event it saw, in the order it saw them. Every stream must see every write once,
    in revision order, with its key."""
    d = Delivery()
    for events in streams:
        d.streams += 1
        revs = [rev for rev, _, _ in events]
        seen = set(revs)
        d.duplicates += len(revs) - len(seen)
        d.lost += len(set(written) - seen)
        d.out_of_order += sum(1 for x, y in itertools.pairwise(revs) if y <= x)
        for rev, key, t in events:
            w = written.get(rev)
            if w is None:
                d.unexpected += 1
                continue
            if w[0] != key:
                d.wrong_key += 1
            d.after_send.append(t - w[1])
            d.after_ack.append(t - w[2])
    return d


def report_deliveries(b: Bench, what: str, server: str, d: Delivery, missing_streams: int) -> None:
    """Each kind of delivery failure is a problem line."""
    for kind, n in (
        ("events lost", d.lost),
        ("events duplicated", d.duplicates),
        ("events out of revision order", d.out_of_order),
        ("events with the wrong key for their revision", d.wrong_key),
        ("events for revisions nobody wrote", d.unexpected),
        ("watch streams missing", missing_streams),
    ):
        if n:
            b.results.problems.append(f"{what} on {server}: {n} {kind}")


def run(b: Bench) -> None:
    a = b.args
    procs = max(1, min(a.client_procs, len(b.workers) - 1))
    per_proc = b.split(a.watchers, procs)
    channels = b.split(a.channels, procs)
    for s in b.order(floors=False):
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
        d = deliveries(written, [events for r in rs[:-1] for events in r["received"]])
        after_ack, after_send, lost = d.after_ack, d.after_send, d.lost
        missing_streams = a.watchers - d.streams
        report_deliveries(b, "5 watch", s.name, d, missing_streams)
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
                "duplicates": d.duplicates,
                "out_of_order": d.out_of_order,
                "write_wall_s": writes_wall,
                **win.summary(),
            },
        )
