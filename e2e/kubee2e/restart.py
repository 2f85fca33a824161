"""A watch across a kine-server restart: changes before, kine-server stopped and started again
on its port and database, changes after; the watcher must see every change once, in order.

Writes during the outage are retried until the apiserver is back; a retry that finds the first
attempt committed after all counts it as done (so the expected list stays exact)."""

from __future__ import annotations

import http.client
import itertools
import subprocess
import time
from dataclasses import dataclass

from .context import Context
from .outcome import CheckFailed, info
from .rest import brief, cm_body, cms
from .watching import Watcher


@dataclass
class Expected:
    type: str
    name: str
    rv: int | None  # None for deletes: DELETE answers a Status, not the deletion's revision
    data: dict[str, str] | None


def write(
    ctx: Context,
    op: str,
    ns: str,
    name: str,
    data: dict[str, str] | None,
    rv: int | None,
    timeout: float = 180.0,
) -> Expected:
    """One change, retried through a kine-server outage; a retry that finds the first attempt
    committed after all (AlreadyExists, Conflict with our data, NotFound) counts it as done."""
    api = ctx.api
    deadline = time.monotonic() + timeout
    attempts = 0
    while True:
        attempts += 1
        try:
            if op == "create":
                status, body = api.request("POST", cms(ns), cm_body(name, data or {}))
                if status == 201:
                    return Expected("ADDED", name, int(body["metadata"]["resourceVersion"]), data)
                if status == 409 and attempts > 1:
                    cur = api.expect(200, "GET", cms(ns, name))
                    return Expected("ADDED", name, int(cur["metadata"]["resourceVersion"]), data)
            elif op == "update":
                body_in = {
                    **cm_body(name, data or {}),
                    "metadata": {"name": name, "resourceVersion": str(rv)},
                }
                status, body = api.request("PUT", cms(ns, name), body_in)
                if status == 200:
                    rv_now = int(body["metadata"]["resourceVersion"])
                    return Expected("MODIFIED", name, rv_now, data)
                if status == 409 and attempts > 1:
                    cur = api.expect(200, "GET", cms(ns, name))
                    if cur.get("data") == data:
                        rv_now = int(cur["metadata"]["resourceVersion"])
                        return Expected("MODIFIED", name, rv_now, data)
            elif op == "delete":
                status, body = api.request("DELETE", cms(ns, name))
                if status == 200 or (status == 404 and attempts > 1):
                    return Expected("DELETED", name, None, None)
            else:
                raise ValueError(op)
            problem = f"HTTP {status}: {brief(body)}"
            if status < 500 and status != 429:
                raise CheckFailed(f"{op} {ns}/{name}: {problem}")
        except (OSError, http.client.HTTPException) as exc:
            problem = str(exc)
        if time.monotonic() > deadline:
            raise CheckFailed(f"{op} {ns}/{name} still failing after {timeout:.0f}s: {problem}")
        time.sleep(0.5)


def changes(ctx: Context, ns: str, prefix: str, count: int) -> list[Expected]:
    """create `count` configmaps, update each twice, delete every third one."""
    out: list[Expected] = []
    rvs: dict[str, int] = {}
    for i in range(count):
        e = write(ctx, "create", ns, f"{prefix}-{i}", {"v": "0"}, None)
        rvs[e.name] = e.rv or 0
        out.append(e)
    for round_ in (1, 2):
        for i in range(count):
            name = f"{prefix}-{i}"
            e = write(ctx, "update", ns, name, {"v": str(round_)}, rvs[name])
            rvs[name] = e.rv or 0
            out.append(e)
    for i in range(0, count, 3):
        out.append(write(ctx, "delete", ns, f"{prefix}-{i}", None, None))
    return out


