"""Measured writes: sequential Puts from one client (workload 1) and kube-apiserver's create
Txn from many concurrent clients (workloads 2 and 8)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from kine_server.pb import rpc_pb2

from .channels import RPC_TIMEOUT, Channels
from .measure import Errors, Sync, Window, sleep_until
from .requests import create_txn, value_of


async def put_sequential(
    endpoint: str,
    prefix: bytes,
    count: int,
    warmup: int,
    value_size: int,
    time_cap: float,
    sync: Sync,
) -> dict[str, Any]:
    value = value_of(value_size)
    chans = Channels(endpoint, 1)
    errors = Errors()
    latencies: list[float] = []
    window = Window()
    try:
        await chans.ready()
        stub = chans.kv[0]
        for i in range(warmup):
            await stub.Put(
                rpc_pb2.PutRequest(key=prefix + b"warmup/%06d" % i, value=value),
                timeout=RPC_TIMEOUT,
            )
        await sleep_until(await sync(None))
        window.start()
        deadline = window.t0 + time_cap
        perf = time.perf_counter
        for i in range(count):
            request = rpc_pb2.PutRequest(key=prefix + b"%06d" % i, value=value)
            t = perf()
            try:
                await stub.Put(request, timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                errors.add("Put", exc)
                continue
            latencies.append(perf() - t)
            if time.monotonic() >= deadline:
                break
        window.stop()
    finally:
        await chans.close()
    return {"latencies": latencies, "errors": errors.report(), **window.report()}


async def create_txns(
    endpoint: str,
    tag: str,
    clients: int,
    channels: int,
    quota: int,
    value_size: int,
    time_cap: float,
    sync: Sync,
    namespaces: int = 20,
) -> dict[str, Any]:
    """`clients` concurrent creators on `channels` connections (client i on connection
    i mod channels); this process stops after `quota` ops or at the time cap."""
    value = value_of(value_size)
    chans = Channels(endpoint, channels)
    errors = Errors()
    latencies: list[float] = []
    window = Window()
    remaining = quota
    writes = 0
    not_created = 0
    try:
        await chans.ready()
        # One unmeasured create per channel: connections warm, the server's code paths too.
        for i, stub in enumerate(chans.kv):
            await stub.Txn(
                create_txn(b"/registry/pods/warmup/%s-%d" % (tag.encode(), i), value),
                timeout=RPC_TIMEOUT,
            )
        await sleep_until(await sync(None))
        window.start()
        deadline = window.t0 + time_cap

        async def client(index: int) -> None:
            nonlocal remaining, writes, not_created
            stub = chans.kv[index % len(chans.kv)]
            perf = time.perf_counter
            n = 0
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                key = b"/registry/pods/ns-%d/pod-%s-%d-%d" % (
                    (index + n) % namespaces,
                    tag.encode(),
                    index,
                    n,
                )
                n += 1
                request = create_txn(key, value)
                t = perf()
                try:
                    response = await stub.Txn(request, timeout=RPC_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    errors.add("create Txn", exc)
                    continue
                latencies.append(perf() - t)
                if response.succeeded:
                    writes += 1
                else:
                    not_created += 1
                    errors.add("create Txn took the Else branch for a new key", detail=repr(key))

        await asyncio.gather(*(client(i) for i in range(clients)))
        window.stop()
    finally:
        await chans.close()
    return {
        "latencies": latencies,
        "writes": writes,
        "not_created": not_created,
        "errors": errors.report(),
        **window.report(),
    }
