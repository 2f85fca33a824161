"""`--py-spy`: recording kine-server (SQLite) with py-spy during workload 2's highest level."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .paths import VENV_PYTHON
from .servers import Server
from .workloads.base import Hooks


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
