"""A real single-node etcd for differential tests against kine-server.

Running the same client calls against genuine etcd is the reference for what
"etcd-compatible" means, so tests start a private etcd on random loopback
ports with a fresh data directory.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from .ports import free_port

_PORT_ATTEMPTS = 3
"""free_port() can race with other processes; retry start this often."""


def _find(name: str) -> str | None:
    """Prefer the distro binary in /usr/bin, else whatever is on PATH."""
    packaged = Path("/usr/bin") / name
    if os.access(packaged, os.X_OK):
        return str(packaged)
    return shutil.which(name)


def etcd_binary() -> str | None:
    """Path of the etcd server binary, or None so callers can skip tests."""
    return _find("etcd")


def etcdctl_binary() -> str | None:
    """Path of the etcdctl client binary, or None if it is not installed."""
    return _find("etcdctl")


def _clean_env(prefix: str) -> dict[str, str]:
    """Copy os.environ without variables etcd/etcdctl would treat as flags.

    Both programs read ``ETCD_*`` / ``ETCDCTL_*`` variables as flag values; a
    stray one in the developer's shell would silently change the server or
    conflict with our explicit flags.
    """
    return {k: v for k, v in os.environ.items() if not k.startswith(prefix)}


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class EtcdTLS:
    """Certificates for a real etcd that serves TLS and requires client certificates, and the
    client pair its own checks (health) present."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    def server_flags(self) -> list[str]:
        return [
            *("--cert-file", str(self.cert), "--key-file", str(self.key)),
            *("--trusted-ca-file", str(self.ca), "--client-cert-auth"),
        ]

    def client_flags(self) -> list[str]:
        return [f"--cacert={self.ca}", f"--cert={self.client_cert}", f"--key={self.client_key}"]


