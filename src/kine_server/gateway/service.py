"""etcd's HTTP/JSON gateway: each POST under /v3/ becomes the gRPC call it names.

As etcd's own gateway does, this one is a client of the server's gRPC service, not a second
implementation: it dials this process's gRPC server (over a unix socket only this process can
reach), so every check, limit and semantic of the gRPC path (request size, txn ops, watch order,
and auth once it exists) applies unchanged. What it adds is only the translation: JSON in and
out (jsonpb.py), errors as etcd's gateway writes them, and streams as one JSON object per line.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from kine_server.gateway import jsonpb
from kine_server.gateway.routes import Kind, Route, find
from kine_server.httpd import BadRequest, Request, Response
from kine_server.pb import rpc_pb2 as pb

log = logging.getLogger(__name__)

JSON = "application/json"
#: etcd answers every gateway request with these (any origin may call it from a browser).
CORS_HEADERS = (
    ("Access-Control-Allow-Headers", "accept, content-type, authorization"),
    ("Access-Control-Allow-Methods", "POST, GET, OPTIONS, PUT, DELETE"),
    ("Access-Control-Allow-Origin", "*"),
)

Health = Callable[[], Awaitable[tuple[int, bytes]]]


def _serialize(message: Message) -> bytes:
    data: bytes = message.SerializeToString()
    return data


class Gateway:
    """Answers gateway requests through a gRPC channel to `target` (this process's server)."""

    def __init__(
        self, target: str, version: str, health: Health, max_message_bytes: int, tls: bool
    ) -> None:
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", 2**31 - 1),
            ],
        )
        major_minor = ".".join(version.split(".")[:2])
        self._version = jsonpb.dumps({"etcdserver": version, "etcdcluster": f"{major_minor}.0"})
        self._health = health
        self._scheme = "https" if tls else "http"
        #: The most one JSON request may take before it is whole (bytes travel as base64).
        self._max_message = 2 * max_message_bytes

    async def close(self) -> None:
        await self._channel.close(grace=None)

    async def handle(self, request: Request, response: Response) -> None:
        path = request.path
        if request.method == "OPTIONS":  # a browser's CORS preflight
            await response.send(200, "text/plain; charset=utf-8", b"")
            return
        if path == "/version":
            await response.send(200, JSON, self._version)
            return
        if path == "/health":
            status, body = await self._health()
            await response.send(status, JSON, body)
            return
        route = find(path)
        if route is None:
            await response.send(404, "text/plain; charset=utf-8", b"Not Found\n")
            return
        if request.method != "POST":
            await response.send(405, "text/plain; charset=utf-8", b"Method Not Allowed\n")
            return
        metadata = _metadata(request)
        if route.kind is Kind.UNARY:
            await self._unary(route, request, response, metadata)
        elif route.kind is Kind.SERVER_STREAM:
            await self._server_stream(route, request, response, metadata)
        else:
            await self._stream(route, request, response, metadata)

    async def _unary(
        self, route: Route, request: Request, response: Response, metadata: Metadata
    ) -> None:
        message = await _decode_body(route, request, response)
        if message is None:
            return
        call = self._channel.unary_unary(route.method, _serialize, route.response.FromString)
        try:
            reply = await call(message, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            await _fail(response, exc.code(), exc.details() or "")
            return
        if isinstance(reply, pb.MemberListResponse):
            self._advertise_gateway(reply, request)
        await response.send(200, JSON, jsonpb.dumps(jsonpb.encode(reply)))

    def _advertise_gateway(self, reply: pb.MemberListResponse, request: Request) -> None:
        """A member's client URLs, to a gateway client, are the gateway's: clients that sync
        their endpoints from the member list (Patroni's etcd3 DCS) would otherwise be sent to
        the gRPC port, which does not speak HTTP/1.1. The address is the one the client used
        (its Host header), so a wildcard listener is advertised as the client reaches it."""
        host = request.headers.get("host")
        if not host:
            return
        for member in reply.members:
            del member.clientURLs[:]
            member.clientURLs.append(f"{self._scheme}://{host}")

    async def _server_stream(
        self, route: Route, request: Request, response: Response, metadata: Metadata
    ) -> None:
        message = await _decode_body(route, request, response)
        if message is None:
            return
        call = self._channel.unary_stream(route.method, _serialize, route.response.FromString)(
            message, metadata=metadata
        )
        response.close_after = True
        try:
            await _relay(call, response)
        finally:
            call.cancel()

    async def _stream(
        self, route: Route, request: Request, response: Response, metadata: Metadata
    ) -> None:
        """Requests decoded from the body as they arrive, each response written as it comes.
        The call lasts until the server ends it or the client goes away (a watch outlives its
        request body, as in etcd; a keep-alive stream ends with it)."""
        # A stream's body lasts as long as the call (a keep-alive stream for days): each request
        # is limited, not their total.
        objects = jsonpb.ObjectStream(max_pending=self._max_message)
        chunks = request.chunks(total_limit=False)
        first: list[Message] = []
        try:
            # The first request is decoded before the call starts: a body that does not begin
            # with one is answered as etcd answers it (500, code 2), not with an empty stream.
            async for part in chunks:
                first = [jsonpb.decode(text, route.request) for text in objects.feed(part)]
                if first:
                    break
            else:
                objects.finish()
        except jsonpb.DecodeError as exc:
            await _fail(response, grpc.StatusCode.UNKNOWN, str(exc))
            return
        call = self._channel.stream_stream(route.method, _serialize, route.response.FromString)(
            metadata=metadata
        )
        response.close_after = True
        gone = asyncio.Event()
        sender = asyncio.create_task(
            _send_requests(call, route, first, objects, chunks, request, gone)
        )
        try:
            await _relay(call, response, gone)
        finally:
            sender.cancel()
            call.cancel()
            await asyncio.gather(sender, return_exceptions=True)


Metadata = tuple[tuple[str, str], ...]


def _metadata(request: Request) -> Metadata:
    """What the gRPC call carries from the HTTP request: the Authorization header, as etcd's
    gateway forwards it (etcd reads a token from `token` or `authorization` metadata)."""
    token = request.headers.get("authorization")
    return (("authorization", token),) if token else ()


async def _decode_body(route: Route, request: Request, response: Response) -> Message | None:
    """The request a whole body holds; None once a body that is not one has been answered."""
    try:
        return jsonpb.decode(await request.body(), route.request)
    except jsonpb.DecodeError as exc:
        await _fail(response, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return None


async def _fail(response: Response, code: grpc.StatusCode, message: str) -> None:
    await response.send(jsonpb.HTTP_STATUS.get(code, 500), JSON, jsonpb.error_body(code, message))


async def _relay(call: Any, response: Response, gone: asyncio.Event | None = None) -> None:
    """Write each response of a streamed call as {"result": ...} on its own line; a call that
    fails writes grpc-gateway's stream error. Returns quietly if the client went away.

    The 200 and its headers go out with the first response, not before: a client (etcd3gw's
    watch) returns from its request once the headers arrive and then writes the keys it
    watches, so the watch must exist by then (its `created` is the first response)."""
    try:
        async for reply in call:
            if not response.started:
                await response.start(200, JSON)
            await response.write(b'{"result":' + jsonpb.dumps(jsonpb.encode(reply)) + b"}\n")
        if not response.started:
            await response.start(200, JSON)  # a stream that ended without a response
    except grpc.aio.AioRpcError as exc:
        if not response.started:
            await _fail(response, exc.code(), exc.details() or "")
        elif gone is None or not gone.is_set():
            await response.write(jsonpb.stream_error(exc.code(), exc.details() or "") + b"\n")
    except asyncio.CancelledError:
        # The call was cancelled because the client went away (see _send_requests); if it is
        # this task that is being cancelled, that goes on.
        task = asyncio.current_task()
        if gone is None or not gone.is_set() or (task is not None and task.cancelling()):
            raise


async def _send_requests(
    call: Any,
    route: Route,
    first: list[Message],
    objects: jsonpb.ObjectStream,
    chunks: AsyncIterator[bytes],
    request: Request,
    gone: asyncio.Event,
) -> None:
    """Feed the call the body's requests; when the body ends, close the sending side, then end
    the call when the client closes its connection. A request that does not decode ends the
    sending side, as etcd's gateway stops reading at one (it logs it; so do we, at debug). A
    connection that breaks in the middle of the body ends the call at once: its client is gone."""
    try:
        for message in first:
            await call.write(message)
        async for part in chunks:
            for text in objects.feed(part):
                await call.write(jsonpb.decode(text, route.request))
        objects.finish()
    except (jsonpb.DecodeError, BadRequest) as exc:
        log.debug("gateway %s: stopped reading requests: %s", route.method, exc)
    except (grpc.RpcError, grpc.aio.UsageError):
        return  # the call has ended: nothing more to send
    except (asyncio.IncompleteReadError, OSError):
        gone.set()
        call.cancel()
        return
    try:
        await call.done_writing()
    except (grpc.RpcError, grpc.aio.UsageError):
        return
    await request.wait_closed()
    gone.set()
    call.cancel()
