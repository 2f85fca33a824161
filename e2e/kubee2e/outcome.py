"""What a check reports: PASS and FAIL lines and their counts, the error that fails a check,
and the helpers the checks share to explain a failure (log tails, waiting for a condition)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class Results:
    """Passed and failed checks of the whole run; every line is printed as it is counted, so
    that a run that hangs has already shown how far it got. Checks may run in threads."""

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.lock = threading.Lock()

    def ok(self, name: str, note: str = "") -> None:
        with self.lock:
            self.passed += 1
            print(f"PASS {name}" + (f"  ({note})" if note else ""), flush=True)

    def fail(self, name: str, reason: str) -> None:
        with self.lock:
            self.failed += 1
            print(f"FAIL {name}: {reason}", flush=True)


class CheckFailed(Exception):
    """A check's expectation did not hold; the message is the FAIL line's reason."""


def info(text: str) -> None:
    """Indented lines under the PASS/FAIL line they explain."""
    for line in text.splitlines():
        print(f"     {line}", flush=True)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def wait_until(
    what: str, predicate: Callable[[], bool], timeout: float, every: float = 0.5
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@contextmanager
def check(results: Results, name: str) -> Iterator[list[str]]:
    """Run a check's body; exceptions become FAIL. The body may append a note."""
    note: list[str] = []
    try:
        yield note
    except CheckFailed as exc:
        results.fail(name, str(exc))
    except Exception as exc:  # every failure is reported, none stops the run
        results.fail(name, f"{type(exc).__name__}: {exc}")
    else:
        results.ok(name, "; ".join(note))
