"""The watches of one watch stream: etcd's mvcc watchStream over its watchableStore.

This is the watch algorithm; `api/watch.py` is only the stream protocol around it. A stream's
watches are registered here by key range, the hub's committed revisions are routed to the ones
they concern, and `deliveries()` says, one step at a time, what the stream must send next:

- a *synced* watch sends the groups the hub queued for it (etcd's synced watcher group);
- a watch that starts in the past, or fell behind (its queue passed the bound, or the hub skipped
  revisions it still needed), reads its history from the database a page at a time and rejoins
  the live feed once it has sent everything the hub has published (etcd's unsynced group);
- a watch whose next revision was compacted away is cancelled with the compact revision.

So nothing is lost, repeated or reordered, memory stays bounded however far a client falls
behind, and progress is reported only for watches that have sent everything published.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from kine_server import errors
from kine_server.mvcc.history import HistoryPage, wire_events
from kine_server.mvcc.hub import EventHub, Group, WireEvent
from kine_server.mvcc.watcher import Watcher, WatchSpec, route
from kine_server.mvcc.watcher_group import WatcherGroup

log = logging.getLogger(__name__)


@dataclass
class WatchLimits:
    #: Events a watch may hold for a slow client before it falls back to reading the database.
    max_pending_events: int = 1024
    #: Rows read from the database per catch-up step.
    page_size: int = 100
    #: A watch with this many revisions queued is lagging: it sends them several to a
    #: response, as etcd does for a watcher whose stream's channel filled up (it moves it to
    #: its unsynced group, whose catch-up sends many revisions per response). A client that
    #: keeps up gets one response per revision, as from etcd.
    lagging_revisions: int = 16
    #: At most this many revisions, and about this many bytes, in one such response (etcd:
    #: watchBatchMaxRevs; the bytes: the stream's largest response).
    batch_revisions: int = 1000
    batch_bytes: int = 1536 * 1024


@dataclass
class WatchStats:
    """Shared by every stream of a process: what metrics and tests read."""

    streams: int = 0
    watchers: int = 0
    peak_pending_events: int = 0
    fallbacks: int = 0
    #: Times a stream stopped reading requests because its client was not reading responses.
    receive_pauses: int = 0


class Events(NamedTuple):
    """Send these events of one watch in one response (or its fragments), headed `revision`."""

    watch_id: int
    revision: int
    events: list[WireEvent]
    spec: WatchSpec


class Cancelled(NamedTuple):
    """The watch needed a revision below `compact_revision`: it has been removed; tell the client."""

    watch_id: int
    compact_revision: int


Delivery = Events | Cancelled

#: Reads a page of history: (after, through, key, end, limit), as KVReader.history.
HistoryReader = Callable[[int, int, bytes, bytes | None, int], Awaitable[HistoryPage]]


class Watches:
    """The watches of one stream. `wake` is called whenever a watch has something to deliver."""

    def __init__(
        self,
        hub: EventHub,
        history: HistoryReader,
        limits: WatchLimits,
        stats: WatchStats,
        wake: Callable[[], None],
    ) -> None:
        self._hub = hub
        self._history = history
        self._limits = limits
        self._stats = stats
        self._wake = wake
        self._watchers: dict[int, Watcher] = {}
        #: The same watchers by key range: what a committed event is matched against.
        self._index: WatcherGroup[Watcher] = WatcherGroup()
        #: Watches with something to deliver: queued groups, or history to read.
        self._ready: dict[int, Watcher] = {}
        self._next_id = 0
        self._unsubscribe: Callable[[], None] | None = None
        #: Fails if routing a committed revision raised: the stream must end (with INTERNAL, so
        #: the client watches again from its last revision) rather than go on deaf.
        self.failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def revision(self) -> int:
        """The newest revision published: what responses about the stream's state are headed."""
        return self._hub.revision

    def open(self) -> None:
        self._unsubscribe = self._hub.subscribe(
            self._guarded(self._on_publish), self._guarded(self._on_skip)
        )

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._stats.watchers -= len(self._watchers)
        self._watchers.clear()
        self._index = WatcherGroup()
        self._ready.clear()

    # -- create and cancel ---------------------------------------------------------------------

    def create(self, watch_id: int, spec: WatchSpec, start_revision: int) -> int:
        """Add a watch (`watch_id` 0: the next free id) from `start_revision` (0: the next
        revision); returns its id, or raises WatchRefused with etcd's reason."""
        if spec.end and spec.key >= spec.end:
            raise errors.EmptyWatchRange()
        if watch_id and watch_id in self._watchers:
            raise errors.DuplicateWatchId()
        watch_id = watch_id or self._auto_id()
        current = self._hub.revision
        start = start_revision or current + 1
        watcher = Watcher(watch_id, spec, next_revision=start, synced=start > current)
        self._watchers[watch_id] = watcher
        self._index.add(watcher, spec.key, spec.end)
        self._stats.watchers += 1
        if not watcher.synced:
            self._ready[watch_id] = watcher
            self._wake()
        return watch_id

    def cancel(self, watch_id: int) -> bool:
        """Remove a watch; False if the stream has none with that id."""
        self._ready.pop(watch_id, None)
        watcher = self._watchers.pop(watch_id, None)
        if watcher is None:
            return False
        self._index.remove(watcher)
        self._stats.watchers -= 1
        return True

    def _auto_id(self) -> int:
        while self._next_id in self._watchers:
            self._next_id += 1
        watch_id = self._next_id
        self._next_id += 1
        return watch_id

    # -- progress ------------------------------------------------------------------------------

    def progress_due(self) -> list[int]:
        """The watches that asked for progress notifications and may be told `revision` now:
        synced, with nothing queued, so a notification is never ahead of their events."""
        return [
            w.watch_id
            for w in self._watchers.values()
            if w.spec.progress_notify and w.synced and not w.pending
        ]

    @property
    def idle(self) -> bool:
        """Every watch has delivered all the hub has published: a progress request for the whole
        stream (etcd's RequestProgress) may be answered with `revision`."""
        return not self._ready

    def pending_events(self) -> int:
        return sum(w.pending_events for w in self._watchers.values())

    # -- the live feed -------------------------------------------------------------------------

    def _guarded(self, handler: Callable[[Any], None]) -> Callable[[Any], None]:
        def call(argument: Any) -> None:
            try:
                handler(argument)
            except Exception as exc:
                log.exception("watch stream failed on a committed revision")
                if not self.failed.done():
                    self.failed.set_exception(errors.Internal.of(exc))

        return call

    def _on_publish(self, groups: list[Group]) -> None:
        stats = self._stats
        for watcher in route(self._index, groups, self._limits.max_pending_events):
            self._ready[watcher.watch_id] = watcher
            stats.peak_pending_events = max(stats.peak_pending_events, watcher.peak_pending_events)
            if not watcher.synced:
                stats.fallbacks += 1
        if self._ready:
            self._wake()

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
            self._wake()

    # -- delivering ----------------------------------------------------------------------------

    async def deliveries(self) -> AsyncGenerator[Delivery, None]:
        """One pass over the watches with work: what to send, in order. Resume the iterator only
        once a delivery has been sent; the watch counts it as sent then. Calls `wake` at the end
        if work is left (a watch still catching up, or groups that arrived meanwhile)."""
        for watcher in list(self._ready.values()):
            if self._watchers.get(watcher.watch_id) is not watcher:
                self._unready(watcher)  # cancelled; its id may already belong to a new watch
            elif watcher.synced:
                while self._current(watcher) and watcher.synced:
                    if len(watcher.pending) >= self._limits.lagging_revisions:
                        group = watcher.take_batch(
                            self._limits.batch_revisions, self._limits.batch_bytes
                        )
                    else:
                        group = watcher.take()
                    if group is None:
                        break
                    revision, events = group
                    yield Events(watcher.watch_id, revision, events, watcher.spec)
                    watcher.sent(revision)
                if watcher.synced and not watcher.pending:
                    self._unready(watcher)
            else:
                async for delivery in self._catch_up(watcher):
                    yield delivery
        if self._ready:
            self._wake()

    async def _catch_up(self, watcher: Watcher) -> AsyncGenerator[Delivery, None]:
        """The next page of history a lagging watch has not sent, from the database."""
        current = through = self._hub.revision
        after = watcher.next_revision - 1
        if after < through:
            spec = watcher.spec
            page = self._limits.page_size
            history = await self._history(after, through, spec.key, spec.end, page)
            if not self._current(watcher):
                return
            if watcher.next_revision < history.compact_revision:
                self.cancel(watcher.watch_id)
                yield Cancelled(watcher.watch_id, history.compact_revision)
                return
            if watcher.next_revision < 0:
                # etcd reads history from a negative start as from the largest revision (its
                # revision keys are unsigned): nothing, and the watch goes live from here.
                watcher.sent(through)
            else:
                events = watcher.select(await wire_events(history.changes))
                if events:
                    yield Events(watcher.watch_id, current, events, spec)
                watcher.sent(history.through)
        # Rejoin the live feed only when nothing was published while we read and sent.
        if watcher.next_revision > self._hub.revision:
            watcher.synced = True
            if not watcher.pending:
                self._unready(watcher)

    def _current(self, watcher: Watcher) -> bool:
        """Still registered? A cancelled watch's id may already belong to a new watch."""
        return self._watchers.get(watcher.watch_id) is watcher

    def _unready(self, watcher: Watcher) -> None:
        if self._ready.get(watcher.watch_id) is watcher:
            del self._ready[watcher.watch_id]
