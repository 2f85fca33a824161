"""What every workload shares: the servers in turn, the client workers, measuring a window."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..clients import Job, Window, Worker, measured
from ..report import Results
from ..servers import KineFlags, Server

Hooks = tuple[Callable[[], None], Callable[[], None]]
"""Called once all jobs of a measurement are ready, and once they are done (a profiler)."""


@dataclass
class Bench:
    args: argparse.Namespace
    servers: list[Server]
    workers: list[Worker]
    results: Results
    profile_hook: Callable[[str, int], Hooks | None]
    workdir: Path
    """Scratch space of the run (servers a workload starts itself keep their data here)."""
    kine_flags: KineFlags
    rotation: int = 0
    rep: int = 0
    listed: set[str] = field(default_factory=set)
    """Servers already loaded with workload 4's keys (they serve every repetition)."""
    extra_trees: list[int] = field(default_factory=list)
    """Processes a workload started besides the servers and workers (etcdctl, pinned servers,
    kube-apiservers): their CPU, with their children's, is ours, not other programs'."""
    db_bases: dict[str, str] = field(default_factory=dict)
    """With --pg or --mysql: by kine-server column, its database server as a DSN without a
    database (fresh ones for 9)."""

    def order(self, floors: bool = True) -> list[Server]:
        """Servers in turn, starting one further along each time (no server always goes first);
        without the floors for a workload that needs stored data."""
        servers = [s for s in self.servers if floors or not s.is_floor]
        n = len(servers)
        if n == 0:
            return []
        start = self.rotation % n
        self.rotation += 1
        return servers[start:] + servers[:start]

    def all_pids(self) -> tuple[list[int], list[int]]:
        """Our processes: single ones, and roots whose whole tree is ours (servers, PostgreSQL)."""
        pids = [os.getpid(), *(w.proc.pid for w in self.workers if w.proc.pid)]
        trees = [s.pid for s in self.servers] + [s.db_root for s in self.servers if s.db_root]
        return pids, trees + self.extra_trees

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def note_noise(self, what: str, server: Server, window: Window) -> None:
        """List a measurement during which other programs used the machine noticeably."""
        other = window.cores(window.other_cpu)
        if other > self.args.noise_warn:
            self.results.notes.append(
                f"{what} on {server.name}: other programs used {other:.2f} cores meanwhile "
                f"(machine busy {window.cores(window.machine_cpu):.2f} of {os.cpu_count()})"
            )

    def measure(
        self,
        what: str,
        server: Server,
        jobs: list[Job],
        timeout: float,
        on_ready: Callable[[], None] | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> tuple[list[Any], Window]:
        results, window = measured(server, jobs, timeout, self.all_pids, on_ready, on_done)
        self.note_noise(what, server, window)
        return results, window

    def split(self, total: int, parts: int) -> list[int]:
        return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
