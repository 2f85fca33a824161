"""kine-server started as a real process, the way an operator or CI starts it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.ports import free_port


def with_default_signals(command: list[str]) -> list[str]:
    """`command`, started with every signal's default disposition. A non-interactive shell's `&`
    (so `make test &`, and `nohup`) starts its children with SIGINT ignored, exec keeps what is
    ignored, and a Go program such as etcdctl then never stops on SIGINT: a test that signals a
    child must not depend on how the test run itself was started."""
    return ["env", "--default-signal", *command]


@contextlib.contextmanager
def ignoring(sig: signal.Signals) -> Iterator[None]:
    """This process ignores `sig` inside the block (the main thread only), as when the test run
    was started in the background: children started in it inherit that."""
    previous = signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(sig, previous)


class KineProcess:
    """`python -m kine_server` on a free loopback port, logging to a file."""

    def __init__(
        self, endpoint: str, log_dir: Path, *args: str, prefix: list[str] | None = None
    ) -> None:
        self.endpoint = endpoint
        #: A command the server runs under, e.g. faketime's.
        self.prefix = prefix or []
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.args = list(args)
        if "--metrics-bind-address" not in self.args:
            self.args += ["--metrics-bind-address", "0"]  # several may run at once
        self.log_path = log_dir / f"kine-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0, probe_interval: float = 0.05) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KINE_")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "kine_server",
                    "--endpoint",
                    self.endpoint,
                    "--listen-address",
                    self.address,
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                # A group of its own: whatever it leaves behind (a prefix's child, --workers
                # front-ends) is found and ended on exit.
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kine-server exited at start:\n{self.log()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(probe_interval)
        raise RuntimeError(f"kine-server did not listen within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            # faketime runs the server as its child, and a test may have left front-ends
            # without their writer: nothing of this server outlives the test.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)


def failed_start(endpoint: str, *args: str, timeout: float = 60.0) -> str:
    """Run `python -m kine_server --endpoint ENDPOINT ARGS` to its exit, which must be a failed
    start: exit code 1 and exactly one line on stderr, which is returned."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KINE_")}
    done = subprocess.run(
        [sys.executable, "-m", "kine_server", "--endpoint", endpoint, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, (done.returncode, done.stderr)
    return lines[0]
