"""A lagging watch sends its queued revisions several to a response; one that keeps up, one each.

etcd sends a synced watcher one response per revision until its stream's channel fills, then
catches it up many revisions per response; kine-server's equivalent threshold is
WatchLimits.lagging_revisions. Either way every event is sent once, in order, and a revision is
never split between responses.
"""

from __future__ import annotations

from kine_server.drivers.base import OPEN_END
from kine_server.mvcc.history import HistoryPage
from kine_server.mvcc.hub import EventHub
from kine_server.mvcc.watchable import Events, Watches, WatchLimits, WatchStats
from kine_server.mvcc.watcher import WatchSpec
from kine_server.pb import kv_pb2


def event(key: bytes, revision: int, value: bytes = b"v") -> kv_pb2.Event:
    kv = kv_pb2.KeyValue(key=key, create_revision=revision, mod_revision=revision, value=value)
    return kv_pb2.Event(type=kv_pb2.Event.PUT, kv=kv)


async def no_history(
    after: int, through: int, key: bytes, end: bytes | None, limit: int
) -> HistoryPage:
    raise AssertionError("a synced watch reads no history")


async def delivered(watches: Watches) -> list[Events]:
    out = []
    async for delivery in watches.deliveries():
        assert isinstance(delivery, Events)
        out.append(delivery)
    return out


async def watching(limits: WatchLimits) -> tuple[EventHub, Watches]:
    hub = EventHub(revision=1)
    watches = Watches(hub, no_history, limits, WatchStats(), lambda: None)
    watches.open()
    watches.create(0, WatchSpec(b"/", OPEN_END), 0)
    return hub, watches


async def test_a_watch_that_keeps_up_gets_one_response_per_revision() -> None:
    hub, watches = await watching(WatchLimits(lagging_revisions=16))
    for revision in range(2, 17):  # 15 queued: one short of lagging
        assert hub.publish([event(b"/k%d" % revision, revision)])
    sent = await delivered(watches)
    assert [d.revision for d in sent] == list(range(2, 17))
    assert all(len(d.events) == 1 for d in sent)


async def test_a_lagging_watch_gets_its_revisions_together_in_order() -> None:
    hub, watches = await watching(WatchLimits(lagging_revisions=16, batch_revisions=10))
    for revision in range(2, 42):  # 40 queued
        # Two events in each revision: a revision is never split between responses.
        assert hub.publish(
            [event(b"/a%d" % revision, revision), event(b"/b%d" % revision, revision)]
        )
    sent = await delivered(watches)
    # 40 lagging revisions, at most 10 a response, while 16 or more are queued; then one each.
    assert [d.revision for d in sent] == [11, 21, 31, *range(32, 42)]
    keys = [e.key for d in sent for e in d.events]
    assert keys == [k for r in range(2, 42) for k in (b"/a%d" % r, b"/b%d" % r)]


async def test_a_lagging_watch_keeps_responses_within_the_byte_limit() -> None:
    value = b"x" * 1000
    hub, watches = await watching(WatchLimits(lagging_revisions=2, batch_bytes=3500))
    for revision in range(2, 12):
        assert hub.publish([event(b"/k%d" % revision, revision, value)])
    sent = await delivered(watches)
    assert [len(d.events) for d in sent] == [3, 3, 3, 1]
    assert all(sum(e.size(False) for e in d.events) <= 3500 for d in sent)
    assert [e.key for d in sent for e in d.events] == [b"/k%d" % r for r in range(2, 12)]
