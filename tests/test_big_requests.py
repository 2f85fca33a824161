"""One client's huge requests (a 20 000-key DeleteRange, a LeaseRevoke of 2 000 keys, an
unpaginated LIST) while another client reads and writes: every request succeeds with the right
answer, the huge ones' watch events all arrive in order, and the other client's requests are
answered *while* the huge ones are applied (the server does not hold its event loop for them).

No timing threshold: "while" is counted. The other client's answered Ranges are counted when
the server starts applying the DeleteRange and the LeaseRevoke and again when it has applied
each (before the commit); a server that applies one without giving its event loop a turn
answers none between.
bench/big_requests.py measures how long the other client waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kine_server.mvcc.applier import Applier
from kine_server.pb import kv_pb2
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.support.client import Client, connect

BIG = 20_000
LEASED = 2_000


def value(key: bytes) -> bytes:
    return b"value of " + key


async def fill(kv: Any, prefix: bytes, count: int, lease: int = 0) -> list[bytes]:
    keys = [prefix + b"%06d" % i for i in range(count)]

    async def txn(chunk: list[bytes]) -> None:
        ops = [
            pb.RequestOp(request_put=pb.PutRequest(key=k, value=value(k), lease=lease))
            for k in chunk
        ]
        await kv.Txn(pb.TxnRequest(success=ops))

    chunks = [keys[i : i + 100] for i in range(0, count, 100)]
    for start in range(0, len(chunks), 8):
        await asyncio.gather(*(txn(c) for c in chunks[start : start + 8]))
    return keys


class Other:
    """The unrelated client: Ranges of its own keys in one loop and Puts of new ones in another
    (a write waits for the huge write before it, a read must not), checking every answer."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.ranges = 0
        self.puts = 0
        self.stopping = False

    async def reads(self) -> None:
        kv = self.client.kv
        while not self.stopping:
            acknowledged = self.puts
            key = b"/other/%06d" % (acknowledged - 1)
            got = await kv.Range(pb.RangeRequest(key=key))
            assert [(kv.key, kv.value) for kv in got.kvs] == [(key, value(key))]
            count = await kv.Range(pb.RangeRequest(key=b"/other/", range_end=b"/other0"))
            assert count.count >= acknowledged
            self.ranges += 1

    async def writes(self) -> None:
        while not self.stopping:
            key = b"/other/%06d" % self.puts
            await self.client.kv.Put(pb.PutRequest(key=key, value=value(key)))
            self.puts += 1

    async def run(self) -> None:
        await self.writes_one()
        await asyncio.gather(self.reads(), self.writes())

    async def writes_one(self) -> None:
        key = b"/other/%06d" % self.puts
        await self.client.kv.Put(pb.PutRequest(key=key, value=value(key)))
        self.puts += 1


async def events(call: Any, count: int) -> list[Any]:
    """The next `count` events of a watch stream."""
    seen: list[Any] = []
    while len(seen) < count:
        response = await asyncio.wait_for(call.read(), 60)
        seen += response.events
    return seen


async def test_huge_requests_leave_other_clients_answered_and_watches_complete(
    server: SingleProcess, kine: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    lease = (await kine.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=3600))).ID
    big = await fill(kine.kv, b"/big/", BIG)
    leased = await fill(kine.kv, b"/leased/", LEASED, lease)
    other = Other(connect(f"127.0.0.1:{server.port}"))

    # Other's Ranges answered while each huge request was being applied.
    answered_while: dict[str, int] = {}

    def counting(name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def applied(applier: Applier, *args: Any, **kwargs: Any) -> Any:
            before = other.ranges
            result = await method(applier, *args, **kwargs)
            answered_while[name] = other.ranges - before
            return result

        return applied

    monkeypatch.setattr(Applier, "delete_range", counting("delete", Applier.delete_range))
    monkeypatch.setattr(Applier, "revoke", counting("revoke", Applier.revoke))

    watch = kine.watch.Watch()
    for prefix, end in ((b"/big/", b"/big0"), (b"/leased/", b"/leased0")):
        create = pb.WatchCreateRequest(key=prefix, range_end=end, prev_kv=True)
        await watch.write(pb.WatchRequest(create_request=create))
        assert (await watch.read()).created
    try:
        running = asyncio.create_task(other.run())
        while other.ranges < 3:  # the other client is under way
            await asyncio.sleep(0.01)
        listed = await kine.kv.Range(pb.RangeRequest(key=b"/big/", range_end=b"/big0"))
        deleted, revoked = await asyncio.gather(
            kine.kv.DeleteRange(pb.DeleteRangeRequest(key=b"/big/", range_end=b"/big0")),
            kine.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease)),
        )
        seen = await events(watch, BIG + LEASED)
        other.stopping = True
        await running
    finally:
        other.stopping = True
        watch.cancel()
        await other.client.close()

    assert [(kv.key, kv.value) for kv in listed.kvs] == [(k, value(k)) for k in big]
    assert deleted.deleted == BIG
    # The two deletes are two revisions, each one's events in key order, in revision order.
    revisions = sorted({e.kv.mod_revision for e in seen})
    assert len(revisions) == 2
    groups = [[e for e in seen if e.kv.mod_revision == r] for r in revisions]
    assert [e.kv.mod_revision for e in seen] == [e.kv.mod_revision for g in groups for e in g]
    assert deleted.header.revision in revisions
    by_prefix = {g[0].kv.key[:5]: g for g in groups}
    for keys, prefix in ((big, b"/big/"), (leased, b"/leas")):
        got = by_prefix[prefix]
        assert [(e.type, e.kv.key, e.prev_kv.key, e.prev_kv.value) for e in got] == [
            (kv_pb2.Event.DELETE, k, k, value(k)) for k in keys
        ]
    assert by_prefix[b"/big/"][0].kv.mod_revision == deleted.header.revision
    after = await kine.kv.Range(pb.RangeRequest(key=b"/", range_end=b"0", count_only=True))
    assert after.count == other.puts
    assert revoked.header.revision >= deleted.header.revision - 1
    # The point: the other client was answered while each huge request was applied.
    assert answered_while["delete"] > 0, answered_while
    assert answered_while["revoke"] > 0, answered_while
    # Not asserted for the LIST: its rows come in one await (a thread's, or PostgreSQL's), and
    # the other client's Range, several round trips, may not fit in the turns it then yields.
