"""etcd's request checks (server/etcdserver/api/v3rpc/key.go), made before a request reaches the store."""

from __future__ import annotations

from collections.abc import Sequence

from kine_server import errors
from kine_server.pb import rpc_pb2

_SORT_ORDERS = set(rpc_pb2.RangeRequest.SortOrder.values())
_SORT_TARGETS = set(rpc_pb2.RangeRequest.SortTarget.values())


def check_range(req: rpc_pb2.RangeRequest) -> None:
    if not req.key:
        raise errors.EmptyKey()
    if req.sort_order not in _SORT_ORDERS or req.sort_target not in _SORT_TARGETS:
        raise errors.InvalidSortOption()


def check_put(req: rpc_pb2.PutRequest) -> None:
    if not req.key:
        raise errors.EmptyKey()
    if req.ignore_value and req.value:
        raise errors.ValueProvided()
    if req.ignore_lease and req.lease:
        raise errors.LeaseProvided()


def check_delete(req: rpc_pb2.DeleteRangeRequest) -> None:
    if not req.key:
        raise errors.EmptyKey()


def check_txn(req: rpc_pb2.TxnRequest, max_ops: int) -> None:
    """Shape checks, then etcd's put/delete overlap check, which is the costlier one."""
    _check_txn_shape(req, max_ops)
    _intervals(req.success)
    _intervals(req.failure)


def _check_txn_shape(req: rpc_pb2.TxnRequest, max_ops: int) -> None:
    ops = max(len(req.compare), len(req.success), len(req.failure))
    if ops > max_ops:
        raise errors.TooManyOps()
    for compare in req.compare:
        if not compare.key:
            raise errors.EmptyKey()
    for op in (*req.success, *req.failure):
        kind = op.WhichOneof("request")
        if kind == "request_range":
            check_range(op.request_range)
        elif kind == "request_put":
            check_put(op.request_put)
        elif kind == "request_delete_range":
            check_delete(op.request_delete_range)
        elif kind == "request_txn":
            _check_txn_shape(op.request_txn, max_ops - ops)  # nested ops share the limit
        else:
            raise errors.KeyNotFound()  # an empty RequestOp, as etcd answers it


class _Deletes:
    """The key intervals a branch deletes; etcd's affine intervals, where "" as end is infinity."""

    def __init__(self) -> None:
        self.spans: list[tuple[bytes, bytes | None]] = []

    def add(self, key: bytes, end: bytes) -> None:
        self.spans.append((key, end if end else None))

    def covers(self, key: bytes) -> bool:
        for start, end in self.spans:
            if end is None:
                if key == start:
                    return True
            elif start <= key < end:
                return True
        return False


def _intervals(ops: Sequence[rpc_pb2.RequestOp]) -> tuple[set[bytes], _Deletes]:
    """etcd's checkIntervals: no key may be put twice, or put and deleted, by one branch."""
    if len(ops) == 1 and ops[0].WhichOneof("request") == "request_put":
        return {ops[0].request_put.key}, _Deletes()  # the usual write: nothing can overlap
    deletes = _Deletes()
    for op in ops:
        if op.WhichOneof("request") == "request_delete_range":
            deletes.add(op.request_delete_range.key, op.request_delete_range.range_end)
    puts: set[bytes] = set()
    for op in ops:
        if op.WhichOneof("request") != "request_txn":
            continue
        puts_then, deletes_then = _intervals(op.request_txn.success)
        puts_else, deletes_else = _intervals(op.request_txn.failure)
        for key in puts_then:
            if key in puts or deletes.covers(key):
                raise errors.DuplicateKey()
            puts.add(key)
        for key in puts_else:
            # then/else exclude each other, so a key put in both branches is no conflict
            if (key in puts and key not in puts_then) or deletes.covers(key):
                raise errors.DuplicateKey()
            puts.add(key)
        deletes.spans += deletes_then.spans + deletes_else.spans
    for op in ops:
        if op.WhichOneof("request") != "request_put":
            continue
        key = op.request_put.key
        if key in puts or deletes.covers(key):
            raise errors.DuplicateKey()
        puts.add(key)
    return puts, deletes
