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


THROUGHPUT_UNIT = "ops/s"


def floor_reference(servers: list[str]) -> str | None:
    """The floor every throughput row is a fraction of: the one with the most processes
    (`floor-N`), as kine-server runs a front-end per core."""
    floors = [s for s in servers if s.startswith("floor-") and s[6:].isdigit()]
    return max(floors, key=lambda s: int(s[6:])) if floors else None


def floor_ratios(metrics: list[dict[str, Any]], servers: list[str]) -> dict[str, Any]:
    """Add `vs_floor` ({server: value / floor's}) to every throughput metric the reference
    floor has a figure for; what the JSON says about the floors."""
    reference = floor_reference(servers)
    for m in metrics:
        floor = m["values"].get(reference) if reference else None
        if m["unit"] != THROUGHPUT_UNIT or floor is None or math.isnan(floor) or floor <= 0:
            continue
        m["vs_floor"] = {
            s: v / floor for s, v in m["values"].items() if s != reference and not math.isnan(v)
        }
    return {"reference": reference, "floors": [s for s in servers if s.startswith("floor-")]}


def render(metrics: list[dict[str, Any]], servers: list[str]) -> str:
    """One row per metric: etcd, the floors, then each kine-server with its ratio to etcd and,
    for throughput, its fraction of the reference floor (etcd's too, beside the floors)."""
    floors = [s for s in servers if s.startswith("floor-")]
    kines = [s for s in servers if s != "etcd" and s not in floors]
    reference = floor_reference(servers)
    has_etcd = "etcd" in servers
    header = ["metric", "unit"]
    if has_etcd:
        header.append("etcd")
    header += floors
    if reference and has_etcd:
        header.append(f"etcd/{reference}")
    for k in kines:
        header += [k, f"{k}/etcd"] if has_etcd else [k]
        if reference:
            header.append(f"{k}/{reference}")
    rows = []
    for m in metrics:
        values = m["values"]
        etcd = values.get("etcd")
        vs_floor = m["unit"] == THROUGHPUT_UNIT and reference is not None
        floor = values.get(reference) if vs_floor and reference else None
        row = [m["label"], m["unit"]]
        if has_etcd:
            row.append(fmt(etcd, m["unit"]))
        row += [fmt(values.get(f), m["unit"]) for f in floors]
        if reference and has_etcd:
            row.append(ratio_of(etcd, floor) if vs_floor else "")
        for k in kines:
            value = values.get(k)
            row.append(fmt(value, m["unit"]))
            if has_etcd:
                row.append(ratio_of(value, etcd) if m.get("ratio", True) else "")
            if reference:
                row.append(ratio_of(value, floor) if vs_floor else "")
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
        f"kine-server vs etcd and the floor  ({data['started_utc']}, {data['machine']['cpus']} cores, "
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
