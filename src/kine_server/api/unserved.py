"""etcd services this server does not serve yet: each call answers UNIMPLEMENTED with its name."""

from __future__ import annotations

from kine_server.api.common import answer_unsupported
from kine_server.pb import rpc_pb2, rpc_pb2_grpc

_SERVICES = rpc_pb2.DESCRIPTOR.services_by_name


class LeaseService(rpc_pb2_grpc.LeaseServicer):
    pass


class AuthService(rpc_pb2_grpc.AuthServicer):
    pass


answer_unsupported(LeaseService, _SERVICES["Lease"])
answer_unsupported(AuthService, _SERVICES["Auth"])
