"""Fan-out of committed events to in-process subscribers, one revision group at a time.

The writer publishes each committed batch here in revision order, right after the commit; a
database poller (other instances' writes) can publish the same way. `revision` is the newest
revision published: everything at or below it has been handed to every subscriber, or skipped:
revisions compacted away before this hub saw them (an instance that lagged behind another's
compaction) are never published, and subscribers are told to read what they still need from
the database, where a watch below the compact revision is cancelled as etcd cancels it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kine_server.pb import kv_pb2
from kine_server.wire import varint

#: WatchResponse.events is field 11; a length-delimited field's key is (11 << 3) | 2.
_EVENTS_KEY = bytes([(11 << 3) | 2])


class WireEvent:
    """One event, encoded once as a WatchResponse `events` field for every watcher sending it.

    A hundred watchers of one key range send the same bytes: encoding the event once per watcher
    (and copying it into each response) was most of the fan-out's own cost.
    """

    __slots__ = ("_with_prev", "_without_prev", "event", "key", "type")

    def __init__(self, event: kv_pb2.Event, key: bytes | None = None) -> None:
        self.event = event
        self.key = event.kv.key if key is None else key
        self.type = event.type
        self._with_prev: bytes | None = None
        self._without_prev: bytes | None = None

    def size(self, prev_kv: bool) -> int:
        """The length of `wire(prev_kv)`: it is encoded, once, to be sent anyway."""
        return len(self.wire(prev_kv))

    def wire(self, prev_kv: bool) -> bytes:
        if prev_kv or not self.event.HasField("prev_kv"):
            if self._with_prev is None:
                self._with_prev = _field(self.event.SerializeToString())
            return self._with_prev
        if self._without_prev is None:
            bare = kv_pb2.Event(type=self.event.type, kv=self.event.kv)
            self._without_prev = _field(bare.SerializeToString())
        return self._without_prev


def _field(payload: bytes) -> bytes:
    return _EVENTS_KEY + varint(len(payload)) + payload


log = logging.getLogger(__name__)

#: The events of one revision, in the order the request made them.
Group = tuple[int, list[WireEvent]]
#: Given the groups of newly published revisions.
Published = Callable[[list[Group]], None]
#: Told that revisions up to this one will never be published.
Skipped = Callable[[int], None]


def by_revision(events: list[kv_pb2.Event]) -> list[Group]:
    """The events grouped by revision. It runs on the loop for every commit, a DeleteRange's
    50 000 events at once: each `event.kv` builds a wrapper object, so it is read once."""
    groups: list[Group] = []
    wires: list[WireEvent] = []
    revision = None
    for event in events:
        kv = event.kv
        if kv.mod_revision != revision:
            revision = kv.mod_revision
            wires = []
            groups.append((revision, wires))
        wires.append(WireEvent(event, kv.key))
    return groups


class EventHub:
    """Synchronous fan-out: a subscriber must only queue what it is given, never block or await."""

    def __init__(self, revision: int = 0) -> None:
        self.revision = revision
        self._subscribers: dict[int, tuple[Published, Skipped]] = {}
        self._next_id = 0

    def subscribe(self, published: Published, skipped: Skipped) -> Callable[[], None]:
        """Register a subscriber; returns the function that unregisters it."""
        token = self._next_id
        self._next_id += 1
        self._subscribers[token] = (published, skipped)

        def unsubscribe() -> None:
            self._subscribers.pop(token, None)

        return unsubscribe

    def publish(self, events: list[kv_pb2.Event]) -> bool:
        """Hand on the events of revisions after `revision`, which must follow on from it.

        Revisions already published are skipped (the writer and the poller may both bring the
        same batch). Returns False, publishing nothing, if the events do not start right after
        `revision`: then someone else's revisions are missing, and the poller must fetch them.
        """
        groups = [g for g in by_revision(events) if g[0] > self.revision]
        if not groups:
            return True
        if groups[0][0] != self.revision + 1:
            return False
        self.revision = groups[-1][0]
        for token, (published, _) in list(self._subscribers.items()):
            try:
                published(groups)
            except Exception:
                # One broken subscriber must not cost the others their events: it reads them
                # back from the database instead, or is dropped if even that fails.
                log.exception("watch subscriber failed on revision %d; resyncing it", self.revision)
                self._skip_one(token, self.revision)
        return True

    def skip(self, through: int) -> None:
        """Revisions up to `through` will never be published: move on, and tell subscribers."""
        if through <= self.revision:
            return
        self.revision = through
        for token in list(self._subscribers):
            self._skip_one(token, through)

    def _skip_one(self, token: int, through: int) -> None:
        subscriber = self._subscribers.get(token)
        if subscriber is None:
            return
        try:
            subscriber[1](through)
        except Exception:
            log.exception("watch subscriber failed; dropping it")
            self._subscribers.pop(token, None)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
