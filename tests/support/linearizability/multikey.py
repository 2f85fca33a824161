"""A scenario across two keys, checked on the whole history without partitioning.

Per-key partitions cannot see whether a Txn that writes two keys is atomic: a Range over both
keys must show both of its writes or neither, at one revision. Clients here run a SWAP (a Txn
comparing both keys' mod_revisions, putting both with prev_kv if they hold and reading both if
not), a READ (one Range over both keys), and a PUT of one key, so reads see the keys diverge and
converge. The model is the pair of keys (as model.Stored) with the one revision floor.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc

from kine_server.pb import rpc_pb2 as pb
from kine_server.pb import rpc_pb2_grpc
from tests.support.linearizability import checker
from tests.support.linearizability.history import Compare, KeyValue
from tests.support.linearizability.model import Stored, holds, matches
from tests.support.linearizability.recorder import channel

KEYS = (b"/lin2/a", b"/lin2/b")
RANGE_END = b"/lin2/c"


class MultiKind(enum.StrEnum):
    READ = "read"
    SWAP = "swap"
    PUT = "put"


Pair = tuple[KeyValue | None, KeyValue | None]


@dataclass(frozen=True)
class MultiOutcome:
    """`kvs`: READ, both keys; SWAP, both prev_kvs (held) or both as read (not); PUT, its
    key's prev_kv (the other None)."""

    revision: int
    kvs: Pair
    succeeded: bool = True


@dataclass(frozen=True)
class MultiOp:
    id: int
    client: int
    kind: MultiKind
    #: PUT: which key.
    index: int = 0
    #: SWAP: the values for both keys; PUT: its value first.
    values: tuple[bytes, bytes] = (b"", b"")
    #: SWAP: the mod_revisions compared.
    compare: tuple[int, int] = (0, 0)
    call: int = 0
    ret: int | None = None
    outcome: MultiOutcome | None = None
    known_revision: int | None = None

    def describe(self) -> str:
        what = f"{self.kind.value}"
        if self.kind is MultiKind.PUT:
            what += f"({KEYS[self.index].decode()}, {self.values[0].decode()})"
        elif self.kind is MultiKind.SWAP:
            what += f"({self.values[0].decode()}, {self.values[1].decode()}, if {self.compare})"
        span = f"[{self.call / 1e9:.6f}, " + (
            "∞)" if self.ret is None else f"{self.ret / 1e9:.6f}]"
        )
        out = self.outcome
        if out is None:
            return f"#{self.id} c{self.client} {what} {span} -> ?"
        return (
            f"#{self.id} c{self.client} {what} {span} -> r{out.revision} {out.succeeded} {out.kvs}"
        )


#: Both keys and the revision floor (see model).
State = tuple[Stored | None, Stored | None, int]
INITIAL: State = (None, None, 0)


def _put(stored: Stored | None, value: bytes, revision: int | None) -> Stored:
    if stored is None:
        return Stored(value, revision, revision, 1)
    return Stored(value, stored.create_revision, revision, stored.version + 1)


def step(state: State, op: MultiOp) -> State | None:
    a, b, floor = state
    out = op.outcome
    revision = op.known_revision if out is None else out.revision
    if revision is not None and (revision < floor or (revision == floor and _writes(op))):
        return None
    after = floor if revision is None else revision
    if op.kind is MultiKind.READ:
        if out is None or not (matches(a, out.kvs[0]) and matches(b, out.kvs[1])):
            return None
        return (a, b, after)
    if op.kind is MultiKind.PUT:
        stored = (a, b)[op.index]
        if out is not None and not matches(stored, out.kvs[op.index]):
            return None
        new = _put(stored, op.values[0], revision)
        return (new, b, after) if op.index == 0 else (a, new, after)
    held = holds(a, Compare(op.compare[0])) and holds(b, Compare(op.compare[1]))
    if out is None:
        if not held:
            return None if op.known_revision is not None else state
    elif held != out.succeeded or not (matches(a, out.kvs[0]) and matches(b, out.kvs[1])):
        return None
    if held:
        return (_put(a, op.values[0], revision), _put(b, op.values[1], revision), after)
    return (a, b, after)


def _writes(op: MultiOp) -> bool:
    if op.outcome is None:
        return op.known_revision is not None
    return op.kind is MultiKind.PUT or (op.kind is MultiKind.SWAP and op.outcome.succeeded)


def check(ops: Sequence[MultiOp], timeout: float = 30.0) -> tuple[checker.Verdict, str]:
    """Resolve the indeterminate writes by the values seen (no watch here: the unseen stay open,
    so the history should have few), check unique revisions, and search the whole history."""
    seen: dict[bytes, int] = {}
    for op in ops:
        for kv in op.outcome.kvs if op.outcome else ():
            if kv is not None:
                seen.setdefault(kv.value, kv.mod_revision)
    resolved = []
    for op in ops:
        if op.outcome is None and op.kind is MultiKind.READ:
            continue
        if op.outcome is None and op.values[0] in seen:
            op = replace(op, known_revision=seen[op.values[0]])
        resolved.append(op)
    revisions = Counter(op.outcome.revision for op in resolved if op.outcome and _writes(op))
    twice = [r for r, n in revisions.items() if n > 1]
    if twice:
        return checker.Verdict.ILLEGAL, f"write revisions not unique: {twice[:5]}"
    deadline = time.monotonic() + timeout
    result = checker.search(b"(both keys)", resolved, step, INITIAL, deadline)
    return result.verdict, result.report()


