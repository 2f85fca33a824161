"""The floor servers of a run: bench/floor.py (an etcd v3 gRPC server that stores nothing)
with 1 and with N processes sharing a port, as columns beside etcd and kine-server.

A floor answers Put and Txn with a canned response, so its figures say what Python's gRPC
alone allows on this machine with the same client; every throughput row is also reported as a
fraction of the floor with the most processes (report.py). Workloads that need stored data
(4 LIST, 5 watch, 9 kube-apiserver) and those that start servers of their own (8) skip it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.ports import free_port

from .paths import BENCH, ROOT, BenchError
from .servers import Server, terminate

READY = b"floor: serving"


class Floor:
    """`bench/floor.py --procs N` as a subprocess in its own session, ready once it says so
    (every process listens: a client that connects before would see only the first)."""

    def __init__(self, workdir: Path, procs: int) -> None:
        self.procs = procs
        self.name = f"floor-{procs}"
        self.log_path = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = ""
        self.exit_code: int | None = None

    def start(self, timeout: float = 60.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
        )
        self.endpoint = f"127.0.0.1:{free_port()}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, str(BENCH / "floor.py")),
                    *("--listen", self.endpoint, "--procs", str(self.procs)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY in self.log_path.read_bytes():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        text = self.log_path.read_text(errors="replace")
        self.stop()
        raise BenchError(f"{self.name} did not start:\n{text[-3000:]}")

    def server(self) -> Server:
        assert self.proc is not None
        return Server(self.name, self.endpoint, self.proc.pid, self.log_path, kind="floor")

    def stop(self) -> None:
        """SIGTERM (it stops its processes and exits 0), SIGKILL after 15 s; then SIGKILL to
        its session, should a server process have outlived it."""
        if self.proc is not None:
            self.exit_code = terminate(self.proc, 15)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc = None

    def problems(self) -> list[str]:
        """A floor logs nothing but its ready line; anything else (a traceback) is reported."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [f"{self.name} log: {line[:300]}" for line in lines if not line.startswith("floor:")]
