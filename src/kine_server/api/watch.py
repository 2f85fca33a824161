"""etcdserverpb.Watch: many watches on one bidirectional stream, as etcd's serverWatchStream.

This is the stream protocol only; the watch algorithm (routing, catch-up, fall-back, progress
eligibility) is `mvcc/watchable.py`, as etcd keeps it in mvcc rather than v3rpc. Requests (create,
cancel, progress) are handled as they arrive; one sender task per stream writes responses: control
responses first (created/canceled/progress), then what the watches deliver, fragmented if asked.
The hub only queues into watches; it never waits for a client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeAlias

import grpc

from kine_server import errors
from kine_server.api.auth import Credentials
from kine_server.api.common import Member, send
from kine_server.mvcc.applier import CHUNK, range_end
from kine_server.mvcc.watchable import Cancelled, Delivery, Watches, WatchLimits, WatchStats
from kine_server.mvcc.watcher import WatchSpec
from kine_server.pb import rpc_pb2, rpc_pb2_grpc
from kine_server.store.store import Store

Context: TypeAlias = grpc.aio.ServicerContext
Create = rpc_pb2.WatchCreateRequest


@dataclass
class WatchSettings:
    progress_interval: float = 5.0
    max_response_bytes: int = 1536 * 1024
    #: Events a watcher may hold for a slow client before it falls back to reading the database.
    max_pending_events: int = 1024
    #: Rows read from the database per catch-up step.
    page_size: int = 100
    #: Control responses (created, canceled, progress) a stream may queue before it stops reading
    #: requests until the client reads: etcd's ctrlStreamBufLen.
    max_queued_control: int = 16


class Headers:
    """The newest revision's WatchResponse header, encoded once for every stream (see _head)."""

    def __init__(self, member: Member) -> None:
        self._member = member
        self._revision = -1
        self._encoded = b""

    def encoded(self, revision: int) -> bytes:
        if revision != self._revision:
            response = rpc_pb2.WatchResponse()
            response.header.revision = revision
            self._member.stamp(response.header)
            self._encoded = response.SerializeToString()
            self._revision = revision
        return self._encoded


class _StreamClosed(Exception):
    """The client's side of the call has finished; nothing more can be sent."""


def encode(response: rpc_pb2.WatchResponse | bytes) -> bytes:
    """The Watch call's serializer: event responses arrive already encoded (see WireEvent)."""
    if isinstance(response, bytes):
        return response
    data: bytes = response.SerializeToString()
    return data


class WatchService(rpc_pb2_grpc.WatchServicer):
    def __init__(
        self, store: Store, member: Member, credentials: Credentials, settings: WatchSettings
    ) -> None:
        self._store = store
        self._member = member
        self._credentials = credentials
        self._settings = settings
        self.stats = WatchStats()
        self._headers = Headers(member)
        self._streams: set[WatchStream] = set()
        self._closing = asyncio.Event()

    def handler(self) -> grpc.RpcMethodHandler:
        """The Watch method, with a serializer that passes pre-encoded responses through."""
        return grpc.stream_stream_rpc_method_handler(
            self.Watch,
            request_deserializer=rpc_pb2.WatchRequest.FromString,
            response_serializer=encode,
        )

    def shutdown(self) -> None:
        """End every stream with UNAVAILABLE: the server is stopping."""
        self._closing.set()

    def buffered_events(self) -> int:
        """Events queued in every watcher of every stream (walked at scrape time)."""
        return sum(stream.watches.pending_events() for stream in self._streams)

    async def _authorize(self, context: Context, create: rpc_pb2.WatchCreateRequest) -> None:
        """etcd's isWatchPermitted: the stream's user must be able to read the range now."""
        try:
            state, who = await self._credentials.checked(context)
            state.check(who, create.key, create.range_end, write=False)
        except errors.EtcdError as exc:
            raise errors.WatchDenied(exc) from exc

    async def Watch(
        self, request_iterator: AsyncIterator[rpc_pb2.WatchRequest], context: Context
    ) -> None:
        stream = WatchStream(
            self._store,
            self._member,
            self._headers,
            self._settings,
            self.stats,
            context,
            self._closing,
            lambda create: self._authorize(context, create),
        )
        self._streams.add(stream)
        try:
            await stream.serve(request_iterator)
        except _StreamClosed:
            pass
        except errors.EtcdError as exc:
            await context.abort(exc.code, exc.message)
        finally:
            self._streams.discard(stream)


