"""Watch under load and over time, on both databases: nothing lost, repeated or reordered; memory
bounded for slow clients; progress notifications; clean-up when streams go away."""

from __future__ import annotations

import asyncio
import random

import pytest

from kine_server.api.watch import WatchSettings
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.conftest import test_config
from tests.support.client import Client, connect
from tests.support.watching import WatchStream

pytestmark = pytest.mark.mysql


def key_range(low: int, high: int) -> tuple[bytes, bytes]:
    return b"/s/%03d" % low, b"/s/%03d" % high


async def collect(
    stream: WatchStream, watch_ids: set[int], until: int
) -> dict[int, list[tuple[int, int, bytes]]]:
    """Events per watch id up to the stream's progress response for revision `until` or later.

    A progress response (watch_id -1) comes only once every watch of the stream has been sent
    everything up to its header revision, so it is the end marker etcd's own clients rely on.
    """
    received: dict[int, list[tuple[int, int, bytes]]] = {w: [] for w in watch_ids}
    await stream.progress()
    while True:
        response = await stream.read(timeout=30)
        assert response is not None, "stream went quiet before its progress response"
        if response.watch_id == -1:
            if response.header.revision >= until:
                return received
            await stream.progress()
            continue
        received[response.watch_id] += [
            (e.kv.mod_revision, e.type, e.kv.key) for e in response.events
        ]


async def test_64_writers_100_watchers_receive_exactly_their_events(
    server: SingleProcess, kine: Client
) -> None:
    rng = random.Random(7)
    ranges = []
    for _ in range(100):
        low = rng.randrange(0, 90)
        ranges.append(key_range(low, low + rng.randrange(1, 30)))
    streams = []
    for s in range(10):
        stream = WatchStream(kine)
        for w in range(10):
            key, end = ranges[s * 10 + w]
            await stream.create(key, end, watch_id=w + 1)
        streams.append(stream)
    for stream in streams:  # every watch created before the first write
        for _ in range(10):
            created = await stream.read()
            assert created is not None and created.created

    committed: list[tuple[int, int, bytes]] = []

    async def writer(n: int) -> None:
        client_rng = random.Random(n)
        for _ in range(15):
            key = b"/s/%03d" % client_rng.randrange(0, 100)
            if client_rng.random() < 0.2:
                response = await kine.kv.DeleteRange(pb.DeleteRangeRequest(key=key))
                if response.deleted:
                    committed.append((response.header.revision, 1, key))
            else:
                response = await kine.kv.Put(pb.PutRequest(key=key, value=b"%d" % n))
                committed.append((response.header.revision, 0, key))

    await asyncio.gather(*(writer(n) for n in range(64)))
    final = (await kine.kv.Range(pb.RangeRequest(key=b"/s/"))).header.revision
    committed.sort()
    assert [c[0] for c in committed] == list(range(2, final + 1))
    total = 0
    for s, stream in enumerate(streams):
        got = await collect(stream, set(range(1, 11)), final)
        for w in range(10):
            key, end = ranges[s * 10 + w]
            expected = [c for c in committed if key <= c[2] < end]
            assert got[w + 1] == expected, f"stream {s} watch {w + 1} on {key!r}..{end!r}"
            total += len(expected)
        await stream.close()
    assert total > 1000


async def test_stuck_watcher_catches_up_from_the_database_with_bounded_memory(dsn: str) -> None:
    server = SingleProcess(test_config(dsn))
    await server.start()
    assert server.watch is not None
    settings: WatchSettings = server.watch._settings
    client = connect(f"127.0.0.1:{server.port}")
    writer = connect(f"127.0.0.1:{server.port}")
    try:
        call = client.watch.Watch()
        create = pb.WatchCreateRequest(key=b"/f/", range_end=b"/f0", prev_kv=True)
        await call.write(pb.WatchRequest(create_request=create))
        assert (await call.read()).created
        # The client now reads nothing while 50 000 events are written.
        per_txn, txns = 50, 1000
        value = b"v" * 64
        for _t in range(txns):
            ops = [
                pb.RequestOp(request_put=pb.PutRequest(key=b"/f/%02d" % i, value=value))
                for i in range(per_txn)
            ]
            await writer.kv.Txn(pb.TxnRequest(success=ops))
        stats = server.watch.stats
        assert stats.fallbacks >= 1
        assert stats.peak_pending_events <= settings.max_pending_events
        # Resume reading: every event, in order, each revision whole.
        expected_revision = 2
        events = 0
        while expected_revision < 2 + txns:
            response = await asyncio.wait_for(call.read(), 60)
            revisions = [e.kv.mod_revision for e in response.events]
            assert revisions == sorted(revisions)
            for revision in sorted(set(revisions)):
                batch = [e for e in response.events if e.kv.mod_revision == revision]
                assert revision == expected_revision
                assert [e.kv.key for e in batch] == [b"/f/%02d" % i for i in range(per_txn)]
                assert all(e.kv.version == revision - 1 for e in batch)
                assert all(e.prev_kv.version == revision - 2 for e in batch if revision > 2)
                expected_revision += 1
                events += len(batch)
        assert events == per_txn * txns
        # Back on the live feed: a new write arrives as its own response.
        put = await writer.kv.Put(pb.PutRequest(key=b"/f/live", value=b"x"))
        response = await asyncio.wait_for(call.read(), 10)
        assert [e.kv.mod_revision for e in response.events] == [put.header.revision]
        assert stats.peak_pending_events <= settings.max_pending_events
        call.cancel()
    finally:
        await client.close()
        await writer.close()
        await server.stop()


