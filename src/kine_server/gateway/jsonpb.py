"""etcd's JSON: the protobuf JSON mapping as etcd's grpc-gateway writes and reads it.

The gateway marshals with the original field names (`create_revision`, not `createRevision`),
64-bit integers as strings, bytes as base64, enums by name and default values left out; it reads
either name, ignores unknown fields, and takes an empty body as an empty request. Strings are
escaped as Go's encoding/json escapes them (`<`, `>`, `&`, U+2028 and U+2029 as \\u escapes,
other characters as UTF-8), so a response is byte for byte the one etcd sends.
"""

from __future__ import annotations

import codecs
import json
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from kine_server.httpd import REASONS

M = TypeVar("M", bound=Message)

#: grpc-gateway's HTTPStatusFromCode, as etcd 3.4 and 3.5 answer.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 408,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


class DecodeError(ValueError):
    """A request body that is not the JSON of its request message."""


def dumps(value: Any) -> bytes:
    """Compact JSON as Go's encoding/json writes it."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.translate(_GO_ESCAPES).encode("utf-8", "replace")


def encode(message: Message) -> Any:
    """A message as the JSON value etcd's gateway writes for it (fields in number order,
    which is declaration order in etcd's protos, as Go writes them)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def decode(data: bytes | str, kind: type[M]) -> M:
    message: M = kind()
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"request body is not UTF-8: {exc}") from None
    if not data.strip():
        return message
    try:
        json_format.Parse(data, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise DecodeError(str(exc).splitlines()[0]) from None
    return message


def error_body(code: grpc.StatusCode, message: str) -> bytes:
    """A failed unary call as etcd's gateway writes it (its status is HTTP_STATUS[code])."""
    return dumps({"error": message, "message": message, "code": code.value[0]})


def stream_error(code: grpc.StatusCode, message: str) -> bytes:
    """A streamed call that failed after its first response: grpc-gateway's stream error."""
    status = HTTP_STATUS.get(code, 500)
    return dumps(
        {
            "error": {
                "grpc_code": code.value[0],
                "http_code": status,
                "message": message,
                "http_status": _reason(status),
            }
        }
    )


def _reason(status: int) -> str:
    return REASONS.get(status, "Unknown")


class ObjectStream:
    """Splits a streamed request body into its JSON values, as Go's json.Decoder reads them:
    one after another, separated by any whitespace (or none)."""

    def __init__(self, max_pending: int = 0) -> None:
        self._text = codecs.getincrementaldecoder("utf-8")()
        self._buffer = ""
        self._decoder = json.JSONDecoder()
        #: The longest a value may grow before it is complete (0: no limit).
        self._max_pending = max_pending

    def feed(self, data: bytes) -> list[str]:
        """The values complete so far, each as its text. Text that does not parse yet is kept:
        it may be a value whose end has not arrived (see finish)."""
        try:
            self._buffer += self._text.decode(data)
        except UnicodeDecodeError as exc:
            raise DecodeError(f"request body is not UTF-8: {exc}") from None
        values = []
        while text := self._buffer.lstrip():
            try:
                _, end = self._decoder.raw_decode(text)
            except json.JSONDecodeError:
                break
            values.append(text[:end])
            self._buffer = text[end:]
        else:
            self._buffer = ""
        if self._max_pending and len(self._buffer) > self._max_pending:
            raise DecodeError(f"a request larger than {self._max_pending} bytes")
        return values

    def finish(self) -> None:
        """The body ended: what is left must be nothing but whitespace."""
        try:
            self._buffer += self._text.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise DecodeError(f"request body is not UTF-8: {exc}") from None
        if text := self._buffer.strip():
            try:
                self._decoder.raw_decode(text)
            except json.JSONDecodeError as exc:
                raise DecodeError(str(exc)) from None
            raise DecodeError("unexpected text after a value")
