"""grpc.health.v1.Health: SERVING while the database answers."""

from __future__ import annotations

from typing import TypeAlias

import grpc

from kine_server import errors
from kine_server.api.common import answer_unsupported
from kine_server.pb import health_pb2, health_pb2_grpc
from kine_server.store.store import Store

Context: TypeAlias = grpc.aio.ServicerContext
Status = health_pb2.HealthCheckResponse


class HealthService(health_pb2_grpc.HealthServicer):
    def __init__(self, store: Store) -> None:
        self._store = store

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        try:
            await self._store.counters()
        except errors.Unavailable:
            return Status(status=Status.NOT_SERVING)
        return Status(status=Status.SERVING)


answer_unsupported(HealthService, health_pb2.DESCRIPTOR.services_by_name["Health"])
