"""Starting and stopping the servers under test: kine-server, a real etcd, PostgreSQL.

Every server runs on loopback with a fresh data directory. A server can be pinned to a set of
cores (`cpus`, as `taskset -c` takes them): the affinity is set before the program starts, so
everything that sizes itself by the cores it may use sees it (etcd's GOMAXPROCS, kine-server's
default `--workers`) and every child process inherits it.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from kine_server.pb import auth_pb2, rpc_pb2, rpc_pb2_grpc
from tests.support import postgres as pg_support
from tests.support.etcd import RealEtcd
from tests.support.ports import free_port

from .paths import ROOT, BenchError
from .procs import children_map, tree_cpu

#: With --auth: the user every client job (and the Go client) signs in as. Not root, so that
#: every request is checked against its role's permissions (root's skip them).
AUTH_USER, AUTH_PASSWORD = "bench", "benchpw"

#: The generated stub class carries no annotations: typed here.
AUTH_STUB: Callable[[grpc.Channel], Any] = rpc_pb2_grpc.AuthStub


def enable_auth(endpoint: str) -> None:
    """Turn auth on as an operator would: root, and a user with readwrite on every key."""
    channel = grpc.insecure_channel(endpoint)
    try:
        auth = AUTH_STUB(channel)
        auth.UserAdd(rpc_pb2.AuthUserAddRequest(name="root", password="rootpw"), timeout=30)
        auth.UserGrantRole(rpc_pb2.AuthUserGrantRoleRequest(user="root", role="root"), timeout=30)
        auth.UserAdd(rpc_pb2.AuthUserAddRequest(name=AUTH_USER, password=AUTH_PASSWORD), timeout=30)
        auth.RoleAdd(rpc_pb2.AuthRoleAddRequest(name="everything"), timeout=30)
        everything = auth_pb2.Permission(
            permType=auth_pb2.Permission.READWRITE, key=b"\0", range_end=b"\0"
        )
        grant = rpc_pb2.AuthRoleGrantPermissionRequest(name="everything", perm=everything)
        auth.RoleGrantPermission(grant, timeout=30)
        role = rpc_pb2.AuthUserGrantRoleRequest(user=AUTH_USER, role="everything")
        auth.UserGrantRole(role, timeout=30)
        auth.AuthEnable(rpc_pb2.AuthEnableRequest(), timeout=30)
    finally:
        channel.close()


@dataclass
class Server:
    """A running server as the workloads see it: where to connect, which process to measure."""

    name: str
    endpoint: str
    pid: int
    log_path: Path
    db_root: int | None = None
    """The root process of a separate database (PostgreSQL's postmaster), whose CPU the
    server's requests cost too."""
    auth: bool = False
    """With --auth: auth is on, and clients sign in as AUTH_USER."""
    kind: str = "kine"
    """"kine", "etcd", or "floor" (bench/floor.py: no storage, not every workload runs on it)."""

    @property
    def is_floor(self) -> bool:
        return self.kind == "floor"

    @property
    def target(self) -> str:
        """What the client jobs connect to: the endpoint, after `user:password@` with --auth
        (each job's channels sign in, as every etcd client does; see loadgen.Channels)."""
        return f"{AUTH_USER}:{AUTH_PASSWORD}@{self.endpoint}" if self.auth else self.endpoint

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the server (with its child processes) and of its database."""
        children = children_map()
        return tree_cpu(self.pid, children), tree_cpu(
            self.db_root, children
        ) if self.db_root else 0.0


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL if it has not exited after `timeout` s; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def pinned(cpus: str | None) -> list[str]:
    """The command prefix that starts a program on these cores only (nothing if None)."""
    return ["taskset", "-c", cpus] if cpus else []


@dataclass(frozen=True)
class KineFlags:
    """What this checkout's kine-server accepts (its CLI grows while the bench stays) and the
    extra flags (`--kine-arg`) the bench passes to every kine-server it starts."""

    help_text: str
    extra: tuple[str, ...] = ()

    @classmethod
    def probe(cls, extra: list[str]) -> KineFlags:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        out = subprocess.run(
            [sys.executable, "-m", "kine_server", "--help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        return cls(out.stdout, tuple(extra))

    def has(self, flag: str) -> bool:
        """Whether `kine-server --help` lists `flag` (whole flag: --workers is not --workers-x)."""
        return re.search(re.escape(flag) + r"(?![\w-])", self.help_text) is not None

    def workers(self, pid: int) -> int | None:
        """The number of worker processes a kine-server started with these flags runs: the
        `--workers` given with `--kine-arg`, else its default, the cores in the process's
        affinity set. None if this kine-server has no `--workers`."""
        if not self.has("--workers"):
            return None
        for i, arg in enumerate(self.extra):
            if arg.startswith("--workers="):
                return int(arg.split("=", 1)[1])
            if arg == "--workers" and i + 1 < len(self.extra):
                return int(self.extra[i + 1])
        try:
            return len(os.sched_getaffinity(pid))
        except OSError:
            return None


class KineServer:
    """`python -m kine_server` as a subprocess in its own session (Ctrl-C is ours to handle)."""

    def __init__(
        self,
        dsn: str,
        workdir: Path,
        name: str,
        entry: list[str],
        env: dict[str, str],
        flags: KineFlags,
        cpus: str | None = None,
    ) -> None:
        self.dsn = dsn
        self.name = name
        self.entry = entry
        """What follows the interpreter: ["-m", "kine_server"], or a profiler wrapping it."""
        self.extra_env = env
        self.flags = flags
        self.cpus = cpus
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
            if self.flags.has("--metrics-bind-address"):
                # Newer kine-servers serve /metrics, by default on a fixed port: two would clash.
                self.metrics_address = f"127.0.0.1:{free_port()}"
                extra = ["--metrics-bind-address", self.metrics_address]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [
                        *pinned(self.cpus),
                        sys.executable,
                        *self.entry,
                        "--endpoint",
                        self.dsn,
                        "--listen-address",
                        self.endpoint,
                        "--compact-interval",
                        "0",
                        *extra,
                        *self.flags.extra,
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

    def server(self, db_root: int | None = None) -> Server:
        """The running server, for the workloads."""
        assert self.proc is not None
        return Server(self.name, self.endpoint, self.proc.pid, self.log_path, db_root)

    def stop(self) -> None:
        """SIGTERM (kine-server drains and closes the database), SIGKILL after 30 s."""
        if self.proc is not None:
            self.exit_code = terminate(self.proc, 30)
            self.proc = None

    def problems(self) -> list[str]:
        """Lines of its log above INFO: each is worth reporting."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [
            f"{self.name} log: {line[:300]}"
            for line in text.splitlines()
            if any(w in line for w in ("WARNING", "ERROR", "Traceback", "CRITICAL"))
        ]


class Etcd:
    """The tests' RealEtcd (/usr/bin/etcd), optionally pinned to some cores.

    RealEtcd runs one binary with its own flags, so pinning goes through a two-line script that
    `exec`s taskset, which `exec`s etcd: the process keeps the pid RealEtcd started."""

    def __init__(self, workdir: Path, name: str = "etcd", cpus: str | None = None) -> None:
        self.name = name
        binary = None
        if cpus:
            etcd = RealEtcd().binary
            script = workdir / f"{name}-taskset.sh"
            script.write_text(
                f'#!/bin/sh\nexec taskset -c {shlex.quote(cpus)} {shlex.quote(etcd)} "$@"\n'
            )
            script.chmod(0o755)
            binary = str(script)
        self.etcd = RealEtcd(binary)

    def start(self) -> None:
        self.etcd.start()

    def server(self) -> Server:
        proc = self.etcd._proc
        assert proc is not None
        return Server(self.name, self.etcd.endpoint, proc.pid, self.etcd.log_path, kind="etcd")

    def stop(self) -> None:
        self.etcd.stop()


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
