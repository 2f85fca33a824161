"""etcdserverpb.Maintenance: Status (with the raised alarms in its errors, as etcd), Alarm,
Defragment, HashKV, Hash and Snapshot; the rest answers UNIMPLEMENTED by name."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc

from kine_server import errors
from kine_server.api.auth import Credentials
from kine_server.api.common import Member, answer_unsupported, etcd_errors
from kine_server.maintenance.alarms import raised, status_error
from kine_server.pb import rpc_pb2, rpc_pb2_grpc, workers_pb2
from kine_server.store.commands import ALARM, DEFRAGMENT, WRITE_STATUS
from kine_server.store.store import Store

Context: TypeAlias = grpc.aio.ServicerContext
CHUNK = 64 * 1024


class MaintenanceService(rpc_pb2_grpc.MaintenanceServicer):
    def __init__(
        self, store: Store, member: Member, credentials: Credentials, version: str
    ) -> None:
        self._store = store
        self._member = member
        self._credentials = credentials
        self._version = version

    @etcd_errors
    async def Status(
        self, request: rpc_pb2.StatusRequest, context: Context
    ) -> rpc_pb2.StatusResponse:
        counters = await self._store.counters()
        size, in_use = await self._store.size()
        # One member, always the leader; the store revision stands in for the raft index.
        status = await self._store.submit(WRITE_STATUS, workers_pb2.StatusQuery())
        problems = []
        if status.compaction_failures:
            problems.append(
                f"compaction failing: {status.compaction_failures} batches in a row, "
                f"last error: {status.compaction_last_error}"
            )
        # Then every raised alarm, as etcd lists them after its own errors.
        problems += [status_error(alarm) for alarm in await raised(self._store.driver)]
        response = rpc_pb2.StatusResponse(
            errors=problems,
            version=self._version,
            dbSize=size,
            dbSizeInUse=in_use,
            leader=self._member.member_id,
            raftIndex=counters.revision,
            raftTerm=1,
            raftAppliedIndex=counters.revision,
            isLearner=False,
        )
        response.header.revision = counters.revision
        self._member.stamp(response.header)
        return response

    @etcd_errors
    async def Alarm(self, request: rpc_pb2.AlarmRequest, context: Context) -> rpc_pb2.AlarmResponse:
        # GET lists the raised alarms; ACTIVATE the one it names, DEACTIVATE the one it cleared.
        if request.action != rpc_pb2.AlarmRequest.GET:
            await self._credentials.admin(context)
        response = await self._store.submit(ALARM, request)
        counters = await self._store.counters()
        response.header.revision = counters.revision
        self._member.stamp(response.header)
        return response

    @etcd_errors
    async def Defragment(
        self, request: rpc_pb2.DefragmentRequest, context: Context
    ) -> rpc_pb2.DefragmentResponse:
        await self._credentials.maintainer(context)
        response = await self._store.submit(DEFRAGMENT, request)
        response.header.revision = (await self._store.counters()).revision
        self._member.stamp(response.header)
        return response

    @etcd_errors
    async def HashKV(
        self, request: rpc_pb2.HashKVRequest, context: Context
    ) -> rpc_pb2.HashKVResponse:
        await self._credentials.maintainer(context)
        crc, _, compacted = await self._store.hash_kv(request.revision)
        response = rpc_pb2.HashKVResponse(hash=crc, compact_revision=compacted)
        response.header.revision = (await self._store.counters()).revision
        self._member.stamp(response.header)
        return response

    @etcd_errors
    async def Hash(self, request: rpc_pb2.HashRequest, context: Context) -> rpc_pb2.HashResponse:
        # etcd hashes its whole backend file; the key space as of now is this server's analogue.
        await self._credentials.maintainer(context)
        crc, revision, _ = await self._store.hash_kv(0)
        response = rpc_pb2.HashResponse(hash=crc)
        response.header.revision = revision
        self._member.stamp(response.header)
        return response

    async def Snapshot(
        self, request: rpc_pb2.SnapshotRequest, context: Context
    ) -> AsyncIterator[rpc_pb2.SnapshotResponse]:
        """A consistent copy of the store, as etcd's backend file (bbolt), in 64 KiB chunks,
        followed (as etcd does) by the SHA-256 of the database, which etcdctl checks."""
        with tempfile.TemporaryDirectory(prefix="kine-snapshot-") as directory:
            path = os.path.join(directory, "snapshot.db")
            try:
                await self._credentials.maintainer(context)
                counters = await self._store.snapshot(path)
            except errors.EtcdError as exc:
                await context.abort(exc.code, exc.message)
            digest = hashlib.sha256()
            with open(path, "rb") as file:  # noqa: ASYNC230 - local temp file, small reads
                remaining = os.fstat(file.fileno()).st_size + digest.digest_size
                while True:
                    chunk = file.read(CHUNK)
                    digest.update(chunk)
                    if not chunk:
                        chunk = digest.digest()
                    remaining -= len(chunk)
                    response = rpc_pb2.SnapshotResponse(remaining_bytes=remaining, blob=chunk)
                    response.header.revision = counters.revision
                    self._member.stamp(response.header)
                    yield response
                    if remaining <= 0:
                        break


answer_unsupported(MaintenanceService, rpc_pb2.DESCRIPTOR.services_by_name["Maintenance"])
