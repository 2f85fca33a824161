"""CPU and memory of processes, read from /proc (Linux only, as the whole benchmark)."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may contain spaces)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds (all its threads)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu(pid: int, children: dict[int, list[int]] | None = None) -> float:
    """CPU of a process and all its descendants, including those that have already exited
    (their time moves into the parent's cutime/cstime when it reaps them, as PostgreSQL's
    postmaster does for every backend and autovacuum worker). `children`: a `children_map()`
    to reuse when measuring several trees at one instant."""
    if children is None:
        children = children_map()
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    own = sum(int(f) for f in fields[11:15]) / CLK_TCK  # utime stime cutime cstime
    return own + sum(tree_cpu(child, children) for child in children.get(pid, []))


def proc_status_kib(pid: int, name: str) -> int:
    """One `Name: N kB` line of /proc/PID/status (VmHWM, VmRSS), 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_status_kib(pid: int, name: str) -> int:
    """`proc_status_kib` summed over `pid` and its descendants (kine-server --workers is a
    writer process and its front-ends: the memory of the server is all of them)."""
    children = children_map()
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += proc_status_kib(current, name)
        todo += children.get(current, [])
    return total


def children_map() -> dict[int, list[int]]:
    """Every live process's children, from one pass over /proc (it has no child list without
    CONFIG_PROC_CHILDREN)."""
    found: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            found.setdefault(int(fields[1]), []).append(int(entry))
    return found


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores, not idle or iowait)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / CLK_TCK


def ours_cpu(pids: list[int], trees: list[int]) -> float:
    """CPU of single processes plus that of whole process trees."""
    children = children_map() if trees else {}
    return sum(proc_cpu(p) for p in pids) + sum(tree_cpu(p, children) for p in trees)
