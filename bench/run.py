#!/usr/bin/env python3
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
import datetime
import itertools
import json
import math
import multiprocessing
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

if __name__ == "__main__" and VENV_PYTHON.exists() and Path(sys.prefix) != ROOT / ".venv":
    # grpcio and the stubs live in the project's venv; the client processes must use it too.
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])

for path in (BENCH, ROOT, ROOT / "src"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import loadgen  # noqa: E402

from tests.support import postgres as pg_support  # noqa: E402
from tests.support.etcd import RealEtcd  # noqa: E402
from tests.support.ports import free_port  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
RESULTS = BENCH / "results"


class BenchError(Exception):
    pass


# -- /proc ---------------------------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds (all its threads)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu(pid: int) -> float:
    """CPU of a process and all its descendants, including those that have already exited
    (their time moves into the parent's cutime/cstime when it reaps them, as PostgreSQL's
    postmaster does for every backend and autovacuum worker)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    own = sum(int(f) for f in fields[11:15]) / CLK_TCK  # utime stime cutime cstime
    return own + sum(tree_cpu(child) for child in children_of(pid))


def proc_status_kib(pid: int, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children_of(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == parent:
            found.append(int(entry))
    return found


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores, not idle or iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLK_TCK


# -- servers -------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    endpoint: str
    pid: int
    log_path: Path
    db_root: int | None = None
    """The root process of a separate database (PostgreSQL's postmaster), whose CPU the
    server's requests cost too."""

    def cpu(self) -> tuple[float, float]:
        return proc_cpu(self.pid), tree_cpu(self.db_root) if self.db_root else 0.0


_HELP: list[str] = []


def kine_has_flag(flag: str) -> bool:
    """Whether this checkout's kine-server knows `flag` (the CLI grows while the bench stays)."""
    if not _HELP:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        out = subprocess.run(
            [sys.executable, "-m", "kine_server", "--help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        _HELP.append(out.stdout)
    return flag in _HELP[0]


class KineServer:
    """`python -m kine_server` as a subprocess in its own session (Ctrl-C is ours to handle)."""

    def __init__(
        self, dsn: str, workdir: Path, name: str, entry: list[str], env: dict[str, str]
    ) -> None:
        self.dsn = dsn
        self.name = name
        self.entry = entry
        """What follows the interpreter: ["-m", "kine_server"], or a profiler wrapping it."""
        self.extra_env = env
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""
        self.metrics_address = ""
        self.exit_code: int | None = None

    def start(self, timeout: float = 30.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KINE_")}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
        )
        env.update(self.extra_env)
        for _attempt in range(3):
            port = free_port()
            self.endpoint = f"127.0.0.1:{port}"
            extra = []
            if kine_has_flag("--metrics-bind-address"):
                # Newer kine-servers serve /metrics, by default on a fixed port: two would clash.
                self.metrics_address = f"127.0.0.1:{free_port()}"
                extra = ["--metrics-bind-address", self.metrics_address]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [
                        sys.executable,
                        *self.entry,
                        "--endpoint",
                        self.dsn,
                        "--listen-address",
                        self.endpoint,
                        "--compact-interval",
                        "0",
                        *extra,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.log_path.parent,
                    start_new_session=True,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        return
                time.sleep(0.05)
            log_text = self.log_path.read_text(errors="replace")
            self.stop()
            if "cannot listen" not in log_text:
                raise BenchError(f"{self.name} did not start:\n{log_text[-3000:]}")
        raise BenchError(f"{self.name}: no free port after 3 attempts")

    def stop(self) -> None:
        """SIGTERM (kine-server drains and closes the database), SIGKILL after 30 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode
        self.proc = None


class BenchPostgres(pg_support.ThrowawayPostgres):
    """The tests' throwaway PostgreSQL, but with fsync on by default: etcd and SQLite sync every
    commit to disk, so a PostgreSQL that does not would not be a fair comparison."""

    def __init__(self, fsync: bool) -> None:
        super().__init__()
        self.fsync = fsync

    def _start_server(self) -> None:
        options = " ".join(
            [
                "-k",
                shlex.quote(str(self.base_dir)),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"fsync={'on' if self.fsync else 'off'}",
                "-c",
                "max_connections=200",
            ]
        )
        self._run(
            [
                pg_support._find_pg_binary("pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(int(self.startup_timeout)),
                "-o",
                options,
                "start",
            ],
            f"pg_ctl start on port {self.port}",
        )
        self._running = True
        self.dsn = f"postgres://{pg_support.DB_USER}@127.0.0.1:{self.port}/postgres"
        self._wait_ready()

    def postmaster(self) -> int | None:
        return self._postmaster_pid()


# -- client worker processes ---------------------------------------------------------------------


class Worker:
    def __init__(self, ctx: Any, index: int) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=loadgen.serve, args=(child,), daemon=True, name=f"bench-client-{index}"
        )
        self.proc.start()
        child.close()

    def submit(self, name: str, **kwargs: Any) -> None:
        self.conn.send((name, kwargs))

    def go(self, start_at: float) -> None:
        self.conn.send(start_at)

    def wait(self, want: str, timeout: float) -> Any:
        """The next message of kind `want` ("ready", "progress" or "ok"); raises on an error."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"client process {self.proc.name}: no {want!r} in {timeout:.0f}s")
            if not self.conn.poll(min(remaining, 1.0)):
                if not self.proc.is_alive():
                    raise BenchError(f"client process {self.proc.name} died")
                continue
            kind, payload = self.conn.recv()
            if kind == "error":
                raise BenchError(f"client job failed in {self.proc.name}:\n{payload}")
            if kind == want:
                return payload
            raise BenchError(f"{self.proc.name}: {kind!r} while waiting for {want!r}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.send(None)
        self.proc.join(3)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(3)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def call(worker: Worker, name: str, timeout: float = 300.0, **kwargs: Any) -> Any:
    """An unmeasured job on one worker."""
    worker.submit(name, **kwargs)
    return worker.wait("ok", timeout)


@dataclass
class Window:
    """What the machine, the server and the client did while one measured job ran."""

    wall: float
    server_cpu: float
    db_cpu: float
    machine_cpu: float
    ours_cpu: float
    """CPU of every process the benchmark started (all servers, clients) and its own."""
    client_cpu: float = 0.0

    @property
    def other_cpu(self) -> float:
        """Busy CPU not ours: other programs on the machine (noise if high)."""
        return max(0.0, self.machine_cpu - self.ours_cpu)

    def cores(self, seconds: float) -> float:
        return seconds / self.wall if self.wall > 0 else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "wall_s": self.wall,
            "server_cpu_s": self.server_cpu,
            "db_cpu_s": self.db_cpu,
            "client_cpu_s": self.client_cpu,
            "machine_cpu_s": self.machine_cpu,
            "server_cores": self.cores(self.server_cpu + self.db_cpu),
            "client_cores": self.cores(self.client_cpu),
            "other_cores": self.cores(self.other_cpu),
        }


def ours_cpu(pids: list[int], trees: list[int]) -> float:
    return sum(proc_cpu(p) for p in pids) + sum(tree_cpu(p) for p in trees)


def measured(
    server: Server,
    jobs: list[tuple[Worker, str, dict[str, Any]]],
    timeout: float,
    all_pids: Callable[[], tuple[list[int], list[int]]],
    on_ready: Callable[[], None] | None = None,
    on_done: Callable[[], None] | None = None,
) -> tuple[list[Any], Window]:
    """Run jobs that each call sync(): when all are ready, start them together and measure."""
    for worker, name, kwargs in jobs:
        worker.submit(name, **kwargs)
    for worker, _, _ in jobs:
        worker.wait("ready", 180)
    if on_ready is not None:
        on_ready()
    start_at = time.monotonic() + 0.05
    for worker, _, _ in jobs:
        worker.go(start_at)
    while time.monotonic() < start_at:
        time.sleep(0.001)
    cpu0, db0 = server.cpu()
    pids, trees = all_pids()
    ours0 = ours_cpu(pids, trees)
    machine0 = machine_busy()
    t0 = time.monotonic()
    try:
        results = [worker.wait("ok", timeout) for worker, _, _ in jobs]
    finally:
        if on_done is not None:
            on_done()
    wall = time.monotonic() - t0
    machine1 = machine_busy()
    cpu1, db1 = server.cpu()
    window = Window(
        wall, cpu1 - cpu0, db1 - db0, machine1 - machine0, ours_cpu(pids, trees) - ours0
    )
    window.client_cpu = sum(r.get("client_cpu", 0.0) for r in results)
    return results, window


# -- statistics and results ----------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[index]


def median(values: list[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class Metric:
    id: str
    label: str
    unit: str
    values: dict[str, float] = field(default_factory=dict)
    """The median of each server's samples (one per repetition)."""
    ratio: bool = True
    samples: dict[str, list[float]] = field(default_factory=dict)


class Results:
    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}
        self.details: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []
        self.notes: list[str] = []

    def put(self, mid: str, label: str, unit: str, server: str, value: float, ratio: bool = True):
        metric = self.metrics.setdefault(mid, Metric(mid, label, unit, ratio=ratio))
        samples = metric.samples.setdefault(server, [])
        samples.append(value)
        metric.values[server] = median([v for v in samples if not math.isnan(v)] or [math.nan])

    def detail(self, workload: str, server: str, info: dict[str, Any]) -> None:
        """One entry per repetition."""
        self.details.setdefault(workload, {}).setdefault(server, []).append(info)

    def errors(self, workload: str, server: str, reports: list[dict[str, Any]]) -> int:
        """Merge the error reports of a workload's jobs; each becomes a problem line."""
        counts: dict[str, int] = {}
        samples: list[str] = []
        for report in reports:
            for kind, n in report["counts"].items():
                counts[kind] = counts.get(kind, 0) + n
            samples.extend(report["samples"])
        for kind, n in counts.items():
            example = next((s for s in samples if s.startswith(kind)), "")
            self.problems.append(f"{workload} on {server}: {n} x {kind}  (e.g. {example})")
        return sum(counts.values())


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit in ("count",):
        return f"{int(value)}"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio_of(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or a < 0 or b <= 0:
        return "-"  # e.g. a watch event that arrived before the write's acknowledgement
    return f"{a / b:.2f}x"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for n, row in enumerate([header, *rows]):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(metrics: list[dict[str, Any]], servers: list[str]) -> str:
    kines = [s for s in servers if s != "etcd"]
    header = ["metric", "unit", "etcd"]
    for k in kines:
        header += [k, f"{k}/etcd"]
    rows = []
    for m in metrics:
        etcd = m["values"].get("etcd")
        row = [m["label"], m["unit"], fmt(etcd, m["unit"])]
        for k in kines:
            value = m["values"].get(k)
            row += [fmt(value, m["unit"]), ratio_of(value, etcd) if m.get("ratio", True) else ""]
        rows.append(row)
    return table(rows, header)


def render_compare(new: dict[str, Any], old: dict[str, Any]) -> str:
    old_metrics = {m["id"]: m for m in old["metrics"]}
    servers = [s for s in new["servers"] if s in old["servers"]]
    header = ["metric", "unit"]
    for s in servers:
        header += [f"{s} old", f"{s} new", "new/old"]
    rows = []
    for m in new["metrics"]:
        before = old_metrics.get(m["id"])
        if before is None:
            continue
        row = [m["label"], m["unit"]]
        for s in servers:
            a, b = m["values"].get(s), before["values"].get(s)
            row += [fmt(b, m["unit"]), fmt(a, m["unit"]), ratio_of(a, b)]
        rows.append(row)
    return table(rows, header)


# -- the workloads -------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    servers: list[Server]
    workers: list[Worker]
    results: Results
    profile_hook: Callable[[str, int], tuple[Callable[[], None], Callable[[], None]] | None]
    rotation: int = 0
    rep: int = 0
    listed: set[str] = field(default_factory=set)

    def order(self) -> list[Server]:
        """Servers in turn, starting one further along each time (no server always goes first)."""
        n = len(self.servers)
        start = self.rotation % n
        self.rotation += 1
        return self.servers[start:] + self.servers[:start]

    def all_pids(self) -> tuple[list[int], list[int]]:
        """Our processes: single ones, and roots whose whole tree is ours (PostgreSQL)."""
        pids = [os.getpid(), *(w.proc.pid for w in self.workers if w.proc.pid)]
        pids += [s.pid for s in self.servers]
        return pids, [s.db_root for s in self.servers if s.db_root]

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def measure(
        self,
        what: str,
        server: Server,
        jobs: list[tuple[Worker, str, dict[str, Any]]],
        timeout: float,
        on_ready: Callable[[], None] | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> tuple[list[Any], Window]:
        results, window = measured(server, jobs, timeout, self.all_pids, on_ready, on_done)
        other = window.cores(window.other_cpu)
        if other > self.args.noise_warn:
            self.results.notes.append(
                f"{what} on {server.name}: other programs used {other:.2f} cores meanwhile "
                f"(machine busy {window.cores(window.machine_cpu):.2f} of {os.cpu_count()})"
            )
        return results, window

    def split(self, total: int, parts: int) -> list[int]:
        return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]

    # 1 ------------------------------------------------------------------------------------------
    def w1_put(self) -> None:
        a = self.args
        for s in self.order():
            self.log(f"1 sequential Put on {s.name}")
            [r], win = self.measure(
                "1 put",
                s,
                [
                    (
                        self.workers[0],
                        "put_sequential",
                        dict(
                            endpoint=s.endpoint,
                            prefix=b"/bench/put/r%d/" % self.rep,
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
            self.results.errors("1 put", s.name, [r["errors"]])
            self.results.put("w1.p50", "1 seq Put p50", "ms", s.name, percentile(lat, 50) * 1e3)
            self.results.put("w1.p99", "1 seq Put p99", "ms", s.name, percentile(lat, 99) * 1e3)
            self.results.put("w1.ops", "1 seq Put rate", "ops/s", s.name, len(lat) / r["wall"])
            self.results.put(
                "w1.client", "1 client CPU", "cores", s.name, win.cores(win.client_cpu), False
            )
            self.results.detail("w1", s.name, {"ops": len(lat), **win.summary()})

    # 2 ------------------------------------------------------------------------------------------
    def w2_create(self) -> None:
        a = self.args
        totals: dict[str, list[float]] = {s.name: [0.0, 0.0] for s in self.servers}
        for level in a.levels:
            procs = 1 if level == 1 else min(a.client_procs, level, len(self.workers))
            clients = self.split(level, procs)
            channels = self.split(min(a.channels, level), procs)
            quotas = self.split(a.create_ops, procs)
            for s in self.order():
                self.log(f"2 create Txn x{level} on {s.name} ({procs} client processes)")
                tag = f"{s.name}-{level}-r{self.rep}"
                jobs = [
                    (
                        self.workers[i],
                        "create_txns",
                        dict(
                            endpoint=s.endpoint,
                            tag=f"{tag}-{i}",
                            clients=clients[i],
                            channels=max(1, channels[i]),
                            quota=quotas[i],
                            value_size=a.value_size,
                            time_cap=a.level_time,
                        ),
                    )
                    for i in range(procs)
                ]
                hooks = self.profile_hook(s.name, level) or (None, None)
                rs, win = self.measure(f"2 create x{level}", s, jobs, a.level_time + 120, *hooks)
                lat = [x for r in rs for x in r["latencies"]]
                wall = max(r["wall"] for r in rs)
                writes = sum(r["writes"] for r in rs)
                self.results.errors(f"2 create x{level}", s.name, [r["errors"] for r in rs])
                p = f"w2.c{level}"
                lbl = f"2 create x{level}"
                self.results.put(f"{p}.ops", f"{lbl} throughput", "ops/s", s.name, len(lat) / wall)
                self.results.put(f"{p}.p50", f"{lbl} p50", "ms", s.name, percentile(lat, 50) * 1e3)
                self.results.put(f"{p}.p99", f"{lbl} p99", "ms", s.name, percentile(lat, 99) * 1e3)
                cpu = win.server_cpu + win.db_cpu
                self.results.put(
                    f"w6.cpu.c{level}",
                    f"6 server CPU / 1000 writes, x{level}",
                    "cpu-s",
                    s.name,
                    cpu / writes * 1000 if writes else math.nan,
                )
                self.results.put(
                    f"{p}.server", f"{lbl} server CPU", "cores", s.name, win.cores(cpu), False
                )
                self.results.put(
                    f"{p}.client",
                    f"{lbl} client CPU",
                    "cores",
                    s.name,
                    win.cores(win.client_cpu),
                    False,
                )
                self.results.put(
                    f"{p}.other",
                    f"{lbl} other load",
                    "cores",
                    s.name,
                    win.cores(win.other_cpu),
                    False,
                )
                totals[s.name][0] += cpu
                totals[s.name][1] += writes
                self.results.detail(
                    f"w2.c{level}",
                    s.name,
                    {
                        "ops": len(lat),
                        "writes": writes,
                        "not_created": sum(r["not_created"] for r in rs),
                        "client_processes": procs,
                        "channels": channels,
                        "mean_ms": sum(lat) / len(lat) * 1e3 if lat else math.nan,
                        **win.summary(),
                    },
                )
        for name, (cpu, writes) in totals.items():
            if writes:
                self.results.put(
                    "w6.cpu", "6 server CPU / 1000 writes, all", "cpu-s", name, cpu / writes * 1000
                )

    # 3 ------------------------------------------------------------------------------------------
    def w3_churn(self) -> None:
        a = self.args
        procs = min(a.client_procs, len(self.workers))
        clients = self.split(a.churn_clients, procs)
        channels = self.split(min(a.channels, a.churn_clients), procs)
        keys = [
            b"/registry/configmaps/churn-r%d/cm-%05d" % (self.rep, i) for i in range(a.churn_keys)
        ]
        for s in self.order():
            self.log(f"3 update churn on {s.name}: loading {len(keys)} keys")
            loaded = call(
                self.workers[0],
                "load_keys",
                endpoint=s.endpoint,
                keys=keys,
                value_size=a.value_size,
                per_txn=1,
                clients=16,
            )
            self.results.errors("3 churn set-up", s.name, [loaded["errors"]])
            revisions = loaded["revisions"]
            ordered = sorted(revisions)
            self.log(f"3 update churn on {s.name}: {a.churn_versions} versions each")
            jobs = [
                (
                    self.workers[i],
                    "churn",
                    dict(
                        endpoint=s.endpoint,
                        revisions={k: revisions[k] for k in ordered[i::procs]},
                        versions=a.churn_versions,
                        clients=clients[i],
                        channels=max(1, channels[i]),
                        value_size=a.value_size,
                        time_cap=a.time_cap,
                    ),
                )
                for i in range(procs)
            ]
            rs, win = self.measure("3 churn", s, jobs, a.time_cap + 300)
            lat = [x for r in rs for x in r["latencies"]]
            wall = max(r["wall"] for r in rs)
            updates = sum(r["updates"] for r in rs)
            conflicts = sum(r["conflicts"] for r in rs)
            wrong = sum(r["wrong_final"] for r in rs)
            self.results.errors("3 churn", s.name, [r["errors"] for r in rs])
            self.results.put("w3.time", "3 churn total time", "s", s.name, wall)
            self.results.put("w3.ops", "3 churn throughput", "ops/s", s.name, len(lat) / wall)
            self.results.put("w3.p99", "3 churn p99", "ms", s.name, percentile(lat, 99) * 1e3)
            self.results.put("w3.done", "3 churn updates done", "count", s.name, updates)
            self.results.put(
                "w3.conflicts", "3 churn conflicts (must be 0)", "count", s.name, conflicts, False
            )
            self.results.put(
                "w3.client", "3 client CPU", "cores", s.name, win.cores(win.client_cpu), False
            )
            self.results.detail(
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

    # 4 ------------------------------------------------------------------------------------------
    def w4_list(self) -> None:
        a = self.args
        prefix = b"/registry/secrets/list/"
        keys = [prefix + b"s-%06d" % i for i in range(a.list_keys)]
        for s in self.order():
            if s.name not in self.listed:  # the same 10 000 keys serve every repetition
                self.listed.add(s.name)
                self.log(f"4 LIST on {s.name}: loading {len(keys)} keys")
                loaded = call(
                    self.workers[0],
                    "load_keys",
                    endpoint=s.endpoint,
                    keys=keys,
                    value_size=a.value_size,
                    per_txn=100,
                    clients=4,
                )
                self.results.errors("4 list set-up", s.name, [loaded["errors"]])
            self.log(f"4 LIST on {s.name}: {a.list_runs} paginated LISTs")
            [r], win = self.measure(
                "4 list",
                s,
                [
                    (
                        self.workers[0],
                        "list_runs",
                        dict(
                            endpoint=s.endpoint,
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
            self.results.errors("4 list", s.name, [r["errors"]])
            totals = r["totals"]
            self.results.put(
                "w4.median",
                f"4 LIST {a.list_keys}/{a.list_page} median",
                "ms",
                s.name,
                median(totals) * 1e3,
            )
            self.results.put(
                "w4.page", "4 LIST page p50", "ms", s.name, percentile(r["pages"], 50) * 1e3
            )
            self.results.put(
                "w4.client", "4 client CPU", "cores", s.name, win.cores(win.client_cpu), False
            )
            self.results.detail(
                "w4",
                s.name,
                {
                    "runs_ms": [t * 1e3 for t in totals],
                    "pages_per_list": len(r["pages"]) // max(1, len(totals)),
                    "pinned_revision_check": r["pinned_check"],
                    **win.summary(),
                },
            )

    # 5 ------------------------------------------------------------------------------------------
    def w5_watch(self) -> None:
        a = self.args
        procs = max(1, min(a.client_procs, len(self.workers) - 1))
        per_proc = self.split(a.watchers, procs)
        channels = self.split(a.channels, procs)
        for s in self.order():
            prefix = b"/registry/events/watch-%s-r%d/" % (s.name.encode(), self.rep)
            sentinel = prefix + b"zz-end"
            revision = call(self.workers[0], "current_revision", endpoint=s.endpoint)
            self.log(f"5 {a.watchers} watchers, {a.watch_writes} writes on {s.name}")
            duration = a.time_cap + 30
            jobs = [
                (
                    self.workers[i],
                    "watchers",
                    dict(
                        endpoint=s.endpoint,
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
                    self.workers[procs],
                    "watch_writer",
                    dict(
                        endpoint=s.endpoint,
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
            rs, win = self.measure("5 watch", s, jobs, duration + 60)
            writer = rs[-1]
            self.results.errors("5 watch", s.name, [r["errors"] for r in rs])
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
                    self.results.problems.append(f"5 watch on {s.name}: {n} {what}")
            writes_wall = writer["wall"]
            self.results.put(
                "w5.p50",
                "5 watch latency p50 (after ack)",
                "ms",
                s.name,
                percentile(after_ack, 50) * 1e3,
            )
            self.results.put(
                "w5.p99",
                "5 watch latency p99 (after ack)",
                "ms",
                s.name,
                percentile(after_ack, 99) * 1e3,
            )
            self.results.put(
                "w5.p50s",
                "5 watch latency p50 (after send)",
                "ms",
                s.name,
                percentile(after_send, 50) * 1e3,
            )
            self.results.put(
                "w5.p99s",
                "5 watch latency p99 (after send)",
                "ms",
                s.name,
                percentile(after_send, 99) * 1e3,
            )
            self.results.put(
                "w5.lost",
                "5 watch events lost (must be 0)",
                "count",
                s.name,
                lost + missing_streams * len(written),
                False,
            )
            self.results.put(
                "w5.rate",
                "5 watch writes achieved",
                "ops/s",
                s.name,
                len(written) / writes_wall if writes_wall else math.nan,
            )
            self.results.put(
                "w5.client", "5 client CPU", "cores", s.name, win.cores(win.client_cpu), False
            )
            self.results.detail(
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


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pg", action="store_true", help="also benchmark kine-server on PostgreSQL")
    p.add_argument("--no-sqlite", action="store_true", help="skip kine-server on SQLite")
    p.add_argument("--no-etcd", action="store_true", help="skip etcd (e.g. when profiling)")
    p.add_argument(
        "--pg-fsync", choices=["on", "off"], default="on", help="PostgreSQL fsync (default on)"
    )
    p.add_argument("--workloads", default="1,2,3,4,5", help="which workloads (default all)")
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
    args.workload_set = {int(w) for w in args.workloads.split(",") if w}
    args.levels = [int(x) for x in args.levels.split(",") if x]
    return args


def quietly(stop: Callable[[], Any]) -> None:
    """Run one clean-up step; a failure is reported but never skips the others."""
    try:
        stop()
    except BaseException as exc:  # clean-up must go on, also after a second Ctrl-C
        print(f"clean-up: {getattr(stop, '__qualname__', stop)} failed: {exc!r}", file=sys.stderr)


def machine_info() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
            return out.splitlines()[0] if out else "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = version(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"]) != "?"
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "etcd": version(["/usr/bin/etcd", "--version"]),
        "kine_commit": commit + ("+dirty-src" if dirty else ""),
        "loadavg_at_start": os.getloadavg(),
    }


def print_run(data: dict[str, Any]) -> None:
    print()
    print(
        f"kine-server vs etcd  ({data['started_utc']}, {data['machine']['cpus']} cores, "
        f"run took {data['duration_s']:.0f} s)"
    )
    print(render(data["metrics"], data["servers"]))
    if data["problems"]:
        print("\nProblems seen:")
        for line in data["problems"]:
            print("  - " + line)
    else:
        print("\nProblems seen: none")
    if data.get("notes"):
        print("\nNoise (other programs on the machine during a measurement):")
        for line in data["notes"]:
            print("  - " + line)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.show:
        data = json.loads(Path(args.show).read_text())
        print_run(data)
        if args.compare:
            print(f"\nthis run / {args.compare}:")
            print(render_compare(data, json.loads(Path(args.compare).read_text())))
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
    kines: list[KineServer] = []
    servers: list[Server] = []
    workers: list[Worker] = []
    pyspy: list[subprocess.Popen[bytes]] = []
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
                    f"sqlite://{workdir}/sqlite/state.db", workdir, "kine-sqlite", entry, env
                )
                kines.append(kine)
                stack.callback(quietly, kine.stop)
                kine.start()
                assert kine.proc is not None
                servers.append(Server("kine-sqlite", kine.endpoint, kine.proc.pid, kine.log_path))
            if args.pg:
                pg = BenchPostgres(fsync=args.pg_fsync == "on")
                stack.callback(quietly, pg.stop)
                pg.start()
                dsn = pg.dsn.rsplit("/", 1)[0] + "/kinebench"
                kine = KineServer(dsn, workdir, "kine-pg", ["-m", "kine_server"], {})
                kines.append(kine)
                stack.callback(quietly, kine.stop)
                kine.start()
                assert kine.proc is not None
                servers.append(
                    Server("kine-pg", kine.endpoint, kine.proc.pid, kine.log_path, pg.postmaster())
                )
            if not args.no_etcd:
                etcd = RealEtcd()
                stack.callback(quietly, etcd.stop)
                etcd.start()
                assert etcd._proc is not None
                servers.insert(0, Server("etcd", etcd.endpoint, etcd._proc.pid, etcd.log_path))
            for s in servers:
                print(f"{s.name}: {s.endpoint} (pid {s.pid})", flush=True)

            ctx = multiprocessing.get_context("spawn")
            for i in range(max(args.client_procs + 1, 2)):
                worker = Worker(ctx, i)
                workers.append(worker)
                stack.callback(quietly, worker.close)

            def profile_hook(name: str, level: int) -> tuple[Any, Any] | None:
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
                    with open(workdir / "py-spy.log", "wb") as log:
                        pyspy.append(
                            subprocess.Popen(
                                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                            )
                        )
                    time.sleep(1.5)  # let it attach before the load starts

                def end() -> None:
                    proc = pyspy.pop()
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                    print((workdir / "py-spy.log").read_text(errors="replace")[-600:], flush=True)

                return begin, end

            bench = Bench(args, servers, workers, results, profile_hook)
            steps = {
                1: bench.w1_put,
                2: bench.w2_create,
                3: bench.w3_churn,
                4: bench.w4_list,
                5: bench.w5_watch,
            }
            for repetition in range(args.repeat):
                bench.rep = repetition
                if args.repeat > 1:
                    bench.log(f"repetition {repetition + 1} of {args.repeat}")
                for number in sorted(args.workload_set):
                    steps[number]()

            for s in servers:
                hwm = proc_status_kib(s.pid, "VmHWM") / 1024
                results.put("w6.rss", "6 server peak RSS (VmHWM)", "MiB", s.name, hwm)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping everything", file=sys.stderr)
            return 130
        finally:
            for proc in pyspy:
                with contextlib.suppress(Exception):
                    proc.kill()
                    proc.wait()
            # Server logs: anything above INFO is worth reporting.
            for kine in kines:
                with contextlib.suppress(OSError):
                    for line in kine.log_path.read_text(errors="replace").splitlines():
                        if any(w in line for w in ("WARNING", "ERROR", "Traceback", "CRITICAL")):
                            results.problems.append(f"{kine.name} log: {line[:300]}")
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
