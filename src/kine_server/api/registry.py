"""Every etcd service of one process, as gRPC handlers: built once, at start-up, on its store.

The services are registered as generic handlers found by method name, each method's handler
wrapped once for metrics and with a deserializer that never raises (api/decoding.py): grpcio's
aio server waits, for every incoming call, on one request future per *registered* method (an
asyncio.wait over some 50 futures here: 12% of the event loop at 2,000 writes/s); all generic
handlers share one future.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from kine_server.api import decoding
from kine_server.api.auth import AuthService, Credentials
from kine_server.api.cluster import ClusterService
from kine_server.api.common import Member
from kine_server.api.health import HealthService
from kine_server.api.kv import KVService
from kine_server.api.lease import LeaseService
from kine_server.api.maintenance import MaintenanceService
from kine_server.api.watch import WatchService, WatchSettings
from kine_server.auth.tokens import make_tokens
from kine_server.config import GRPC_OVERHEAD_BYTES, Config
from kine_server.metrics import Metrics
from kine_server.pb import health_pb2_grpc, rpc_pb2_grpc
from kine_server.store.store import Store


class _Collector:
    """Stands in for the server while the generated code registers a service: keeps each method,
    timed for metrics and guarded, in a generic handler only (see the module's docstring)."""

    def __init__(self, metrics: Metrics, max_txn_ops: int) -> None:
        self._metrics = metrics
        self._max_txn_ops = max_txn_ops
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        pass  # the same methods come to add_registered_method_handlers, where they can be timed

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.add(service, handlers)

    def add(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        timed = {
            name: self._metrics.timed(
                name, decoding.guarded(f"/{service}/{name}", handler, self._max_txn_ops)
            )
            for name, handler in handlers.items()
        }
        self.handlers.append(grpc.method_handlers_generic_handler(service, timed))


@dataclass
class Services:
    """The handlers to add to the gRPC server, and the streaming services the server must end
    itself when it stops (their streams never finish by themselves)."""

    handlers: list[grpc.GenericRpcHandler]
    watch: WatchService
    lease: LeaseService

    def shutdown(self) -> None:
        """End every Watch and LeaseKeepAlive stream with UNAVAILABLE."""
        self.watch.shutdown()
        self.lease.shutdown()


def services(config: Config, store: Store, member: Member, metrics: Metrics) -> Services:
    """etcd's KV, Watch, Lease, Maintenance, Cluster and Auth, and gRPC's Health, on `store`."""
    credentials = Credentials(
        store,
        make_tokens(config.auth_token, config.auth_token_ttl),
        certificate_users=bool(config.trusted_ca_file),
    )
    collector = _Collector(metrics, config.max_txn_ops)
    kv = KVService(store, member, credentials, config.max_request_bytes, config.max_txn_ops)
    rpc_pb2_grpc.add_KVServicer_to_server(kv, collector)
    rpc_pb2_grpc.add_MaintenanceServicer_to_server(
        MaintenanceService(store, member, credentials, config.emulated_etcd_version), collector
    )
    rpc_pb2_grpc.add_ClusterServicer_to_server(ClusterService(store, member), collector)
    watch = WatchService(
        store,
        member,
        credentials,
        WatchSettings(
            progress_interval=config.watch_progress_notify_interval,
            # etcd fragments above the same limit its gRPC layer accepts.
            max_response_bytes=config.max_request_bytes + GRPC_OVERHEAD_BYTES,
        ),
    )
    collector.add("etcdserverpb.Watch", {"Watch": watch.handler()})
    lease = LeaseService(store, member, credentials)
    rpc_pb2_grpc.add_LeaseServicer_to_server(lease, collector)
    rpc_pb2_grpc.add_AuthServicer_to_server(
        AuthService(store, member, credentials, config.bcrypt_cost), collector
    )
    health_pb2_grpc.add_HealthServicer_to_server(HealthService(store), collector)
    return Services(collector.handlers, watch, lease)
