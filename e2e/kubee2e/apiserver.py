"""kube-apiserver on loopback over one etcd endpoint: finding the binary, its files (a bearer
token, a service-account key pair), its flags, starting it and waiting for /readyz.

The end-to-end checks run it on kine-server; the benchmark (bench/kinebench) starts it with this
module too, on etcd and on kine-server, to load both through the same apiserver.
"""

from __future__ import annotations

import http.client
import os
import secrets
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from .outcome import CheckFailed, tail
from .processes import ROOT, Process, free_port
from .rest import Api, brief


class ApiserverUnavailable(RuntimeError):
    """No kube-apiserver binary: scripts/kube-apiserver.sh could not build or find one."""


def kube_apiserver_binary(explicit: str | None = None) -> str:
    """`explicit`, else $KUBE_APISERVER, else what scripts/kube-apiserver.sh prints (it builds
    the binary the first time, about 10 minutes, then answers from its cache)."""
    if explicit:
        return explicit
    if os.environ.get("KUBE_APISERVER"):
        return os.environ["KUBE_APISERVER"]
    print(
        "-- locating kube-apiserver (scripts/kube-apiserver.sh; the first run builds it) --",
        flush=True,
    )
    out = subprocess.run(
        [str(ROOT / "scripts" / "kube-apiserver.sh")], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise ApiserverUnavailable(out.stderr)
    return out.stdout.strip().splitlines()[-1]


def binary_version(binary: str) -> str:
    return subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()


def make_apiserver_files(work: Path, token: str) -> None:
    """The token file (one admin in system:masters) and the service-account key pair."""
    (work / "tokens.csv").write_text(f"{token},e2e-admin,e2e-admin,system:masters\n")
    subprocess.run(
        ["openssl", "genrsa", "-out", str(work / "sa.key"), "2048"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        ["openssl", "rsa", "-in", str(work / "sa.key"), "-pubout", "-out", str(work / "sa.pub")],
        check=True,
        capture_output=True,
    )


def apiserver_process(
    binary: str, work: Path, etcd_endpoint: str, port: int, extra: Sequence[str]
) -> Process:
    """kube-apiserver serving HTTPS on 127.0.0.1:`port` over the etcd at `etcd_endpoint`
    (host:port), every request allowed for the token of tokens.csv."""
    argv = [
        binary,
        f"--etcd-servers=http://{etcd_endpoint}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={work / 'certs'}",
        f"--token-auth-file={work / 'tokens.csv'}",
        "--authorization-mode=AlwaysAllow",
        f"--service-account-key-file={work / 'sa.pub'}",
        f"--service-account-signing-key-file={work / 'sa.key'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--endpoint-reconciler-type=none",
        "--service-cluster-ip-range=10.0.0.0/24",
        "--profiling=false",
        *extra,
    ]
    env = dict(os.environ)
    env["HOME"] = str(work)
    return Process("kube-apiserver", argv, work / "kube-apiserver.log", env)


class KubeApiserver:
    """One kube-apiserver: its work directory (files, log), its process and a REST client.

    The files and the port are made at construction; `start()` runs it, `wait_ready()` waits
    for /readyz, `stop()` ends it (SIGTERM, then SIGKILL of its process group)."""

    def __init__(
        self, binary: str, work: Path, etcd_endpoint: str, extra: Sequence[str] = ()
    ) -> None:
        self.work = work
        token = secrets.token_hex(16)
        make_apiserver_files(work, token)
        self.port = free_port()
        self.process = apiserver_process(binary, work, etcd_endpoint, self.port, extra)
        self.api = Api(self.port, token)
        self.started = 0.0

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def start(self) -> None:
        self.started = time.monotonic()
        self.process.start()

    def stop(self, timeout: float = 20.0) -> int | None:
        return self.process.stop(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.process.running():
                code = self.process.proc.returncode if self.process.proc else None
                raise CheckFailed(
                    f"kube-apiserver exited ({code}); log tail:\n{tail(self.log_path)}"
                )
            try:
                status, body = self.api.request("GET", "/readyz")
                if status == 200:
                    return
                last = f"HTTP {status}: {brief(body)}"
            except (OSError, http.client.HTTPException) as exc:
                last = str(exc)
            time.sleep(0.5)
        raise CheckFailed(
            f"/readyz not ready after {timeout:.0f}s (last: {last}); "
            f"apiserver log tail:\n{tail(self.log_path)}"
        )
