"""Workload 9: ConfigMaps through a real kube-apiserver, what users of kine-server feel.

For each server (etcd, kine-server on SQLite, with --pg on PostgreSQL; not the floors, which
store nothing an apiserver could read back) a fresh one is started on a fresh store, and a
kube-apiserver 1.20 on it (the end-to-end run's launcher, `kubee2e.apiserver`, and its binary
from scripts/kube-apiserver.sh). Then `--kube-workers` clients (threads over the client
processes, one HTTPS connection each) create `--kube-count` configmaps, get each, update each
at the resourceVersion its create answered, and delete each, each phase measured on its own
(stopping at `--kube-time`); then `--kube-watchers` watches on a second namespace receive the
configmaps an open-loop writer creates at `--kube-watch-rate`: latency from the create's
response to each watch's event, and every event must arrive once.

The apiserver keeps its defaults (watch cache on, compaction every 5 minutes: never during the
run): each GET, update and delete reaches the store, a watch is served from the apiserver's
cache, which its own watch of the store feeds. kube-apiserver opens dozens of connections to its
store (a client per resource), as in a real cluster.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from typing import Any

from kubee2e.apiserver import ApiserverUnavailable, KubeApiserver, kube_apiserver_binary
from kubee2e.outcome import CheckFailed
from kubee2e.rest import cms

from ..procs import tree_cpu
from ..report import percentile
from ..servers import Server
from .base import Bench
from .fresh import start_etcd, start_kine
from .watch import deliveries, report_deliveries

PHASES = ("create", "get", "update", "delete")
NAMESPACE = "kubebench"
WATCH_NAMESPACE = "kubewatch"
SENTINEL = "zz-end"


class TreeCpu:
    """CPU of a process tree over a window, for the measurement's start and end hooks."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t0 = 0.0
        self.used = 0.0

    def start(self) -> None:
        self.t0 = tree_cpu(self.pid)

    def stop(self) -> None:
        self.used = tree_cpu(self.pid) - self.t0


def run(b: Bench) -> None:
    try:
        binary = kube_apiserver_binary(b.args.kube_apiserver)
    except ApiserverUnavailable as exc:
        b.results.problems.append(f"9 kube-apiserver: scripts/kube-apiserver.sh failed: {exc}")
        return
    for s in b.order(floors=False):
        with ExitStack() as stack:
            on_apiserver(b, stack, s, binary)


def fresh_like(b: Bench, stack: ExitStack, s: Server) -> Server:
    """A fresh server of the same kind as `s` (a new SQLite file, a new PostgreSQL or MariaDB
    database)."""
    tag = f"kube-{s.name}-r{b.rep}"
    if s.kind == "etcd":
        server = start_etcd(b, stack, tag)
    elif s.db_root is not None and s.name in b.db_bases:
        dsn = f"{b.db_bases[s.name]}/kinebench_kube_r{b.rep}"
        server = start_kine(b, stack, tag, name=s.name, dsn=dsn, db_root=s.db_root)
    else:
        server = start_kine(b, stack, tag, name=s.name)
    b.extra_trees.append(server.pid)
    stack.callback(b.extra_trees.remove, server.pid)
    return server


