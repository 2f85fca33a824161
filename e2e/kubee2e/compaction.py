"""The apiserver's own compaction through kine-server: a LIST at an early resourceVersion is
answered until the apiserver's compactor has run, 410 Gone after, and newer reads still work."""

from __future__ import annotations

import re
import time

from .context import COMPACTION_INTERVAL_S, Context
from .outcome import CheckFailed
from .rest import brief


def run(ctx: Context) -> None:
    with ctx.check("compaction") as note:
        note.append(_compaction(ctx))


def _compaction(ctx: Context) -> str:
    api, apiserver = ctx.api, ctx.apiserver
    if not ctx.early_rv:
        raise CheckFailed("no early resourceVersion recorded")

    # The apiserver's compactor first runs one interval after start (recording the
    # revision), and compacts up to that revision one interval later.
    def compacted_revs() -> list[str]:
        log = apiserver.log_path.read_text(errors="replace")
        return re.findall(r"etcd: compacted rev \((\d+)\)", log)

    path = f"/api/v1/namespaces?resourceVersion={ctx.early_rv}&resourceVersionMatch=Exact"
    # An outage (the kine-server restart) delays it: its ticks fail until the apiserver is
    # back, and then it needs up to two more intervals.
    deadline = max(
        apiserver.started + 4 * COMPACTION_INTERVAL_S + 30,
        ctx.recovered_at + 3 * COMPACTION_INTERVAL_S + 15,
    )
    while True:
        status, body = api.request("GET", path)
        if status == 410:
            break
        if status != 200:
            raise CheckFailed(f"LIST Exact at {ctx.early_rv}: HTTP {status} {brief(body)}")
        if time.monotonic() > deadline:
            raise CheckFailed(
                f"LIST Exact at old rv {ctx.early_rv} still answers 200 "
                f"{time.monotonic() - apiserver.started:.0f}s after start; "
                f"apiserver compactions logged: {compacted_revs()}"
            )
        time.sleep(1)
    compacted = compacted_revs()
    if not compacted:
        raise CheckFailed("410 without an 'etcd: compacted rev' line in the apiserver log")
    # Reads at and after the compacted revision keep working.
    current = api.expect(200, "GET", "/api/v1/namespaces")
    rv_now = int(current["metadata"]["resourceVersion"])
    api.expect(
        200, "GET", f"/api/v1/namespaces?resourceVersion={rv_now}&resourceVersionMatch=Exact"
    )
    # (A watch from an old resourceVersion is answered by the apiserver's watch cache,
    # not by kine-server, so it proves nothing here.)
    reason = body.get("message", "") if isinstance(body, dict) else ""
    return (
        f"{ctx.early_exact_ok} before; 410 Gone after the apiserver compacted "
        f"(compacted revs {', '.join(compacted)}): {reason[:80]}"
    )
