"""A worker process's main loop: run the jobs the orchestrator sends over the pipe.

Messages a worker sends back: ("ready", info) once a measured job is ready (the orchestrator then
sends the start instant), then ("ok", result) or ("error", traceback text)."""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import Callable
from typing import Any

from . import churn, kube, listing, loading, watch, writes

JOBS: dict[str, Callable[..., Any]] = {
    "current_revision": loading.current_revision,
    "load_keys": loading.load_keys,
    "put_sequential": writes.put_sequential,
    "create_txns": writes.create_txns,
    "churn": churn.churn,
    "list_runs": listing.list_runs,
    "watchers": watch.watchers,
    "watch_writer": watch.watch_writer,
    "kube_ops": kube.kube_ops,
    "kube_watchers": kube.kube_watchers,
    "kube_writer": kube.kube_writer,
}

MEASURED_JOBS = {
    "put_sequential",
    "create_txns",
    "churn",
    "list_runs",
    "watchers",
    "watch_writer",
    "kube_ops",
    "kube_watchers",
    "kube_writer",
}


def serve(conn: Any) -> None:
    """Worker process main loop: run the jobs the orchestrator sends until it sends None."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    async def sync(info: Any) -> float:
        conn.send(("ready", info))
        start_at: float = await loop.run_in_executor(None, conn.recv)
        return start_at

    try:
        while True:
            message = conn.recv()
            if message is None:
                return
            name, kwargs = message
            try:
                if name in MEASURED_JOBS:
                    kwargs = {**kwargs, "sync": sync}
                result = loop.run_until_complete(JOBS[name](**kwargs))
                conn.send(("ok", result))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        return
    finally:
        loop.close()
