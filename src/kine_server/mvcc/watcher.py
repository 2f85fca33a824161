"""Watchers: which events a watch wants, what it still has to send, and how it catches up.

A watcher is *synced* while the hub hands it every new revision; its pending groups are bounded.
When a slow client lets them pass the bound, the watcher drops them and becomes *unsynced*: it then
reads the same events back from the database, page by page, from the first revision it has not
sent, and becomes synced again once it has sent everything the hub has published. Nothing is lost,
repeated or reordered, and memory stays bounded however far behind a client falls.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from kine_server.drivers.base import OPEN_END
from kine_server.mvcc.hub import Group, WireEvent
from kine_server.mvcc.watcher_group import WatcherGroup
from kine_server.pb import kv_pb2

Event = kv_pb2.Event


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """What a WatchCreateRequest asks for; `end` uses the driver's encoding (None, OPEN_END, bytes)."""

    key: bytes
    end: bytes | None
    no_put: bool = False
    no_delete: bool = False
    prev_kv: bool = False
    progress_notify: bool = False
    fragment: bool = False

    def matches(self, key: bytes) -> bool:
        if self.end is None:
            return key == self.key
        if self.end == OPEN_END:
            return key >= self.key
        return self.key <= key < self.end

    def wants(self, event: WireEvent) -> bool:
        if event.type == Event.PUT:
            return not self.no_put
        return not self.no_delete


class Watcher:
    """One watch of one stream: its position, and the groups waiting to be sent."""

    def __init__(self, watch_id: int, spec: WatchSpec, next_revision: int, synced: bool) -> None:
        self.watch_id = watch_id
        self.spec = spec
        #: The lowest revision not yet sent to the client.
        self.next_revision = next_revision
        self.synced = synced
        #: Usually the hub's own groups, shared with every other watcher that wants all of them:
        #: a thousand watchers of a prefix then hold a thousand references, not copies.
        self.pending: collections.deque[Group] = collections.deque()
        self.pending_events = 0
        self.peak_pending_events = 0

    def select(self, events: list[WireEvent]) -> list[WireEvent]:
        """The events this watch wants: `events` itself when it wants them all."""
        spec = self.spec
        chosen = [e for e in events if spec.matches(e.key) and spec.wants(e)]
        return events if len(chosen) == len(events) else chosen

    def offer(self, groups: list[Group], max_pending: int) -> bool:
        """Queue what this watch wants from newly published groups. True if it now has work for
        the sender: groups to send, or it fell behind and must read from the database."""
        if not self.synced:
            return False
        queued = False
        for group in groups:
            revision, events = group
            if revision < self.next_revision:
                continue
            chosen = self.select(events)
            if not chosen:
                continue
            if self.pending_events + len(chosen) > max_pending:
                # Too slow to keep in memory: forget the queue, read it back from the database.
                self.fall_behind()
                return True
            self.pending.append(group if chosen is events else (revision, chosen))
            self.pending_events += len(chosen)
            queued = True
        self.peak_pending_events = max(self.peak_pending_events, self.pending_events)
        return queued

    def fall_behind(self) -> None:
        """Stop taking the live feed: what is queued and what follows is read from the database,
        from `next_revision` on, until the watcher is current again."""
        self.pending.clear()
        self.pending_events = 0
        self.synced = False

    def take(self) -> Group | None:
        if not self.pending:
            return None
        group = self.pending.popleft()
        self.pending_events -= len(group[1])
        return group

    def take_batch(self, revisions: int, size: int) -> Group | None:
        """Several queued revisions as one group headed by the last: at most `revisions` of
        them and, past the first, about `size` bytes of encoded events."""
        first = self.take()
        if first is None:
            return None
        revision, events = first
        events = list(events)
        prev_kv = self.spec.prev_kv
        total = sum(e.size(prev_kv) for e in events)
        while self.pending and revisions > 1:
            next_revision, next_events = self.pending[0]
            grown = total + sum(e.size(prev_kv) for e in next_events)
            if grown > size:
                break
            self.take()
            revision, total, revisions = next_revision, grown, revisions - 1
            events += next_events
        return revision, events

    def sent(self, revision: int) -> None:
        self.next_revision = max(self.next_revision, revision + 1)


def route(index: WatcherGroup[Watcher], groups: list[Group], max_pending: int) -> list[Watcher]:
    """Offer newly published groups to the watchers whose range holds one of their keys; returns
    those that now have work for the sender (see Watcher.offer).

    The index finds them in O(log n + matches) per event, so a stream's idle watchers cost a
    commit nothing. Each watcher is offered only the events it matched (the group itself, shared,
    when it matched them all); `offer` still applies the filters, the revision and the bound.
    """
    offered: dict[Watcher, list[Group]] = {}
    for group in groups:
        revision, events = group
        if len(events) == 1:
            for watcher in index.match(events[0].key):
                offered.setdefault(watcher, []).append(group)
            continue
        picked: dict[Watcher, list[WireEvent]] = {}
        for event in events:
            for watcher in index.match(event.key):
                picked.setdefault(watcher, []).append(event)
        for watcher, chosen in picked.items():
            part = group if len(chosen) == len(events) else (revision, chosen)
            offered.setdefault(watcher, []).append(part)
    return [watcher for watcher, mine in offered.items() if watcher.offer(mine, max_pending)]
