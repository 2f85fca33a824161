"""The Wing-Gong linearizability search with Lowe's memoisation, as Porcupine does it.

The history of each key is checked on its own (every operation touches one key, so the whole
history is linearizable iff each key's is; see model for how the keys' searches still share the
global revision order). A partition's calls and returns are one time-ordered list; the search
repeatedly takes the first call it can apply to the model, removes it and its return from the
list ("lift"), and backs up (undoing the last lift) when it meets a return whose call it could
not place. A (set of linearized operations, state) pair already explored is never explored
again: that cache is what makes the search practical.

An indeterminate operation returns at infinity: it may be linearized anywhere after its call, or
at the very end (where it changes nothing anyone saw), which stands for "never happened".

A time cap ends the search with UNKNOWN, never with a pass.
"""

from __future__ import annotations

import enum
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from tests.support.linearizability import model
from tests.support.linearizability.history import Operation

#: Return time of indeterminate operations: after everything.
INFINITY = 2**63


class Timed(Protocol):
    """What the search needs of an operation (the model's step function needs the rest)."""

    @property
    def call(self) -> int: ...

    @property
    def ret(self) -> int | None: ...

    def describe(self) -> str: ...


Op = TypeVar("Op", bound=Timed)
State = TypeVar("State", bound=Hashable)


class Verdict(enum.StrEnum):
    OK = "ok"
    ILLEGAL = "illegal"
    UNKNOWN = "unknown"


@dataclass
class PartitionResult(Generic[Op, State]):
    key: bytes
    verdict: Verdict
    operations: int
    #: ILLEGAL: the longest linearization found, in order, and the state after it.
    state: State
    longest: list[Op] = field(default_factory=list)
    #: Operations tried against the model (the search's work).
    steps: int = 0
    #: ILLEGAL: the operation whose return came before it could be placed after `longest`,
    #: and the operations whose calls came before that return (the candidates that failed).
    blocked: Op | None = None
    candidates: list[Op] = field(default_factory=list)

    def report(self, context: int = 8) -> str:
        key = self.key.decode(errors="replace")
        lines = [f"key {key}: {self.verdict.value} ({self.operations} operations)"]
        if self.verdict is Verdict.UNKNOWN:
            lines.append(f"  time cap reached after {self.steps} steps")
        if self.verdict is not Verdict.ILLEGAL:
            return "\n".join(lines)
        lines.append(
            f"  longest linearization: {len(self.longest)} operations; its last {context}:"
        )
        lines += [f"    {op.describe()}" for op in self.longest[-context:]]
        lines.append(f"  state then: {self.state}")
        if self.blocked is not None:
            lines.append(f"  returned before it could be placed: {self.blocked.describe()}")
        lines.append("  none of these could come next:")
        lines += [f"    {op.describe()}" for op in self.candidates[:context]]
        return "\n".join(lines)


@dataclass
class Result:
    verdict: Verdict
    partitions: list[PartitionResult[Operation, model.State]]
    seconds: float

    def report(self) -> str:
        bad = [p for p in self.partitions if p.verdict is not Verdict.OK]
        head = (
            f"linearizability: {self.verdict.value}, {len(self.partitions)} keys, "
            f"{sum(p.operations for p in self.partitions)} operations, "
            f"{sum(p.steps for p in self.partitions)} steps, {self.seconds:.2f}s"
        )
        return "\n".join([head, *(p.report() for p in bad)])


class _Node(Generic[Op]):
    """A call or return entry of the doubly linked list the search lifts entries out of."""

    __slots__ = ("index", "match", "next", "op", "prev")

    def __init__(self, op: Op | None, index: int) -> None:
        self.op = op
        self.index = index
        #: A call's return entry; None for a return (and the head).
        self.match: _Node[Op] | None = None
        self.prev: _Node[Op] | None = None
        self.next: _Node[Op] | None = None


