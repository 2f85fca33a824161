"""The etcd requests the jobs send, as kube-apiserver sends them, and the values they write."""

from __future__ import annotations

import os

from kine_server.pb import rpc_pb2

Compare = rpc_pb2.Compare


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with prefix" (clientv3.GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\x00"


def value_of(size: int) -> bytes:
    return os.urandom(size)


def create_txn(key: bytes, value: bytes) -> rpc_pb2.TxnRequest:
    """kube-apiserver's create: If mod_revision(key)==0 Then Put Else Get."""
    return rpc_pb2.TxnRequest(
        compare=[Compare(key=key, target=Compare.MOD, result=Compare.EQUAL, mod_revision=0)],
        success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value))],
        failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))],
    )


def update_txn(key: bytes, value: bytes, mod_revision: int) -> rpc_pb2.TxnRequest:
    """kube-apiserver's GuaranteedUpdate: If mod_revision(key)==X Then Put Else Get."""
    return rpc_pb2.TxnRequest(
        compare=[
            Compare(key=key, target=Compare.MOD, result=Compare.EQUAL, mod_revision=mod_revision)
        ],
        success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value))],
        failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))],
    )