def restart_kine_same_port(ctx: Context) -> None:
    """Start kine-server again on its port; it must come up at once, as etcd does.

    If it refuses with "Address already in use" (connections of the previous process in
    TIME_WAIT on that port), that is reported as a failure of its own, and the start is
    retried until it works so that the remaining checks still run."""
    kine = ctx.kine
    name = f"{ctx.db}/kine-restart-same-port"
    t0 = time.monotonic()
    try:
        kine.start_and_wait()
        ctx.results.ok(name)
        return
    except CheckFailed as exc:
        if "already in use" not in str(exc).lower():
            raise
        first_error = str(exc).strip().splitlines()[-1]
    time_wait = subprocess.run(
        ["ss", "-Htan", "state", "time-wait", f"( sport = :{kine.port} )"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    while True:
        time.sleep(1)
        try:
            kine.start_and_wait()
            break
        except CheckFailed as exc:
            if "already in use" not in str(exc).lower() or time.monotonic() - t0 > 120:
                raise
    ctx.results.fail(
        name,
        f"{first_error!r} right after the previous kine-server exited "
        f"(with {len(time_wait.splitlines())} connections in TIME_WAIT on port "
        f"{kine.port}); it could listen again only {time.monotonic() - t0:.0f}s later",
    )


def watch_across_restart(ctx: Context) -> None:
    with ctx.check("watch-across-restart") as note:
        note.append(_watch_across_restart(ctx))


def _watch_across_restart(ctx: Context) -> str:
    api, kine, apiserver = ctx.api, ctx.kine, ctx.apiserver
    ns = "e2e-watch"
    api.expect(201, "POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
    start_rv = int(api.expect(200, "GET", cms(ns))["metadata"]["resourceVersion"])
    watcher = Watcher(api, ns, start_rv)
    watcher.start()
    try:
        expected = changes(ctx, ns, "before", 10)
        if not watcher.wait_for(len(expected), 30):
            raise CheckFailed(
                f"before the restart: {len(watcher.events)} of {len(expected)} events "
                f"within 30s; {watcher.fatal}"
            )

        # Restart kine-server mid-watch, on the same port and database.
        log_start = apiserver.log_path.stat().st_size
        t0 = time.monotonic()
        code = kine.stop()
        stop_took = time.monotonic() - t0
        if code != 0:
            raise CheckFailed(f"kine-server exited {code} on SIGTERM")
        time.sleep(2)  # long enough for the apiserver to notice
        restart_kine_same_port(ctx)
        restarted = time.monotonic() - t0

        # The first change after the restart waits (with retries) for the apiserver to be
        # back; the window of expected connection errors in its log ends there.
        first = write(ctx, "create", ns, "after-first", {"v": "0"}, None)
        ctx.recovered_at = time.monotonic()
        recovered = ctx.recovered_at - t0
        ctx.restart_window = (log_start, apiserver.log_path.stat().st_size)
        expected.append(first)
        expected += changes(ctx, ns, "after", 10)
        if not watcher.wait_for(len(expected), 90):
            raise CheckFailed(
                f"{len(watcher.events)} of {len(expected)} events within 90s after the "
                f"restart; {watcher.fatal or 'no error'}; re-watches: {watcher.reconnects[-3:]}"
            )
        time.sleep(1)  # anything extra (a duplicate) would arrive now
    finally:
        watcher.stop()
    if watcher.fatal:
        raise CheckFailed(watcher.fatal)
    got = watcher.events
    problems: list[str] = []
    if len(got) != len(expected):
        problems.append(f"{len(got)} events for {len(expected)} changes")
    for i, (g, e) in enumerate(zip(got, expected, strict=False)):
        if (
            (g.type, g.name) != (e.type, e.name)
            or (e.rv is not None and g.rv != e.rv)
            or (e.data is not None and g.data != e.data)
        ):
            problems.append(
                f"event {i}: got {g.type} {g.name} rv {g.rv}, want {e.type} {e.name} rv {e.rv}"
            )
            break
    rv_list = [g.rv for g in got]
    if any(b <= a for a, b in itertools.pairwise(rv_list)):
        problems.append("resourceVersions not strictly increasing")
    if problems:
        raise CheckFailed("; ".join(problems))
    for r in watcher.reconnects:
        info(f"re-watch {r}")
    return (
        f"{len(got)} events in order, none missing or repeated; kine-server exited "
        f"{stop_took:.1f}s after SIGTERM, restarted after {restarted:.1f}s, apiserver writing "
        f"again after {recovered:.1f}s; watch re-established {len(watcher.reconnects)}x"
    )
