"""Servers a workload starts for itself, on a fresh store (workloads 8 and 9): etcd, and
kine-server on a fresh SQLite file or a fresh PostgreSQL database, optionally pinned to cores.

Each is stopped by the caller's ExitStack; a kine-server's log warnings and its exit code on
SIGTERM are reported as for the run's main servers."""

from __future__ import annotations

from contextlib import ExitStack

from ..servers import Etcd, KineServer, Server
from .base import Bench


def start_etcd(b: Bench, stack: ExitStack, tag: str, cpus: str | None = None) -> Server:
    etcd = Etcd(b.workdir, f"etcd-{tag}", cpus)
    stack.callback(etcd.stop)
    etcd.start()
    server = etcd.server()
    server.name = "etcd"
    return server


def start_kine(
    b: Bench,
    stack: ExitStack,
    tag: str,
    cpus: str | None = None,
    name: str = "kine-sqlite",
    dsn: str | None = None,
    db_root: int | None = None,
) -> Server:
    """A kine-server on `dsn` (default: a fresh SQLite file named by `tag`), reported as
    `name`; `db_root` is its database's process (PostgreSQL's postmaster) for its CPU."""
    dsn = dsn or f"sqlite://{b.workdir}/{tag}/state.db"
    kine = KineServer(dsn, b.workdir, tag, ["-m", "kine_server"], {}, b.kine_flags, cpus)

    def stop() -> None:
        kine.stop()
        b.results.problems.extend(kine.problems())
        if kine.exit_code not in (0, None):
            b.results.problems.append(f"{tag} exited with code {kine.exit_code} after SIGTERM")

    stack.callback(stop)
    kine.start()
    server = kine.server(db_root)
    server.name = name
    return server
