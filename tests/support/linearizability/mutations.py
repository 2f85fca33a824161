"""A recorded history with one thing made wrong, for showing that the checks catch it on real
histories too (each kind of fault a broken server could produce, made in the record instead)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import replace

from tests.support.linearizability.guarantees import write_revision
from tests.support.linearizability.history import History, Kind, Operation, Outcome


def all_of(history: History) -> Iterator[tuple[str, History, str]]:
    """Every mutation of `history`, with what its verification's report must then say; one
    that finds nothing to alter fails (a check never exercised cannot be said to work)."""
    for name, mutate, expected in MUTATIONS:
        altered = copy.deepcopy(history)
        if not mutate(altered):
            raise AssertionError(f"{name}: the history has nothing to alter that way")
        yield name, altered, expected


def _replace(history: History, old: Operation, new: Operation) -> None:
    history.operations[history.operations.index(old)] = new


def stale_read(history: History) -> bool:
    """A read shows what an earlier read of the key saw, although the write it really showed
    was acknowledged before it began."""
    ops = history.operations
    writers = {op.value: op for op in ops if op.writes and op.kind is not Kind.DELETE}
    gets = [op for op in ops if op.kind is Kind.GET and op.outcome and op.outcome.kv]
    for later in gets:
        assert later.outcome is not None and later.outcome.kv is not None
        writer = writers.get(later.outcome.kv.value)
        if writer is None or writer.ret is None or writer.ret >= later.call:
            continue
        for earlier in gets:
            assert earlier.outcome is not None and earlier.outcome.kv is not None
            if (
                earlier.key == later.key
                and earlier.ret is not None
                and earlier.ret < writer.call
                and earlier.outcome.kv.mod_revision < later.outcome.kv.mod_revision
            ):
                stale = Outcome(later.outcome.revision, earlier.outcome.kv)
                _replace(history, later, replace(later, outcome=stale))
                return True
    return False


def lost_write(history: History) -> bool:
    """The final read of a key shows the key as it was before the last write it showed."""
    ops = history.operations
    writers = {op.value: op for op in ops if op.writes and op.kind is not Kind.DELETE}
    finals = [op for op in ops if op.client == max(o.client for o in ops)]
    for final in finals:
        if final.outcome is None or final.outcome.kv is None:
            continue
        writer = writers.get(final.outcome.kv.value)
        if writer is not None and writer.outcome is not None:
            lost = Outcome(final.outcome.revision, writer.outcome.kv)
            _replace(history, final, replace(final, outcome=lost))
            return True
    return False


def stale_cas(history: History) -> bool:
    """A CAS whose compare did not hold (the key had changed since its client looked) writes
    anyway: the other client's update is lost."""
    for op in history.operations:
        out = op.outcome
        if op.kind is Kind.CAS and out is not None and not out.succeeded and out.kv is not None:
            _replace(history, op, replace(op, outcome=Outcome(out.revision, out.kv, True)))
            return True
    return False


def duplicate_revision(history: History) -> bool:
    """Two acknowledged writes of different keys at one revision."""
    writes = [op for op in history.operations if op.writes and op.kind is Kind.PUT]
    for first in writes:
        for second in writes:
            if first.key != second.key and first.outcome and second.outcome:
                twice = replace(second.outcome, revision=first.outcome.revision)
                _replace(history, second, replace(second, outcome=twice))
                return True
    return False


def watch_drops(history: History) -> bool:
    """The watch from the start misses the event of an acknowledged write."""
    acked = {write_revision(op) for op in history.operations if op.ok and op.writes}
    events = history.watches[0].events
    for index, event in enumerate(events):
        if event.revision in acked:
            del events[index]
            return True
    return False


def watch_repeats(history: History) -> bool:
    """The mid-way watch delivers an event a second time, right after itself."""
    events = history.watches[-1].events
    if not events:
        return False
    middle = len(events) // 2
    events.insert(middle, events[middle])
    return True


MUTATIONS: list[tuple[str, Callable[[History], bool], str]] = [
    ("stale read", stale_read, "linearizability: illegal"),
    ("lost acknowledged write", lost_write, "linearizability: illegal"),
    ("lost update through a stale CAS", stale_cas, "linearizability: illegal"),
    ("duplicate revision", duplicate_revision, "write revisions unique: r"),
    ("watch missing an event", watch_drops, "every acknowledged write delivered: missing"),
    ("watch repeating an event", watch_repeats, "delivered again"),
]
