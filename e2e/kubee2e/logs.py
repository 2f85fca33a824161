"""After the run: no storage errors in the apiserver's log outside the kine-server restart
(when connection errors are expected), and no ERROR in kine-server's log."""

from __future__ import annotations

import json
import re

from .context import Context
from .outcome import CheckFailed, info

STORAGE_ERROR = re.compile(
    r"etcd|storage|grpc|transport|clientv3|kine|127\.0\.0\.1:\d+", re.IGNORECASE
)
ERRORISH = re.compile(r"error|fail|refused|unavailable|timeout|timed out|panic", re.IGNORECASE)


def severity(line: str) -> str:
    """klog's I/W/E/F, or the level of a JSON line (the etcd client logs through zap)."""
    if re.match(r"[IWEF]\d{4} ", line):
        return line[0]
    if line.startswith("{"):
        try:
            level = str(json.loads(line).get("level", ""))
        except ValueError:
            return ""
        return {"warn": "W", "error": "E", "fatal": "F", "panic": "F"}.get(level, "I")
    return ""


def run(ctx: Context) -> None:
    apiserver, kine = ctx.apiserver, ctx.kine
    with ctx.check("apiserver-log-no-storage-errors") as note:
        raw = apiserver.log_path.read_bytes()
        window = ctx.restart_window or (len(raw), len(raw))
        outside: list[str] = []
        during: list[str] = []
        offset = 0
        for line in raw.split(b"\n"):
            text = line.decode(errors="replace")
            start = offset
            offset += len(line) + 1
            level = severity(text)
            storage = STORAGE_ERROR.search(text) and ERRORISH.search(text)
            if not (level in ("E", "F") or (level == "W" and storage)):
                continue
            (during if window[0] <= start < window[1] else outside).append(text)
        note.append(
            f"{len(during)} warning/error lines during the kine-server restart (expected), "
            "none outside it"
        )
        if during:
            info(f"apiserver log during the restart ({len(during)} lines), e.g.:")
            for text in during[:6]:
                info("  " + text[:230])
        if outside:
            for text in outside[:15]:
                info("  " + text[:300])
            raise CheckFailed(
                f"{len(outside)} error lines outside the restart window (shown above)"
            )

    with ctx.check("kine-log-no-errors") as note:
        kine_lines = kine.log_path.read_text(errors="replace").splitlines()
        bad = [t for t in kine_lines if re.search(r" (ERROR|CRITICAL) |Traceback", t)]
        warnings = [t for t in kine_lines if " WARNING " in t]
        for t in warnings[:5]:
            info("kine warning: " + t[:230])
        if bad:
            for t in bad[:15]:
                info("  " + t[:300])
            raise CheckFailed(f"{len(bad)} ERROR lines in kine-server's log (shown above)")
        note.append(f"{len(warnings)} warnings")