async def test_progress_notify_reaches_idle_watches(dsn: str) -> None:
    server = SingleProcess(test_config(dsn, watch_progress_notify_interval=0.2))
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    try:
        await client.kv.Put(pb.PutRequest(key=b"other", value=b"x"))
        stream = WatchStream(client)
        await stream.create(b"quiet", progress_notify=True)
        await stream.create(b"also-quiet", watch_id=5)
        assert (await stream.read()).created  # type: ignore[union-attr]
        assert (await stream.read()).created  # type: ignore[union-attr]
        await client.kv.Put(pb.PutRequest(key=b"other", value=b"y"))
        notes = [await stream.read(timeout=5) for _ in range(2)]
        for note in notes:
            assert note is not None
            assert note.watch_id == 0 and not note.events and not note.created
        assert notes[-1].header.revision == 3  # type: ignore[union-attr]
        await stream.close()
    finally:
        await client.close()
        await server.stop()


async def test_closing_streams_frees_every_watch(server: SingleProcess) -> None:
    assert server.watch is not None
    stats = server.watch.stats
    hub_before = server.store.hub.subscriber_count
    clients = [connect(f"127.0.0.1:{server.port}") for _ in range(3)]
    streams = []
    for client in clients:
        stream = WatchStream(client)
        for i in range(20):
            await stream.create(b"k%d" % i)
        for _ in range(20):
            assert (await stream.read()) is not None
        streams.append(stream)
    assert stats.watchers == 60 and stats.streams == 3
    await streams[0].cancel(0)
    assert (await streams[0].read()).canceled  # type: ignore[union-attr]
    assert stats.watchers == 59
    await streams[0].close()  # the client cancels its call
    await clients[1].close()  # the client goes away with its connection
    await streams[2].close()
    for _ in range(100):
        if stats.streams == 0:
            break
        await asyncio.sleep(0.05)
    assert stats.watchers == 0 and stats.streams == 0
    assert server.store.hub.subscriber_count == hub_before
    for client in clients:
        await client.close()


async def test_compaction_below_a_watcher_does_not_disturb_it(server: SingleProcess, kine: Client) -> None:
    stream = WatchStream(kine)
    await stream.create(b"c", start_revision=1)
    assert (await stream.read()).created  # type: ignore[union-attr]
    revisions = []
    for i in range(20):
        revisions.append(
            (await kine.kv.Put(pb.PutRequest(key=b"c", value=b"%d" % i))).header.revision
        )
    got: list[int] = []
    while len(got) < 20:
        response = await stream.read()
        assert response is not None
        got += [e.kv.mod_revision for e in response.events]
    await kine.kv.Compact(pb.CompactionRequest(revision=revisions[-1], physical=True))
    later = await kine.kv.Put(pb.PutRequest(key=b"c", value=b"after"))
    response = await stream.read()
    assert response is not None and not response.canceled
    assert [e.kv.mod_revision for e in response.events] == [later.header.revision]
    assert got == revisions
    await stream.close()


async def test_history_pages_never_split_a_revision(server: SingleProcess, kine: Client) -> None:
    """Replay reads the database in pages; a page ends on a revision boundary, and a revision
    larger than a page is sent whole."""
    assert server.watch is not None
    server.watch._settings.page_size = 7
    sizes = [3, 5, 1, 12, 7, 2, 30, 4]
    for n, size in enumerate(sizes):
        ops = [
            pb.RequestOp(request_put=pb.PutRequest(key=b"/h/%02d" % i, value=b"%d" % n))
            for i in range(size)
        ]
        await kine.kv.Txn(pb.TxnRequest(success=ops))
    stream = WatchStream(kine)
    await stream.create(b"/h/", b"/h0", start_revision=2)
    assert (await stream.read()).created  # type: ignore[union-attr]
    got = await collect(stream, {0}, 1 + len(sizes))
    by_revision: dict[int, int] = {}
    for revision, _, _ in got[0]:
        by_revision[revision] = by_revision.get(revision, 0) + 1
    assert by_revision == {2 + n: size for n, size in enumerate(sizes)}
    assert [r for r, _, _ in got[0]] == sorted(r for r, _, _ in got[0])
    await stream.close()
