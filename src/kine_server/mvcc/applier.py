"""etcd's request semantics (Range, Put, DeleteRange, Txn) evaluated on one database transaction.

This follows etcd's applier (server/etcdserver/apply.go) step for step: a Txn's compares choose a
branch, every request of the branch is checked before anything is written (so an error leaves no
partial write), then the branch runs. All writes of one request share one revision, `begin + 1`;
a request that changes nothing does not take a revision.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from kine_server import errors
from kine_server.drivers.base import OPEN_END, ChangeRow, ReadTx, Row, WriteTx
from kine_server.mvcc.range_counts import Counting
from kine_server.pb import kv_pb2, rpc_pb2

#: The largest limit SQL can bind with the extra row a Range reads to tell whether there is more.
MAX_LIMIT = 2**63 - 2

#: Rows a big request handles between two turns of the event loop: a DeleteRange, LeaseRevoke or
#: LIST of 50 000 keys held the loop for seconds, and every other client waited. 1000 rows take
#: a few milliseconds of Python; a request of fewer rows never yields, so it pays nothing.
CHUNK = 1000

#: Deletes of at most this many keys run a statement per key (a single-key DeleteRange, the
#: common case, is cheapest so); more, a few set-based statements however many keys.
FEW = 8

RangeRequest = rpc_pb2.RangeRequest
Compare = rpc_pb2.Compare
KeyValue = kv_pb2.KeyValue
Event = kv_pb2.Event

_SORT_KEYS: dict[int, Callable[[Row], Any]] = {
    RangeRequest.KEY: lambda r: r.key,
    RangeRequest.VERSION: lambda r: r.version,
    RangeRequest.CREATE: lambda r: r.create_revision,
    RangeRequest.MOD: lambda r: r.mod_revision,
    RangeRequest.VALUE: lambda r: r.value,
}


def range_end(end: bytes) -> bytes | None:
    """etcd's encoding of a range end: empty is one key, "\\0" is every key from the start on."""
    if not end:
        return None
    if end == b"\x00":
        return OPEN_END
    return end


def to_kv(row: Row | ChangeRow) -> kv_pb2.KeyValue:
    return KeyValue(
        key=row.key,
        create_revision=row.create_revision,
        mod_revision=row.mod_revision,
        version=row.version,
        value=row.value,
        lease=row.lease,
    )


def header(revision: int) -> rpc_pb2.ResponseHeader:
    return rpc_pb2.ResponseHeader(revision=revision)


def _compare_one(compare: rpc_pb2.Compare, row: Row | None) -> bool:
    target = compare.target
    ours: bytes | int
    theirs: bytes | int
    if target == Compare.VALUE:
        ours, theirs = (row.value if row else b""), compare.value
    elif target == Compare.CREATE:
        ours, theirs = (row.create_revision if row else 0), compare.create_revision
    elif target == Compare.MOD:
        ours, theirs = (row.mod_revision if row else 0), compare.mod_revision
    elif target == Compare.VERSION:
        ours, theirs = (row.version if row else 0), compare.version
    elif target == Compare.LEASE:
        ours, theirs = (row.lease if row else 0), compare.lease
    else:
        ours = theirs = 0  # etcd leaves an unknown target's result at "equal"
    sign = _sign(ours, theirs)
    result = compare.result
    if result == Compare.EQUAL:
        return sign == 0
    if result == Compare.NOT_EQUAL:
        return sign != 0
    if result == Compare.GREATER:
        return sign > 0
    if result == Compare.LESS:
        return sign < 0
    return True


def _sign(ours: Any, theirs: Any) -> int:
    """-1, 0 or 1, like Go's bytes.Compare and etcd's compareInt64."""
    return int(ours > theirs) - int(ours < theirs)


