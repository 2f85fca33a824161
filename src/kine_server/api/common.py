"""What every service shares: the member identity in response headers, error translation, and
UNIMPLEMENTED answers that name the call for everything this server does not serve."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from kine_server import errors
from kine_server.pb import rpc_pb2

log = logging.getLogger(__name__)

#: etcd has no raft term to report; a single member that never changes leader stays at term 1.
RAFT_TERM = 1


@dataclass(frozen=True)
class Member:
    """This server as the one member of its etcd cluster."""

    cluster_id: int
    member_id: int
    name: str
    client_urls: list[str] = field(default_factory=list)

    def stamp(self, header: rpc_pb2.ResponseHeader) -> None:
        header.cluster_id = self.cluster_id
        header.member_id = self.member_id
        header.raft_term = RAFT_TERM


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def etcd_errors(handler: Handler) -> Handler:
    """Turn the store's EtcdError into the gRPC status etcd would send."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except errors.EtcdError as exc:
            await context.abort(exc.code, exc.message)
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise  # context.abort() inside the handler: the status is already set
            # A bug: INTERNAL (never UNKNOWN, never a retryable code), logged with its trace.
            log.exception("%s failed", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, errors.Internal.of(exc).message)

    return wrapper  # type: ignore[return-value]


async def send(context: grpc.aio.ServicerContext, response: Any) -> bool:
    """Write one response of a stream; False if the call is over. A client that goes away makes
    the write fail, as InvalidStateError once the call has ended, or as grpc's own
    ExecuteBatchError while the write is in flight: either way nothing more can be sent, and it
    is no error of the server's (grpc would log it at ERROR with a traceback)."""
    try:
        await context.write(response)
    except Exception as exc:
        log.debug("stream ended while writing to %s: %s", context.peer(), type(exc).__name__)
        return False
    return True


def _unsupported(full_name: str) -> Callable[..., Awaitable[Any]]:
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, errors.Unsupported(full_name).message)

    return handler


def answer_unsupported(cls: type, service: ServiceDescriptor) -> type:
    """Class decorator: every RPC of `service` that `cls` does not define answers UNIMPLEMENTED."""
    for method in service.methods:
        if method.name not in cls.__dict__:
            setattr(cls, method.name, _unsupported(f"{service.full_name}/{method.name}"))
    return cls
