"""Fan-out of committed events to in-process subscribers.

The writer publishes each committed batch here, in revision order, right after the commit. Watchers
subscribe; so will a database poller that brings in other instances' writes.
"""

from __future__ import annotations

from collections.abc import Callable

from kine_server.pb import kv_pb2

Subscriber = Callable[[list[kv_pb2.Event]], None]


class EventHub:
    """Synchronous fan-out: a subscriber must only queue the events, never block or await."""

    def __init__(self) -> None:
        self._subscribers: dict[int, Subscriber] = {}
        self._next_id = 0

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Register `subscriber`; returns the function that unregisters it."""
        token = self._next_id
        self._next_id += 1
        self._subscribers[token] = subscriber
        return lambda: self._subscribers.pop(token, None) and None

    def publish(self, events: list[kv_pb2.Event]) -> None:
        if not events:
            return
        for subscriber in list(self._subscribers.values()):
            subscriber(events)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