def _entry_list(ops: Sequence[Op]) -> _Node[Op]:
    """The list's head: calls and returns by time, a call before a return at the same time (so
    operations that touch count as concurrent)."""
    events: list[tuple[int, int, int]] = []
    for index, op in enumerate(ops):
        events.append((op.call, 0, index))
        events.append((INFINITY if op.ret is None else op.ret, 1, index))
    events.sort()
    head: _Node[Op] = _Node(None, -1)
    calls: dict[int, _Node[Op]] = {}
    last = head
    for _, is_return, index in events:
        node = _Node(ops[index], index)
        if is_return:
            calls[index].match = node
        else:
            calls[index] = node
        node.prev, last.next = last, node
        last = node
    return head


def _lift(call: _Node[Op]) -> None:
    assert call.prev is not None and call.next is not None and call.match is not None
    call.prev.next = call.next
    call.next.prev = call.prev
    ret = call.match
    assert ret.prev is not None
    ret.prev.next = ret.next
    if ret.next is not None:
        ret.next.prev = ret.prev


def _unlift(call: _Node[Op]) -> None:
    assert call.prev is not None and call.next is not None and call.match is not None
    ret = call.match
    assert ret.prev is not None
    ret.prev.next = ret
    if ret.next is not None:
        ret.next.prev = ret
    call.prev.next = call
    call.next.prev = call


def search(
    key: bytes,
    ops: Sequence[Op],
    step: Callable[[State, Op], State | None],
    initial: State,
    deadline: float,
) -> PartitionResult[Op, State]:
    """Search one partition's history for a linearization from `initial`, until `deadline`
    (time.monotonic())."""
    result: PartitionResult[Op, State] = PartitionResult(key, Verdict.OK, len(ops), initial)
    head = _entry_list(ops)
    entry = head.next
    state = initial
    linearized = 0
    cache: set[tuple[int, State]] = set()
    calls: list[tuple[_Node[Op], State]] = []
    while head.next is not None:
        assert entry is not None
        result.steps += 1
        if result.steps % 2048 == 0 and time.monotonic() > deadline:
            result.verdict = Verdict.UNKNOWN
            return result
        if entry.match is not None:  # a call: try to linearize it here
            assert entry.op is not None
            after = step(state, entry.op)
            if after is not None:
                bits = linearized | (1 << entry.index)
                if (bits, after) not in cache:
                    cache.add((bits, after))
                    calls.append((entry, state))
                    state, linearized = after, bits
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
            continue
        # A return whose call is not linearized yet: back up. The deepest such point is what
        # a report shows (kept only here: copying the stack whenever it grew is quadratic).
        if result.blocked is None or len(calls) > len(result.longest):
            result.longest = [c.op for c, _ in calls if c.op is not None]
            result.state = state
            result.blocked = entry.op
            result.candidates = _calls_before(head, entry)
        if not calls:
            result.verdict = Verdict.ILLEGAL
            return result
        entry, state = calls.pop()
        linearized &= ~(1 << entry.index)
        _unlift(entry)
        entry = entry.next
    return result


def _calls_before(head: _Node[Op], stop: _Node[Op]) -> list[Op]:
    found = []
    node = head.next
    while node is not None and node is not stop:
        if node.match is not None and node.op is not None:
            found.append(node.op)
        node = node.next
    return found


def check(ops: Sequence[Operation], timeout: float = 30.0) -> Result:
    """Check a whole history, one key at a time; UNKNOWN if `timeout` seconds run out."""
    began = time.monotonic()
    deadline = began + timeout
    by_key: dict[bytes, list[Operation]] = defaultdict(list)
    for op in ops:
        by_key[op.key].append(op)
    partitions = []
    for key in sorted(by_key):
        partitions.append(search(key, by_key[key], model.step, model.INITIAL, deadline))
    verdicts = {p.verdict for p in partitions}
    verdict = (
        Verdict.ILLEGAL
        if Verdict.ILLEGAL in verdicts
        else Verdict.UNKNOWN
        if Verdict.UNKNOWN in verdicts
        else Verdict.OK
    )
    return Result(verdict, partitions, time.monotonic() - began)
