"""The gateway's paths: each is one gRPC method, as etcd's rpc.proto maps them (google.api.http).

The paths are those etcd 3.4 answers under `/v3/` (checked against it: lease revoke and
time-to-live are served under `kv/lease/` too, and `maintenance/hash` is Hash, not HashKV).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from google.protobuf.message import Message

from kine_server.pb import rpc_pb2 as pb

#: etcd 3.4 and 3.5 serve `/v3/`; 3.3's `/v3beta/` is kept for older clients.
PREFIXES = ("/v3/", "/v3beta/")


class Kind(enum.Enum):
    UNARY = "unary"
    #: One request, a stream of responses (Snapshot).
    SERVER_STREAM = "server stream"
    #: Requests and responses both streamed (Watch, LeaseKeepAlive).
    STREAM = "stream"


@dataclass(frozen=True)
class Route:
    method: str
    request: type[Message]
    response: type[Message]
    kind: Kind = Kind.UNARY


def _routes() -> dict[str, Route]:
    kv, lease, cluster, maintenance, auth = (
        "/etcdserverpb." + service for service in ("KV", "Lease", "Cluster", "Maintenance", "Auth")
    )
    lease_revoke = Route(f"{lease}/LeaseRevoke", pb.LeaseRevokeRequest, pb.LeaseRevokeResponse)
    time_to_live = Route(
        f"{lease}/LeaseTimeToLive", pb.LeaseTimeToLiveRequest, pb.LeaseTimeToLiveResponse
    )
    leases = Route(f"{lease}/LeaseLeases", pb.LeaseLeasesRequest, pb.LeaseLeasesResponse)
    return {
        "kv/range": Route(f"{kv}/Range", pb.RangeRequest, pb.RangeResponse),
        "kv/put": Route(f"{kv}/Put", pb.PutRequest, pb.PutResponse),
        "kv/deleterange": Route(f"{kv}/DeleteRange", pb.DeleteRangeRequest, pb.DeleteRangeResponse),
        "kv/txn": Route(f"{kv}/Txn", pb.TxnRequest, pb.TxnResponse),
        "kv/compaction": Route(f"{kv}/Compact", pb.CompactionRequest, pb.CompactionResponse),
        "watch": Route("/etcdserverpb.Watch/Watch", pb.WatchRequest, pb.WatchResponse, Kind.STREAM),
        "lease/grant": Route(f"{lease}/LeaseGrant", pb.LeaseGrantRequest, pb.LeaseGrantResponse),
        "lease/revoke": lease_revoke,
        "kv/lease/revoke": lease_revoke,
        "lease/keepalive": Route(
            f"{lease}/LeaseKeepAlive",
            pb.LeaseKeepAliveRequest,
            pb.LeaseKeepAliveResponse,
            Kind.STREAM,
        ),
        "lease/timetolive": time_to_live,
        "kv/lease/timetolive": time_to_live,
        "lease/leases": leases,
        "kv/lease/leases": leases,
        "cluster/member/add": Route(
            f"{cluster}/MemberAdd", pb.MemberAddRequest, pb.MemberAddResponse
        ),
        "cluster/member/remove": Route(
            f"{cluster}/MemberRemove", pb.MemberRemoveRequest, pb.MemberRemoveResponse
        ),
        "cluster/member/update": Route(
            f"{cluster}/MemberUpdate", pb.MemberUpdateRequest, pb.MemberUpdateResponse
        ),
        "cluster/member/list": Route(
            f"{cluster}/MemberList", pb.MemberListRequest, pb.MemberListResponse
        ),
        "cluster/member/promote": Route(
            f"{cluster}/MemberPromote", pb.MemberPromoteRequest, pb.MemberPromoteResponse
        ),
        "maintenance/alarm": Route(f"{maintenance}/Alarm", pb.AlarmRequest, pb.AlarmResponse),
        "maintenance/status": Route(f"{maintenance}/Status", pb.StatusRequest, pb.StatusResponse),
        "maintenance/defragment": Route(
            f"{maintenance}/Defragment", pb.DefragmentRequest, pb.DefragmentResponse
        ),
        "maintenance/hash": Route(f"{maintenance}/Hash", pb.HashRequest, pb.HashResponse),
        "maintenance/snapshot": Route(
            f"{maintenance}/Snapshot", pb.SnapshotRequest, pb.SnapshotResponse, Kind.SERVER_STREAM
        ),
        "maintenance/transfer-leadership": Route(
            f"{maintenance}/MoveLeader", pb.MoveLeaderRequest, pb.MoveLeaderResponse
        ),
        "auth/enable": Route(f"{auth}/AuthEnable", pb.AuthEnableRequest, pb.AuthEnableResponse),
        "auth/disable": Route(f"{auth}/AuthDisable", pb.AuthDisableRequest, pb.AuthDisableResponse),
        "auth/authenticate": Route(
            f"{auth}/Authenticate", pb.AuthenticateRequest, pb.AuthenticateResponse
        ),
        # etcd 3.5's; 3.4 has no AuthStatus.
        "auth/status": Route(f"{auth}/AuthStatus", pb.AuthStatusRequest, pb.AuthStatusResponse),
        "auth/user/add": Route(f"{auth}/UserAdd", pb.AuthUserAddRequest, pb.AuthUserAddResponse),
        "auth/user/get": Route(f"{auth}/UserGet", pb.AuthUserGetRequest, pb.AuthUserGetResponse),
        "auth/user/list": Route(
            f"{auth}/UserList", pb.AuthUserListRequest, pb.AuthUserListResponse
        ),
        "auth/user/delete": Route(
            f"{auth}/UserDelete", pb.AuthUserDeleteRequest, pb.AuthUserDeleteResponse
        ),
        "auth/user/changepw": Route(
            f"{auth}/UserChangePassword",
            pb.AuthUserChangePasswordRequest,
            pb.AuthUserChangePasswordResponse,
        ),
        "auth/user/grant": Route(
            f"{auth}/UserGrantRole", pb.AuthUserGrantRoleRequest, pb.AuthUserGrantRoleResponse
        ),
        "auth/user/revoke": Route(
            f"{auth}/UserRevokeRole", pb.AuthUserRevokeRoleRequest, pb.AuthUserRevokeRoleResponse
        ),
        "auth/role/add": Route(f"{auth}/RoleAdd", pb.AuthRoleAddRequest, pb.AuthRoleAddResponse),
        "auth/role/get": Route(f"{auth}/RoleGet", pb.AuthRoleGetRequest, pb.AuthRoleGetResponse),
        "auth/role/list": Route(
            f"{auth}/RoleList", pb.AuthRoleListRequest, pb.AuthRoleListResponse
        ),
        "auth/role/delete": Route(
            f"{auth}/RoleDelete", pb.AuthRoleDeleteRequest, pb.AuthRoleDeleteResponse
        ),
        "auth/role/grant": Route(
            f"{auth}/RoleGrantPermission",
            pb.AuthRoleGrantPermissionRequest,
            pb.AuthRoleGrantPermissionResponse,
        ),
        "auth/role/revoke": Route(
            f"{auth}/RoleRevokePermission",
            pb.AuthRoleRevokePermissionRequest,
            pb.AuthRoleRevokePermissionResponse,
        ),
    }


ROUTES = _routes()


def find(path: str) -> Route | None:
    """The route a request path names, under any of PREFIXES."""
    for prefix in PREFIXES:
        if path.startswith(prefix):
            return ROUTES.get(path[len(prefix) :])
    return None
