"""etcdserverpb.Lease: grant, revoke, keep-alive stream, time-to-live, list."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import grpc

from kine_server import errors
from kine_server.api.auth import Credentials
from kine_server.api.common import Member, etcd_errors, send
from kine_server.auth import permissions as auth
from kine_server.pb import rpc_pb2, rpc_pb2_grpc, workers_pb2
from kine_server.store.commands import LEASE_GRANT, LEASE_KEEP_ALIVE, LEASE_REVOKE
from kine_server.store.store import Store

Context: TypeAlias = grpc.aio.ServicerContext


def _discard(future: asyncio.Future[Any]) -> None:
    """Cancel `future` and take its outcome whenever it comes. When the client goes away the
    call is cancelled while the next read is pending; that read ends later (StopAsyncIteration),
    and asyncio would log it at ERROR as "Task exception was never retrieved"."""
    future.cancel()
    future.add_done_callback(lambda done: done.cancelled() or done.exception())


#: Keep-alives renewed in one writer request at most: a batch is one UPDATE, quick even at this.
BATCH = 1000
#: Keep-alives read ahead of their answers at most: a client that sends without reading the
#: answers is then no longer read, instead of its requests piling up here. (grpc itself still
#: takes in a few MB of them before its flow control holds the client back.)
READ_AHEAD = 4 * BATCH


class _ReadAhead:
    """A keep-alive stream's requests, read by a task of their own as they arrive, so that the
    stream's handler finds every request sent while it was renewing and answering the last ones."""

    def __init__(self, requests: AsyncIterator[rpc_pb2.LeaseKeepAliveRequest], limit: int) -> None:
        self._lease_ids: collections.deque[int] = collections.deque()
        self._limit = limit
        self._interrupted = False
        #: Set when ids arrive, the stream ends or the handler is interrupted.
        self._changed = asyncio.Event()
        #: Clear while `limit` ids wait to be taken.
        self._room = asyncio.Event()
        self._room.set()
        self._task = asyncio.ensure_future(self._read(requests))
        self._task.add_done_callback(lambda _: self._changed.set())

    async def _read(self, requests: AsyncIterator[rpc_pb2.LeaseKeepAliveRequest]) -> None:
        async for request in requests:
            self._lease_ids.append(request.ID)
            self._changed.set()
            if len(self._lease_ids) >= self._limit:
                self._room.clear()
                await self._room.wait()

    async def take(self, most: int) -> list[int]:
        """Up to `most` of the ids read and not yet taken, in order, once there is one; [] when
        the client is done sending (or `interrupt()` was called). Raises what reading raised."""
        while not self._lease_ids and not self._interrupted:
            if self._task.done():
                self._task.result()
                return []
            self._changed.clear()
            await self._changed.wait()
        count = min(most, len(self._lease_ids))
        taken = [self._lease_ids.popleft() for _ in range(count)]
        self._room.set()
        return taken

    def interrupt(self) -> None:
        """Make a waiting `take()` return now."""
        self._interrupted = True
        self._changed.set()

    def close(self) -> None:
        """Stop reading (the stream is over)."""
        _discard(self._task)


class LeaseService(rpc_pb2_grpc.LeaseServicer):
    def __init__(self, store: Store, member: Member, credentials: Credentials) -> None:
        self._store = store
        self._member = member
        self._credentials = credentials
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
        response = await self._store.submit(LEASE_GRANT, request)
        self._header(response.header)
        return response

    @etcd_errors
    async def LeaseRevoke(
        self, request: rpc_pb2.LeaseRevokeRequest, context: Context
    ) -> rpc_pb2.LeaseRevokeResponse:
        state, who = await self._credentials.checked(context)
        await auth.check_lease_keys(state, who, request.ID, self._store.leased_keys)
        caller = auth.Caller(who, state.generation)
        response = await self._store.submit(LEASE_REVOKE, request, caller)
        self._header(response.header)
        return response

    async def LeaseKeepAlive(
        self, request_iterator: AsyncIterator[rpc_pb2.LeaseKeepAliveRequest], context: Context
    ) -> None:
        """Renew what the client sent while the previous renewals committed, all together, and
        answer each request in order: one writer transaction per batch, not per keep-alive
        (etcd's clients send one per lease every TTL/3 on one stream, so a client holding many
        leases pipelines them)."""
        ahead = _ReadAhead(request_iterator, READ_AHEAD)
        closing = asyncio.ensure_future(self._closing.wait())
        closing.add_done_callback(lambda _: ahead.interrupt())
        try:
            while True:
                lease_ids = await ahead.take(BATCH)
                if closing.done():
                    raise errors.Unavailable("kine-server: shutting down")
                if not lease_ids:
                    return  # the client is done sending, and everything is answered
                renewal = workers_pb2.KeepAlives(ids=lease_ids)
                ttls = (await self._store.submit(LEASE_KEEP_ALIVE, renewal)).ttls
                for lease_id, ttl in zip(lease_ids, ttls, strict=True):
                    response = rpc_pb2.LeaseKeepAliveResponse(ID=lease_id, TTL=ttl)
                    self._header(response.header)
                    if not await send(context, response):
                        return  # the client went away
        except errors.EtcdError as exc:
            await context.abort(exc.code, exc.message)
        finally:
            closing.cancel()
            ahead.close()

    @etcd_errors
    async def LeaseTimeToLive(
        self, request: rpc_pb2.LeaseTimeToLiveRequest, context: Context
    ) -> rpc_pb2.LeaseTimeToLiveResponse:
        status = await self._store.lease_time_to_live(request.ID, request.keys)
        if request.keys and status is not None:  # etcd 3.5.9: the keys listed must be readable
            state, who = await self._credentials.checked(context)
            for key in status.keys:
                state.check(who, key, b"", write=False)
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
