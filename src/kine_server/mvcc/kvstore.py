"""Reads of the key space, each one read transaction: what etcd's mvcc/kvstore.go answers.

Every process reads the database itself (a `--workers` front-end too): a write is committed
before it is answered, so a read that starts after any client heard of a write sees it,
whichever process served either (reads stay linearizable, as etcd's). Writes are not here: they
go through the one writer (mvcc/writer.py), in whichever process it runs.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import time
import zlib
from collections.abc import AsyncIterator

from kine_server import errors
from kine_server.drivers.base import OPEN_END, Counters, Driver, ReadTx
from kine_server.mvcc.applier import Applier
from kine_server.mvcc.history import HistoryPage, read_page
from kine_server.mvcc.range_counts import PageCounts
from kine_server.pb import rpc_pb2

log = logging.getLogger(__name__)


async def key_space_hash(tx: ReadTx, at: int) -> int:
    """HashKV's crc32: every live key's create/mod revision, version, lease and value as of
    `at`, in key order (the same on every instance and across restarts: the table alone)."""
    crc = 0
    key = b"\x00"
    while True:
        rows = await tx.range(key, OPEN_END, at, 1000)
        for row in rows:
            crc = zlib.crc32(row.key, crc)
            header = struct.pack(
                ">qqqq", row.create_revision, row.mod_revision, row.version, row.lease
            )
            crc = zlib.crc32(row.value, zlib.crc32(header, crc))
        if len(rows) < 1000:
            return crc
        key = rows[-1].key + b"\x00"


class KVReader:
    """Range, read-only Txn, watch history and the key-space hash, from the driver's readers."""

    def __init__(self, driver: Driver, slow_threshold: float = 0.0) -> None:
        self._driver = driver
        #: Read transactions slower than this many seconds are logged (--slow-sql-threshold;
        #: 0 disables), as the writer logs slow write transactions.
        self.slow_threshold = slow_threshold
        #: The counts of the pages of paginated LISTs this process served (range_counts.py).
        self.page_counts = PageCounts()

    @contextlib.asynccontextmanager
    async def reading(self, what: str) -> AsyncIterator[ReadTx]:
        """One read transaction: the driver's errors become the client's answer, and one that
        takes longer than `slow_threshold` is logged with what it served."""
        began = time.monotonic()
        with errors.database_errors():
            async with self._driver.read() as tx:
                yield tx
        took = time.monotonic() - began
        if 0 < self.slow_threshold <= took:
            log.warning("slow read transaction: %s took %.3fs", what, took)

    async def counters(self) -> Counters:
        async with self.reading("counters") as tx:
            return await tx.counters()

    async def range(self, req: rpc_pb2.RangeRequest) -> rpc_pb2.RangeResponse:
        async with self.reading("Range") as tx:
            counters = await tx.counters()
            applier = Applier(
                tx, counters.revision, counters.compact_revision, counting=self.page_counts
            )
            return await applier.range(req)

    async def read_only_txn(self, req: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        """A Txn with no write in either branch: etcd serves it without a proposal."""
        async with self.reading("Txn") as tx:
            counters = await tx.counters()
            return await Applier(tx, counters.revision, counters.compact_revision).txn(req)

    async def history(
        self, after: int, through: int, key: bytes, end: bytes | None, limit: int
    ) -> HistoryPage:
        """The changes of a key range after `after`, at most about `limit` of them, whole
        revisions only, read from one snapshot; `page.through` says how far the page reaches."""
        async with self.reading("watch history") as tx:
            counters = await tx.counters()
            if after + 1 < counters.compact_revision:
                return HistoryPage(counters.compact_revision, [], after)
            changes, through = await read_page(tx, after, through, key, end, limit)
        return HistoryPage(counters.compact_revision, changes, through)

    async def hash_kv(self, revision: int) -> tuple[int, int, int]:
        """(crc32 of the key space as of `revision`, that revision, compact revision).

        Every key's create/mod revision, version, lease and value, in key order: the same on
        every instance and across restarts, since it is computed from the table alone.

        As etcd 3.5's HashByRev: 0 is the current revision, one below the compact revision is
        compacted, a negative one hashes nothing (it is not an error), and the compact revision
        itself answers the hash it had before the compaction. etcd 3.5 keeps the hash it computes
        while compacting (server/mvcc/kvstore_compaction.go scheduleCompaction) and answers a
        HashKV at that revision with it (server/mvcc/hash.go hashStorage.HashByRev); 3.4 answered
        "compacted". Here nothing needs keeping: the key space at the compact revision is still
        readable, so its hash is the one answered before. (etcd's kept hash reports the compact
        revision before that compaction as its compact_revision; this answers the current one.)
        """
        async with self.reading("HashKV") as tx:
            counters = await tx.counters()
            if revision > 0 and revision < counters.compact_revision:
                raise errors.Compacted()
            if revision > counters.revision:
                raise errors.FutureRevision()
            at = revision or counters.revision
            crc = await key_space_hash(tx, at)
        return crc, at, counters.compact_revision
