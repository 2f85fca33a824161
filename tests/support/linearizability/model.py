"""etcd's KV for one key, as the step function of the linearizability search.

The state is the key's value with its create_revision, mod_revision and version (so every read's
and prev_kv's revisions and version are checked exactly), and a *floor*: the highest revision that
an operation linearized so far on this key is known to have been at. etcd orders writes by
revision and answers a read at the revision its snapshot had, so in any linearization a write
made after others on the key has a higher revision than they and than any read before it
(`revision > floor`), and a read never shows an older snapshot than one already linearized
(`header revision >= floor`). This ties the per-key searches to the one global revision order.

An indeterminate write's revision is known when anything showed its value (see resolve);
otherwise the state holds None for it. A client only compares a mod_revision it saw, and a write
anyone saw is resolved, so an unknown revision equals none that a client compares against.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.support.linearizability.history import Compare, KeyValue, Kind, Operation


@dataclass(frozen=True, slots=True)
class Stored:
    value: bytes
    #: None: the revision of an indeterminate write nobody saw.
    create_revision: int | None
    mod_revision: int | None
    version: int


@dataclass(frozen=True, slots=True)
class State:
    kv: Stored | None
    floor: int


INITIAL = State(None, 0)


def matches(stored: Stored | None, seen: KeyValue | None) -> bool:
    """Whether a response's view of the key is the state (unknown revisions match any)."""
    if stored is None or seen is None:
        return stored is None and seen is None
    return (
        stored.value == seen.value
        and stored.version == seen.version
        and stored.mod_revision in (None, seen.mod_revision)
        and stored.create_revision in (None, seen.create_revision)
    )


def holds(stored: Stored | None, compare: Compare) -> bool:
    """etcd's compare of one key: a value compare fails on an absent key; an absent key's
    mod_revision is 0."""
    if compare.value is not None:
        return stored is not None and stored.value == compare.value
    if stored is None:
        return compare.mod_revision == 0
    return stored.mod_revision == compare.mod_revision


def _write(state: State, value: bytes, revision: int | None) -> State | None:
    """`state` after a put of `value` at `revision` (None: unknown), or None if the revision
    cannot come after what is already linearized."""
    if revision is not None and revision <= state.floor:
        return None
    prev = state.kv
    kv = Stored(
        value,
        prev.create_revision if prev is not None else revision,
        revision,
        prev.version + 1 if prev is not None else 1,
    )
    return State(kv, state.floor if revision is None else revision)


def _read(state: State, revision: int, seen: KeyValue | None) -> State | None:
    """A read at `revision` that saw `seen`."""
    if revision < state.floor or not matches(state.kv, seen):
        return None
    return State(state.kv, revision)


def step(state: State, op: Operation) -> State | None:
    """The state after `op`, or None if `op` cannot be linearized in `state`."""
    out = op.outcome
    if op.kind is Kind.GET:
        return None if out is None else _read(state, out.revision, out.kv)
    if op.kind is Kind.PUT:
        if out is None:
            return _write(state, op.value, op.known_revision)
        if not matches(state.kv, out.kv):
            return None
        return _write(state, op.value, out.revision)
    if op.kind is Kind.DELETE:
        return _delete(state, op)
    assert op.compare is not None
    held = holds(state.kv, op.compare)
    if out is None:
        if held:
            return _write(state, op.value, op.known_revision)
        # Had it written, someone would have seen its value.
        return state if op.known_revision is None else None
    if held != out.succeeded:
        return None
    if out.succeeded:
        return _write(state, op.value, out.revision) if matches(state.kv, out.kv) else None
    return _read(state, out.revision, out.kv)


def _delete(state: State, op: Operation) -> State | None:
    out = op.outcome
    if out is None:
        if state.kv is None:  # nothing to delete: no revision, no event
            return None if op.known_revision is not None else state
        revision = op.known_revision
        if revision is not None and revision <= state.floor:
            return None
        return State(None, state.floor if revision is None else revision)
    if not out.succeeded:
        return _read(state, out.revision, None)
    if state.kv is None or not matches(state.kv, out.kv) or out.revision <= state.floor:
        return None
    return State(None, out.revision)