class RealEtcd:
    """A private single-member etcd cluster on 127.0.0.1.

    Use as ``with RealEtcd() as etcd: client(etcd.endpoint)`` or call
    :meth:`start` / :meth:`stop` explicitly.
    """

    def __init__(
        self,
        binary: str | None = None,
        startup_timeout: float = 30.0,
        restore_from: Path | None = None,
        tls: EtcdTLS | None = None,
    ) -> None:
        found = binary or etcd_binary()
        if found is None:
            raise FileNotFoundError("etcd binary not found (install etcd-server)")
        self.binary: str = found
        self.startup_timeout = startup_timeout
        #: A snapshot (`etcdctl snapshot save`) the member starts from, restored by etcdctl.
        self.restore_from = restore_from
        #: Serve TLS and require client certificates (etcd's --client-cert-auth).
        self.tls = tls
        self.endpoint: str = ""
        """``127.0.0.1:PORT`` of the client listener; empty until started."""
        self.client_port = 0
        self.peer_port = 0
        self._base_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def log_path(self) -> Path:
        if self._base_dir is None:
            raise RuntimeError("RealEtcd has not been started")
        return self._base_dir / "etcd.log"

    @property
    def data_dir(self) -> Path:
        """etcd's --data-dir (member/snap/db is its backend)."""
        if self._base_dir is None:
            raise RuntimeError("RealEtcd has not been started")
        return self._base_dir / "data"

    @property
    def pid(self) -> int:
        """The etcd process's id (for measuring its CPU)."""
        if self._proc is None:
            raise RuntimeError("RealEtcd has not been started")
        return self._proc.pid

    def stop_process(self) -> None:
        """Terminate etcd but keep its files (for reading its data directory)."""
        self._terminate()

    def start(self) -> None:
        """Start etcd and wait until it serves requests; clean up on failure."""
        if self._proc is not None:
            return
        self._base_dir = Path(tempfile.mkdtemp(prefix="kine-etcd-", dir="/tmp"))
        try:
            for attempt in range(_PORT_ATTEMPTS):
                self._spawn()
                try:
                    self._wait_ready()
                    return
                except RuntimeError:
                    port_taken = "address already in use" in _tail(self.log_path)
                    self._terminate()
                    if not port_taken or attempt == _PORT_ATTEMPTS - 1:
                        raise
                    shutil.rmtree(self._base_dir / "data", ignore_errors=True)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate etcd (SIGTERM, SIGKILL after 5 s) and delete its directory."""
        self._terminate()
        if self._base_dir is not None:
            shutil.rmtree(self._base_dir, ignore_errors=True)
            self._base_dir = None
        self.endpoint = ""

    def etcdctl(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run ``etcdctl --endpoints <this server> ARGS`` and return its output.

        Raises CalledProcessError on failure so tests see etcdctl's stderr.
        """
        ctl = etcdctl_binary()
        if ctl is None:
            raise FileNotFoundError("etcdctl binary not found (install etcd-client)")
        env = _clean_env("ETCDCTL_")
        env["ETCDCTL_API"] = "3"
        return subprocess.run(
            [
                ctl,
                "--endpoints",
                self.client_url,
                *(self.tls.client_flags() if self.tls else []),
                *args,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------

    def _spawn(self) -> None:
        assert self._base_dir is not None
        self.client_port = free_port()
        self.peer_port = free_port()
        self.endpoint = f"127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        env = _clean_env("ETCD_")
        if self.restore_from is not None:
            self._restore(peer_url)
        machine = platform.machine().lower()
        if machine in ("aarch64", "arm64"):
            # etcd 3.4 refuses to start on arm64 unless explicitly allowed.
            env["ETCD_UNSUPPORTED_ARCH"] = "arm64"
        # Truncate per attempt so the "address in use" check sees only this run;
        # the child keeps its own copy of the descriptor once spawned.
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    "--name",
                    "default",
                    "--data-dir",
                    str(self._base_dir / "data"),
                    "--listen-client-urls",
                    self.client_url,
                    "--advertise-client-urls",
                    self.client_url,
                    "--listen-peer-urls",
                    peer_url,
                    "--initial-advertise-peer-urls",
                    peer_url,
                    "--initial-cluster",
                    f"default={peer_url}",
                    *(self.tls.server_flags() if self.tls else []),
                ],
                env=env,
                cwd=self._base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def _restore(self, peer_url: str) -> None:
        """`etcdctl snapshot restore` into the data directory, for this member and peer URL."""
        assert self._base_dir is not None and self.restore_from is not None
        ctl = etcdctl_binary()
        if ctl is None:
            raise FileNotFoundError("etcdctl not installed (make deps installs it)")
        data = self._base_dir / "data"
        shutil.rmtree(data, ignore_errors=True)
        env = _clean_env("ETCDCTL_")
        env["ETCDCTL_API"] = "3"
        subprocess.run(
            [
                ctl,
                "snapshot",
                "restore",
                str(self.restore_from),
                "--data-dir",
                str(data),
                "--name",
                "default",
                "--initial-cluster",
                f"default={peer_url}",
                "--initial-advertise-peer-urls",
                peer_url,
            ],
            env=env,
            capture_output=True,
            check=True,
            timeout=60,
        )

    def _terminate(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            self._proc = None

    def _wait_ready(self) -> None:
        """Poll until the client port accepts TCP and, if available, etcdctl reports healthy."""
        deadline = time.monotonic() + self.startup_timeout
        have_ctl = etcdctl_binary() is not None
        while True:
            assert self._proc is not None
            exit_code = self._proc.poll()
            if exit_code is not None:
                raise RuntimeError(
                    f"etcd exited with code {exit_code} during startup\n"
                    f"--- log tail ({self.log_path}) ---\n{_tail(self.log_path)}"
                )
            if self._port_open() and (not have_ctl or self._healthy()):
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"etcd on {self.endpoint} not ready after {self.startup_timeout:.0f}s\n"
                    f"--- log tail ({self.log_path}) ---\n{_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def _port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.client_port), timeout=1):
                return True
        except OSError:
            return False

    def _healthy(self) -> bool:
        try:
            self.etcdctl("endpoint", "health", "--command-timeout=2s", timeout=5)
        except subprocess.CalledProcessError as exc:
            # A member restored with auth on answers the health check's read without a user:
            # refused, but answered, so it serves.
            return "etcdserver: user name is empty" in exc.stderr
        except subprocess.TimeoutExpired:
            return False
        return True
