"""Measured load through kube-apiserver's REST API (workload 9): ConfigMap create, get, update
and delete by many threads, watches on the configmaps, and an open-loop writer they watch.

The apiserver client is the end-to-end run's (`kubee2e.rest.Api`: HTTPS, a bearer token, one
keep-alive connection per thread), so `workers` threads are `workers` connections, as a
controller's or kubectl's. Each thread makes one unmeasured request first (its TLS handshake is
not part of the window). The JSON and TLS work costs this process about as much CPU as a gRPC
call does; the window's client CPU shows how much.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import os
import socket
import threading
import time
from contextlib import suppress
from typing import Any

from kubee2e.rest import Api, brief, cm_body, cms

from .measure import Errors, Sync, Window, open_loop, sleep_until

OPS = ("create", "get", "update", "delete")


def _data(value_size: int) -> dict[str, str]:
    return {"v": os.urandom(max(1, value_size // 2)).hex()}


def _one(
    api: Api, op: str, namespace: str, name: str, rv: str, data: dict[str, str]
) -> tuple[int, Any]:
    """One request of `op`; the status it must answer comes with it."""
    if op == "create":
        return 201, api.request("POST", cms(namespace), cm_body(name, data))
    if op == "get":
        return 200, api.request("GET", cms(namespace, name))
    if op == "update":
        body = cm_body(name, data)
        body["metadata"]["resourceVersion"] = rv
        return 200, api.request("PUT", cms(namespace, name), body)
    if op == "delete":
        return 200, api.request("DELETE", cms(namespace, name))
    raise ValueError(op)


async def kube_ops(
    port: int,
    token: str,
    op: str,
    namespace: str,
    names: list[str],
    rvs: dict[str, str],
    workers: int,
    value_size: int,
    time_cap: float,
    sync: Sync,
) -> dict[str, Any]:
    """`op` once on each of `names` (an update at the resourceVersion `rvs` has for it) by
    `workers` threads, until done or `time_cap`. Reports each request's latency and the
    resourceVersion each create or update answered."""
    api = Api(port, token)
    errors = Errors()
    window = Window()
    latencies: list[float] = []
    new_rvs: dict[str, str] = {}
    pending = iter(names)
    lock = threading.Lock()
    warmed = threading.Barrier(workers + 1)
    go = threading.Event()
    start_at = [0.0]
    data = _data(value_size)

    def worker() -> None:
        try:
            api.request("GET", f"/api/v1/namespaces/{namespace}")
        except (OSError, http.client.HTTPException) as exc:
            with lock:
                errors.add(f"kube {op} warm-up", exc)
        warmed.wait()
        go.wait()
        delay = start_at[0] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        deadline = start_at[0] + time_cap
        perf = time.perf_counter
        try:
            while time.monotonic() < deadline:
                with lock:
                    name = next(pending, None)
                if name is None:
                    return
                t = perf()
                try:
                    want, (status, body) = _one(api, op, namespace, name, rvs.get(name, ""), data)
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        errors.add(f"kube {op}", exc)
                    continue
                took = perf() - t
                with lock:
                    if status != want:
                        errors.add(f"kube {op}: HTTP {status}", detail=f"{name}: {brief(body)}")
                        continue
                    latencies.append(took)
                    if op in ("create", "update"):
                        new_rvs[name] = body["metadata"]["resourceVersion"]
        finally:
            api.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    await asyncio.to_thread(warmed.wait)
    start_at[0] = await sync(None)
    go.set()
    await sleep_until(start_at[0])
    window.start()
    for thread in threads:
        await asyncio.to_thread(thread.join)
    window.stop()
    return {"latencies": latencies, "rvs": new_rvs, "errors": errors.report(), **window.report()}


async def kube_watchers(
    port: int,
    token: str,
    namespace: str,
    count: int,
    start_rv: str,
    sentinel: str,
    max_duration: float,
    sync: Sync,
) -> dict[str, Any]:
    """`count` watches (one connection each) on `namespace`'s configmaps from `start_rv`.
    Records (resourceVersion, name, time received) of every ADDED event until the `sentinel`
    configmap is seen or `max_duration` has passed since the start."""
    api = Api(port, token)
    errors = Errors()
    window = Window()
    lock = threading.Lock()
    received: list[list[tuple[int, str, float]]] = [[] for _ in range(count)]
    finished = [False] * count
    connected = threading.Semaphore(0)
    conns: list[http.client.HTTPSConnection] = []
    stopping = threading.Event()
    path = f"{cms(namespace)}?watch=1&resourceVersion={start_rv}&timeoutSeconds=900"

    def watch(index: int) -> None:
        mine = received[index]
        conn = api.connection(timeout=max_duration + 60)
        with lock:
            conns.append(conn)
        signalled = False
        try:
            conn.request("GET", path, headers=api.headers())
            response = conn.getresponse()  # the apiserver sends its headers once it watches
            connected.release()
            signalled = True
            if response.status != 200:
                raise OSError(f"HTTP {response.status}: {response.read()[:200]!r}")
            monotonic = time.monotonic
            while True:
                line = response.readline()
                now = monotonic()
                if not line:
                    raise OSError("watch ended by the apiserver")
                event = json.loads(line)
                obj = event.get("object", {})
                if event.get("type") != "ADDED":
                    with lock:
                        errors.add(f"kube watch: unexpected {event.get('type')} event")
                    continue
                name = obj["metadata"]["name"]
                if name == sentinel:
                    finished[index] = True
                    return
                mine.append((int(obj["metadata"]["resourceVersion"]), name, now))
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if not finished[index] and not stopping.is_set():
                with lock:
                    errors.add("kube watch", exc)
        finally:
            if not signalled:
                connected.release()
            conn.close()

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()

    def all_connected() -> None:
        for _ in range(count):
            connected.acquire()

    await asyncio.to_thread(all_connected)
    await sleep_until(await sync({"created": count}))
    window.start()
    deadline = time.monotonic() + max_duration

    def join() -> None:
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    await asyncio.to_thread(join)
    window.stop()
    late = [t for t in threads if t.is_alive()]
    stopping.set()
    with lock:
        for _ in late:
            errors.add("kube watch had not seen the sentinel by the deadline")
        for conn in conns:
            if conn.sock is not None:
                with suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
    for thread in late:  # they end at once now; their lists must not change while sent back
        await asyncio.to_thread(thread.join, 5)
    return {
        "received": received,
        "finished": sum(finished),
        "errors": errors.report(),
        **window.report(),
    }


async def kube_writer(
    port: int,
    token: str,
    namespace: str,
    sentinel: str,
    count: int,
    rate: float,
    max_inflight: int,
    value_size: int,
    time_cap: float,
    sync: Sync,
) -> dict[str, Any]:
    """Open loop: create number i is sent at start + i/rate (later only if `max_inflight` are
    outstanding). Records (resourceVersion, name, sent, acknowledged) of each, then creates the
    sentinel the watchers stop at."""
    api = Api(port, token)
    errors = Errors()
    window = Window()
    writes: list[tuple[int, str, float, float]] = []
    data = _data(value_size)
    pool = concurrent.futures.ThreadPoolExecutor(max_inflight)
    loop = asyncio.get_running_loop()
    lock = threading.Lock()

    def create(name: str) -> None:
        sent = time.monotonic()
        try:
            status, body = api.request("POST", cms(namespace), cm_body(name, data))
        except (OSError, http.client.HTTPException) as exc:
            with lock:
                errors.add("kube watched create", exc)
            return
        acked = time.monotonic()
        if status != 201:
            with lock:
                errors.add(f"kube watched create: HTTP {status}", detail=brief(body))
            return
        writes.append((int(body["metadata"]["resourceVersion"]), name, sent, acked))

    try:
        # Connections up before the window: a few unmeasured reads on the pool's threads.
        warm = [
            loop.run_in_executor(pool, api.request, "GET", f"/api/v1/namespaces/{namespace}")
            for _ in range(min(8, max_inflight))
        ]
        await asyncio.gather(*warm, return_exceptions=True)
        await sleep_until(await sync(None))
        window.start()

        async def put(i: int) -> None:
            await loop.run_in_executor(pool, create, f"w-{i:06d}")

        await open_loop(window, count, rate, max_inflight, time_cap, put)
        window.stop()
        await loop.run_in_executor(pool, create, sentinel)
    finally:
        pool.shutdown(wait=True)
    writes = [w for w in writes if w[1] != sentinel]
    return {"writes": writes, "errors": errors.report(), **window.report()}
