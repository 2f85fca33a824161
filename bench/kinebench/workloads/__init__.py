"""The workloads, by the number `--workloads` selects them with (bench/README.md's table).

Each is a `run(bench)` that measures every server in turn and puts its figures in
`bench.results`. Number 6 is not a run of its own: its figures come from workload 2 and from
the servers at the end of workloads 1-5.
"""

from __future__ import annotations

from collections.abc import Callable

from . import churn, create, goclient, kube, listing, put, scaling, watch
from .base import Bench

WORKLOADS: tuple[tuple[int, Callable[[Bench], None]], ...] = (
    (1, put.run),
    (2, create.run),
    (3, churn.run),
    (4, listing.run),
    (5, watch.run),
    (7, goclient.run),
    (8, scaling.run),
    (9, kube.run),
)

LATE = frozenset({7, 8, 9})
"""Run after every repetition of the others and after the peak-RSS figure: 7 grows the shared
servers' stores by hundreds of thousands of revisions, 8 and 9 start servers of their own."""

__all__ = ["LATE", "WORKLOADS", "Bench"]
