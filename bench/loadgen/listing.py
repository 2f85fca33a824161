"""Measured paginated LISTs (workload 4) as the apiserver paginates, and an unmeasured check
that a LIST pinned to a revision still shows that revision after the keys change under it."""

from __future__ import annotations

import time
from typing import Any

import grpc

from kine_server.pb import rpc_pb2

from .channels import RPC_TIMEOUT, Channels
from .measure import Errors, Sync, Window, sleep_until
from .requests import prefix_end


async def _list_once(stub: Any, prefix: bytes, page: int) -> tuple[list[Any], int, list[float]]:
    """The apiserver's paginated LIST: the first page reads the newest revision, the following
    pages read at that revision, each starting just after the previous page's last key."""
    end = prefix_end(prefix)
    perf = time.perf_counter
    kvs: list[Any] = []
    t = perf()
    response = await stub.Range(
        rpc_pb2.RangeRequest(key=prefix, range_end=end, limit=page), timeout=RPC_TIMEOUT
    )
    pages = [perf() - t]
    revision = response.header.revision
    kvs.extend(response.kvs)
    while response.more:
        start = response.kvs[-1].key + b"\x00"
        t = perf()
        response = await stub.Range(
            rpc_pb2.RangeRequest(key=start, range_end=end, limit=page, revision=revision),
            timeout=RPC_TIMEOUT,
        )
        pages.append(perf() - t)
        kvs.extend(response.kvs)
    return kvs, revision, pages


async def list_runs(
    endpoint: str,
    prefix: bytes,
    page: int,
    runs: int,
    expected: int,
    time_cap: float,
    sync: Sync,
) -> dict[str, Any]:
    chans = Channels(endpoint, 1)
    errors = Errors()
    totals: list[float] = []
    page_latencies: list[float] = []
    window = Window()
    try:
        await chans.ready()
        stub = chans.kv[0]
        await _list_once(stub, prefix, page)  # unmeasured: warms the server's caches
        await sleep_until(await sync(None))
        window.start()
        deadline = window.t0 + time_cap
        for _ in range(runs):
            t = time.perf_counter()
            try:
                kvs, _, pages = await _list_once(stub, prefix, page)
            except grpc.aio.AioRpcError as exc:
                errors.add("LIST Range", exc)
                continue
            totals.append(time.perf_counter() - t)
            page_latencies.extend(pages)
            keys = [kv.key for kv in kvs]
            if len(keys) != expected or len(set(keys)) != expected or keys != sorted(keys):
                errors.add(
                    "LIST result wrong",
                    detail=f"{len(keys)} keys ({len(set(keys))} distinct), expected {expected}",
                )
            if time.monotonic() >= deadline:
                break
        window.stop()
        pinned = await _pinned_check(chans.kv[0], prefix, page, expected, errors)
    finally:
        await chans.close()
    return {
        "totals": totals,
        "pages": page_latencies,
        "pinned_check": pinned,
        "errors": errors.report(),
        **window.report(),
    }


async def _pinned_check(stub: Any, prefix: bytes, page: int, expected: int, errors: Errors) -> str:
    """Unmeasured: after the first page, change a key of the last page and delete one of the second;
    the remaining pages must still show the state at the pinned revision."""
    end = prefix_end(prefix)
    first = await stub.Range(
        rpc_pb2.RangeRequest(key=prefix, range_end=end, limit=page), timeout=RPC_TIMEOUT
    )
    revision = first.header.revision
    everything = await stub.Range(
        rpc_pb2.RangeRequest(key=prefix, range_end=end, keys_only=True), timeout=RPC_TIMEOUT
    )
    all_keys = [kv.key for kv in everything.kvs]
    if len(all_keys) < 3 * page:
        return "skipped (too few keys)"
    changed, deleted = all_keys[-1], all_keys[page + 1]
    old = {}
    for key in (changed, deleted):
        r = await stub.Range(rpc_pb2.RangeRequest(key=key), timeout=RPC_TIMEOUT)
        old[key] = (r.kvs[0].mod_revision, r.kvs[0].value)
    await stub.Put(rpc_pb2.PutRequest(key=changed, value=b"changed"), timeout=RPC_TIMEOUT)
    await stub.DeleteRange(rpc_pb2.DeleteRangeRequest(key=deleted), timeout=RPC_TIMEOUT)
    kvs = list(first.kvs)
    response = first
    while response.more:
        response = await stub.Range(
            rpc_pb2.RangeRequest(
                key=response.kvs[-1].key + b"\x00", range_end=end, limit=page, revision=revision
            ),
            timeout=RPC_TIMEOUT,
        )
        if response.header.revision != revision + 2:  # etcd: the store's revision, not the read's
            errors.add(
                "pinned LIST header revision",
                detail=f"{response.header.revision}, expected current {revision + 2}",
            )
        kvs.extend(response.kvs)
    seen = {kv.key: kv for kv in kvs}
    problems = []
    if len(kvs) != len(all_keys):
        problems.append(f"{len(kvs)} keys at pinned revision, expected {len(all_keys)}")
    for key in (changed, deleted):
        kv = seen.get(key)
        if kv is None or (kv.mod_revision, kv.value) != old[key]:
            problems.append(f"{key!r} not as at revision {revision}")
    # Restore the prefix for later runs: the deleted key back, the changed value as it was.
    await stub.Put(rpc_pb2.PutRequest(key=changed, value=old[changed][1]), timeout=RPC_TIMEOUT)
    await stub.Put(rpc_pb2.PutRequest(key=deleted, value=old[deleted][1]), timeout=RPC_TIMEOUT)
    for problem in problems:
        errors.add("pinned-revision LIST wrong", detail=problem)
    return "ok" if not problems else "; ".join(problems)
