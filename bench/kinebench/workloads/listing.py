"""Workload 4: a paginated LIST of a large prefix, as the apiserver paginates."""

from __future__ import annotations

from ..clients import call
from ..report import median, percentile
from .base import Bench


def run(b: Bench) -> None:
    a = b.args
    prefix = b"/registry/secrets/list/"
    keys = [prefix + b"s-%06d" % i for i in range(a.list_keys)]
    for s in b.order(floors=False):
        if s.name not in b.listed:  # the same 10 000 keys serve every repetition
            b.listed.add(s.name)
            b.log(f"4 LIST on {s.name}: loading {len(keys)} keys")
            loaded = call(
                b.workers[0],
                "load_keys",
                endpoint=s.target,
                keys=keys,
                value_size=a.value_size,
                per_txn=100,
                clients=4,
            )
            b.results.errors("4 list set-up", s.name, [loaded["errors"]])
        b.log(f"4 LIST on {s.name}: {a.list_runs} paginated LISTs")
        [r], win = b.measure(
            "4 list",
            s,
            [
                (
                    b.workers[0],
                    "list_runs",
                    dict(
                        endpoint=s.target,
                        prefix=prefix,
                        page=a.list_page,
                        runs=a.list_runs,
                        expected=len(keys),
                        time_cap=a.time_cap,
                    ),
                )
            ],
            a.time_cap + 120,
        )
        b.results.errors("4 list", s.name, [r["errors"]])
        totals = r["totals"]
        b.results.put(
            "w4.median",
            f"4 LIST {a.list_keys}/{a.list_page} median",
            "ms",
            s.name,
            median(totals) * 1e3,
        )
        b.results.put("w4.page", "4 LIST page p50", "ms", s.name, percentile(r["pages"], 50) * 1e3)
        b.results.put(
            "w4.client", "4 client CPU", "cores", s.name, win.cores(win.client_cpu), False
        )
        b.results.detail(
            "w4",
            s.name,
            {
                "runs_ms": [t * 1e3 for t in totals],
                "pages_per_list": len(r["pages"]) // max(1, len(totals)),
                "pinned_revision_check": r["pinned_check"],
                **win.summary(),
            },
        )
