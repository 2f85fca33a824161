from kine_server.pb import kv_pb2 as _kv_pb2
from kine_server.pb import rpc_pb2 as _rpc_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusQuery(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("compaction_failures", "compaction_last_error")
    COMPACTION_FAILURES_FIELD_NUMBER: _ClassVar[int]
    COMPACTION_LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    compaction_failures: int
    compaction_last_error: str
    def __init__(self, compaction_failures: _Optional[int] = ..., compaction_last_error: _Optional[str] = ...) -> None: ...

class KeepAlives(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class KeepAliveTTLs(_message.Message):
    __slots__ = ("ttls",)
    TTLS_FIELD_NUMBER: _ClassVar[int]
    ttls: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ttls: _Optional[_Iterable[int]] = ...) -> None: ...

class AuthChange(_message.Message):
    __slots__ = ("method", "request")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    method: str
    request: bytes
    def __init__(self, method: _Optional[str] = ..., request: _Optional[bytes] = ...) -> None: ...

class Caller(_message.Message):
    __slots__ = ("identified", "user", "revision", "generation")
    IDENTIFIED_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    identified: bool
    user: str
    revision: int
    generation: int
    def __init__(self, identified: _Optional[bool] = ..., user: _Optional[str] = ..., revision: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class AuthChanged(_message.Message):
    __slots__ = ("response",)
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    response: bytes
    def __init__(self, response: _Optional[bytes] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("id", "put", "delete_range", "txn", "compact", "lease_grant", "lease_revoke", "lease_keep_alive", "alarm", "defragment", "status", "auth_change", "caller")
    ID_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_RANGE_FIELD_NUMBER: _ClassVar[int]
    TXN_FIELD_NUMBER: _ClassVar[int]
    COMPACT_FIELD_NUMBER: _ClassVar[int]
    LEASE_GRANT_FIELD_NUMBER: _ClassVar[int]
    LEASE_REVOKE_FIELD_NUMBER: _ClassVar[int]
    LEASE_KEEP_ALIVE_FIELD_NUMBER: _ClassVar[int]
    ALARM_FIELD_NUMBER: _ClassVar[int]
    DEFRAGMENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AUTH_CHANGE_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    id: int
    put: _rpc_pb2.PutRequest
    delete_range: _rpc_pb2.DeleteRangeRequest
    txn: _rpc_pb2.TxnRequest
    compact: _rpc_pb2.CompactionRequest
    lease_grant: _rpc_pb2.LeaseGrantRequest
    lease_revoke: _rpc_pb2.LeaseRevokeRequest
    lease_keep_alive: KeepAlives
    alarm: _rpc_pb2.AlarmRequest
    defragment: _rpc_pb2.DefragmentRequest
    status: StatusQuery
    auth_change: AuthChange
    caller: Caller
    def __init__(self, id: _Optional[int] = ..., put: _Optional[_Union[_rpc_pb2.PutRequest, _Mapping]] = ..., delete_range: _Optional[_Union[_rpc_pb2.DeleteRangeRequest, _Mapping]] = ..., txn: _Optional[_Union[_rpc_pb2.TxnRequest, _Mapping]] = ..., compact: _Optional[_Union[_rpc_pb2.CompactionRequest, _Mapping]] = ..., lease_grant: _Optional[_Union[_rpc_pb2.LeaseGrantRequest, _Mapping]] = ..., lease_revoke: _Optional[_Union[_rpc_pb2.LeaseRevokeRequest, _Mapping]] = ..., lease_keep_alive: _Optional[_Union[KeepAlives, _Mapping]] = ..., alarm: _Optional[_Union[_rpc_pb2.AlarmRequest, _Mapping]] = ..., defragment: _Optional[_Union[_rpc_pb2.DefragmentRequest, _Mapping]] = ..., status: _Optional[_Union[StatusQuery, _Mapping]] = ..., auth_change: _Optional[_Union[AuthChange, _Mapping]] = ..., caller: _Optional[_Union[Caller, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("id", "put", "delete_range", "txn", "compact", "lease_grant", "lease_revoke", "lease_keep_alive", "alarm", "defragment", "status", "auth_change", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    PUT_FIELD_NUMBER: _ClassVar[int]
    DELETE_RANGE_FIELD_NUMBER: _ClassVar[int]
    TXN_FIELD_NUMBER: _ClassVar[int]
    COMPACT_FIELD_NUMBER: _ClassVar[int]
    LEASE_GRANT_FIELD_NUMBER: _ClassVar[int]
    LEASE_REVOKE_FIELD_NUMBER: _ClassVar[int]
    LEASE_KEEP_ALIVE_FIELD_NUMBER: _ClassVar[int]
    ALARM_FIELD_NUMBER: _ClassVar[int]
    DEFRAGMENT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    AUTH_CHANGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: int
    put: _rpc_pb2.PutResponse
    delete_range: _rpc_pb2.DeleteRangeResponse
    txn: _rpc_pb2.TxnResponse
    compact: _rpc_pb2.CompactionResponse
    lease_grant: _rpc_pb2.LeaseGrantResponse
    lease_revoke: _rpc_pb2.LeaseRevokeResponse
    lease_keep_alive: KeepAliveTTLs
    alarm: _rpc_pb2.AlarmResponse
    defragment: _rpc_pb2.DefragmentResponse
    status: StatusReply
    auth_change: AuthChanged
    error: Error
    def __init__(self, id: _Optional[int] = ..., put: _Optional[_Union[_rpc_pb2.PutResponse, _Mapping]] = ..., delete_range: _Optional[_Union[_rpc_pb2.DeleteRangeResponse, _Mapping]] = ..., txn: _Optional[_Union[_rpc_pb2.TxnResponse, _Mapping]] = ..., compact: _Optional[_Union[_rpc_pb2.CompactionResponse, _Mapping]] = ..., lease_grant: _Optional[_Union[_rpc_pb2.LeaseGrantResponse, _Mapping]] = ..., lease_revoke: _Optional[_Union[_rpc_pb2.LeaseRevokeResponse, _Mapping]] = ..., lease_keep_alive: _Optional[_Union[KeepAliveTTLs, _Mapping]] = ..., alarm: _Optional[_Union[_rpc_pb2.AlarmResponse, _Mapping]] = ..., defragment: _Optional[_Union[_rpc_pb2.DefragmentResponse, _Mapping]] = ..., status: _Optional[_Union[StatusReply, _Mapping]] = ..., auth_change: _Optional[_Union[AuthChanged, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Feed(_message.Message):
    __slots__ = ("skipped_through", "auth_generation", "events")
    SKIPPED_THROUGH_FIELD_NUMBER: _ClassVar[int]
    AUTH_GENERATION_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    skipped_through: int
    auth_generation: int
    events: _containers.RepeatedCompositeFieldContainer[_kv_pb2.Event]
    def __init__(self, skipped_through: _Optional[int] = ..., auth_generation: _Optional[int] = ..., events: _Optional[_Iterable[_Union[_kv_pb2.Event, _Mapping]]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("revision", "worker")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    revision: int
    worker: int
    def __init__(self, revision: _Optional[int] = ..., worker: _Optional[int] = ...) -> None: ...

class Scrape(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class Scraped(_message.Message):
    __slots__ = ("id", "text", "worker")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: bytes
    worker: int
    def __init__(self, id: _Optional[int] = ..., text: _Optional[bytes] = ..., worker: _Optional[int] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("command", "result", "feed", "hello", "scrape", "scraped")
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    FEED_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    SCRAPE_FIELD_NUMBER: _ClassVar[int]
    SCRAPED_FIELD_NUMBER: _ClassVar[int]
    command: Command
    result: Result
    feed: Feed
    hello: Hello
    scrape: Scrape
    scraped: Scraped
    def __init__(self, command: _Optional[_Union[Command, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., feed: _Optional[_Union[Feed, _Mapping]] = ..., hello: _Optional[_Union[Hello, _Mapping]] = ..., scrape: _Optional[_Union[Scrape, _Mapping]] = ..., scraped: _Optional[_Union[Scraped, _Mapping]] = ...) -> None: ...
