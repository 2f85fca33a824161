"""etcdserverpb.Auth: authentication is not offered; every call answers UNIMPLEMENTED by name.

Clients that never enable auth (kube-apiserver, etcdctl without --user) never call it.
"""

from __future__ import annotations

from kine_server.api.common import answer_unsupported
from kine_server.pb import rpc_pb2, rpc_pb2_grpc


class AuthService(rpc_pb2_grpc.AuthServicer):
    pass


answer_unsupported(AuthService, rpc_pb2.DESCRIPTOR.services_by_name["Auth"])
