"""Watch conversations run against kine-server (both databases) and a real etcd; the transcripts
(every response, in order, with revisions, ids, events and prev_kvs) must be identical."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from kine_server.pb import rpc_pb2 as pb
from tests.support.client import Client
from tests.support.watching import WatchRecorder

Scenario = Callable[[WatchRecorder], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}
W = pb.WatchCreateRequest


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


def put(key: bytes, value: bytes = b"v") -> pb.PutRequest:
    return pb.PutRequest(key=key, value=value)


@scenario
async def single_key(w: WatchRecorder) -> None:
    await w.stream.create(b"a")
    await w.expect(1)
    await w.kv("Put", put(b"a", b"1"))
    await w.kv("Put", put(b"b", b"1"))
    await w.kv("Put", put(b"a", b"2"))
    await w.expect(2)
    await w.kv("DeleteRange", pb.DeleteRangeRequest(key=b"a"))
    await w.expect(1)
    await w.stream.cancel(0)
    await w.expect(1)
    await w.kv("Put", put(b"a", b"3"))
    await w.expect_silence()


@scenario
async def ranges_filters_and_prev_kv(w: WatchRecorder) -> None:
    await w.kv("Put", put(b"/p/x", b"old"))
    await w.stream.create(b"/p/", b"/p0", prev_kv=True)
    await w.stream.create(b"/p/", b"/p0", filters=[W.NOPUT])
    await w.stream.create(b"/p/", b"/p0", filters=[W.NODELETE], watch_id=7)
    await w.stream.create(b"/p/m", b"\x00")
    await w.stream.create(b"", b"\x00", prev_kv=True, filters=[W.NOPUT, W.NODELETE])
    await w.expect(5)
    await w.kv("Put", put(b"/p/x", b"new"))
    await w.expect(3)
    await w.kv("Put", put(b"/p/a", b"1"))
    await w.expect(2)
    await w.kv("DeleteRange", pb.DeleteRangeRequest(key=b"/p/", range_end=b"/p0"))
    await w.expect(3)
    await w.kv("Put", put(b"/q", b"outside"))
    await w.expect(1)
    await w.expect_silence()


@scenario
async def one_revision_many_keys(w: WatchRecorder) -> None:
    await w.stream.create(b"k", b"l", prev_kv=True)
    await w.expect(1)
    txn = pb.TxnRequest(
        success=[pb.RequestOp(request_put=put(b"k%d" % i, b"%d" % i)) for i in range(5)]
    )
    await w.kv("Txn", txn)
    await w.expect(1)
    await w.kv("DeleteRange", pb.DeleteRangeRequest(key=b"k1", range_end=b"k4", prev_kv=True))
    await w.expect(1)
    await w.expect_silence()


@scenario
async def deletes_of_many_keys(w: WatchRecorder) -> None:
    """More keys than the applier deletes a statement per key (applier.FEW), after a Put of
    the same Txn (a from-key range, which etcd's duplicate-key check misses): the events'
    order and prev_kvs as etcd's."""
    await w.stream.create(b"k", b"l", prev_kv=True)
    await w.expect(1)
    puts = [pb.RequestOp(request_put=put(b"k%02d" % i, b"%d" % i)) for i in range(20)]
    await w.kv("Txn", pb.TxnRequest(success=puts))
    await w.expect(1)
    ops = [
        pb.RequestOp(request_put=put(b"k05", b"changed")),
        pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"k", range_end=b"\x00")),
    ]
    await w.kv("Txn", pb.TxnRequest(success=ops))
    await w.expect(1)
    await w.expect_silence()


@scenario
async def one_key_twice_in_one_revision(w: WatchRecorder) -> None:
    """A Txn that puts then deletes a key (and one that deletes then puts it): both events in
    one revision; a delete's prev_kv is the state before the revision, not the Txn's own put."""
    await w.kv("Put", put(b"/v/a", b"old"))
    await w.stream.create(b"/v/", b"\x00", prev_kv=True)
    await w.stream.create(b"k", watch_id=9)
    await w.expect(2)
    ops = [
        pb.RequestOp(request_put=put(b"/v/z", b"new")),
        pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"/v/", range_end=b"\x00")),
    ]
    await w.kv("Txn", pb.TxnRequest(success=ops))
    await w.expect(1)
    nested = [
        pb.RequestOp(request_txn=pb.TxnRequest(success=[pb.RequestOp(request_put=put(b"k"))])),
        pb.RequestOp(
            request_txn=pb.TxnRequest(
                success=[pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"k"))]
            )
        ),
    ]
    await w.kv("Txn", pb.TxnRequest(success=nested))
    await w.expect(2)  # "k" is inside the from-key range too
    await w.kv("Put", put(b"/v/z", b"back"))
    await w.expect(1)
    await w.kv("Txn", pb.TxnRequest(success=ops[::-1]))
    await w.expect(1)
    await w.stream.create(b"/v/", b"\x00", prev_kv=True, start_revision=3)
    await w.expect(5)
    await w.expect_silence()


