"""The count of a paginated range, carried from one page to the next.

etcd answers every limited Range with the count of the whole range, and kube-apiserver lists a
prefix in pages of 500, each page pinned to the first page's revision and starting just after
the previous page's last key. etcd counts from its in-memory index; a database counts the rows,
which on MySQL/MariaDB cost more than reading the page itself (a LIST of 10 000 keys counted
105 000 rows in its 20 pages). A page's count is known without counting: at a fixed revision the
rows of [key, end) never change (compaction only ever removes rows older than the revisions it
still lets a client read), so the range after a page's last key holds the page's count less the
keys it returned. Each process keeps the next page's count for the pages it served, a bounded
number of them; a page asked of another process, or after its entry was evicted, is counted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable

from kine_server.drivers.base import ReadTx

#: Paginations followed at once per process (each entry two keys and an int).
CAPACITY = 1024


class Counting:
    """Counts every range with a statement: the writer's transactions, whose view includes its
    own uncommitted writes, and any reader without a memory of pages."""

    def count_soon(
        self, tx: ReadTx, key: bytes, end: bytes | None, at: int | None, revision: int
    ) -> Awaitable[int]:
        """The count of [key, end) as `tx` sees it at `at` (None: its newest revision, which is
        `revision`), started now where the transaction can run it beside the caller."""
        return tx.count_soon(key, end, at)

    def served(self, after: bytes, end: bytes | None, revision: int, remaining: int) -> None:
        """A page was served: `remaining` keys of the range at `revision` come after `after`."""


class PageCounts(Counting):
    """Counting that remembers, for each page served, the count of the range after it."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        self._next: OrderedDict[tuple[bytes, bytes | None, int], int] = OrderedDict()

    def count_soon(
        self, tx: ReadTx, key: bytes, end: bytes | None, at: int | None, revision: int
    ) -> Awaitable[int]:
        known = self._next.get((key, end, revision))
        if known is None:
            return tx.count_soon(key, end, at)
        self._next.move_to_end((key, end, revision))  # kept: a client may ask the page again
        return _ready(known)

    def served(self, after: bytes, end: bytes | None, revision: int, remaining: int) -> None:
        self._next[(after, end, revision)] = remaining
        self._next.move_to_end((after, end, revision))
        while len(self._next) > self._capacity:
            self._next.popitem(last=False)

    def remembered(self) -> int:
        """How many pages' next counts are kept (not __len__: an empty one would be falsy)."""
        return len(self._next)


async def _ready(count: int) -> int:
    return count
