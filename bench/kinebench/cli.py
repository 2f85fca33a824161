"""kine-server against a real etcd and the floor: the same workloads on each, one table.

Starts every server itself on loopback with fresh data directories (the floors of
`--floor-procs`, etcd, kine-server on SQLite, with --pg on PostgreSQL and with --mysql on
MariaDB), runs each workload on each server in turn (the order rotates from one workload to
the next), stops everything it started (also on an error or Ctrl-C), prints the table and
saves it as JSON in bench/results/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import multiprocessing
import shutil
import signal
import sys
import tempfile
import time
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.mysql import ThrowawayMariaDB

from .clients import Worker
from .floors import Floor
from .options import parse_args
from .paths import BENCH, RESULTS, ROOT
from .procs import tree_status_kib
from .profiling import PySpy
from .report import Results, floor_ratios, machine_info, print_run, render_compare
from .servers import (
    AUTH_USER,
    BenchPostgres,
    Etcd,
    KineFlags,
    KineServer,
    Server,
    enable_auth,
)
from .workloads import LATE, WORKLOADS, Bench


def quietly(stop: Callable[[], Any]) -> None:
    """Run one clean-up step; a failure is reported but never skips the others."""
    try:
        stop()
    except BaseException as exc:  # clean-up must go on, also after a second Ctrl-C
        print(f"clean-up: {getattr(stop, '__qualname__', stop)} failed: {exc!r}", file=sys.stderr)


@dataclass
class Started:
    """The servers of a run, in the table's column order: etcd, the floors, kine-servers."""

    servers: list[Server] = field(default_factory=list)
    kines: list[KineServer] = field(default_factory=list)
    floors: list[Floor] = field(default_factory=list)
    db_bases: dict[str, str] = field(default_factory=dict)
    """By kine-server column, its PostgreSQL or MariaDB without a database name (workload 9
    makes fresh databases)."""


def start_servers(
    args: Namespace,
    stack: contextlib.ExitStack,
    workdir: Path,
    kine_flags: KineFlags,
    started: Started,
) -> None:
    """Start every server of the run into `started`, each stopped by `stack` on the way out."""
    kines: list[Server] = []
    if not args.no_sqlite:
        entry = ["-m", "kine_server"]
        env = {}
        if args.instrument:
            entry = [str(BENCH / "kine_instrumented.py")]
            env["BENCH_KINE_STATS"] = str(Path(args.instrument).resolve())
        if args.cprofile:
            entry = ["-m", "cProfile", "-o", args.cprofile, *entry]
        dsn = f"sqlite://{workdir}/sqlite/state.db"
        kine = KineServer(dsn, workdir, "kine-sqlite", entry, env, kine_flags)
        started.kines.append(kine)
        stack.callback(quietly, kine.stop)
        kine.start()
        kines.append(kine.server())
    if args.pg:
        pg = BenchPostgres(fsync=args.pg_fsync == "on")
        stack.callback(quietly, pg.stop)
        pg.start()
        started.db_bases["kine-pg"] = base = pg.dsn.rsplit("/", 1)[0]
        kine = KineServer(
            base + "/kinebench", workdir, "kine-pg", ["-m", "kine_server"], {}, kine_flags
        )
        started.kines.append(kine)
        stack.callback(quietly, kine.stop)
        kine.start()
        kines.append(kine.server(pg.postmaster()))
    if args.mysql:
        mariadb = ThrowawayMariaDB(durable=True)
        stack.callback(quietly, mariadb.stop)
        mariadb.start()
        started.db_bases["kine-mysql"] = base = mariadb.dsn.rstrip("/")
        kine = KineServer(
            base + "/kinebench", workdir, "kine-mysql", ["-m", "kine_server"], {}, kine_flags
        )
        started.kines.append(kine)
        stack.callback(quietly, kine.stop)
        kine.start()
        kines.append(kine.server(mariadb.server_pid()))
    if args.auth:
        for s in kines:
            enable_auth(s.endpoint)
        kines = [dataclasses.replace(s, auth=True) for s in kines]
    if not args.no_etcd:
        etcd = Etcd(workdir)
        stack.callback(quietly, etcd.stop)
        etcd.start()
        server = etcd.server()
        if args.auth:
            enable_auth(server.endpoint)
            server = dataclasses.replace(server, auth=True)
        started.servers.append(server)
    for procs in args.floors:
        floor = Floor(workdir, procs)
        started.floors.append(floor)
        stack.callback(quietly, floor.stop)
        floor.start()
        started.servers.append(floor.server())  # no auth: it checks nothing
    started.servers += kines