@scenario
async def history_then_live(w: WatchRecorder) -> None:
    for i in range(5):
        await w.kv("Put", put(b"h/%d" % (i % 2), b"%d" % i))
    await w.kv("DeleteRange", pb.DeleteRangeRequest(key=b"h/0"))
    await w.stream.create(b"h/", b"h0", start_revision=3, prev_kv=True)
    await w.stream.create(b"h/1", start_revision=2)
    await w.stream.create(b"h/", b"h0", start_revision=10)
    await w.expect(5)
    await w.kv("Put", put(b"h/0", b"back"))
    await w.kv("Put", put(b"h/1", b"again"))
    await w.expect(3)
    await w.expect_silence()


@scenario
async def refused_creates_and_cancels(w: WatchRecorder) -> None:
    await w.stream.create(b"a", watch_id=3)
    await w.stream.create(b"b", watch_id=3)
    await w.stream.create(b"z", b"a")
    await w.stream.create(b"a", b"a")
    await w.expect(4)
    await w.stream.cancel(99)
    await w.expect_silence()
    await w.stream.cancel(3)
    await w.expect(1)
    await w.stream.create(b"c")
    await w.stream.create(b"d")
    await w.expect(2)


@scenario
async def compacted_start(w: WatchRecorder) -> None:
    for i in range(6):
        await w.kv("Put", put(b"c", b"%d" % i))
    await w.kv("Compact", pb.CompactionRequest(revision=5, physical=True))
    await w.stream.create(b"c", start_revision=3)
    await w.expect(2)
    await w.stream.create(b"c", start_revision=5)
    await w.expect(2)
    await w.kv("Put", put(b"c", b"live"))
    await w.expect(1)
    await w.expect_silence()


@scenario
async def negative_start_revisions(w: WatchRecorder) -> None:
    """Before any compaction etcd's compact revision is -1: a watch from -1 reads all history,
    one from below it is cancelled with compact_revision -1; after one, every negative start is."""
    await w.kv("Put", put(b"n", b"1"))
    await w.stream.create(b"n", start_revision=-1, watch_id=1)
    await w.expect(2)
    await w.stream.create(b"n", start_revision=-5, watch_id=2)
    await w.expect(2)
    await w.kv("Put", put(b"n", b"2"))
    await w.expect(1)
    await w.kv("Compact", pb.CompactionRequest(revision=2))
    await w.stream.create(b"n", start_revision=-1, watch_id=3)
    await w.expect(2)
    await w.expect_silence()


@scenario
async def progress_request(w: WatchRecorder) -> None:
    await w.stream.create(b"a")
    await w.expect(1)
    await w.kv("Put", put(b"b"))
    await w.stream.progress()
    await w.expect(1)
    await w.kv("Put", put(b"a"))
    await w.expect(1)
    await w.stream.progress()
    await w.expect(1)


@scenario
async def fragments(w: WatchRecorder) -> None:
    for i in range(5):
        await w.kv("Put", put(b"big/%d" % i, b"x" * 500_000))
    # One revision whose events (with their 500 kB prev_kvs) exceed etcd's limit of
    # --max-request-bytes plus 512 KiB of gRPC overhead.
    await w.stream.create(b"big/", b"big0", fragment=True, prev_kv=True)
    await w.stream.create(b"big/", b"big0", watch_id=5, prev_kv=True)
    await w.expect(2)
    await w.kv("DeleteRange", pb.DeleteRangeRequest(key=b"big/", range_end=b"big0"))
    await w.expect(3)
    await w.expect_silence()


@pytest.mark.mysql
@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_watch_same_as_etcd(name: str, kine: Client, etcd: Client) -> None:
    ours, theirs = WatchRecorder(kine), WatchRecorder(etcd)
    try:
        await SCENARIOS[name](ours)
        await SCENARIOS[name](theirs)
    finally:
        await ours.stream.close()
        await theirs.stream.close()
    assert ours.transcript == theirs.transcript

