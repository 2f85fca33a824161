"""Unmeasured jobs: a server's current revision, and writing the keys a workload starts from."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from kine_server.pb import rpc_pb2

from .channels import RPC_TIMEOUT, Channels
from .measure import Errors
from .requests import value_of


async def current_revision(endpoint: str) -> int:
    chans = Channels(endpoint, 1)
    try:
        await chans.ready()
        response = await chans.kv[0].Range(
            rpc_pb2.RangeRequest(key=b"/", count_only=True), timeout=RPC_TIMEOUT
        )
        return int(response.header.revision)
    finally:
        await chans.close()


async def load_keys(
    endpoint: str,
    keys: list[bytes],
    value_size: int,
    per_txn: int = 100,
    clients: int = 4,
) -> dict[str, Any]:
    """Write `keys` with Txns of `per_txn` plain puts, `clients` at a time; each key's revision
    is the header revision of the Txn that wrote it."""
    value = value_of(value_size)
    chans = Channels(endpoint, clients)
    errors = Errors()
    batches = [keys[i : i + per_txn] for i in range(0, len(keys), per_txn)]
    revisions: dict[bytes, int] = {}
    try:
        await chans.ready()

        async def client(index: int) -> None:
            stub = chans.kv[index % len(chans.kv)]
            for b in range(index, len(batches), clients):
                batch = batches[b]
                request = rpc_pb2.TxnRequest(
                    success=[
                        rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k, value=value))
                        for k in batch
                    ]
                )
                try:
                    response = await stub.Txn(request, timeout=RPC_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    errors.add("load Txn", exc)
                    continue
                for k in batch:
                    revisions[k] = response.header.revision

        await asyncio.gather(*(client(i) for i in range(clients)))
    finally:
        await chans.close()
    return {"revisions": revisions, "errors": errors.report()}