class MultiClients:
    def __init__(self, address: str, clients: int, seed: int, deadline: float = 5.0) -> None:
        self.address = address
        self.clients = clients
        self.seed = seed
        self.deadline = deadline
        self.operations: list[MultiOp] = []
        self._ids = itertools.count()

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._client(n, stop) for n in range(self.clients)))

    async def _client(self, client: int, stop: asyncio.Event) -> None:
        rng = random.Random(self.seed * 1_000 + client)
        conn = channel(self.address)
        kv = rpc_pb2_grpc.KVStub(conn)
        seen: Pair = (None, None)
        try:
            while not stop.is_set():
                kind = rng.choice([MultiKind.READ, MultiKind.SWAP, MultiKind.SWAP, MultiKind.PUT])
                op_id = next(self._ids)
                values = (b"c%d-%d-a" % (client, op_id), b"c%d-%d-b" % (client, op_id))
                mods = (_mod(seen[0]), _mod(seen[1]))
                op = MultiOp(op_id, client, kind, rng.randrange(2), values, mods)
                op = replace(op, call=time.monotonic_ns())
                try:
                    outcome = await self._call(kv, op)
                except grpc.aio.AioRpcError:
                    self.operations.append(op)
                    seen = (None, None)
                    await asyncio.sleep(0.02)
                    continue
                op = replace(op, ret=time.monotonic_ns(), outcome=outcome)
                self.operations.append(op)
                seen = _after(op, seen)
        finally:
            await conn.close()

    async def _call(self, kv: rpc_pb2_grpc.KVStub, op: MultiOp) -> MultiOutcome:
        options: dict[str, Any] = {"timeout": self.deadline, "wait_for_ready": True}
        if op.kind is MultiKind.READ:
            got = await kv.Range(pb.RangeRequest(key=KEYS[0], range_end=RANGE_END), **options)
            found = {item.key: _kv(item) for item in got.kvs}
            return MultiOutcome(got.header.revision, (found.get(KEYS[0]), found.get(KEYS[1])))
        if op.kind is MultiKind.PUT:
            request = pb.PutRequest(key=KEYS[op.index], value=op.values[0], prev_kv=True)
            put = await kv.Put(request, **options)
            prev = _kv(put.prev_kv) if put.HasField("prev_kv") else None
            return MultiOutcome(
                put.header.revision, (prev, None) if op.index == 0 else (None, prev)
            )
        txn = await kv.Txn(
            pb.TxnRequest(
                compare=[
                    pb.Compare(key=k, target=pb.Compare.MOD, mod_revision=m)
                    for k, m in zip(KEYS, op.compare, strict=True)
                ],
                success=[
                    pb.RequestOp(request_put=pb.PutRequest(key=k, value=v, prev_kv=True))
                    for k, v in zip(KEYS, op.values, strict=True)
                ],
                failure=[pb.RequestOp(request_range=pb.RangeRequest(key=k)) for k in KEYS],
            ),
            **options,
        )
        kvs: list[KeyValue | None] = []
        for response in txn.responses:
            if txn.succeeded:
                put = response.response_put
                kvs.append(_kv(put.prev_kv) if put.HasField("prev_kv") else None)
            else:
                got = response.response_range
                kvs.append(_kv(got.kvs[0]) if got.kvs else None)
        return MultiOutcome(txn.header.revision, (kvs[0], kvs[1]), txn.succeeded)


def _mod(kv: KeyValue | None) -> int:
    return 0 if kv is None else kv.mod_revision


def _after(op: MultiOp, seen: Pair) -> Pair:
    """Both keys as an answered operation left them, as far as its client can tell."""
    out = op.outcome
    assert out is not None

    def written(prev: KeyValue | None, value: bytes) -> KeyValue:
        if prev is None:
            return KeyValue(value, out.revision, out.revision, 1)
        return KeyValue(value, prev.create_revision, out.revision, prev.version + 1)

    if op.kind is MultiKind.PUT:
        new = written(out.kvs[op.index], op.values[0])
        return (new, seen[1]) if op.index == 0 else (seen[0], new)
    if op.kind is MultiKind.SWAP and out.succeeded:
        return (written(out.kvs[0], op.values[0]), written(out.kvs[1], op.values[1]))
    return out.kvs


def _kv(item: Any) -> KeyValue:
    return KeyValue(item.value, item.create_revision, item.mod_revision, item.version)
