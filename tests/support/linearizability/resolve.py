"""What the evidence says about the operations whose clients never heard back.

An indeterminate Put or CAS whose (unique) value anyone saw took effect, at the revision it was
seen at. With a *complete* watch (from the first revision through the final one, every revision
delivered, every event a write of the history: watches.check passed), the store's whole write
sequence is known, so an indeterminate write it does not show never happened and is dropped, and
an indeterminate Delete is dropped when no Delete event of its key is left unexplained by the
acknowledged ones (it deleted nothing). A failed read is dropped: it changed nothing.

This keeps the search small: an unexplained indeterminate operation is a candidate at every step
of the search after its call, and a few dozen of them make it exponential. Without a complete
watch nothing is dropped that might have happened, and unknown revisions stay unknown.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from tests.support.linearizability.guarantees import write_revision
from tests.support.linearizability.history import EventType, Kind, Operation, WatchLog


@dataclass
class Resolution:
    operations: list[Operation]
    #: Indeterminate writes found to have taken effect, and those dropped (never happened, or
    #: changed nothing), and indeterminate ones left for the search to place.
    took_effect: int = 0
    dropped: int = 0
    open: int = 0


def resolve(ops: Sequence[Operation], complete: WatchLog | None = None) -> Resolution:
    seen_at: dict[bytes, int] = {}
    for op in ops:
        if op.outcome is not None and op.outcome.kv is not None:
            seen_at.setdefault(op.outcome.kv.value, op.outcome.kv.mod_revision)
    unexplained_deletes: dict[bytes, list[int]] = defaultdict(list)
    if complete is not None:
        acked = {r for op in ops if op.outcome is not None and (r := write_revision(op))}
        for event in complete.events:
            if event.type is EventType.PUT:
                seen_at.setdefault(event.value, event.revision)
            elif event.revision not in acked:
                unexplained_deletes[event.key].append(event.revision)
    open_deletes: dict[bytes, int] = defaultdict(int)
    for op in ops:
        if op.kind is Kind.DELETE and op.outcome is None:
            open_deletes[op.key] += 1

    result = Resolution([])
    for op in ops:
        if op.outcome is not None:
            result.operations.append(op)
        elif op.kind is Kind.GET:
            result.dropped += 1
        elif op.kind is Kind.DELETE:
            events = unexplained_deletes[op.key]
            if complete is not None and not events:
                result.dropped += 1
            elif complete is not None and len(events) == 1 and open_deletes[op.key] == 1:
                result.took_effect += 1
                result.operations.append(replace(op, known_revision=events[0]))
            else:
                result.open += 1
                result.operations.append(op)
        elif op.value in seen_at:
            result.took_effect += 1
            result.operations.append(replace(op, known_revision=seen_at[op.value]))
        elif complete is not None:
            result.dropped += 1
        else:
            result.open += 1
            result.operations.append(op)
    return result