class WatchStream:
    def __init__(
        self,
        store: Store,
        member: Member,
        headers: Headers,
        settings: WatchSettings,
        stats: WatchStats,
        context: Context,
        closing: asyncio.Event,
        authorize: Callable[[rpc_pb2.WatchCreateRequest], Awaitable[None]],
    ) -> None:
        self._closing = closing
        #: Raises WatchRefused for a create the stream's user may not make.
        self._authorize = authorize
        self._member = member
        self._headers = headers
        self._settings = settings
        self._stats = stats
        self._context = context
        self._wake = asyncio.Event()
        limits = WatchLimits(
            settings.max_pending_events,
            settings.page_size,
            batch_bytes=settings.max_response_bytes,
        )
        self.watches = Watches(store.hub, store.kv.history, limits, stats, self._wake.set)
        self._control: collections.deque[rpc_pb2.WatchResponse] = collections.deque()
        #: Set while the control queue has room; the receiver waits on it (see _receive).
        self._room = asyncio.Event()
        self._room.set()
        self._progress_requested = False

    async def serve(self, requests: AsyncIterator[rpc_pb2.WatchRequest]) -> None:
        self._stats.streams += 1
        self.watches.open()
        tasks: list[asyncio.Future[None]] = [
            asyncio.create_task(self._receive(requests)),
            asyncio.create_task(self._send_loop()),
            asyncio.create_task(self._progress_loop()),
            asyncio.create_task(self._until_closing()),
            self.watches.failed,
        ]
        try:
            running = set(tasks)
            while running:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    # An EtcdError from the sender ends the stream with its status. The client
                    # closing its side only ends the requests: as in etcd, watches go on until
                    # the call itself ends.
                    task.result()
        finally:
            self.watches.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._stats.streams -= 1

    async def _until_closing(self) -> None:
        await self._closing.wait()
        raise errors.Unavailable("kine-server: shutting down")

    # -- requests ------------------------------------------------------------------------------

    async def _receive(self, requests: AsyncIterator[rpc_pb2.WatchRequest]) -> None:
        limit = self._settings.max_queued_control
        async for request in requests:
            kind = request.WhichOneof("request_union")
            if kind == "create_request":
                await self._create(request.create_request)
            elif kind == "cancel_request":
                self._cancel(request.cancel_request.watch_id)
            elif kind == "progress_request":
                self._progress_requested = True
            self._wake.set()
            # As etcd's recvLoop blocks on its bounded control channel: a client that writes
            # without reading stops being read (gRPC flow control then stops it), instead of
            # growing this stream without bound.
            if len(self._control) >= limit:
                self._stats.receive_pauses += 1
                self._room.clear()
                await self._room.wait()

    async def _create(self, create: rpc_pb2.WatchCreateRequest) -> None:
        spec = WatchSpec(
            key=create.key or b"\x00",  # etcd: an empty key is the smallest key
            end=range_end(create.range_end),
            no_put=Create.NOPUT in create.filters,
            no_delete=Create.NODELETE in create.filters,
            prev_kv=create.prev_kv,
            progress_notify=create.progress_notify,
            fragment=create.fragment,
        )
        try:
            await self._authorize(create)
        except errors.WatchRefused as refused:
            self._control.append(self._refused(refused))
            return
        current = self.watches.revision  # after the await: the revision the watch starts at
        try:
            watch_id = self.watches.create(create.watch_id, spec, create.start_revision)
        except errors.WatchRefused as refused:
            response = self._refused(refused)
        else:
            response = self._response(current, watch_id=watch_id, created=True)
        self._control.append(response)

    def _refused(self, refused: errors.WatchRefused) -> rpc_pb2.WatchResponse:
        """etcd's answer to a create it refuses: created and at once canceled, id -1."""
        return self._response(
            self.watches.revision,
            watch_id=-1,
            created=True,
            canceled=True,
            cancel_reason=refused.reason,
        )

    def _cancel(self, watch_id: int) -> None:
        if self.watches.cancel(watch_id):
            self._control.append(
                self._response(self.watches.revision, watch_id=watch_id, canceled=True)
            )

    # -- responses -----------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            # Event.wait() returns at once when already set, without yielding. That cannot starve
            # the loop: each pass either writes (and so waits for gRPC) or delivers nothing and
            # leaves `wake` clear.
            await self._wake.wait()
            self._wake.clear()
            await self._flush_control()
            async with contextlib.aclosing(self.watches.deliveries()) as deliveries:
                async for delivery in deliveries:
                    await self._deliver(delivery)
                    await self._flush_control()
            if self._progress_requested and self.watches.idle:
                self._progress_requested = False
                await self._write(self._response(self.watches.revision, watch_id=-1))

    async def _flush_control(self) -> None:
        while self._control:
            await self._write(self._control.popleft())
            if len(self._control) < self._settings.max_queued_control:
                self._room.set()
        self._room.set()

    async def _deliver(self, delivery: Delivery) -> None:
        if isinstance(delivery, Cancelled):
            response = self._response(
                0,
                watch_id=delivery.watch_id,
                compact_revision=delivery.compact_revision,
                canceled=True,
            )
            await self._write(response)
            return
        watch_id, revision, chosen, spec = delivery
        events: list[bytes] = []
        for start in range(0, len(chosen), CHUNK):  # a DeleteRange's 50 000 events: see CHUNK
            if start:
                await asyncio.sleep(0)
            events += [e.wire(spec.prev_kv) for e in chosen[start : start + CHUNK]]
        head = self._head(revision, watch_id, fragment=False)
        limit = self._settings.max_response_bytes
        size = len(head) + sum(len(e) for e in events)
        if not spec.fragment or len(events) < 2 or size < limit:
            await self._write(head + b"".join(events))
            return
        # etcd's sendFragments: fill each fragment up to the limit; the last one is not a fragment.
        more = self._head(revision, watch_id, fragment=True)
        index = 0
        while index < len(events):
            first = index
            size = len(more)
            while index < len(events):
                size += len(events[index])
                if index > first and size >= limit:
                    break
                index += 1
            part = events[first:index]
            await self._write((more if index < len(events) else head) + b"".join(part))

    # -- progress ------------------------------------------------------------------------------

    async def _progress_loop(self) -> None:
        interval = self._settings.progress_interval
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            for watch_id in self.watches.progress_due():
                self._control.append(self._response(self.watches.revision, watch_id=watch_id))
            if self._control:
                self._wake.set()

    # -- plumbing ------------------------------------------------------------------------------

    def _response(self, revision: int, **fields: object) -> rpc_pb2.WatchResponse:
        response = rpc_pb2.WatchResponse(**fields)  # type: ignore[arg-type]
        response.header.revision = revision
        self._member.stamp(response.header)
        return response

    def _head(self, revision: int, watch_id: int, fragment: bool) -> bytes:
        """A WatchResponse without its events; the encoded events follow (field 11 comes last).

        Encoded messages concatenate as a merge, so the header, the same for every watcher of a
        revision, is encoded once per revision and the watch's own fields appended to it.
        """
        own: bytes = rpc_pb2.WatchResponse(watch_id=watch_id, fragment=fragment).SerializeToString()
        return self._headers.encoded(revision) + own

    async def _write(self, response: rpc_pb2.WatchResponse | bytes) -> None:
        if not await send(self._context, response):
            raise _StreamClosed()  # the client went away: end the stream, do not spin on it
