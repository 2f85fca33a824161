"""The benchmark's flags (`bench/run.py --help`), checked once at the start."""

from __future__ import annotations

import argparse

from .workloads import WORKLOADS

DESCRIPTION = """kine-server against a real etcd and the floor: the same workloads on each, one
table (see bench/README.md).

    .venv/bin/python bench/run.py              # kine-server on SQLite vs etcd
    .venv/bin/python bench/run.py --pg         # and kine-server on PostgreSQL
    .venv/bin/python bench/run.py --mysql      # and kine-server on MariaDB
    .venv/bin/python bench/run.py --compare bench/results/OLD.json
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--pg", action="store_true", help="also benchmark kine-server on PostgreSQL")
    p.add_argument("--mysql", action="store_true", help="also benchmark kine-server on MariaDB")
    p.add_argument("--no-sqlite", action="store_true", help="skip kine-server on SQLite")
    p.add_argument("--no-etcd", action="store_true", help="skip etcd (e.g. when profiling)")
    p.add_argument(
        "--auth",
        action="store_true",
        help="auth on in every server, clients signed in as a user that is not root "
        "(workload 8 starts servers of its own, without auth)",
    )
    p.add_argument(
        "--pg-fsync", choices=["on", "off"], default="on", help="PostgreSQL fsync (default on)"
    )
    p.add_argument(
        "--workloads",
        default=",".join(str(n) for n, _ in WORKLOADS),
        help="which workloads (default all: %(default)s; see bench/README.md)",
    )
    p.add_argument("--levels", default="1,16,64", help="workload 2 client counts")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the whole sequence N times (servers still alternate); each figure is the "
        "median of the N",
    )
    p.add_argument("--client-procs", type=int, default=2, help="client processes (default 2)")
    p.add_argument(
        "--channels",
        type=int,
        default=64,
        help="gRPC connections of a Python-client measurement in all, one per client up to "
        "this many (64, as kube-apiserver opens dozens; each process at least one: "
        "--channels 2 is one connection per client process, the earlier default was 8)",
    )
    p.add_argument("--value-size", type=int, default=1024)
    p.add_argument("--time-cap", type=float, default=30.0, help="cap per workload per server")
    p.add_argument("--level-time", type=float, default=10.0, help="cap per workload-2 level")
    p.add_argument("--put-count", type=int, default=2000)
    p.add_argument("--create-ops", type=int, default=20000, help="ops cap per workload-2 level")
    p.add_argument("--churn-keys", type=int, default=1000)
    p.add_argument("--churn-versions", type=int, default=20)
    p.add_argument("--churn-clients", type=int, default=16)
    p.add_argument("--list-keys", type=int, default=10000)
    p.add_argument("--list-page", type=int, default=500)
    p.add_argument("--list-runs", type=int, default=5)
    p.add_argument("--watchers", type=int, default=100)
    p.add_argument("--watch-writes", type=int, default=2000)
    p.add_argument("--watch-rate", type=float, default=200.0, help="writes/s offered (200)")
    p.add_argument(
        "--go-load",
        choices=["s", "m", "l", "xl"],
        default="l",
        help="workload 7: etcdctl check perf --load (l: 500 clients, 8 000 Puts/s for 60 s)",
    )
    p.add_argument("--scale-clients", type=int, default=64, help="workload 8 clients (64)")
    p.add_argument("--scale-time", type=float, default=10.0, help="workload 8 cap per server")
    p.add_argument(
        "--floor-procs",
        default="1,2",
        help="the floors to run (bench/floor.py, no storage): process counts, e.g. 1,2 "
        "(default); '' for none. Throughput is also reported as a fraction of the largest",
    )
    p.add_argument("--no-floor", action="store_true", help="no floor columns (--floor-procs '')")
    p.add_argument(
        "--kube-apiserver",
        metavar="PATH",
        help="workload 9's kube-apiserver (default: scripts/kube-apiserver.sh's, built once)",
    )
    p.add_argument("--kube-count", type=int, default=3000, help="workload 9 configmaps (3000)")
    p.add_argument("--kube-workers", type=int, default=16, help="workload 9 clients (16)")
    p.add_argument("--kube-time", type=float, default=10.0, help="workload 9 cap per phase")
    p.add_argument("--kube-watchers", type=int, default=10, help="workload 9 watches (10)")
    p.add_argument(
        "--kube-watch-rate", type=float, default=200.0, help="workload 9 watched creates/s (200)"
    )
    p.add_argument("--kube-watch-writes", type=int, default=2000, help="workload 9 (2000)")
    p.add_argument(
        "--kine-arg",
        metavar="ARG",
        action="append",
        default=[],
        help="pass ARG to every kine-server the bench starts (repeatable; write a flag as "
        "--kine-arg=--workers=2)",
    )
    p.add_argument(
        "--noise-warn",
        type=float,
        default=0.25,
        help="note a measurement during which other programs used more cores than this",
    )
    p.add_argument("--compare", metavar="OLD.json", help="also print this run against OLD.json")
    p.add_argument("--show", metavar="RUN.json", help="print a saved run instead of running")
    p.add_argument("--no-save", action="store_true", help="do not write bench/results/*.json")
    p.add_argument(
        "--cprofile", metavar="PATH", help="run kine-server (SQLite) under cProfile -o PATH"
    )
    p.add_argument(
        "--py-spy",
        metavar="PATH",
        help="py-spy record kine-server (SQLite) during workload 2 at the highest level; "
        "PATH gets collapsed stacks (see bench/profile_summary.py)",
    )
    p.add_argument("--py-spy-args", default="", help="extra py-spy record flags, e.g. '--gil'")
    p.add_argument(
        "--instrument",
        metavar="PATH",
        help="run kine-server (SQLite) through bench/kine_instrumented.py; writer and SQL "
        "counters go to PATH (JSON) when it stops",
    )
    args = p.parse_args(argv)
    known = {n for n, _ in WORKLOADS}
    try:
        args.workload_set = {int(w) for w in args.workloads.split(",") if w}
    except ValueError:
        p.error(f"--workloads: numbers separated by commas, not {args.workloads!r}")
    if args.workload_set - known:
        p.error(
            f"--workloads: no workload {sorted(args.workload_set - known)} (there are "
            f"{sorted(known)}; 6's figures come from 2 and from the whole run)"
        )
    args.levels = [int(x) for x in args.levels.split(",") if x]
    try:
        floors = [] if args.no_floor else [int(x) for x in args.floor_procs.split(",") if x]
    except ValueError:
        p.error(f"--floor-procs: numbers separated by commas, not {args.floor_procs!r}")
    args.floors = sorted(set(floors))
    return args
