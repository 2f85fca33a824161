"""etcdserverpb.Lease: grant, revoke, keep-alive stream, time-to-live, list."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from kine_server import errors
from kine_server.api.common import Member, etcd_errors, send
from kine_server.pb import rpc_pb2, rpc_pb2_grpc
from kine_server.store.store import Storage

Context: TypeAlias = grpc.aio.ServicerContext


def _discard(future: asyncio.Future[Any]) -> None:
    """Cancel `future` and take its outcome whenever it comes. When the client goes away the
    call is cancelled while the next read is pending; that read ends later (StopAsyncIteration),
    and asyncio would log it at ERROR as "Task exception was never retrieved"."""
    future.cancel()
    future.add_done_callback(lambda done: done.cancelled() or done.exception())


class LeaseService(rpc_pb2_grpc.LeaseServicer):
    def __init__(self, store: Storage, member: Member) -> None:
        self._store = store
        self._member = member
        self._closing = asyncio.Event()

    def shutdown(self) -> None:
        """End every keep-alive stream with UNAVAILABLE: the server is stopping."""
        self._closing.set()

    def _header(self, header: rpc_pb2.ResponseHeader) -> None:
        # Lease responses carry the store revision as of the answer, as etcd's newHeader does.
        header.revision = self._store.hub.revision
        self._member.stamp(header)

    @etcd_errors
    async def LeaseGrant(
        self, request: rpc_pb2.LeaseGrantRequest, context: Context
    ) -> rpc_pb2.LeaseGrantResponse:
        lease_id, ttl = await self._store.lease_grant(request)
        response = rpc_pb2.LeaseGrantResponse(ID=lease_id, TTL=ttl)
        self._header(response.header)
        return response

    @etcd_errors
    async def LeaseRevoke(
        self, request: rpc_pb2.LeaseRevokeRequest, context: Context
    ) -> rpc_pb2.LeaseRevokeResponse:
        await self._store.lease_revoke(request.ID)
        response = rpc_pb2.LeaseRevokeResponse()
        self._header(response.header)
        return response

    async def LeaseKeepAlive(
        self, request_iterator: AsyncIterator[rpc_pb2.LeaseKeepAliveRequest], context: Context
    ) -> None:
        requests = aiter(request_iterator)
        closing = asyncio.ensure_future(self._closing.wait())
        following: asyncio.Future[rpc_pb2.LeaseKeepAliveRequest] | None = None
        try:
            while True:
                following = asyncio.ensure_future(anext(requests))
                await asyncio.wait({following, closing}, return_when=asyncio.FIRST_COMPLETED)
                if closing.done():
                    raise errors.Unavailable("kine-server: shutting down")
                try:
                    request = following.result()
                except StopAsyncIteration:
                    return
                ttl = await self._store.lease_keep_alive(request.ID)
                response = rpc_pb2.LeaseKeepAliveResponse(ID=request.ID, TTL=ttl)
                self._header(response.header)
                if not await send(context, response):
                    return  # the client went away
        except errors.EtcdError as exc:
            await context.abort(exc.code, exc.message)
        finally:
            closing.cancel()
            if following is not None:
                _discard(following)

    @etcd_errors
    async def LeaseTimeToLive(
        self, request: rpc_pb2.LeaseTimeToLiveRequest, context: Context
    ) -> rpc_pb2.LeaseTimeToLiveResponse:
        status = await self._store.lease_time_to_live(request.ID, request.keys)
        if status is None:
            response = rpc_pb2.LeaseTimeToLiveResponse(ID=request.ID, TTL=-1)
        else:
            response = rpc_pb2.LeaseTimeToLiveResponse(
                ID=request.ID,
                TTL=status.remaining_ttl,
                grantedTTL=status.granted_ttl,
                keys=status.keys,
            )
        self._header(response.header)
        return response

    @etcd_errors
    async def LeaseLeases(
        self, request: rpc_pb2.LeaseLeasesRequest, context: Context
    ) -> rpc_pb2.LeaseLeasesResponse:
        ids = await self._store.lease_list()
        response = rpc_pb2.LeaseLeasesResponse(leases=[rpc_pb2.LeaseStatus(ID=i) for i in ids])
        self._header(response.header)
        return response
