"""Measured update churn (workload 3): each key's updates in sequence, each a Txn conditional
on the mod_revision the previous response reported, then a check of every key's final state."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from kine_server.pb import rpc_pb2

from .channels import RPC_TIMEOUT, Channels
from .measure import Errors, Sync, Window, sleep_until
from .requests import update_txn, value_of


async def churn(
    endpoint: str,
    revisions: dict[bytes, int],
    versions: int,
    clients: int,
    channels: int,
    value_size: int,
    time_cap: float,
    sync: Sync,
    verify: bool = True,
) -> dict[str, Any]:
    """Each key gets `versions` updates, each conditional on the mod_revision the previous
    response reported. Keys are split between `clients`; one key's updates are sequential.
    `verify` False skips reading every key back (the floor stores nothing to read)."""
    value = value_of(value_size)
    chans = Channels(endpoint, channels)
    errors = Errors()
    latencies: list[float] = []
    window = Window()
    keys = sorted(revisions)
    current = dict(revisions)
    updated = dict.fromkeys(keys, 0)
    conflicts = 0
    ops = 0
    wrong = 0
    try:
        await chans.ready()
        await sleep_until(await sync(None))
        window.start()
        deadline = window.t0 + time_cap

        async def client(index: int) -> None:
            nonlocal conflicts, ops
            stub = chans.kv[index % len(chans.kv)]
            mine = keys[index::clients]
            perf = time.perf_counter
            for _ in range(versions):
                for key in mine:
                    if time.monotonic() >= deadline:
                        return
                    request = update_txn(key, value, current[key])
                    t = perf()
                    try:
                        response = await stub.Txn(request, timeout=RPC_TIMEOUT)
                    except grpc.aio.AioRpcError as exc:
                        errors.add("update Txn", exc)
                        continue
                    latencies.append(perf() - t)
                    ops += 1
                    if response.succeeded:
                        current[key] = response.header.revision
                        updated[key] += 1
                    else:
                        # Nobody else writes these keys: the Else branch means a wrong mod_revision.
                        conflicts += 1
                        kvs = response.responses[0].response_range.kvs
                        got = kvs[0].mod_revision if kvs else 0
                        errors.add(
                            "update Txn compare failed",
                            detail=f"{key!r}: expected mod {current[key]}, server has {got}",
                        )
                        current[key] = got

        await asyncio.gather(*(client(i) for i in range(clients)))
        window.stop()
        # Check: every key's version is 1 + the updates that succeeded, mod_revision the last one.
        for key in keys if verify else []:
            response = await chans.kv[0].Range(rpc_pb2.RangeRequest(key=key), timeout=RPC_TIMEOUT)
            kv = response.kvs[0] if response.kvs else None
            if kv is None or kv.version != 1 + updated[key] or kv.mod_revision != current[key]:
                wrong += 1
                errors.add(
                    "churn final state wrong",
                    detail=f"{key!r}: got version={kv.version if kv else None} "
                    f"mod={kv.mod_revision if kv else None}, expected version={1 + updated[key]} "
                    f"mod={current[key]}",
                )
    finally:
        await chans.close()
    return {
        "latencies": latencies,
        "ops": ops,
        "updates": sum(updated.values()),
        "conflicts": conflicts,
        "wrong_final": wrong,
        "errors": errors.report(),
        **window.report(),
    }
