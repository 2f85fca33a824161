"""etcdserverpb.KV: Range, Put, DeleteRange, Txn, Compact."""

from __future__ import annotations

from typing import TypeAlias

import grpc

from kine_server import errors
from kine_server.api import validation
from kine_server.api.auth import Credentials
from kine_server.api.common import Member, etcd_errors
from kine_server.auth import permissions as auth
from kine_server.mvcc.requests import is_read_only
from kine_server.pb import rpc_pb2, rpc_pb2_grpc
from kine_server.store.commands import COMPACT, DELETE_RANGE, PUT
from kine_server.store.store import Store

Context: TypeAlias = grpc.aio.ServicerContext


class KVService(rpc_pb2_grpc.KVServicer):
    def __init__(
        self,
        store: Store,
        member: Member,
        credentials: Credentials,
        max_request_bytes: int,
        max_txn_ops: int,
    ) -> None:
        self._store = store
        self._member = member
        self._credentials = credentials
        self._max_request_bytes = max_request_bytes
        self._max_txn_ops = max_txn_ops

    def _check_size(self, request: object) -> None:
        # etcd refuses proposals over --max-request-bytes; reads are not proposals.
        if request.ByteSize() > self._max_request_bytes:  # type: ignore[attr-defined]
            raise errors.RequestTooLarge()

    @etcd_errors
    async def Range(self, request: rpc_pb2.RangeRequest, context: Context) -> rpc_pb2.RangeResponse:
        validation.check_range(request)
        state, who = await self._credentials.checked(context)
        auth.check_range(state, who, request)
        response = await self._store.range(request)
        self._member.stamp(response.header)
        return response

    @etcd_errors
    async def Put(self, request: rpc_pb2.PutRequest, context: Context) -> rpc_pb2.PutResponse:
        validation.check_put(request)
        self._check_size(request)
        state, who = await self._credentials.checked(context)
        await auth.check_put(state, who, request, self._store.leased_keys)
        caller = auth.Caller(who, state.generation)
        response = await self._store.submit(PUT, request, caller)
        self._member.stamp(response.header)
        return response

    @etcd_errors
    async def DeleteRange(
        self, request: rpc_pb2.DeleteRangeRequest, context: Context
    ) -> rpc_pb2.DeleteRangeResponse:
        validation.check_delete(request)
        self._check_size(request)
        state, who = await self._credentials.checked(context)
        auth.check_delete(state, who, request)
        caller = auth.Caller(who, state.generation)
        response = await self._store.submit(DELETE_RANGE, request, caller)
        self._member.stamp(response.header)
        return response

    @etcd_errors
    async def Txn(self, request: rpc_pb2.TxnRequest, context: Context) -> rpc_pb2.TxnResponse:
        validation.check_txn(request, self._max_txn_ops)
        if not is_read_only(request):  # etcd serves read-only Txns without a proposal
            self._check_size(request)
        state, who = await self._credentials.checked(context)
        await auth.check_txn(state, who, request, self._store.leased_keys)
        response = await self._store.txn(request, auth.Caller(who, state.generation))
        self._member.stamp(response.header)
        return response

    @etcd_errors
    async def Compact(
        self, request: rpc_pb2.CompactionRequest, context: Context
    ) -> rpc_pb2.CompactionResponse:
        await self._credentials.admin(context)
        response = await self._store.submit(COMPACT, request)
        self._member.stamp(response.header)
        return response
