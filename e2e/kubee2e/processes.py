"""Server processes the end-to-end run starts: each in its own session with a log file, and
kine-server as the apiserver's etcd, on a loopback port chosen so it can be restarted."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

from .outcome import CheckFailed, tail

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A free loopback port *below* the kernel's ephemeral range.

    kine-server is restarted on the same port while kube-apiserver's ~70 etcd clients keep
    redialling it; a port inside the ephemeral range can then be taken by one of those dials
    itself (a TCP self-connect: source port == destination port), and the restart fails with
    "Address already in use".
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class Process:
    """A server process with its own session (so Ctrl-C reaches only us) and a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=ROOT,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was never started"
        return self.proc.pid

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the process group; returns the exit code of SIGTERM."""
        if self.proc is None:
            return None
        code: int | None = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                code = None
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything it left behind
        if self.proc.poll() is None:
            self.proc.wait()
        return code


class Kine:
    """kine-server on `port` (which a restart keeps: the apiserver redials the same address)."""

    def __init__(self, dsn: str, port: int, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KINE_")}
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        argv = [
            *(sys.executable, "-m", "kine_server"),
            *("--endpoint", dsn),
            *("--listen-address", f"127.0.0.1:{port}"),
            *("--compact-interval", "0"),
        ]
        help_text = subprocess.run(
            [sys.executable, "-m", "kine_server", "--help"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        ).stdout
        if "--metrics-bind-address" in help_text:
            argv += ["--metrics-bind-address", "0"]  # 8080 may be taken; not needed here
        self.process = Process("kine-server", argv, log_path, env)
        self.port = port

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def stop(self, timeout: float = 20.0) -> int | None:
        return self.process.stop(timeout)

    def start_and_wait(self, timeout: float = 30.0) -> None:
        self.process.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.process.running():
                raise CheckFailed(f"kine-server exited at start:\n{tail(self.log_path)}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise CheckFailed(f"kine-server not listening after {timeout:.0f}s:\n{tail(self.log_path)}")
