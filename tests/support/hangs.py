"""Diagnosing a hung test: its asyncio tasks' stacks, on demand or when it runs too long.

A hung asyncio test shows nothing useful in thread dumps (the loop just sits in select), so on
SIGUSR1, or once a test has run for `WATCHDOG_SECONDS`, every task of the running loop prints
its stack, past pytest's output capture, to the terminal. The test itself is not interrupted.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

WATCHDOG_SECONDS = 300.0


def install(write: Callable[[str], None]) -> None:
    """Dump on SIGUSR1 through `write` (pytest's terminal writer: capture does not hide it)."""

    def dump(signum: int, frame: FrameType | None) -> None:
        out = io.StringIO()
        loop = asyncio._get_running_loop()
        print(f"=== asyncio tasks (signal {signum}) ===", file=out)
        if loop is None:
            print("no running event loop in the main thread", file=out)
        else:
            for task in asyncio.all_tasks(loop):
                print(f"--- {task!r}", file=out)
                task.print_stack(file=out)
        write(out.getvalue())

    signal.signal(signal.SIGUSR1, dump)


def watchdog(name: str) -> threading.Timer:
    """A started timer that dumps the tasks if `name` is still running after the deadline."""

    def fire() -> None:
        print(f"=== {name} has run {WATCHDOG_SECONDS:.0f}s ===", file=sys.__stderr__)
        os.kill(os.getpid(), signal.SIGUSR1)

    timer = threading.Timer(WATCHDOG_SECONDS, fire)
    timer.daemon = True
    timer.start()
    return timer