def run_workloads(bench: Bench, results: Results) -> None:
    args = bench.args
    steps = dict(WORKLOADS)
    chosen = sorted(args.workload_set)
    for late in (False, True):
        if late:
            # Before workload 7's half a million Puts and the servers of 8 and 9.
            for s in bench.servers:
                hwm = tree_status_kib(s.pid, "VmHWM") / 1024
                results.put(
                    "w6.rss", "6 server peak RSS (VmHWM, all processes)", "MiB", s.name, hwm
                )
        phase = [n for n in chosen if (n in LATE) == late]
        for repetition in range(args.repeat if phase else 0):
            bench.rep = repetition
            if args.repeat > 1:
                bench.log(f"repetition {repetition + 1} of {args.repeat}")
            for number in phase:
                steps[number](bench)


def stop_and_collect(started: Started, results: Results) -> None:
    """Stop kine-servers and floors here to learn how they exit (0 expected after SIGTERM)."""
    procs: list[KineServer | Floor] = [*started.kines, *started.floors]
    for proc in procs:
        results.problems.extend(proc.problems())
        proc.stop()
        if proc.exit_code not in (0, None):
            results.problems.append(f"{proc.name} exited with code {proc.exit_code} after SIGTERM")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.show:
        saved = json.loads(Path(args.show).read_text())
        print_run(saved)
        if args.compare:
            print(f"\nthis run / {args.compare}:")
            print(render_compare(saved, json.loads(Path(args.compare).read_text())))
        return 0

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C must always stop the run cleanly, also when a script started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    began = datetime.datetime.now(datetime.UTC)
    t_start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="kine-bench-"))
    results = Results()
    kine_flags = KineFlags.probe(args.kine_arg)
    started = Started()
    pyspy = PySpy(args, workdir)
    kine_workers: dict[str, int | None] = {}
    data: dict[str, Any] | None = None
    with contextlib.ExitStack() as stack:
        try:
            stack.callback(shutil.rmtree, workdir, True)
            start_servers(args, stack, workdir, kine_flags, started)
            servers = started.servers
            if args.auth:
                results.notes.append(
                    f"auth on: clients sign in as {AUTH_USER} (readwrite on every key, not "
                    "root); the floors check nothing"
                )
            for s in servers:
                print(f"{s.name}: {s.endpoint} (pid {s.pid})", flush=True)
            kine_workers = {s.name: kine_flags.workers(s.pid) for s in servers if s.kind == "kine"}

            ctx = multiprocessing.get_context("spawn")
            workers: list[Worker] = []
            for i in range(max(args.client_procs + 1, 2)):
                worker = Worker(ctx, i)
                workers.append(worker)
                stack.callback(quietly, worker.close)

            bench = Bench(args, servers, workers, results, pyspy.hook(servers), workdir, kine_flags)
            bench.db_bases = started.db_bases
            run_workloads(bench, results)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping everything", file=sys.stderr)
            return 130
        finally:
            pyspy.kill()
            stop_and_collect(started, results)
            metrics = [vars(m) for m in results.metrics.values()]
            names = [s.name for s in started.servers]
            floor = floor_ratios(metrics, names)
            data = {
                "started_utc": began.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "duration_s": time.monotonic() - t_start,
                "args": {k: v for k, v in vars(args).items() if k != "workload_set"},
                "machine": machine_info(),
                "servers": names,
                "floor": floor,
                "kine": {
                    "extra_args": list(kine_flags.extra),
                    "has_workers_flag": kine_flags.has("--workers"),
                    "workers": kine_workers,
                },
                "metrics": metrics,
                "details": results.details,
                "problems": results.problems,
                "notes": results.notes,
            }
    assert data is not None
    print_run(data)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / (began.strftime("%Y%m%dT%H%M%SZ") + ".json")
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
        print(f"\nsaved {path.relative_to(ROOT)}")
    if args.compare:
        print(f"\nthis run / {args.compare}:")
        print(render_compare(data, json.loads(Path(args.compare).read_text())))
    return 0
