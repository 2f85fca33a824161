"""Workload 3: update churn, each update a Txn on the mod_revision of the previous one."""

from __future__ import annotations

from ..clients import call
from ..report import percentile
from .base import Bench


def run(b: Bench) -> None:
    a = b.args
    procs = min(a.client_procs, len(b.workers))
    clients = b.split(a.churn_clients, procs)
    channels = b.split(min(a.channels, a.churn_clients), procs)
    keys = [b"/registry/configmaps/churn-r%d/cm-%05d" % (b.rep, i) for i in range(a.churn_keys)]
    for s in b.order():
        b.log(f"3 update churn on {s.name}: loading {len(keys)} keys")
        loaded = call(
            b.workers[0],
            "load_keys",
            endpoint=s.target,
            keys=keys,
            value_size=a.value_size,
            per_txn=1,
            clients=16,
        )
        b.results.errors("3 churn set-up", s.name, [loaded["errors"]])
        revisions = loaded["revisions"]
        ordered = sorted(revisions)
        b.log(f"3 update churn on {s.name}: {a.churn_versions} versions each")
        jobs = [
            (
                b.workers[i],
                "churn",
                dict(
                    endpoint=s.target,
                    revisions={k: revisions[k] for k in ordered[i::procs]},
                    versions=a.churn_versions,
                    clients=clients[i],
                    channels=max(1, channels[i]),
                    value_size=a.value_size,
                    time_cap=a.time_cap,
                    verify=not s.is_floor,
                ),
            )
            for i in range(procs)
        ]
        rs, win = b.measure("3 churn", s, jobs, a.time_cap + 300)
        lat = [x for r in rs for x in r["latencies"]]
        wall = max(r["wall"] for r in rs)
        updates = sum(r["updates"] for r in rs)
        conflicts = sum(r["conflicts"] for r in rs)
        wrong = sum(r["wrong_final"] for r in rs)
        b.results.errors("3 churn", s.name, [r["errors"] for r in rs])
        b.results.put("w3.time", "3 churn total time", "s", s.name, wall)
        b.results.put("w3.ops", "3 churn throughput", "ops/s", s.name, len(lat) / wall)
        b.results.put("w3.p99", "3 churn p99", "ms", s.name, percentile(lat, 99) * 1e3)
        b.results.put("w3.done", "3 churn updates done", "count", s.name, updates)
        b.results.put(
            "w3.conflicts", "3 churn conflicts (must be 0)", "count", s.name, conflicts, False
        )
        b.results.put(
            "w3.client", "3 client CPU", "cores", s.name, win.cores(win.client_cpu), False
        )
        b.results.detail(
            "w3",
            s.name,
            {
                "ops": len(lat),
                "updates": updates,
                "planned": len(keys) * a.churn_versions,
                "conflicts": conflicts,
                "wrong_final_state": wrong,
                "p50_ms": percentile(lat, 50) * 1e3,
                **win.summary(),
            },
        )
