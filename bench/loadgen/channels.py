"""gRPC connections to one server as the jobs open them, and the stubs they call.

Each channel asks for its own subchannel pool: grpcio's channels to one target otherwise share
one TCP connection per process, and a server of several processes sharing a port (kine-server's
--workers, the floor's) would see all of a client process's load arrive at one of them. A job's
`n` channels are therefore `n` connections, spread by the kernel over the server's processes as
kube-apiserver's dozens of connections are."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import grpc

from kine_server.pb import rpc_pb2, rpc_pb2_grpc

CHANNEL_OPTIONS = [
    # Without a local pool every channel to one target shares one TCP connection.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

RPC_TIMEOUT = 30.0

# The generated stub classes carry no annotations: typed once here.
_KV: Callable[[grpc.aio.Channel], Any] = rpc_pb2_grpc.KVStub
_WATCH: Callable[[grpc.aio.Channel], Any] = rpc_pb2_grpc.WatchStub
_AUTH: Callable[[grpc.aio.Channel], Any] = rpc_pb2_grpc.AuthStub


class Channels:
    """`n` channels to one endpoint, each its own connection, with the stubs the jobs use.

    An endpoint `user:password@host:port` (the bench's --auth) signs in once all are connected,
    and every call then carries the token, as an etcd client's do."""

    def __init__(self, endpoint: str, n: int) -> None:
        self._credentials, _, address = endpoint.rpartition("@")
        self.channels = [
            grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(max(1, n))
        ]
        self.kv: list[Any] = [_KV(c) for c in self.channels]
        self.watch: list[Any] = [_WATCH(c) for c in self.channels]

    async def ready(self, timeout: float = 15.0) -> None:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self.channels)), timeout)
        if self._credentials:
            name, _, password = self._credentials.partition(":")
            request = rpc_pb2.AuthenticateRequest(name=name, password=password)
            auth = _AUTH(self.channels[0])
            metadata = (("token", (await auth.Authenticate(request, timeout=RPC_TIMEOUT)).token),)
            self.kv = [Signed(stub, metadata) for stub in self.kv]
            self.watch = [Signed(stub, metadata) for stub in self.watch]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels), return_exceptions=True)


class Signed:
    """A stub whose calls all carry `metadata` (the token), for the cost of one partial."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        for name in ("Range", "Put", "DeleteRange", "Txn", "Compact", "Watch"):
            if hasattr(stub, name):
                setattr(self, name, functools.partial(getattr(stub, name), metadata=metadata))
