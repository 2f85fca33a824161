"""Request decoding that never raises inside gRPC, and etcd's nesting depth for Txn.

grpcio logs a traceback at ERROR for every request its deserializer cannot parse. Here a
deserializer that fails returns an `Undecodable` instead, and the handler answers it as Go's
gRPC answers a request it cannot unmarshal (INTERNAL, "grpc: error unmarshalling request: …"),
logging one line at debug level: a client sending garbage harms nobody, the log included.

protobuf's upb parser refuses messages nested deeper than 100 levels, and each level of a
nested Txn is two (TxnRequest, RequestOp): 51 nested Txns failed, where etcd accepts as many
as --max-txn-ops allows. Raising upb's limit for good is not safe (a 250 kB request nested
32 000 deep overflows the C stack), so a Txn that fails for depth is measured on the wire first,
without parsing it; one within etcd's bound is parsed with the limit lifted for that one call,
and a deeper one gets the answer etcd gives it: too many operations.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from kine_server import errors
from kine_server.pb import rpc_pb2
from kine_server.wire import read_varint

log = logging.getLogger(__name__)

try:  # upb's switch for the nesting (and size) limit; gRPC still bounds the size
    from google._upb._message import SetAllowOversizeProtos as _allow_deep
except ImportError:  # pragma: no cover - another protobuf backend
    _allow_deep = None

Deserializer = Callable[[bytes], Any]


class Undecodable:
    """Stands in for a request that could not be parsed; carries the answer to give."""

    __slots__ = ("error",)

    def __init__(self, error: errors.EtcdError) -> None:
        self.error = error


def unmarshal_error(exc: Exception) -> errors.EtcdError:
    return errors.Internal(f"grpc: error unmarshalling request: {exc}")


def deserializer(parse: Deserializer, max_txn_ops: int) -> Deserializer:
    """`parse` (a message type's FromString), returning an Undecodable instead of raising."""
    deep_txn = parse == rpc_pb2.TxnRequest.FromString

    def decode(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            if deep_txn and "MaxDepth" in str(exc):
                return _deep_txn(data, max_txn_ops)
            return Undecodable(unmarshal_error(exc))

    return decode


def _deep_txn(data: bytes, max_txn_ops: int) -> Any:
    # Every level but the innermost has at least one op, and nested levels share the op limit,
    # so etcd's checkTxnRequest refuses anything deeper than this.
    limit = max_txn_ops + 1
    try:
        depth = txn_depth(data, limit)
    except ValueError as exc:
        return Undecodable(unmarshal_error(exc))
    if depth > limit or _allow_deep is None:
        return Undecodable(errors.TooManyOps())
    _allow_deep(True)
    try:
        return rpc_pb2.TxnRequest.FromString(data)
    except DecodeError as exc:
        return Undecodable(unmarshal_error(exc))
    finally:
        _allow_deep(False)


# Field numbers: TxnRequest.success = 2, .failure = 3 (RequestOps); RequestOp.request_txn = 4.
_TXN, _OP = 0, 1


def txn_depth(data: bytes, limit: int) -> int:
    """How deep TxnRequests nest in the encoded TxnRequest `data` (1: no nested Txn), read from
    the wire format without parsing; counting stops past `limit`. ValueError if malformed."""
    deepest = 1
    stack = [(len(data), _TXN, 1)]  # (end of the message, its kind, its depth)
    pos = 0
    while stack:
        end, kind, depth = stack[-1]
        if pos >= end:
            stack.pop()
            continue
        key, pos = read_varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 2:
            length, pos = read_varint(data, pos)
            if pos + length > end:
                raise ValueError("a field runs past its message")
            if kind == _TXN and field in (2, 3):
                stack.append((pos + length, _OP, depth))
                continue
            if kind == _OP and field == 4:
                deepest = max(deepest, depth + 1)
                if deepest > limit:
                    return deepest
                stack.append((pos + length, _TXN, depth + 1))
                continue
            pos += length
        elif wire == 0:
            _, pos = read_varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire} is not one a request uses")
    return deepest


async def _requests(
    method: str, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            # Go's gRPC words it differently on a stream than for a unary call.
            cause = request.error.message.removeprefix("grpc: error unmarshalling request: ")
            error = errors.Internal(f"grpc: failed to unmarshal the received message {cause}")
            log.debug("%s: undecodable request from %s: %s", method, context.peer(), cause)
            raise error
        yield request


def guarded(method: str, handler: grpc.RpcMethodHandler, max_txn_ops: int) -> grpc.RpcMethodHandler:
    """`handler` with a deserializer that never raises, and behaviour that answers an
    Undecodable request with its error (a stream's with the error that ends the stream)."""
    decode = deserializer(handler.request_deserializer, max_txn_ops)
    if handler.request_streaming:
        behavior = handler.stream_stream or handler.stream_unary

        async def streaming(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await behavior(_requests(method, requests, context), context)

        if handler.stream_stream is not None:
            return handler._replace(request_deserializer=decode, stream_stream=streaming)
        return handler._replace(request_deserializer=decode, stream_unary=streaming)

    async def check(request: Any, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, Undecodable):
            log.debug(
                "%s: undecodable request from %s: %s", method, context.peer(), request.error.message
            )
            await context.abort(request.error.code, request.error.message)

    if handler.unary_stream is not None:
        stream = handler.unary_stream

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            await check(request, context)
            async for response in stream(request, context):
                yield response

        return handler._replace(request_deserializer=decode, unary_stream=unary_stream)
    unary = handler.unary_unary

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(request, context)
        return await unary(request, context)

    return handler._replace(request_deserializer=decode, unary_unary=unary_unary)
