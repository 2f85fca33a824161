"""A gRPC client for either server (kine-server or a real etcd), with every etcd stub at hand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import text_format

from kine_server.pb import health_pb2_grpc, rpc_pb2_grpc


@dataclass
class Client:
    channel: grpc.aio.Channel
    kv: rpc_pb2_grpc.KVStub
    watch: rpc_pb2_grpc.WatchStub
    lease: rpc_pb2_grpc.LeaseStub
    cluster: rpc_pb2_grpc.ClusterStub
    maintenance: rpc_pb2_grpc.MaintenanceStub
    auth: rpc_pb2_grpc.AuthStub
    health: health_pb2_grpc.HealthStub

    async def close(self) -> None:
        await self.channel.close()


def connect(endpoint: str) -> Client:
    channel = grpc.aio.insecure_channel(
        endpoint, options=[("grpc.max_receive_message_length", 2**31 - 1)]
    )
    return Client(
        channel=channel,
        kv=rpc_pb2_grpc.KVStub(channel),
        watch=rpc_pb2_grpc.WatchStub(channel),
        lease=rpc_pb2_grpc.LeaseStub(channel),
        cluster=rpc_pb2_grpc.ClusterStub(channel),
        maintenance=rpc_pb2_grpc.MaintenanceStub(channel),
        auth=rpc_pb2_grpc.AuthStub(channel),
        health=health_pb2_grpc.HealthStub(channel),
    )


def normalized(response: Any) -> str:
    """A response as one line of text, without the ids that legitimately differ between servers."""
    if response.HasField("header"):
        response.header.cluster_id = 0
        response.header.member_id = 0
        response.header.raft_term = 0
    return str(text_format.MessageToString(response, as_one_line=True, as_utf8=True))


class Recorder:
    """Makes calls on one server and records each outcome (response or error) as a line of text.

    A differential test runs the same scenario through a Recorder on kine-server and one on a real
    etcd and compares the two transcripts line by line.
    """

    def __init__(self, client: Client, render: Callable[[Any], str] = normalized) -> None:
        self.client = client
        #: How a response is written in the transcript.
        self._render = render
        self.transcript: list[str] = []

    async def __call__(self, method: str, request: Any) -> Any:
        service, name = method.split(".")
        stub = getattr(getattr(self.client, service), name)
        try:
            response = await stub(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            self.transcript.append(f"{method} -> {exc.code().name}: {exc.details()}")
            return None
        self.transcript.append(f"{method} -> {self._render(response)}")
        return response

    def note(self, text: str) -> None:
        self.transcript.append(text)
