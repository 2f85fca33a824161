"""kine-server against a real etcd: the same workloads on both, one table (see bench/README.md).

    .venv/bin/python bench/run.py              # kine-server on SQLite vs etcd
    .venv/bin/python bench/run.py --pg         # and kine-server on PostgreSQL
    .venv/bin/python bench/run.py --compare bench/results/OLD.json

Starts every server itself on loopback with fresh data directories, runs each workload on each
server in turn (the order rotates from one workload to the next), stops everything it started
(also on an error or Ctrl-C), prints the table and saves it as JSON in bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import multiprocessing
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .clients import Worker
from .paths import BENCH, RESULTS, ROOT, VENV_PYTHON
from .procs import tree_status_kib
from .report import Results, machine_info, print_run, render_compare
from .servers import AUTH_USER, BenchPostgres, Etcd, KineFlags, KineServer, Server, enable_auth
from .workloads import LATE, WORKLOADS, Bench
from .workloads.base import Hooks


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pg", action="store_true", help="also benchmark kine-server on PostgreSQL")
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
    p.add_argument("--channels", type=int, default=8, help="gRPC connections per level (8)")
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
    p.add_argument("--watch-rate", type=float, default=100.0, help="writes/s offered (100)")
    p.add_argument(
        "--go-load",
        choices=["s", "m", "l", "xl"],
        default="l",
        help="workload 7: etcdctl check perf --load (l: 500 clients, 8 000 Puts/s for 60 s)",
    )
    p.add_argument("--scale-clients", type=int, default=64, help="workload 8 clients (64)")
    p.add_argument("--scale-time", type=float, default=10.0, help="workload 8 cap per server")
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
    return args


def quietly(stop: Callable[[], Any]) -> None:
    """Run one clean-up step; a failure is reported but never skips the others."""
    try:
        stop()
    except BaseException as exc:  # clean-up must go on, also after a second Ctrl-C
        print(f"clean-up: {getattr(stop, '__qualname__', stop)} failed: {exc!r}", file=sys.stderr)


class PySpy:
    """`--py-spy`: py-spy record on kine-server (SQLite) during workload 2's highest level."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def hook(self, servers: list[Server]) -> Callable[[str, int], Hooks | None]:
        args = self.args

        def profile_hook(name: str, level: int) -> Hooks | None:
            if not args.py_spy or name != "kine-sqlite" or level != max(args.levels):
                return None
            server = next(s for s in servers if s.name == name)

            def begin() -> None:
                exe = shutil.which("py-spy", path=str(VENV_PYTHON.parent)) or "py-spy"
                cmd = [
                    exe,
                    "record",
                    "--pid",
                    str(server.pid),
                    "--format",
                    "raw",
                    "--threads",
                    "-o",
                    args.py_spy,
                    *shlex.split(args.py_spy_args),
                ]
                if "--rate" not in args.py_spy_args and "-r" not in args.py_spy_args.split():
                    cmd += ["--rate", "250"]
                with open(self.workdir / "py-spy.log", "wb") as log:
                    self.procs.append(
                        subprocess.Popen(
                            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                        )
                    )
                time.sleep(1.5)  # let it attach before the load starts

            def end() -> None:
                proc = self.procs.pop()
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                print((self.workdir / "py-spy.log").read_text(errors="replace")[-600:], flush=True)

            return begin, end

        return profile_hook

    def kill(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait()


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
    started = datetime.datetime.now(datetime.UTC)
    t_start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="kine-bench-"))
    results = Results()
    kine_flags = KineFlags.probe(args.kine_arg)
    kines: list[KineServer] = []
    servers: list[Server] = []
    workers: list[Worker] = []
    pyspy = PySpy(args, workdir)
    kine_workers: dict[str, int | None] = {}
    data: dict[str, Any] | None = None
    with contextlib.ExitStack() as stack:
        try:
            stack.callback(shutil.rmtree, workdir, True)
            if not args.no_sqlite:
                entry = ["-m", "kine_server"]
                env = {}
                if args.instrument:
                    entry = [str(BENCH / "kine_instrumented.py")]
                    env["BENCH_KINE_STATS"] = str(Path(args.instrument).resolve())
                if args.cprofile:
                    entry = ["-m", "cProfile", "-o", args.cprofile, *entry]
                kine = KineServer(
                    f"sqlite://{workdir}/sqlite/state.db",
                    workdir,
                    "kine-sqlite",
                    entry,
                    env,
                    kine_flags,
                )
                kines.append(kine)
                stack.callback(quietly, kine.stop)
                kine.start()
                servers.append(kine.server())
            if args.pg:
                pg = BenchPostgres(fsync=args.pg_fsync == "on")
                stack.callback(quietly, pg.stop)
                pg.start()
                dsn = pg.dsn.rsplit("/", 1)[0] + "/kinebench"
                kine = KineServer(dsn, workdir, "kine-pg", ["-m", "kine_server"], {}, kine_flags)
                kines.append(kine)
                stack.callback(quietly, kine.stop)
                kine.start()
                servers.append(kine.server(pg.postmaster()))
            if not args.no_etcd:
                etcd = Etcd(workdir)
                stack.callback(quietly, etcd.stop)
                etcd.start()
                servers.insert(0, etcd.server())
            if args.auth:
                for s in servers:
                    enable_auth(s.endpoint)
                servers = [dataclasses.replace(s, auth=True) for s in servers]
                results.notes.append(
                    f"auth on: clients sign in as {AUTH_USER} (readwrite on every key, not root)"
                )
            for s in servers:
                print(f"{s.name}: {s.endpoint} (pid {s.pid})", flush=True)
            kine_workers = {s.name: kine_flags.workers(s.pid) for s in servers if s.name != "etcd"}

            ctx = multiprocessing.get_context("spawn")
            for i in range(max(args.client_procs + 1, 2)):
                worker = Worker(ctx, i)
                workers.append(worker)
                stack.callback(quietly, worker.close)

            bench = Bench(args, servers, workers, results, pyspy.hook(servers), workdir, kine_flags)
            steps = dict(WORKLOADS)
            chosen = sorted(args.workload_set)
            for late in (False, True):
                if late:
                    # Before workload 7's half a million Puts and the servers of 8.
                    for s in servers:
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
        except KeyboardInterrupt:
            print("\ninterrupted: stopping everything", file=sys.stderr)
            return 130
        finally:
            pyspy.kill()
            for kine in kines:
                results.problems.extend(kine.problems())
            names = [s.name for s in servers]
            # Stop kine-servers here to learn how they exit (0 expected after SIGTERM).
            for kine in kines:
                kine.stop()
                if kine.exit_code not in (0, None):
                    results.problems.append(
                        f"{kine.name} exited with code {kine.exit_code} after SIGTERM"
                    )
            data = {
                "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "duration_s": time.monotonic() - t_start,
                "args": {k: v for k, v in vars(args).items() if k != "workload_set"},
                "machine": machine_info(),
                "servers": names,
                "kine": {
                    "extra_args": list(kine_flags.extra),
                    "has_workers_flag": kine_flags.has("--workers"),
                    "workers": kine_workers,
                },
                "metrics": [vars(m) for m in results.metrics.values()],
                "details": results.details,
                "problems": results.problems,
                "notes": results.notes,
            }
    assert data is not None
    print_run(data)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / (started.strftime("%Y%m%dT%H%M%SZ") + ".json")
        path.write_text(json.dumps(data, indent=1, default=str) + "\n")
        print(f"\nsaved {path.relative_to(ROOT)}")
    if args.compare:
        print(f"\nthis run / {args.compare}:")
        print(render_compare(data, json.loads(Path(args.compare).read_text())))
    return 0
