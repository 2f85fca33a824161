"""Faults injected while a history is recorded. Each is a blocking callable (the recording runs it
in a thread, so clients and watchers go on meanwhile) that returns once the fault is over."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.support.faultproxy import FaultProxy, Mode
from tests.support.postgres import ThrowawayPostgres
from tests.support.process import KineProcess
from tests.support.procs import group


@dataclass(frozen=True)
class Fault:
    #: Seconds after the recording started.
    at: float
    name: str
    inject: Callable[[], None]


def kill_server(kine: KineProcess) -> Callable[[], None]:
    """kill -9 of every process of the server (its own process group: the writer and any
    front-ends), then the same server again on the same data and port."""

    def inject() -> None:
        assert kine.proc is not None
        os.killpg(kine.proc.pid, signal.SIGKILL)
        kine.proc.wait()
        _wait_gone(kine.proc.pid)
        kine.start()

    return inject


def kill_frontend(kine: KineProcess) -> Callable[[], None]:
    """kill -9 of one front-end of a `--workers N` server (the writer starts another)."""

    def inject() -> None:
        assert kine.proc is not None
        deadline = time.monotonic() + 30
        while not (frontends := group(kine.proc.pid) - {kine.proc.pid}):
            assert time.monotonic() < deadline, "no front-end to kill"
            time.sleep(0.05)
        os.kill(min(frontends), signal.SIGKILL)

    return inject


def restart_postgres(postgres: ThrowawayPostgres) -> Callable[[], None]:
    """PostgreSQL stopped (fast: every connection ended) and started again on the same data."""
    return postgres.restart


def proxy_fault(
    proxy: FaultProxy, mode: Mode, seconds: float, latency: float = 0.05
) -> Callable[[], None]:
    """The fault proxy in `mode` for `seconds`, then forwarding again."""

    def inject() -> None:
        proxy.set_mode(mode, latency=latency)
        time.sleep(seconds)
        proxy.set_mode(Mode.FORWARD)

    return inject


def _wait_gone(pgid: int, within: float = 10.0) -> None:
    """Until no process of the group is left (a front-end would still hold the port)."""
    deadline = time.monotonic() + within
    while group(pgid):
        assert time.monotonic() < deadline, f"processes of group {pgid} outlived SIGKILL"
        time.sleep(0.02)
