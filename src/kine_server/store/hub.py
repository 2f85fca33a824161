"""Fan-out of committed events to in-process subscribers, one revision group at a time.

The writer publishes each committed batch here in revision order, right after the commit; a
database poller (other instances' writes) can publish the same way. `revision` is the newest
revision published: everything at or below it has been handed to every subscriber.
"""

from __future__ import annotations

from collections.abc import Callable

from kine_server.pb import kv_pb2

#: The events of one revision, in the order the request made them.
Group = tuple[int, list[kv_pb2.Event]]
Subscriber = Callable[[list[Group]], None]


def by_revision(events: list[kv_pb2.Event]) -> list[Group]:
    groups: list[Group] = []
    for event in events:
        revision = event.kv.mod_revision
        if groups and groups[-1][0] == revision:
            groups[-1][1].append(event)
        else:
            groups.append((revision, [event]))
    return groups


class EventHub:
    """Synchronous fan-out: a subscriber must only queue what it is given, never block or await."""

    def __init__(self, revision: int = 0) -> None:
        self.revision = revision
        self._subscribers: dict[int, Subscriber] = {}
        self._next_id = 0

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Register `subscriber`; returns the function that unregisters it."""
        token = self._next_id
        self._next_id += 1
        self._subscribers[token] = subscriber

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
        for subscriber in list(self._subscribers.values()):
            subscriber(groups)
        return True

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
