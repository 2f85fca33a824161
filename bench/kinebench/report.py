"""Collecting the figures of a run, and printing them: the table, the comparison with an older
run, the problems and the noise seen."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from .paths import ROOT


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    index = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[index]


def median(values: list[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class Metric:
    id: str
    label: str
    unit: str
    values: dict[str, float] = field(default_factory=dict)
    """The median of each server's samples (one per repetition)."""
    ratio: bool = True
    samples: dict[str, list[float]] = field(default_factory=dict)


class Results:
    """Everything a run found: figures (one row each), details per workload, problems, noise."""

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}
        self.details: dict[str, dict[str, Any]] = {}
        self.problems: list[str] = []
        self.notes: list[str] = []

    def put(
        self, mid: str, label: str, unit: str, server: str, value: float, ratio: bool = True
    ) -> None:
        metric = self.metrics.setdefault(mid, Metric(mid, label, unit, ratio=ratio))
        samples = metric.samples.setdefault(server, [])
        samples.append(value)
        metric.values[server] = median([v for v in samples if not math.isnan(v)] or [math.nan])

    def detail(self, workload: str, server: str, info: dict[str, Any]) -> None:
        """One entry per repetition."""
        self.details.setdefault(workload, {}).setdefault(server, []).append(info)

    def errors(self, workload: str, server: str, reports: list[dict[str, Any]]) -> int:
        """Merge the error reports of a workload's jobs; each becomes a problem line."""
        counts: dict[str, int] = {}
        samples: list[str] = []
        for report in reports:
            for kind, n in report["counts"].items():
                counts[kind] = counts.get(kind, 0) + n
            samples.extend(report["samples"])
        for kind, n in counts.items():
            example = next((s for s in samples if s.startswith(kind)), "")
            self.problems.append(f"{workload} on {server}: {n} x {kind}  (e.g. {example})")
        return sum(counts.values())


def fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit in ("count",):
        return f"{int(value)}"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def ratio_of(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or a < 0 or b <= 0:
        return "-"  # e.g. a watch event that arrived before the write's acknowledgement
    return f"{a / b:.2f}x"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for n, row in enumerate([header, *rows]):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(metrics: list[dict[str, Any]], servers: list[str]) -> str:
    kines = [s for s in servers if s != "etcd"]
    header = ["metric", "unit", "etcd"]
    for k in kines:
        header += [k, f"{k}/etcd"]
    rows = []
    for m in metrics:
        etcd = m["values"].get("etcd")
        row = [m["label"], m["unit"], fmt(etcd, m["unit"])]
        for k in kines:
            value = m["values"].get(k)
            row += [fmt(value, m["unit"]), ratio_of(value, etcd) if m.get("ratio", True) else ""]
        rows.append(row)
    return table(rows, header)


def render_compare(new: dict[str, Any], old: dict[str, Any]) -> str:
    old_metrics = {m["id"]: m for m in old["metrics"]}
    servers = [s for s in new["servers"] if s in old["servers"]]
    header = ["metric", "unit"]
    for s in servers:
        header += [f"{s} old", f"{s} new", "new/old"]
    rows = []
    for m in new["metrics"]:
        before = old_metrics.get(m["id"])
        if before is None:
            continue
        row = [m["label"], m["unit"]]
        for s in servers:
            a, b = m["values"].get(s), before["values"].get(s)
            row += [fmt(b, m["unit"]), fmt(a, m["unit"]), ratio_of(a, b)]
        rows.append(row)
    return table(rows, header)


def machine_info() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
            return out.splitlines()[0] if out else "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = version(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"]) != "?"
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "etcd": version(["/usr/bin/etcd", "--version"]),
        "kine_commit": commit + ("+dirty-src" if dirty else ""),
        "loadavg_at_start": os.getloadavg(),
    }


def print_run(data: dict[str, Any]) -> None:
    print()
    print(
        f"kine-server vs etcd  ({data['started_utc']}, {data['machine']['cpus']} cores, "
        f"run took {data['duration_s']:.0f} s)"
    )
    print(render(data["metrics"], data["servers"]))
    if data["problems"]:
        print("\nProblems seen:")
        for line in data["problems"]:
            print("  - " + line)
    else:
        print("\nProblems seen: none")
    if data.get("notes"):
        print("\nNoise (other programs on the machine during a measurement):")
        for line in data["notes"]:
            print("  - " + line)
