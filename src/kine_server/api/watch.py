"""etcdserverpb.Watch: many watches on one bidirectional stream, as etcd's serverWatchStream.

Requests (create, cancel, progress) are handled as they arrive; one sender task per stream writes
responses: control responses first (created/canceled/progress), then each ready watcher's events.
The hub only queues into watchers; it never waits for a client.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc

from kine_server import errors
from kine_server.api.common import Member, send
from kine_server.pb import rpc_pb2, rpc_pb2_grpc
from kine_server.store.applier import CHUNK, range_end
from kine_server.store.hub import Group, WireEvent
from kine_server.store.store import Storage
from kine_server.store.watch import Watcher, WatchSpec, route, wire_events
from kine_server.store.watcher_group import WatcherGroup

log = logging.getLogger(__name__)

Context: TypeAlias = grpc.aio.ServicerContext
Create = rpc_pb2.WatchCreateRequest

#: etcd's error texts for a create it refuses (sent as cancel_reason).
DUPLICATE_ID = "mvcc: duplicate watch ID provided on the WatchStream"
EMPTY_RANGE = "mvcc: watcher range is empty"


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


@dataclass
class WatchStats:
    """Shared by every stream: what metrics and tests read."""

    streams: int = 0
    watchers: int = 0
    peak_pending_events: int = 0
    fallbacks: int = 0
    #: Times a stream stopped reading requests because its client was not reading responses.
    receive_pauses: int = 0


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
    def __init__(self, store: Storage, member: Member, settings: WatchSettings) -> None:
        self._store = store
        self._member = member
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
        return sum(w.pending_events for s in self._streams for w in s.watchers())

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
        store: Storage,
        member: Member,
        headers: Headers,
        settings: WatchSettings,
        stats: WatchStats,
        context: Context,
        closing: asyncio.Event,
    ) -> None:
        self._closing = closing
        self._store = store
        self._hub = store.hub
        self._member = member
        self._headers = headers
        self._settings = settings
        self._stats = stats
        self._context = context
        self._watchers: dict[int, Watcher] = {}
        #: The same watchers by key range: what a committed event is matched against.
        self._index: WatcherGroup[Watcher] = WatcherGroup()
        self._ready: dict[int, Watcher] = {}
        self._control: collections.deque[rpc_pb2.WatchResponse] = collections.deque()
        self._wake = asyncio.Event()
        #: Set while the control queue has room; the receiver waits on it (see _receive).
        self._room = asyncio.Event()
        self._room.set()
        self._progress_requested = False
        self._next_id = 0

    def watchers(self) -> list[Watcher]:
        return list(self._watchers.values())

    async def serve(self, requests: AsyncIterator[rpc_pb2.WatchRequest]) -> None:
        self._stats.streams += 1
        failed = asyncio.get_running_loop().create_future()

        def guarded(handler: Callable[[Any], None]) -> Callable[[Any], None]:
            """A hub handler that can never fail silently: if it raises, the stream ends with
            INTERNAL (the client watches again from its last revision) instead of being left
            subscribed to nothing."""

            def call(argument: Any) -> None:
                try:
                    handler(argument)
                except Exception as exc:
                    log.exception("watch stream failed on a committed revision")
                    if not failed.done():
                        failed.set_exception(errors.Internal.of(exc))

            return call

        unsubscribe = self._hub.subscribe(guarded(self._on_publish), guarded(self._on_skip))
        tasks: list[asyncio.Future[None]] = [
            asyncio.create_task(self._receive(requests)),
            asyncio.create_task(self._send_loop()),
            asyncio.create_task(self._progress_loop()),
            asyncio.create_task(self._until_closing()),
            failed,
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
            unsubscribe()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._stats.streams -= 1
            self._stats.watchers -= len(self._watchers)
            self._watchers.clear()
            self._index = WatcherGroup()
            self._ready.clear()

    async def _until_closing(self) -> None:
        await self._closing.wait()
        raise errors.Unavailable("kine-server: shutting down")

    # -- requests ------------------------------------------------------------------------------

    async def _receive(self, requests: AsyncIterator[rpc_pb2.WatchRequest]) -> None:
        limit = self._settings.max_queued_control
        async for request in requests:
            kind = request.WhichOneof("request_union")
            if kind == "create_request":
                self._create(request.create_request)
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

    def _create(self, create: rpc_pb2.WatchCreateRequest) -> None:
        key = create.key or b"\x00"  # etcd: an empty key is the smallest key
        end = range_end(create.range_end)
        current = self._hub.revision
        error = ""
        if end and key >= end:
            error = EMPTY_RANGE
        elif create.watch_id and create.watch_id in self._watchers:
            error = DUPLICATE_ID
        if error:
            self._control.append(
                self._response(
                    current, watch_id=-1, created=True, canceled=True, cancel_reason=error
                )
            )
            return
        watch_id = create.watch_id or self._auto_id()
        spec = WatchSpec(
            key=key,
            end=end,
            no_put=Create.NOPUT in create.filters,
            no_delete=Create.NODELETE in create.filters,
            prev_kv=create.prev_kv,
            progress_notify=create.progress_notify,
            fragment=create.fragment,
        )
        start = create.start_revision or current + 1
        watcher = Watcher(watch_id, spec, next_revision=start, synced=start > current)
        self._control.append(self._response(current, watch_id=watch_id, created=True))
        self._watchers[watch_id] = watcher
        self._index.add(watcher, spec.key, spec.end)
        self._stats.watchers += 1
        if not watcher.synced:
            self._ready[watch_id] = watcher

    def _auto_id(self) -> int:
        while self._next_id in self._watchers:
            self._next_id += 1
        watch_id = self._next_id
        self._next_id += 1
        return watch_id

    def _cancel(self, watch_id: int) -> None:
        if self._remove(watch_id):
            self._control.append(
                self._response(self._hub.revision, watch_id=watch_id, canceled=True)
            )

    def _remove(self, watch_id: int) -> bool:
        self._ready.pop(watch_id, None)
        watcher = self._watchers.pop(watch_id, None)
        if watcher is None:
            return False
        self._index.remove(watcher)
        self._stats.watchers -= 1
        return True

    def _current(self, watcher: Watcher) -> bool:
        """Still registered? A cancelled watch's id may already belong to a new watch."""
        return self._watchers.get(watcher.watch_id) is watcher

    def _unready(self, watcher: Watcher) -> None:
        if self._ready.get(watcher.watch_id) is watcher:
            del self._ready[watcher.watch_id]

    # -- events --------------------------------------------------------------------------------

    def _on_publish(self, groups: list[Group]) -> None:
        limit = self._settings.max_pending_events
        stats = self._stats
        for watcher in route(self._index, groups, limit):
            self._ready[watcher.watch_id] = watcher
            peak = max(stats.peak_pending_events, watcher.peak_pending_events)
            stats.peak_pending_events = peak
            if not watcher.synced:
                stats.fallbacks += 1
        if self._ready:
            self._wake.set()

    def _on_skip(self, through: int) -> None:
        """Revisions up to `through` never reach the hub (compacted before this instance saw
        them): every watch still waiting for one reads from the database, where a watch below
        the compact revision is cancelled with it, as etcd cancels it."""
        for watcher in self._watchers.values():
            if watcher.synced and watcher.next_revision <= through:
                watcher.fall_behind()
                self._ready[watcher.watch_id] = watcher
                self._stats.fallbacks += 1
        if self._ready:
            self._wake.set()

    async def _send_loop(self) -> None:
        while True:
            # Event.wait() returns at once when already set, without yielding. That cannot starve
            # the loop: each pass either writes (and so waits for gRPC) or empties `_ready`.
            await self._wake.wait()
            self._wake.clear()
            await self._flush_control()
            for watcher in list(self._ready.values()):
                if not self._current(watcher):
                    self._unready(watcher)
                elif watcher.synced:
                    await self._drain(watcher)
                else:
                    await self._catch_up(watcher)
                await self._flush_control()
            if self._ready:
                self._wake.set()
            elif self._progress_requested:
                self._progress_requested = False
                await self._write(self._response(self._hub.revision, watch_id=-1))

    async def _flush_control(self) -> None:
        while self._control:
            await self._write(self._control.popleft())
            if len(self._control) < self._settings.max_queued_control:
                self._room.set()
        self._room.set()

    async def _drain(self, watcher: Watcher) -> None:
        while self._current(watcher) and watcher.synced and (group := watcher.take()) is not None:
            revision, events = group
            await self._send_events(watcher, revision, events)
            watcher.sent(revision)
        if watcher.synced and not watcher.pending:
            self._unready(watcher)

    async def _catch_up(self, watcher: Watcher) -> None:
        """Send the next page of history a lagging watcher has not seen, from the database."""
        current = through = self._hub.revision
        after = watcher.next_revision - 1
        if after < through:
            spec = watcher.spec
            page = self._settings.page_size
            history = await self._store.history(after, through, spec.key, spec.end, page)
            if not self._current(watcher):
                return
            if watcher.next_revision < history.compact_revision:
                self._remove(watcher.watch_id)
                await self._write(
                    self._response(
                        0,
                        watch_id=watcher.watch_id,
                        compact_revision=history.compact_revision,
                        canceled=True,
                    )
                )
                return
            if watcher.next_revision < 0:
                # etcd reads history from a negative start as from the largest revision (its
                # revision keys are unsigned): nothing, and the watch goes live from here.
                watcher.sent(through)
            else:
                events = watcher.select(await wire_events(history.changes))
                if events:
                    await self._send_events(watcher, current, events)
                watcher.sent(history.through)
        # Rejoin the live feed only when nothing was published while we read and sent.
        if watcher.next_revision > self._hub.revision:
            watcher.synced = True
            if not watcher.pending:
                self._unready(watcher)

    async def _send_events(self, watcher: Watcher, revision: int, chosen: list[WireEvent]) -> None:
        prev_kv = watcher.spec.prev_kv
        events: list[bytes] = []
        for start in range(0, len(chosen), CHUNK):  # a DeleteRange's 50 000 events: see CHUNK
            if start:
                await asyncio.sleep(0)
            events += [e.wire(prev_kv) for e in chosen[start : start + CHUNK]]
        watch_id = watcher.watch_id
        head = self._head(revision, watch_id, fragment=False)
        limit = self._settings.max_response_bytes
        size = len(head) + sum(len(e) for e in events)
        if not watcher.spec.fragment or len(events) < 2 or size < limit:
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
            for watcher in self._watchers.values():
                if watcher.spec.progress_notify and watcher.synced and not watcher.pending:
                    self._control.append(
                        self._response(self._hub.revision, watch_id=watcher.watch_id)
                    )
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
