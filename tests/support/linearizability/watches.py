"""Watch logs against the history: every write exactly once, in revision order, as written.

A logical watch may span several streams (it reconnects from the last revision it saw + 1 after a
fault); what counts is everything it received. For each watch:

- revisions strictly increase (one event per revision: every operation touches one key), so no
  event is repeated or reordered, and none precedes the revision the watch started from;
- every event is a write of the history at its revision: a Put event shows the value, key and
  revision of the write of that value (acknowledged, or indeterminate and seen at most once), a
  Delete event the revision of an acknowledged Delete of that key, or of an indeterminate one;
- every acknowledged write from the watch's start through the final revision is there;
- with `dense` (nothing but the history writes in the store, and the watch covers every key it
  writes), every revision from the start through the final revision is there: an indeterminate
  write that took effect is delivered too.

Two watches must also agree on every revision both received.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

from tests.support.linearizability.guarantees import Findings, write_revision
from tests.support.linearizability.history import EventType, Kind, Operation, WatchEvent, WatchLog

#: A store starts at revision 1, empty: its first write is revision 2.
FIRST_WRITE = 2


def check(
    logs: Sequence[WatchLog], ops: Sequence[Operation], final_revision: int, dense: bool = True
) -> Findings:
    found = Findings()
    for log in logs:
        found.merge(check_log(log, ops, final_revision, dense))
    found.merge(agree(logs))
    return found


def check_log(
    log: WatchLog, ops: Sequence[Operation], final_revision: int, dense: bool = True
) -> Findings:
    found = Findings()
    name = f"watch {log.name}"
    by_value = {op.value: op for op in ops if op.kind in (Kind.PUT, Kind.CAS)}
    acked = {r: op for op in ops if op.outcome is not None and (r := write_revision(op))}
    open_deletes = Counter(op.key for op in ops if op.kind is Kind.DELETE and op.outcome is None)
    delivered: set[int] = set()
    values: set[bytes] = set()
    last = 0
    for event in log.events:
        problem = None
        if event.revision in delivered:
            problem = f"{_text(event)} delivered again"
        elif event.revision < last:
            problem = f"{_text(event)} after r{last}"
        elif event.revision < log.start_revision:
            problem = f"{_text(event)} before the start, r{log.start_revision}"
        found.add(f"{name}: events in revision order, once", problem)
        delivered.add(event.revision)
        last = max(last, event.revision)
        if event.type is EventType.PUT:
            problem = _put_problem(event, by_value.get(event.value))
            if problem is None and event.value in values:
                problem = f"{_text(event)}: that write was delivered before"
            values.add(event.value)
        else:
            problem = _delete_problem(event, acked.get(event.revision), open_deletes)
        found.add(f"{name}: every event is a write of the history", problem)
    for revision, op in sorted(acked.items()):
        if log.start_revision <= revision <= final_revision:
            problem = None if revision in delivered else f"missing: {op.describe()}"
            found.add(f"{name}: every acknowledged write delivered", problem)
    if dense and final_revision:
        first = max(log.start_revision, FIRST_WRITE)
        missing = sorted(set(range(first, final_revision + 1)) - delivered)
        problem = None
        if missing:
            problem = f"no event at {len(missing)} revisions, e.g. r{missing[0]}"
        found.add(f"{name}: every revision through the final one delivered", problem)
    return found


def _put_problem(event: WatchEvent, writer: Operation | None) -> str | None:
    if writer is None:
        return f"{_text(event)}: nobody wrote that value"
    revision = write_revision(writer)
    if writer.key != event.key:
        return f"{_text(event)} shows the value of {writer.describe()}"
    if writer.outcome is not None and not writer.writes:
        return f"{_text(event)} is a CAS that failed: {writer.describe()}"
    if revision is not None and revision != event.revision:
        return f"{_text(event)} is not at the revision of {writer.describe()}"
    if writer.outcome is not None:  # an answered write showed its prev_kv: the key's metadata
        prev = writer.outcome.kv
        version = 1 if prev is None else prev.version + 1
        created = event.revision if prev is None else prev.create_revision
        if (event.version, event.create_revision) != (version, created):
            return f"{_text(event)}: not the version or create_revision after {writer.describe()}"
    return None


def _delete_problem(
    event: WatchEvent, writer: Operation | None, open_deletes: Counter[bytes]
) -> str | None:
    if writer is not None:
        if writer.kind is not Kind.DELETE or writer.key != event.key:
            return f"{_text(event)}, but r{event.revision} is {writer.describe()}"
        return None
    if open_deletes[event.key] == 0:
        return f"{_text(event)}: no Delete of that key made it"
    open_deletes[event.key] -= 1  # each indeterminate Delete explains one event at most
    return None


def agree(logs: Sequence[WatchLog]) -> Findings:
    """Whether the watches received the same event wherever they received one at the same
    revision."""
    found = Findings()
    events: dict[int, set[WatchEvent]] = defaultdict(set)
    for log in logs:
        for event in log.events:
            events[event.revision].add(event)
    if len(logs) < 2:
        return found
    for revision, seen in sorted(events.items()):
        problem = None if len(seen) == 1 else f"r{revision}: " + " vs ".join(map(_text, seen))
        found.add("watches agree on every revision", problem)
    return found


def _text(event: WatchEvent) -> str:
    key = event.key.decode(errors="replace")
    if event.type is EventType.DELETE:
        return f"delete {key} at r{event.revision}"
    value = event.value.decode(errors="replace")
    return f"put {key}={value} at r{event.revision} (c{event.create_revision}/v{event.version})"
