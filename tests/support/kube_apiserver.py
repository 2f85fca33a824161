"""A real kube-apiserver (the e2e's binary, scripts/kube-apiserver.sh) on loopback, for tests that
point it at a kine-server started some other way (a container): start it with the etcd flags
given, wait for /readyz, talk REST with a bearer token.

Deliberately small and separate from e2e/run.py's launcher, which is the e2e's own: the same base
flags (no controllers, no network: --endpoint-reconciler-type=none), nothing else.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import signal
import ssl
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parent.parent.parent


def binary() -> str:
    """The cached kube-apiserver's path (scripts/kube-apiserver.sh builds it the first time)."""
    done = subprocess.run(
        [str(ROOT / "scripts" / "kube-apiserver.sh")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert done.returncode == 0, f"scripts/kube-apiserver.sh failed:\n{done.stderr}"
    return done.stdout.strip().splitlines()[-1]


class KubeApiserver:
    """kube-apiserver on a free loopback port with `etcd_flags` (--etcd-servers=... and TLS)."""

    def __init__(self, work: Path, etcd_flags: list[str]) -> None:
        self.work = work
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.etcd_flags = etcd_flags
        self.log_path = work / "kube-apiserver.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.context = ssl.create_default_context()
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE  # its self-signed serving certificate

    def start(self, timeout: float = 240.0) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        (self.work / "tokens.csv").write_text(f"{self.token},admin,admin,system:masters\n")
        key, pub = self.work / "sa.key", self.work / "sa.pub"
        subprocess.run(
            ["openssl", "genrsa", "-out", str(key), "2048"], check=True, capture_output=True
        )
        subprocess.run(
            ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
            check=True,
            capture_output=True,
        )
        argv = [
            binary(),
            *self.etcd_flags,
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--cert-dir={self.work / 'certs'}",
            f"--token-auth-file={self.work / 'tokens.csv'}",
            "--authorization-mode=AlwaysAllow",
            f"--service-account-key-file={pub}",
            f"--service-account-signing-key-file={key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            "--endpoint-reconciler-type=none",
            "--service-cluster-ip-range=10.0.0.0/24",
            "--profiling=false",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "HOME": str(self.work)},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"kube-apiserver exited {self.proc.returncode}:\n{self.log()}")
            try:
                status, body = self.request("GET", "/readyz")
                if status == 200:
                    return
                last = f"HTTP {status}: {body}"
            except (OSError, http.client.HTTPException) as exc:
                last = str(exc)
            time.sleep(0.5)
        raise AssertionError(f"kube-apiserver not ready in {timeout:.0f}s ({last}):\n{self.log()}")

    def log(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request on a new connection; the body parsed as JSON when it is JSON."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context, timeout=60)
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def expect(self, status: int, method: str, path: str, body: Any = None) -> Any:
        got, answer = self.request(method, path, body)
        assert got == status, f"{method} {path}: HTTP {got}, not {status}: {answer}"
        return answer

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
