"""What a Txn request is, read from its shape alone (no transaction): whether it can write,
whether it puts (what NOSPACE refuses), and the keys a group commit reads ahead of applying it."""

from __future__ import annotations

from kine_server.pb import rpc_pb2


def is_read_only(txn: rpc_pb2.TxnRequest) -> bool:
    """True if neither branch can write, at any depth (etcd's isTxnReadonly)."""
    for op in (*txn.success, *txn.failure):
        kind = op.WhichOneof("request")
        if kind in ("request_put", "request_delete_range"):
            return False
        if kind == "request_txn" and not is_read_only(op.request_txn):
            return False
    return True


def has_puts(txn: rpc_pb2.TxnRequest) -> bool:
    """True if either branch puts, at any depth (what etcd's NOSPACE alarm refuses)."""
    for op in (*txn.success, *txn.failure):
        kind = op.WhichOneof("request")
        if kind == "request_put" or (kind == "request_txn" and has_puts(op.request_txn)):
            return True
    return False


def txn_keys(txn: rpc_pb2.TxnRequest) -> list[bytes]:
    """The single keys a Txn compares or puts, at its top level: what a group commit reads
    ahead of applying it (Applier.prefetch)."""
    keys = [compare.key for compare in txn.compare if not compare.range_end]
    for op in (*txn.success, *txn.failure):
        if op.WhichOneof("request") == "request_put":
            keys.append(op.request_put.key)
    return keys
