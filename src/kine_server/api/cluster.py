"""etcdserverpb.Cluster: this server is a one-member cluster; membership changes are refused."""

from __future__ import annotations

from typing import TypeAlias

import grpc

from kine_server.api.common import Member, answer_unsupported, etcd_errors
from kine_server.pb import rpc_pb2, rpc_pb2_grpc
from kine_server.store.store import Store

Context: TypeAlias = grpc.aio.ServicerContext


class ClusterService(rpc_pb2_grpc.ClusterServicer):
    def __init__(self, store: Store, member: Member) -> None:
        self._store = store
        self._member = member

    @etcd_errors
    async def MemberList(
        self, request: rpc_pb2.MemberListRequest, context: Context
    ) -> rpc_pb2.MemberListResponse:
        counters = await self._store.counters()
        me = rpc_pb2.Member(
            ID=self._member.member_id,
            name=self._member.name,
            peerURLs=[],
            clientURLs=self._member.client_urls,
        )
        response = rpc_pb2.MemberListResponse(members=[me])
        response.header.revision = counters.revision
        self._member.stamp(response.header)
        return response


answer_unsupported(ClusterService, rpc_pb2.DESCRIPTOR.services_by_name["Cluster"])