def on_apiserver(b: Bench, stack: ExitStack, main: Server, binary: str) -> None:
    b.log(f"9 kube-apiserver on a fresh {main.name}")
    s = fresh_like(b, stack, main)
    work = b.workdir / f"kube-apiserver-{s.name}-r{b.rep}"
    work.mkdir()
    apiserver = KubeApiserver(binary, work, s.endpoint)
    stack.callback(apiserver.stop, 30)
    apiserver.start()
    b.extra_trees.append(apiserver.process.pid)
    stack.callback(b.extra_trees.remove, apiserver.process.pid)
    try:
        apiserver.wait_ready(180)
        for ns in (NAMESPACE, WATCH_NAMESPACE):
            apiserver.api.expect(201, "POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    except (CheckFailed, OSError) as exc:
        b.results.problems.append(f"9 kube-apiserver on {s.name}: {exc}"[:2000])
        return
    b.log(f"9 kube-apiserver ready on {s.name} after {apiserver_age(apiserver):.0f} s")
    cpu = TreeCpu(apiserver.process.pid)
    names = [f"cm-{i:05d}" for i in range(b.args.kube_count)]
    rvs: dict[str, str] = {}
    write_cpu = {"server": 0.0, "apiserver": 0.0, "writes": 0.0}
    for op in PHASES:
        targets = names if op == "create" else sorted(rvs)
        done, server_cpu, ops = phase(b, s, apiserver, cpu, op, targets, rvs)
        if op == "create":
            rvs = done
        elif op == "update":
            rvs.update(done)
        if op != "get":
            write_cpu["server"] += server_cpu
            write_cpu["apiserver"] += cpu.used
            write_cpu["writes"] += ops
    writes = write_cpu["writes"]
    for who in ("server", "apiserver"):
        b.results.put(
            f"w9.cpu.{who}",
            f"9 kube {who} CPU / 1000 writes (create, update, delete)",
            "cpu-s",
            s.name,
            write_cpu[who] / writes * 1000 if writes else math.nan,
        )
    watch_phase(b, s, apiserver)


def apiserver_age(apiserver: KubeApiserver) -> float:
    return time.monotonic() - apiserver.started


def phase(
    b: Bench,
    s: Server,
    apiserver: KubeApiserver,
    cpu: TreeCpu,
    op: str,
    targets: list[str],
    rvs: dict[str, str],
) -> tuple[dict[str, str], float, int]:
    """One measured phase over `targets`: the resourceVersions it answered, the server's CPU
    (with its database's) during it, and how many requests succeeded."""
    a = b.args
    procs = max(1, min(a.client_procs, len(b.workers)))
    threads = b.split(a.kube_workers, procs)
    api = apiserver.api
    b.log(f"9 kube {op} x{len(targets)} on {s.name} ({a.kube_workers} clients)")
    jobs = [
        (
            b.workers[i],
            "kube_ops",
            dict(
                port=api.port,
                token=api.token,
                op=op,
                namespace=NAMESPACE,
                names=targets[i::procs],
                rvs={n: rvs[n] for n in targets[i::procs] if n in rvs},
                workers=max(1, threads[i]),
                value_size=a.value_size,
                time_cap=a.kube_time,
            ),
        )
        for i in range(procs)
    ]
    rs, win = b.measure(f"9 kube {op}", s, jobs, a.kube_time + 120, cpu.start, cpu.stop)
    b.results.errors(f"9 kube {op}", s.name, [r["errors"] for r in rs])
    lat = [x for r in rs for x in r["latencies"]]
    wall = max(r["wall"] for r in rs)
    label = f"9 kube {op}"
    b.results.put(
        f"w9.{op}.ops",
        f"{label} throughput ({a.kube_workers} clients)",
        "ops/s",
        s.name,
        len(lat) / wall if wall else math.nan,
    )
    b.results.put(f"w9.{op}.p99", f"{label} p99", "ms", s.name, percentile(lat, 99) * 1e3)
    done: dict[str, str] = {}
    for r in rs:
        done.update(r["rvs"])
    server_cpu = win.server_cpu + win.db_cpu
    b.results.detail(
        f"w9.{op}",
        s.name,
        {
            "ops": len(lat),
            "planned": len(targets),
            "p50_ms": percentile(lat, 50) * 1e3,
            "apiserver_cpu_s": cpu.used,
            "apiserver_cores": win.cores(cpu.used),
            **win.summary(),
        },
    )
    return done, server_cpu, len(lat)


def watch_phase(b: Bench, s: Server, apiserver: KubeApiserver) -> None:
    a = b.args
    api = apiserver.api
    start_rv = api.expect(200, "GET", cms(WATCH_NAMESPACE))["metadata"]["resourceVersion"]
    duration = a.time_cap + 30
    b.log(
        f"9 kube watch on {s.name}: {a.kube_watchers} watches, {a.kube_watch_writes} creates "
        f"at {a.kube_watch_rate:.0f}/s"
    )
    common: dict[str, Any] = dict(port=api.port, token=api.token, namespace=WATCH_NAMESPACE)
    jobs = [
        (
            b.workers[0],
            "kube_watchers",
            dict(
                **common,
                count=a.kube_watchers,
                start_rv=start_rv,
                sentinel=SENTINEL,
                max_duration=duration,
            ),
        ),
        (
            b.workers[1],
            "kube_writer",
            dict(
                **common,
                sentinel=SENTINEL,
                count=a.kube_watch_writes,
                rate=a.kube_watch_rate,
                max_inflight=32,
                value_size=a.value_size,
                time_cap=a.time_cap,
            ),
        ),
    ]
    (watched, writer), win = b.measure("9 kube watch", s, jobs, duration + 60)
    b.results.errors("9 kube watch", s.name, [watched["errors"], writer["errors"]])
    written = {rev: (name, sent, acked) for rev, name, sent, acked in writer["writes"]}
    d = deliveries(written, watched["received"])
    missing = a.kube_watchers - d.streams
    report_deliveries(b, "9 kube watch", s.name, d, missing)
    for mid, after, times in (("", "ack", d.after_ack), ("s", "send", d.after_send)):
        for q in (50, 99):
            b.results.put(
                f"w9.watch.p{q}{mid}",
                f"9 kube watch latency p{q} (after {after})",
                "ms",
                s.name,
                percentile(times, q) * 1e3,
            )
    b.results.put(
        "w9.watch.lost",
        "9 kube watch events lost (must be 0)",
        "count",
        s.name,
        d.lost + missing * len(written),
        False,
    )
    b.results.detail(
        "w9.watch",
        s.name,
        {
            "writes": len(written),
            "write_rate": len(written) / writer["wall"] if writer["wall"] else math.nan,
            "events_received": len(d.after_ack),
            "streams_finished": watched["finished"],
            "duplicates": d.duplicates,
            "out_of_order": d.out_of_order,
            **win.summary(),
        },
    )
