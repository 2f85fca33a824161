"""Workload 7: Puts from a Go client, `etcdctl check perf` (Debian's etcdctl 3.4).

The Python client costs about as much CPU per request as the server does, so it cannot load a
server the way kube-apiserver or any Go client does; etcd's own load check can. Its `l` model
runs 500 clients (one connection each) for 60 s, rate-limited to 8 000 Puts/s, 256-byte keys
and 1 KiB values under one prefix, then deletes that prefix and prints the throughput it
reached and its slowest request. The server's CPU is sampled during the 60 s of load (from its
progress bar's first line; the delete comes after), and its Puts are counted from the server's
revision (one per Put), so deleting up to half a million keys is not part of CPU per Put.

These Puts run after workloads 1-5 on the same servers (they would otherwise run on a store
that grew by a few hundred thousand revisions) and after the peak-RSS figure.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import time

from tests.support.etcd import etcdctl_binary

from ..clients import Stopwatch, call
from ..paths import BenchError
from ..procs import proc_cpu
from ..servers import AUTH_PASSWORD, AUTH_USER, Server
from .base import Bench

LOAD_SECONDS = 60
"""How long check perf offers load, in every model (etcdctl 3.4's checkPerfCfgMap)."""

THROUGHPUT = re.compile(r"Throughput (?:is|too low:) (\d+) writes/s")
SLOWEST = re.compile(r"Slowest request took (?:too long: )?([0-9.]+)s")
VERDICT = re.compile(r"(?:PASS|FAIL|Slowest request|Error)[^\r\n]*")
STDDEV = re.compile(r"Stddev (?:is|too high:) ([0-9.]+)s")


def parse(output: str) -> dict[str, float]:
    """The figures check perf printed (a missing one is NaN: it stops before printing any if
    it could not delete its keys)."""
    found = {}
    for name, pattern in (("ops", THROUGHPUT), ("slowest_s", SLOWEST), ("stddev_s", STDDEV)):
        match = pattern.search(output)
        found[name] = float(match.group(1)) if match else math.nan
    return found


def run(b: Bench) -> None:
    ctl = etcdctl_binary()
    if ctl is None:
        b.results.problems.append("7 Go client: no etcdctl (Debian's etcd-client)")
        return
    for s in b.order():
        check_perf(b, s, ctl)


def check_perf(b: Bench, s: Server, ctl: str) -> None:
    load = b.args.go_load
    b.log(f"7 etcdctl check perf --load={load} on {s.name} ({LOAD_SECONDS:.0f} s, then it deletes)")
    before = call(b.workers[0], "current_revision", endpoint=s.target)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    log_path = b.workdir / f"check-perf-{s.name}-r{b.rep}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                ctl,
                "--endpoints",
                f"http://{s.endpoint}",
                *(["--user", f"{AUTH_USER}:{AUTH_PASSWORD}"] if s.auth else []),
                "check",
                "perf",
                f"--load={load}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    b.extra_trees.append(proc.pid)
    try:
        # The window: from its progress bar's first line, printed as the load starts (once its
        # 500 connections are up; the load's 60 s timer starts with the bar), for 60 s. The bar
        # itself is no end marker: its 60 one-second sleeps drift behind the timer on a busy
        # machine, by more than etcd takes to finish, delete and exit.
        connecting = time.monotonic() + 120
        while proc.poll() is None and log_path.stat().st_size == 0:
            if time.monotonic() > connecting:
                raise BenchError(f"etcdctl check perf on {s.name}: not started after 120 s")
            time.sleep(0.01)
        watch = Stopwatch(s, b.all_pids)
        while proc.poll() is None and time.monotonic() < watch.t0 + LOAD_SECONDS:
            time.sleep(0.02)
        ended_early = proc.poll() is not None
        client_cpu = proc_cpu(proc.pid)  # read before it is reaped: its own CPU, Go's threads
        win = watch.stop()
        win.client_cpu = client_cpu
        proc.wait(120)  # the in-flight Puts, the delete (30 s at most), printing
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        b.extra_trees.remove(proc.pid)
    after = call(b.workers[0], "current_revision", endpoint=s.target)
    output = log_path.read_text(errors="replace")
    figures = parse(output)
    # Its verdicts follow the progress bar's last \r-line without a line break.
    verdicts = VERDICT.findall(output)
    errors = [line for line in verdicts if "ERROR" in line or line.startswith("Error")]
    # Every Put is one revision; the delete, once it succeeded (then the figures are printed),
    # one more. Up to 500 Puts (those in flight at the 60 s) complete after the window.
    puts = after - before - (0 if math.isnan(figures["ops"]) else 1)
    b.note_noise("7 go client", s, win)
    if ended_early or math.isnan(figures["ops"]) or errors:
        said = " | ".join(verdicts or output.replace("\r", "\n").splitlines()[-3:])
        b.results.problems.append(
            f"7 go client on {s.name}: etcdctl exited {proc.returncode}"
            f"{' before the 60 s were up' if ended_early else ''}: {said[:400]}"
        )
    cpu = win.server_cpu + win.db_cpu
    b.results.put(
        "w7.ops",
        f"7 Go client Put throughput (check perf --load={load})",
        "ops/s",
        s.name,
        figures["ops"],
    )
    b.results.put("w7.slowest", "7 Go client slowest Put", "ms", s.name, figures["slowest_s"] * 1e3)
    b.results.put(
        "w7.cpu",
        "7 server CPU / 1000 Puts, Go client",
        "cpu-s",
        s.name,
        cpu / puts * 1000 if puts > 0 and not ended_early else math.nan,
    )
    b.results.put("w7.server", "7 server CPU", "cores", s.name, win.cores(cpu), False)
    b.results.put(
        "w7.client", "7 client CPU (etcdctl)", "cores", s.name, win.cores(client_cpu), False
    )
    b.results.put("w7.other", "7 other load", "cores", s.name, win.cores(win.other_cpu), False)
    b.results.detail(
        "w7",
        s.name,
        {
            "load": load,
            "exit_code": proc.returncode,
            "printed": verdicts,
            "stddev_ms": figures["stddev_s"] * 1e3,
            "puts": puts,
            "puts_per_s_in_window": puts / win.wall if win.wall else math.nan,
            **win.summary(),
        },
    )