class Applier:
    """Runs requests against one transaction whose store revision was `begin` when it started.

    `changes` collects the events of the one request being applied; the writer takes them with
    `take_changes()` after each request, which also moves `begin` to that request's revision.
    """

    def __init__(
        self,
        tx: ReadTx,
        begin: int,
        compact_revision: int,
        auth_generation: int = 0,
        counting: Counting | None = None,
    ) -> None:
        self.tx = tx
        #: How a limited Range's count is had (a reader's remembers the pages it served).
        self.counting = counting if counting is not None else Counting()
        self.begin = begin
        self.compact_revision = compact_revision
        #: The auth store's generation in this transaction (an auth change in it moves it).
        self.auth_generation = auth_generation
        self.changes: list[kv_pb2.Event] = []
        #: Each key's newest row (tombstones included) as this transaction has seen or written
        #: it: a create's compare and its put, or a batch's requests on one key, read it once.
        self._newest: dict[bytes, Row | None] = {}
        #: The live row, before this request, of each key the request has written: a key can
        #: change twice in one request (put, then delete), and etcd's events give the state
        #: before the revision as the previous value, not the request's own first change.
        self._prior: dict[bytes, Row | None] = {}

    async def leased_keys(self, lease: int) -> list[bytes]:
        """The live keys attached to `lease`, as this transaction sees them."""
        return [row.key for row in await self.tx.leased(lease)]

    async def prefetch(self, keys: list[bytes]) -> None:
        """Read the newest rows of `keys` (a batch's single-key requests) in as few statements
        as the driver can: on PostgreSQL one round trip for the batch instead of one per key."""
        missing = {key for key in keys if key not in self._newest}
        if missing:
            self._newest.update(await self.write_tx.newest_many(missing))

    @property
    def revision(self) -> int:
        """The revision reads see: the request's own, once it has written something."""
        return self.begin + 1 if self.changes else self.begin

    def take_changes(self) -> list[kv_pb2.Event]:
        changes = self.changes
        if changes:
            self.begin += 1
            self.changes = []
            self._prior.clear()
        return changes

    # -- reads ---------------------------------------------------------------------------------

    def _check_revision(self, revision: int) -> None:
        """A Range's revision, as etcd's rangeKeys: 0 or less reads the current revision."""
        if revision > self.revision:
            raise errors.FutureRevision()
        if 0 < revision < self.compact_revision:
            raise errors.Compacted()

    def _check_txn_revision(self, revision: int) -> None:
        """A Txn's Range, as etcd's checkRange: only 0 means current; a negative revision is
        below any compact revision (-1 before the first compaction)."""
        if revision == 0:
            return
        if revision > self.revision:
            raise errors.FutureRevision()
        if revision < self.compact_revision:
            raise errors.Compacted()

    async def range(self, req: rpc_pb2.RangeRequest) -> rpc_pb2.RangeResponse:
        current = self.revision
        self._check_revision(req.revision)
        at = req.revision if 0 < req.revision < current else None
        end = range_end(req.range_end)

        if req.count_only:
            count = await self.tx.count(req.key, end, at)
            return rpc_pb2.RangeResponse(header=header(current), count=count)

        filtered = bool(
            req.min_mod_revision
            or req.max_mod_revision
            or req.min_create_revision
            or req.max_create_revision
        )
        # etcd reads everything when it must sort or filter, else one more than the limit.
        fetch = 0 if (req.sort_order != RangeRequest.NONE or filtered) else req.limit
        if fetch > MAX_LIMIT:
            fetch = 0  # more rows than any table holds: no limit (etcd returns them all)
        if fetch > 0:
            fetch += 1
        with_values = not req.keys_only or req.sort_target == RangeRequest.VALUE
        rows = await self.tx.range(req.key, end, at, fetch, with_values)
        if fetch > 0 and len(rows) == fetch:  # a full page: more follow
            read_at = at or current
            counting = self.counting.count_soon(self.tx, req.key, end, at, read_at)
            response = await self._range_response(req, rows, len(rows), filtered)
            response.count = await counting
            after = response.kvs[-1].key + b"\x00"  # where the next page starts
            self.counting.served(after, end, read_at, response.count - len(response.kvs))
            return response
        return await self._range_response(req, rows, len(rows), filtered)

    async def _range_response(
        self, req: rpc_pb2.RangeRequest, rows: list[Row], count: int, filtered: bool
    ) -> rpc_pb2.RangeResponse:
        if filtered:
            rows = [r for r in rows if _passes(req, r)]
        order = req.sort_order
        if req.sort_target != RangeRequest.KEY and order == RangeRequest.NONE:
            order = RangeRequest.ASCEND
        if order != RangeRequest.NONE and not (
            req.sort_target == RangeRequest.KEY and order == RangeRequest.ASCEND
        ):
            rows.sort(key=_SORT_KEYS[req.sort_target], reverse=order == RangeRequest.DESCEND)
        more = False
        if req.limit > 0 and len(rows) > req.limit:
            rows = rows[: req.limit]
            more = True
        response = rpc_pb2.RangeResponse(header=header(self.revision), more=more, count=count)
        add = response.kvs.add  # building in place: a list of KeyValues would be copied in again
        keys_only = req.keys_only
        for start in range(0, len(rows), CHUNK):
            if start:
                await asyncio.sleep(0)
            for r in rows[start : start + CHUNK]:
                add(
                    key=r.key,
                    create_revision=r.create_revision,
                    mod_revision=r.mod_revision,
                    version=r.version,
                    value=b"" if keys_only else r.value,
                    lease=r.lease,
                )
        return response

    async def compare(self, compare: rpc_pb2.Compare) -> bool:
        if not compare.range_end and isinstance(self.tx, WriteTx):
            _, live = await self._live(compare.key)
            rows = [live] if live is not None else []
        else:
            rows = await self.tx.range(compare.key, range_end(compare.range_end), None, 0)
        if not rows:
            # A value compare on a missing key always fails: gRPC cannot tell "" from absent.
            return compare.target != Compare.VALUE and _compare_one(compare, None)
        return all(_compare_one(compare, row) for row in rows)

    # -- writes --------------------------------------------------------------------------------

    @property
    def write_tx(self) -> WriteTx:
        assert isinstance(self.tx, WriteTx), "write request on a read-only transaction"
        return self.tx

    async def _live(self, key: bytes) -> tuple[Row | None, Row | None]:
        """(newest row incl. tombstone, the live row or None)."""
        if key in self._newest:
            newest = self._newest[key]
        else:
            newest = self._newest[key] = await self.write_tx.newest(key)
        return newest, (newest if newest is not None and newest.version > 0 else None)

    def check_key(self, key: bytes) -> None:
        limit = self.tx.max_key_bytes
        if limit is not None and len(key) > limit:
            raise errors.KeyTooLong(limit)

    async def check_put(self, req: rpc_pb2.PutRequest) -> None:
        self.check_key(req.key)
        if req.ignore_value or req.ignore_lease:
            _, live = await self._live(req.key)
            if live is None:
                raise errors.KeyNotFound()
        await self.check_lease(req.lease)

    async def check_lease(self, lease: int) -> None:
        if lease and await self.tx.lease(lease) is None:
            raise errors.LeaseNotFound()

    async def put(self, req: rpc_pb2.PutRequest) -> rpc_pb2.PutResponse:
        self.check_key(req.key)
        await self.check_lease(req.lease)  # etcd looks the lease up before the key
        newest, live = await self._live(req.key)
        if (req.ignore_value or req.ignore_lease) and live is None:
            raise errors.KeyNotFound()
        self._prior.setdefault(req.key, live)
        value = live.value if (req.ignore_value and live) else req.value
        lease = live.lease if (req.ignore_lease and live) else req.lease
        revision = self.begin + 1
        row = ChangeRow(
            key=req.key,
            create_revision=live.create_revision if live else revision,
            mod_revision=revision,
            version=live.version + 1 if live else 1,
            value=value,
            lease=lease,
            sub=len(self.changes),
        )
        superseded = [(req.key, newest.mod_revision)] if newest else []
        await self.write_tx.append([row], superseded)
        self._newest[req.key] = Row(*row[:6])
        kv = to_kv(Row(*row[:6]))
        prev = to_kv(live) if live else None
        self.changes.append(Event(type=Event.PUT, kv=kv, prev_kv=prev))
        response = rpc_pb2.PutResponse(header=header(revision))
        if req.prev_kv and prev is not None:
            response.prev_kv.CopyFrom(prev)
        return response

    async def delete_range(self, req: rpc_pb2.DeleteRangeRequest) -> rpc_pb2.DeleteRangeResponse:
        end = range_end(req.range_end)
        rows = await self.tx.range(req.key, end, None, 0)
        response = rpc_pb2.DeleteRangeResponse(deleted=len(rows))
        if rows:
            revision, first = self.begin + 1, len(self.changes)
            if len(rows) <= FEW:
                await self._append_tombstones(rows)
            else:
                await self.write_tx.delete_range(req.key, end, revision, first)
            await self._deleted(rows, response.prev_kvs if req.prev_kv else None)
        response.header.revision = self.revision
        return response

    async def _append_tombstones(self, rows: list[Row]) -> None:
        """Delete a few rows a statement per key: for one key, three times faster than the
        set-based statements of `delete_range`."""
        revision, first = self.begin + 1, len(self.changes)
        tombstones = [
            ChangeRow(r.key, 0, revision, 0, b"", 0, first + i) for i, r in enumerate(rows)
        ]
        await self.write_tx.append(tombstones, [(r.key, r.mod_revision) for r in rows])

    async def _deleted(
        self, rows: list[Row], prev_kvs: RepeatedCompositeFieldContainer[KeyValue] | None = None
    ) -> None:
        """Record the deletion of `rows` (the database has done it) as this request's events,
        CHUNK rows between two turns of the event loop; each row is added to `prev_kvs` if
        given. `rows` are distinct keys, in the order the database gave their tombstones subs."""
        revision = self.begin + 1
        for start in range(0, len(rows), CHUNK):
            if start:
                await asyncio.sleep(0)
            for r in rows[start : start + CHUNK]:
                self._newest[r.key] = Row(r.key, 0, revision, 0, b"", 0)
                prev = to_kv(r)
                if prev_kvs is not None:
                    prev_kvs.append(prev)
                before = self._prior.setdefault(r.key, r)
                event = Event(type=Event.DELETE, kv=KeyValue(key=r.key, mod_revision=revision))
                if before is r:
                    event.prev_kv.CopyFrom(prev)
                elif before is not None:
                    event.prev_kv.CopyFrom(to_kv(before))
                self.changes.append(event)

    async def revoke(self, lease: int, expired_only: bool) -> bool:
        """Delete a lease and, in this one revision, every key attached to it.

        With `expired_only`, only if its deadline has passed (the database decides, so of several
        instances racing to expire it exactly one succeeds). False if there was nothing to revoke.
        """
        if not await self.write_tx.delete_lease(lease, expired_only):
            return False
        rows = await self.tx.leased(lease)
        if rows:
            if len(rows) <= FEW:
                await self._append_tombstones(rows)
            else:
                await self.write_tx.delete_leased(lease, self.begin + 1, len(self.changes))
            await self._deleted(rows)
        return True

    # -- transactions --------------------------------------------------------------------------

    async def txn(self, req: rpc_pb2.TxnRequest) -> rpc_pb2.TxnResponse:
        path = await self._path(req)
        await self._check(req, path)
        response = rpc_pb2.TxnResponse()
        await self._run(req, path, response)
        response.header.revision = self.revision
        return response

    async def _path(self, req: rpc_pb2.TxnRequest) -> _Path:
        """Evaluate every compare, nested ones too, before anything is written (etcd's txnPath)."""
        succeeded = True
        for compare in req.compare:
            if not await self.compare(compare):
                succeeded = False
                break
        nested = [
            await self._path(op.request_txn)
            for op in (req.success if succeeded else req.failure)
            if op.WhichOneof("request") == "request_txn"
        ]
        return _Path(succeeded, nested)

    async def _check(self, req: rpc_pb2.TxnRequest, path: _Path) -> None:
        """etcd's checkRequests: every error the chosen branches can raise, raised before they
        write; as etcd, every Put at any depth first, then every Range."""
        await self._check_puts(req, path)
        self._check_ranges(req, path)

    @staticmethod
    def _branch(
        req: rpc_pb2.TxnRequest, path: _Path
    ) -> Iterator[tuple[rpc_pb2.RequestOp, _Path | None]]:
        """The ops of the branch `path` chose, each nested Txn with its own path."""
        nested = iter(path.nested)
        for op in req.success if path.succeeded else req.failure:
            inner = next(nested) if op.WhichOneof("request") == "request_txn" else None
            yield op, inner

    async def _check_puts(self, req: rpc_pb2.TxnRequest, path: _Path) -> None:
        for op, inner in self._branch(req, path):
            if inner is not None:
                await self._check_puts(op.request_txn, inner)
            elif op.WhichOneof("request") == "request_put":
                await self.check_put(op.request_put)

    def _check_ranges(self, req: rpc_pb2.TxnRequest, path: _Path) -> None:
        for op, inner in self._branch(req, path):
            if inner is not None:
                self._check_ranges(op.request_txn, inner)
            elif op.WhichOneof("request") == "request_range":
                self._check_txn_revision(op.request_range.revision)

    async def _run(
        self, req: rpc_pb2.TxnRequest, path: _Path, response: rpc_pb2.TxnResponse
    ) -> None:
        """Fill `response` in place: copying a nested response (as `add(response_txn=…)`
        would) makes protobuf parse it again, which fails past 50 levels of nesting."""
        response.succeeded = path.succeeded
        for op, inner in self._branch(req, path):
            kind = op.WhichOneof("request")
            if inner is not None:
                # Nested responses carry an empty header, as in etcd.
                nested = response.responses.add().response_txn
                nested.header.SetInParent()
                await self._run(op.request_txn, inner, nested)
            elif kind == "request_range":
                response.responses.add(response_range=await self.range(op.request_range))
            elif kind == "request_put":
                response.responses.add(response_put=await self.put(op.request_put))
            elif kind == "request_delete_range":
                deleted = await self.delete_range(op.request_delete_range)
                response.responses.add(response_delete_range=deleted)


@dataclass(frozen=True, slots=True)
class _Path:
    """Which branch a Txn takes, and the paths of the nested Txns in that branch."""

    succeeded: bool
    nested: list[_Path]


def _passes(req: rpc_pb2.RangeRequest, row: Row) -> bool:
    if req.max_mod_revision and row.mod_revision > req.max_mod_revision:
        return False
    if req.min_mod_revision and row.mod_revision < req.min_mod_revision:
        return False
    if req.max_create_revision and row.create_revision > req.max_create_revision:
        return False
    return not (req.min_create_revision and row.create_revision < req.min_create_revision)
