"""A paginated LIST's count carried from page to page (mvcc/range_counts.py).

The answers themselves are checked against a real etcd by test_kv_differential's
paginated_lists; here: that later pages really are not counted again, that what is remembered
is bounded, and that a page of another range, revision or process is counted.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import cast

import pytest

from kine_server.drivers.base import OPEN_END, ReadTx
from kine_server.mvcc.range_counts import PageCounts
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.support.client import Client
from tests.test_big_requests import fill


class CountingTx:
    """A ReadTx stand-in that knows only how to count, and says how often it was asked."""

    def __init__(self, answer: int) -> None:
        self.answer = answer
        self.asked = 0

    async def _count(self) -> int:
        return self.answer

    def count_soon(self, key: bytes, end: bytes | None, at: int | None) -> Awaitable[int]:
        self.asked += 1
        return self._count()


async def counted(
    counts: PageCounts, tx: CountingTx, key: bytes, end: bytes, revision: int
) -> int:
    return await counts.count_soon(cast(ReadTx, tx), key, end, None, revision)


async def test_the_page_after_a_served_one_is_not_counted() -> None:
    counts, tx = PageCounts(), CountingTx(99)
    counts.served(b"k5\x00", b"l", 7, 42)
    assert await counted(counts, tx, b"k5\x00", b"l", 7) == 42
    assert await counted(counts, tx, b"k5\x00", b"l", 7) == 42
    assert tx.asked == 0
    for key, end, revision in ((b"k5", b"l", 7), (b"k5\x00", b"m", 7), (b"k5\x00", b"l", 8)):
        assert await counted(counts, tx, key, end, revision) == 99
    assert tx.asked == 3


async def test_what_is_remembered_is_bounded_and_the_oldest_goes_first() -> None:
    counts, tx = PageCounts(capacity=3), CountingTx(0)
    for i in range(3):
        counts.served(b"%d" % i, OPEN_END, 1, i + 10)
    assert await counted(counts, tx, b"0", OPEN_END, 1) == 10
    counts.served(b"3", OPEN_END, 1, 13)  # evicts "1": "0" was used since
    assert counts.remembered() == 3
    assert await counted(counts, tx, b"1", OPEN_END, 1) == 0
    assert tx.asked == 1
    for key, expected in ((b"0", 10), (b"2", 12), (b"3", 13)):
        assert await counted(counts, tx, key, OPEN_END, 1) == expected


class Spy(PageCounts):
    """The store's page counts, telling which pages were counted by the database."""

    def __init__(self) -> None:
        super().__init__()
        self.counted: list[bytes] = []

    def count_soon(
        self, tx: ReadTx, key: bytes, end: bytes | None, at: int | None, revision: int
    ) -> Awaitable[int]:
        if (key, end, revision) not in self._next:
            self.counted.append(key)
        return super().count_soon(tx, key, end, at, revision)


@pytest.mark.mysql
async def test_a_paginated_list_counts_its_range_once(
    server: SingleProcess, kine: Client
) -> None:
    spy = Spy()
    server.store.kv.page_counts = spy
    prefix, end = b"/registry/pods/", b"/registry/pods0"
    keys = await fill(kine.kv, prefix + b"p", 1000)
    page = await kine.kv.Range(pb.RangeRequest(key=prefix, range_end=end, limit=300))
    pinned, counts, seen = page.header.revision, [page.count], len(page.kvs)
    deleted = await kine.kv.DeleteRange(pb.DeleteRangeRequest(key=keys[500]))  # not at `pinned`
    assert deleted.deleted == 1
    while page.more:
        request = pb.RangeRequest(
            key=page.kvs[-1].key + b"\x00", range_end=end, limit=300, revision=pinned
        )
        page = await kine.kv.Range(request)
        fresh = await kine.kv.Range(
            pb.RangeRequest(key=request.key, range_end=end, revision=pinned, count_only=True)
        )
        assert page.count == fresh.count == 1000 - seen
        counts.append(page.count)
        seen += len(page.kvs)
    assert seen == 1000 and counts == [1000, 700, 400, 100]
    assert spy.counted == [prefix]  # the first page only
