"""A recorded history: single-key operations with their real-time intervals, and watch logs.

Every operation touches one key (Put, Get, Delete, or a Txn that compares that key and puts it),
so the checker may split the history per key, as Porcupine does when every operation is local to
one partition. Every written value is unique in a history, so any read, prev_kv or watch event
names exactly the write it shows.

An operation whose client got an error or a timeout is *indeterminate*: it may have taken effect
at any moment after its call, or never; it has no return time and no outcome.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class Kind(enum.StrEnum):
    GET = "get"
    PUT = "put"
    DELETE = "delete"
    #: Txn: if the key's mod_revision (or value) is as compared, put a value; else read the key.
    CAS = "cas"


@dataclass(frozen=True)
class KeyValue:
    """A key's value as a response shows it (the key itself is the operation's)."""

    value: bytes
    create_revision: int
    mod_revision: int
    version: int


@dataclass(frozen=True)
class Compare:
    """A CAS's condition: mod_revision == `mod_revision` (0: the key is absent), or, when
    `value` is not None, value == `value` (false on an absent key, as in etcd)."""

    mod_revision: int = 0
    value: bytes | None = None


@dataclass(frozen=True)
class Outcome:
    """What the server answered.

    `kv` is what the operation saw of its key: a Get's result; a Put's, a Delete's or a
    successful CAS's prev_kv; a failed CAS's failure-branch read. None: the key was absent.
    `succeeded`: a CAS's compare held; a Delete deleted the key. Put and Get: True.
    """

    revision: int
    kv: KeyValue | None
    succeeded: bool = True


@dataclass(frozen=True)
class Operation:
    id: int
    client: int
    kind: Kind
    key: bytes
    #: Put and CAS: the value written, unique in the history.
    value: bytes = b""
    compare: Compare | None = None
    #: Invocation and completion, monotonic nanoseconds; `ret` None: indeterminate.
    call: int = 0
    ret: int | None = None
    outcome: Outcome | None = None
    #: An indeterminate operation's gRPC status (or "timeout").
    error: str = ""
    #: An indeterminate write known (from what others saw) to have taken effect, at this
    #: revision; None: unknown. Set by resolve, never by the recorder.
    known_revision: int | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is not None

    @property
    def writes(self) -> bool:
        """Whether an answered operation made a revision (a Put, a Delete that deleted, a CAS
        whose compare held)."""
        if self.outcome is None:
            return False
        return self.kind is Kind.PUT or (
            self.kind in (Kind.DELETE, Kind.CAS) and self.outcome.succeeded
        )

    def describe(self) -> str:
        """One line for a report."""
        what = f"{self.kind.value}({self.key.decode(errors='replace')}"
        if self.kind in (Kind.PUT, Kind.CAS):
            what += f", {self.value.decode(errors='replace')}"
        if self.compare is not None:
            if self.compare.value is not None:
                what += f", if value=={self.compare.value.decode(errors='replace')}"
            else:
                what += f", if mod=={self.compare.mod_revision}"
        what += ")"
        span = f"[{self.call / 1e9:.6f}, "
        span += "∞)" if self.ret is None else f"{self.ret / 1e9:.6f}]"
        if self.outcome is None:
            known = f" known at r{self.known_revision}" if self.known_revision else ""
            return f"#{self.id} c{self.client} {what} {span} -> ? ({self.error}){known}"
        out = self.outcome
        seen = "absent" if out.kv is None else _kv_text(out.kv)
        flag = "" if self.kind in (Kind.PUT, Kind.GET) else f" {out.succeeded}"
        return f"#{self.id} c{self.client} {what} {span} -> r{out.revision}{flag} {seen}"


def _kv_text(kv: KeyValue) -> str:
    value = kv.value.decode(errors="replace")
    return f"{value}@c{kv.create_revision}/m{kv.mod_revision}/v{kv.version}"


class EventType(enum.StrEnum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    revision: int
    type: EventType
    key: bytes
    value: bytes = b""
    create_revision: int = 0
    version: int = 0


@dataclass
class WatchLog:
    """Everything one logical watch received, across the streams it reconnected on."""

    name: str
    #: The first revision it asked for (its first stream's start_revision).
    start_revision: int
    events: list[WatchEvent] = field(default_factory=list)
    #: The start_revision of each stream after the first (last seen + 1).
    reconnects: list[int] = field(default_factory=list)


@dataclass
class History:
    operations: list[Operation]
    watches: list[WatchLog] = field(default_factory=list)
    #: The store's revision once every client had stopped (0: not known).
    final_revision: int = 0

    def to_json(self) -> str:
        """The whole history, for reproducing a failure with `History.from_json`."""

        def plain(value: Any) -> Any:
            if isinstance(value, bytes):
                return value.decode("latin-1")
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, list | tuple):
                return [plain(v) for v in value]
            return value

        return json.dumps(plain(asdict(self)), indent=None, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> History:
        data = json.loads(text)

        def raw(text: str) -> bytes:
            return text.encode("latin-1")

        def kv(item: dict[str, Any] | None) -> KeyValue | None:
            if item is None:
                return None
            return KeyValue(raw(item["value"]), *(item[f] for f in _KV_INTS))

        operations = []
        for op in data["operations"]:
            compare = op["compare"]
            outcome = op["outcome"]
            operations.append(
                Operation(
                    id=op["id"],
                    client=op["client"],
                    kind=Kind(op["kind"]),
                    key=raw(op["key"]),
                    value=raw(op["value"]),
                    compare=None
                    if compare is None
                    else Compare(
                        compare["mod_revision"],
                        None if compare["value"] is None else raw(compare["value"]),
                    ),
                    call=op["call"],
                    ret=op["ret"],
                    outcome=None
                    if outcome is None
                    else Outcome(outcome["revision"], kv(outcome["kv"]), outcome["succeeded"]),
                    error=op["error"],
                    known_revision=op["known_revision"],
                )
            )
        watches = [
            WatchLog(
                name=w["name"],
                start_revision=w["start_revision"],
                events=[
                    WatchEvent(
                        e["revision"],
                        EventType(e["type"]),
                        raw(e["key"]),
                        raw(e["value"]),
                        e["create_revision"],
                        e["version"],
                    )
                    for e in w["events"]
                ],
                reconnects=list(w["reconnects"]),
            )
            for w in data["watches"]
        ]
        return cls(operations, watches, data["final_revision"])

    def save(self, path: Path) -> Path:
        path.write_text(self.to_json())
        return path


_KV_INTS = ("create_revision", "mod_revision", "version")
