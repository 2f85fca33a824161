"""A revision larger than a page of history is read whole, but never by one statement of
unbounded size (mvcc/history.py read_page): a DeleteRange of a whole key space is one revision
of hundreds of thousands of changes, and one statement reading it all could outlast
--datastore-timeout, leaving a poller or a catching-up watch to retry it forever."""

from __future__ import annotations

from typing import cast

import pytest

from kine_server.drivers.base import Change, ReadTx
from kine_server.mvcc.history import read_page
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.support.client import Client

pytestmark = pytest.mark.mysql


class Spy:
    """A ReadTx that says how many rows each statement of history asked for."""

    def __init__(self, tx: ReadTx) -> None:
        self.tx = tx
        self.limits: list[int] = []

    async def changes(
        self, after: int, through: int, key: bytes, end: bytes | None, limit: int
    ) -> list[Change]:
        self.limits.append(limit)
        return await self.tx.changes(after, through, key, end, limit)

    async def revision_changes(
        self, revision: int, after_sub: int, key: bytes, end: bytes | None, limit: int
    ) -> list[Change]:
        self.limits.append(limit)
        return await self.tx.revision_changes(revision, after_sub, key, end, limit)


async def test_one_revision_larger_than_a_page_is_read_in_pieces(
    server: SingleProcess, kine: Client
) -> None:
    await kine.kv.Put(pb.PutRequest(key=b"p/before", value=b"b"))
    puts = [
        pb.RequestOp(request_put=pb.PutRequest(key=b"p/%02d" % i, value=b"%d" % i))
        for i in range(30)
    ]
    await kine.kv.Txn(pb.TxnRequest(success=puts))
    deleted = await kine.kv.DeleteRange(pb.DeleteRangeRequest(key=b"p/", range_end=b"p0"))
    revision = deleted.header.revision
    await kine.kv.Put(pb.PutRequest(key=b"p/after", value=b"a"))
    async with server.driver.read() as tx:
        whole = await tx.changes(revision - 1, revision, b"p/", b"p0", 2**62)
        spy = Spy(tx)
        changes, through = await read_page(
            cast(ReadTx, spy), revision - 1, revision + 1, b"p/", b"p0", limit=10, piece=7
        )
    assert len(whole) == 31  # the 30 keys of the Txn and "before", all deleted at once
    assert changes == whole and through == revision
    assert spy.limits == [10, 7, 7, 7, 7]  # the page, then the rest 7 rows a statement
    assert [c.row.sub for c in changes] == sorted({c.row.sub for c in changes})
    assert all(c.prev is not None and c.row.version == 0 for c in changes)
    assert sorted(c.prev.value for c in changes if c.prev) == sorted(
        [b"b", *(b"%d" % i for i in range(30))]
    )


async def test_a_revision_that_ends_on_a_piece_boundary_ends_there(
    server: SingleProcess, kine: Client
) -> None:
    puts = [pb.RequestOp(request_put=pb.PutRequest(key=b"q/%d" % i, value=b"v")) for i in range(9)]
    put = await kine.kv.Txn(pb.TxnRequest(success=puts))
    async with server.driver.read() as tx:
        spy = Spy(tx)
        changes, through = await read_page(
            cast(ReadTx, spy), put.header.revision - 1, put.header.revision, b"q/", b"q0", 3, 3
        )
    assert [c.row.key for c in changes] == [b"q/%d" % i for i in range(9)]
    assert through == put.header.revision
    assert spy.limits == [3, 3, 3, 3]  # the last piece reads nothing: the revision has ended
