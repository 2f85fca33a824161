"""etcd's revision guarantees, checked over a whole history (all keys at once).

- Header revisions never decrease along one client's operations.
- Acknowledged writes have unique revisions.
- Real time: an operation that starts after another finished answers at a revision at least that
  one's, and a write that starts after another operation finished gets a higher revision.
- Every value a response shows (a read, a prev_kv, a CAS's failure-branch read) was written by a
  Put or a CAS on that key that had been called by then, and its mod_revision is that write's
  revision: the acknowledged one, or, for an indeterminate write, the same wherever it is seen.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.support.linearizability.history import Kind, Operation


@dataclass
class Findings:
    """What a set of checks found: how many facts each check verified, and each violation."""

    checked: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def add(self, check: str, problem: str | None = None) -> None:
        self.checked[check] += 1
        if problem is not None:
            self.violations.append(f"{check}: {problem}")

    def merge(self, other: Findings) -> None:
        self.checked.update(other.checked)
        self.violations += other.violations

    def report(self, limit: int = 20) -> str:
        lines = [f"{n} {check}" for check, n in sorted(self.checked.items())]
        if self.violations:
            lines.append(f"{len(self.violations)} violations:")
            lines += [f"  {v}" for v in self.violations[:limit]]
        return "\n".join(lines)


def write_revision(op: Operation) -> int | None:
    """The revision an operation wrote at, if it wrote and that is known."""
    if op.outcome is None:
        return op.known_revision
    return op.outcome.revision if op.writes else None


def check(ops: Sequence[Operation]) -> Findings:
    found = Findings()
    _client_revisions(ops, found)
    _unique_write_revisions(ops, found)
    _real_time(ops, found)
    _observed_values(ops, found)
    return found


def _client_revisions(ops: Sequence[Operation], found: Findings) -> None:
    by_client: dict[int, list[Operation]] = defaultdict(list)
    for op in ops:
        if op.outcome is not None:
            by_client[op.client].append(op)
    for client_ops in by_client.values():
        client_ops.sort(key=lambda op: op.call)
        for before, after in itertools.pairwise(client_ops):
            assert before.outcome is not None and after.outcome is not None
            problem = None
            if after.outcome.revision < before.outcome.revision:
                problem = f"{after.describe()} after {before.describe()}"
            found.add("client header revisions never decrease", problem)


def _unique_write_revisions(ops: Sequence[Operation], found: Findings) -> None:
    by_revision: dict[int, list[Operation]] = defaultdict(list)
    for op in ops:
        revision = write_revision(op)
        if revision is not None:
            by_revision[revision].append(op)
    for revision, writers in sorted(by_revision.items()):
        problem = None
        if len(writers) > 1:
            problem = f"r{revision} written by " + "; ".join(w.describe() for w in writers)
        found.add("write revisions unique", problem)


def _real_time(ops: Sequence[Operation], found: Findings) -> None:
    """A sweep in call order over the answered operations, keeping the highest revision of those
    that returned before the current call."""
    answered = [op for op in ops if op.outcome is not None and op.ret is not None]
    by_return = sorted(answered, key=lambda op: op.ret or 0)
    highest: Operation | None = None
    index = 0
    for op in sorted(answered, key=lambda op: op.call):
        while index < len(by_return) and (by_return[index].ret or 0) < op.call:
            done = by_return[index]
            assert done.outcome is not None
            if highest is None or done.outcome.revision > _revision(highest):
                highest = done
            index += 1
        if highest is None:
            continue
        assert op.outcome is not None
        problem = None
        if op.outcome.revision < _revision(highest):
            problem = f"{op.describe()} answered below {highest.describe()}, done before it"
        elif op.writes and op.outcome.revision == _revision(highest):
            problem = f"{op.describe()} wrote at the revision of {highest.describe()}"
        found.add("revisions follow real time", problem)


def _revision(op: Operation) -> int:
    assert op.outcome is not None
    return op.outcome.revision


def _observed_values(ops: Sequence[Operation], found: Findings) -> None:
    writers = {op.value: op for op in ops if op.kind in (Kind.PUT, Kind.CAS)}
    revisions_seen: dict[bytes, set[int]] = defaultdict(set)
    for op in ops:
        out = op.outcome
        if out is None or out.kv is None:
            continue
        kv = out.kv
        writer = writers.get(kv.value)
        check = "every value seen is a write's, at its revision"
        if writer is None:
            found.add(check, f"{op.describe()} shows a value nobody wrote")
            continue
        revision = write_revision(writer)
        problem = None
        if writer.key != op.key:
            problem = f"{op.describe()} shows the value of {writer.describe()}"
        elif writer.outcome is not None and not writer.writes:
            problem = f"{op.describe()} shows the value of a CAS that failed: {writer.describe()}"
        elif revision is not None and revision != kv.mod_revision:
            problem = f"{op.describe()}: mod_revision is not that of {writer.describe()}"
        elif op.ret is not None and op.ret < writer.call:
            problem = f"{op.describe()} shows a write made after it: {writer.describe()}"
        elif not 0 < kv.create_revision <= kv.mod_revision or kv.version < 1:
            problem = f"{op.describe()} shows impossible revisions"
        elif kv.mod_revision > out.revision or (op.writes and kv.mod_revision == out.revision):
            problem = f"{op.describe()} shows a revision past its own"
        found.add(check, problem)
        if writer.outcome is None:
            revisions_seen[kv.value].add(kv.mod_revision)
    for value, seen in revisions_seen.items():
        problem = None
        if len(seen) > 1:
            problem = f"the indeterminate write of {value!r} seen at revisions {sorted(seen)}"
        found.add("an indeterminate write is seen at one revision", problem)
