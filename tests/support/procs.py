"""The machine's live processes as /proc shows them (the tests of --workers look for a server's
front-ends: its children, or its process group)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Process:
    pid: int
    ppid: int
    pgrp: int


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command (state, ppid, pgrp, ...), None once the
    process is gone."""
    try:
        # The command name is in parentheses and may hold spaces: split after it.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def state(pid: int) -> str | None:
    """The process's state letter (R, S, T: stopped, Z: zombie...), None once it is gone."""
    fields = _stat(pid)
    return fields[0] if fields else None


def live() -> Iterator[Process]:
    """Every process that has not exited (zombies left out), read from /proc/PID/stat."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(entry.name)
        if fields is None:
            continue
        letter, ppid, pgrp = fields[0], int(fields[1]), int(fields[2])
        if letter != "Z":
            yield Process(int(entry.name), ppid, pgrp)


def children(pid: int) -> set[int]:
    return {p.pid for p in live() if p.ppid == pid}


def group(pgid: int) -> set[int]:
    """The live processes of a process group."""
    return {p.pid for p in live() if p.pgrp == pgid}
