"""Measured watch fan-out (workload 5): watch streams on a prefix, and an open-loop writer
whose Puts they must all receive; both record when each event was sent, acknowledged and seen."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc

from kine_server.pb import rpc_pb2

from .channels import RPC_TIMEOUT, Channels
from .measure import Errors, Sync, Window, open_loop, sleep_until
from .requests import prefix_end, value_of


async def watchers(
    endpoint: str,
    prefix: bytes,
    sentinel: bytes,
    count: int,
    channels: int,
    start_revision: int,
    max_duration: float,
    sync: Sync,
) -> dict[str, Any]:
    """`count` watch streams (one watch each) on `prefix` from `start_revision`. Reports progress
    once all are created, then records (mod_revision, key, time received) of every event until
    it sees `sentinel` or `max_duration` seconds have passed since then."""
    chans = Channels(endpoint, channels)
    errors = Errors()
    received: list[list[tuple[int, bytes, float]]] = [[] for _ in range(count)]
    created = [asyncio.get_running_loop().create_future() for _ in range(count)]
    finished = [False] * count
    responses = [0]  # WatchResponses that carried events (etcd may batch several revisions)
    window = Window()
    end = prefix_end(prefix)
    try:
        await chans.ready()

        async def watch(index: int) -> None:
            stub = chans.watch[index % len(chans.watch)]
            call = stub.Watch()
            try:
                await call.write(
                    rpc_pb2.WatchRequest(
                        create_request=rpc_pb2.WatchCreateRequest(
                            key=prefix, range_end=end, start_revision=start_revision
                        )
                    )
                )
                mine = received[index]
                monotonic = time.monotonic
                while True:
                    response = await call.read()
                    now = monotonic()
                    if response is grpc.aio.EOF:
                        errors.add("watch stream ended by the server")
                        return
                    if response.created and not created[index].done():
                        created[index].set_result(now)
                    if response.canceled:
                        errors.add("watch canceled", detail=response.cancel_reason)
                        return
                    if response.events:
                        responses[0] += 1
                    for event in response.events:
                        kv = event.kv
                        if kv.key == sentinel:
                            finished[index] = True
                            return
                        mine.append((kv.mod_revision, kv.key, now))
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    errors.add("Watch", exc)
            finally:
                if not created[index].done():
                    created[index].set_result(-1.0)
                call.cancel()

        tasks = [asyncio.create_task(watch(i)) for i in range(count)]
        times = await asyncio.wait_for(asyncio.gather(*created), 60)
        failed = sum(1 for t in times if t < 0)
        await sleep_until(await sync({"created": count - failed, "failed": failed}))
        window.start()
        _, late = await asyncio.wait(tasks, timeout=max_duration)
        window.stop()
        for task in late:
            errors.add("watch had not seen the sentinel by the deadline")
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await chans.close()
    return {
        "received": received,
        "finished": sum(finished),
        "responses": responses[0],
        "errors": errors.report(),
        **window.report(),
    }


async def watch_writer(
    endpoint: str,
    prefix: bytes,
    sentinel: bytes,
    count: int,
    rate: float,
    max_inflight: int,
    value_size: int,
    time_cap: float,
    sync: Sync,
    channels: int = 2,
) -> dict[str, Any]:
    """Open-loop writer: Put number i is sent at start_at + i/rate (no later than that unless
    `max_inflight` Puts are already outstanding). Records send and acknowledgement times."""
    value = value_of(value_size)
    chans = Channels(endpoint, channels)
    errors = Errors()
    writes: list[tuple[int, bytes, float, float]] = []  # revision, key, sent, acked
    window = Window()
    try:
        await chans.ready()
        await sleep_until(await sync(None))
        window.start()

        async def put(i: int) -> None:
            key = prefix + b"k%06d" % i
            try:
                sent = time.monotonic()
                response = await chans.kv[i % len(chans.kv)].Put(
                    rpc_pb2.PutRequest(key=key, value=value), timeout=RPC_TIMEOUT
                )
                writes.append((response.header.revision, key, sent, time.monotonic()))
            except grpc.aio.AioRpcError as exc:
                errors.add("watched Put", exc)

        await open_loop(window, count, rate, max_inflight, time_cap, put)
        window.stop()
        await chans.kv[0].Put(rpc_pb2.PutRequest(key=sentinel, value=b"end"), timeout=RPC_TIMEOUT)
    finally:
        await chans.close()
    return {"writes": writes, "errors": errors.report(), **window.report()}
