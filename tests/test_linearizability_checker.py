"""The linearizability checker and its companions must be able to fail: synthetic histories with
a stale read, a lost acknowledged write, a lost update through a stale CAS, a duplicate revision,
a watch missing, repeating or inventing an event are all flagged, and the histories a correct
etcd can produce (concurrent, indeterminate operations taking effect late or never) pass.

Times are abstract integers; revisions are as etcd's (a store starts at 1, its first write is 2).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

from tests.support.linearizability import checker, guarantees, multikey, watches
from tests.support.linearizability.checker import Verdict
from tests.support.linearizability.history import (
    Compare,
    EventType,
    History,
    KeyValue,
    Kind,
    Operation,
    Outcome,
    WatchEvent,
    WatchLog,
)
from tests.support.linearizability.multikey import MultiKind, MultiOp, MultiOutcome
from tests.support.linearizability.resolve import resolve
from tests.support.linearizability.verify import verify

A, B = b"/lin/a", b"/lin/b"


Span = tuple[int, int | None]


class Ops:
    """Builds a history: each method appends one operation (indeterminate if its span has no
    end) and returns it."""

    def __init__(self) -> None:
        self.ops: list[Operation] = []
        self._ids = itertools.count()

    def _add(
        self,
        kind: Kind,
        key: bytes,
        span: Span,
        outcome: Outcome,
        client: int,
        value: bytes = b"",
        compare: Compare | None = None,
    ) -> Operation:
        call, ret = span
        op = Operation(
            next(self._ids),
            client,
            kind,
            key,
            value,
            compare,
            call,
            ret,
            None if ret is None else outcome,
            "UNAVAILABLE" if ret is None else "",
        )
        self.ops.append(op)
        return op

    def get(
        self, key: bytes, span: Span, revision: int, seen: KeyValue | None, client: int = 0
    ) -> Operation:
        return self._add(Kind.GET, key, span, Outcome(revision, seen), client)

    def put(
        self,
        key: bytes,
        value: bytes,
        span: Span,
        revision: int = 0,
        prev: KeyValue | None = None,
        client: int = 0,
    ) -> Operation:
        return self._add(Kind.PUT, key, span, Outcome(revision, prev), client, value)

    def delete(
        self, key: bytes, span: Span, revision: int = 0, prev: KeyValue | None = None
    ) -> Operation:
        return self._add(Kind.DELETE, key, span, Outcome(revision, prev, prev is not None), 0)

    def cas(
        self,
        key: bytes,
        value: bytes,
        compare: Compare,
        span: Span,
        revision: int = 0,
        succeeded: bool = True,
        seen: KeyValue | None = None,
        client: int = 0,
    ) -> Operation:
        outcome = Outcome(revision, seen, succeeded)
        return self._add(Kind.CAS, key, span, outcome, client, value, compare)


def kv(value: bytes, create: int, mod: int, version: int = 1) -> KeyValue:
    return KeyValue(value, create, mod, version)


def verdict(ops: list[Operation]) -> Verdict:
    return checker.check(ops, timeout=10).verdict


def violations(ops: list[Operation]) -> list[str]:
    return guarantees.check(ops).violations


def puts(*events: tuple[int, bytes, bytes]) -> list[WatchEvent]:
    """Put events of keys' first versions."""
    return [WatchEvent(r, EventType.PUT, k, v, r, 1) for r, k, v in events]


# -- histories a correct etcd can produce ------------------------------------------------------


def test_a_sequential_history_passes() -> None:
    h = Ops()
    h.put(A, b"1", (0, 1), 2)
    h.get(A, (2, 3), 2, kv(b"1", 2, 2))
    h.cas(A, b"2", Compare(2), (4, 5), 3, True, kv(b"1", 2, 2))
    h.cas(A, b"3", Compare(2), (6, 7), 3, False, kv(b"2", 2, 3, 2))
    h.cas(A, b"4", Compare(value=b"2"), (8, 9), 4, True, kv(b"2", 2, 3, 2))
    h.delete(A, (10, 11), 5, kv(b"4", 2, 4, 3))
    h.delete(A, (12, 13), 5, None)
    h.cas(A, b"5", Compare(value=b"4"), (14, 15), 5, False, None)  # value compare: absent fails
    h.cas(A, b"7", Compare(4), (15, 16), 5, False, None)  # an absent key's mod_revision is 0
    h.cas(A, b"6", Compare(0), (16, 17), 6, True, None)  # mod 0: create if absent
    h.get(A, (18, 19), 6, kv(b"6", 6, 6))
    assert verdict(h.ops) is Verdict.OK
    assert violations(h.ops) == []


def test_concurrent_operations_take_effect_in_some_order_within_their_spans() -> None:
    h = Ops()
    h.put(A, b"1", (0, 10), 3, kv(b"2", 2, 2), client=1)  # called first, took effect second
    h.put(A, b"2", (1, 9), 2, None, client=2)
    h.get(A, (2, 3), 1, None, client=3)  # before both
    h.get(A, (4, 11), 2, kv(b"2", 2, 2), client=4)  # between them
    h.get(A, (12, 13), 3, kv(b"1", 2, 3, 2), client=3)
    h.put(B, b"3", (14, 15), 4, None, client=5)
    assert verdict(h.ops) is Verdict.OK
    assert violations(h.ops) == []


def test_an_indeterminate_write_may_take_effect_late_or_never() -> None:
    h = Ops()
    h.put(A, b"late", (0, None))
    h.put(A, b"never", (0, None))
    h.get(A, (5, 6), 1, None)  # not yet
    h.get(A, (7, 8), 2, kv(b"late", 2, 2))  # now
    assert verdict(h.ops) is Verdict.OK
    resolved = resolve(h.ops).operations
    assert [op.known_revision for op in resolved if not op.ok] == [2, None]
    assert verdict(resolved) is Verdict.OK


# -- histories no correct etcd produces ---------------------------------------------------------


def test_a_stale_read_is_flagged() -> None:
    h = Ops()
    h.put(A, b"1", (0, 1), 2)
    h.put(A, b"2", (2, 3), 3, kv(b"1", 2, 2))
    h.get(A, (4, 5), 3, kv(b"1", 2, 2))  # the current revision, an old snapshot
    result = checker.check(h.ops)
    assert result.verdict is Verdict.ILLEGAL
    report = result.report()
    assert "key /lin/a: illegal" in report
    assert "returned before it could be placed: #2 " in report
    # Answered at the old revision instead: the revision order says so too.
    h.ops[-1] = Operation(2, 0, Kind.GET, A, call=4, ret=5, outcome=Outcome(2, kv(b"1", 2, 2)))
    assert verdict(h.ops) is Verdict.ILLEGAL
    assert any("revisions follow real time" in v for v in violations(h.ops))


def test_a_read_shows_every_write_below_its_revision() -> None:
    h = Ops()
    h.put(A, b"1", (0, 10), 2, client=1)
    h.get(A, (1, 2), 3, None, client=2)  # concurrent with the put, but at a revision after it
    assert violations(h.ops) == []  # real time alone allows it
    assert verdict(h.ops) is Verdict.ILLEGAL


def test_a_lost_acknowledged_write_is_flagged() -> None:
    h = Ops()
    h.put(A, b"1", (0, 1), 2)
    h.get(A, (2, 3), 2, None)
    assert verdict(h.ops) is Verdict.ILLEGAL
    # A watch that never delivers it is flagged whatever the reads say.
    lost = WatchLog("from-start", 1, [])
    found = watches.check([lost], h.ops[:1], final_revision=2)
    assert any("every acknowledged write delivered" in v for v in found.violations)


def test_a_lost_update_through_a_stale_cas_is_flagged() -> None:
    h = Ops()
    h.put(A, b"1", (0, 1), 2, client=1)
    h.get(A, (2, 3), 2, kv(b"1", 2, 2), client=1)
    h.put(A, b"2", (4, 5), 3, kv(b"1", 2, 2), client=2)
    # Client 1's CAS on what it saw holds although client 2's write came in between. Whether the
    # server then shows the stale prev_kv or the real one, the history is not linearizable.
    stale = h.cas(A, b"3", Compare(2), (6, 7), 4, True, kv(b"1", 2, 2), client=1)
    assert verdict(h.ops) is Verdict.ILLEGAL
    h.ops[-1] = Operation(
        stale.id, 1, Kind.CAS, A, b"3", Compare(2), 6, 7, Outcome(4, kv(b"2", 2, 3, 2))
    )
    assert verdict(h.ops) is Verdict.ILLEGAL


def test_duplicate_revisions_are_flagged() -> None:
    h = Ops()
    h.put(A, b"1", (0, 1), 2)
    h.put(B, b"2", (0, 1), 2)  # another key: only the global check sees it
    assert verdict(h.ops) is Verdict.OK
    assert any("write revisions unique" in v for v in violations(h.ops))
    h.put(A, b"3", (2, 3), 2, kv(b"1", 2, 2))  # the same key: the search sees it too
    assert verdict(h.ops) is Verdict.ILLEGAL


def test_an_indeterminate_write_cannot_take_effect_before_its_call() -> None:
    h = Ops()
    h.get(A, (0, 1), 2, kv(b"x", 2, 2))
    h.put(A, b"x", (2, None))
    assert verdict(resolve(h.ops).operations) is Verdict.ILLEGAL
    assert any("a write made after it" in v for v in violations(h.ops))


def test_a_write_cannot_be_undone() -> None:
    h = Ops()
    h.put(A, b"1", (0, 1), 2)
    h.put(A, b"2", (2, None))
    h.get(A, (3, 4), 3, kv(b"2", 2, 3, 2))
    h.get(A, (5, 6), 3, kv(b"1", 2, 2))  # back to the overwritten value
    assert verdict(resolve(h.ops).operations) is Verdict.ILLEGAL


def test_wrong_revisions_in_what_a_read_shows_are_flagged() -> None:
    h = Ops()
    h.put(A, b"1", (0, 1), 2)
    h.get(A, (2, 3), 3, kv(b"1", 2, 3))  # mod_revision not the write's
    assert verdict(h.ops) is Verdict.ILLEGAL
    assert any("mod_revision is not that of" in v for v in violations(h.ops))
    h.ops[-1] = Operation(1, 0, Kind.GET, A, call=2, ret=3, outcome=Outcome(2, kv(b"1", 2, 2, 2)))
    assert verdict(h.ops) is Verdict.ILLEGAL  # version


def test_a_delete_of_an_absent_key_that_deleted_is_flagged() -> None:
    h = Ops()
    h.delete(A, (0, 1), 2, kv(b"ghost", 1, 1))
    assert verdict(h.ops) is Verdict.ILLEGAL
    assert violations(h.ops)  # and nobody wrote that value


def test_revisions_that_decrease_for_a_client_are_flagged() -> None:
    h = Ops()
    h.put(B, b"1", (0, 1), 2, client=1)
    h.get(A, (2, 3), 2, None)
    h.get(A, (4, 5), 1, None)
    found = violations(h.ops)
    assert any("client header revisions never decrease" in v for v in found)
    assert any("revisions follow real time" in v for v in found)
    assert verdict(h.ops) is Verdict.ILLEGAL  # the key's own order says so too


# -- watches --------------------------------------------------------------------------------


def watched_history() -> Ops:
    h = Ops()
    h.put(A, b"1", (0, 1), 2)
    h.put(B, b"2", (2, 3), 3)
    h.delete(A, (4, 5), 4, kv(b"1", 2, 2))
    h.put(A, b"3", (6, None))  # took effect at 5
    return h


def full_log() -> list[WatchEvent]:
    events = puts((2, A, b"1"), (3, B, b"2"))
    events.append(WatchEvent(4, EventType.DELETE, A))
    return [*events, WatchEvent(5, EventType.PUT, A, b"3", 5, 1)]


def watch_violations(events: list[WatchEvent], start: int = 1) -> list[str]:
    log = WatchLog("w", start, events)
    return watches.check([log], watched_history().ops, final_revision=5).violations


def test_a_complete_watch_passes_and_resolves_the_indeterminate_write() -> None:
    events = full_log()
    assert watch_violations(events) == []
    assert watch_violations(events[2:], start=4) == []  # a watch opened mid-way
    history = History(watched_history().ops, [WatchLog("w", 1, events)], 5)
    verification = verify(history)
    assert verification.ok, verification.report()
    assert verification.resolution.took_effect == 1


def test_a_watch_missing_an_event_is_flagged() -> None:
    events = full_log()
    assert any("every acknowledged write delivered" in v for v in watch_violations(events[1:]))
    # The indeterminate write's event missing: only density shows it.
    assert any("no event at 1 revisions, e.g. r5" in v for v in watch_violations(events[:3]))


def test_a_watch_repeating_or_reordering_an_event_is_flagged() -> None:
    events = full_log()
    assert any("delivered again" in v for v in watch_violations([*events, events[1]]))
    reordered = [events[1], events[0], *events[2:]]
    assert any("after r3" in v for v in watch_violations(reordered))
    # The same write again at another revision (an indeterminate one counts once, too).
    twice = [*events, WatchEvent(6, EventType.PUT, A, b"3", 5, 2)]
    assert any("delivered before" in v for v in watch_violations(twice))


def test_a_watch_inventing_or_misplacing_an_event_is_flagged() -> None:
    events = full_log()
    assert any("nobody wrote" in v for v in watch_violations([*events, *puts((6, A, b"?"))]))
    moved = [*events[:3], WatchEvent(6, EventType.PUT, A, b"3", 5, 1)]
    assert any("no event at" in v for v in watch_violations(moved))
    wrong_key = [*events[:1], *puts((3, A, b"2")), *events[2:]]
    assert any("shows the value of" in v for v in watch_violations(wrong_key))
    assert any("before the start" in v for v in watch_violations(events, start=3))
    other = WatchLog("other", 1, [*events[:3], WatchEvent(5, EventType.DELETE, A)])
    assert watches.agree([WatchLog("w", 1, events), other]).violations


# -- the search itself ------------------------------------------------------------------------


def test_the_time_cap_reports_unknown_never_a_pass() -> None:
    h = Ops()
    for n in range(18):  # each may or may not have happened, in any order: 2^18 subsets
        h.put(A, b"%d" % n, (0, None))
    # The last one first: the depth-first search finds that only after trying the others.
    h.get(A, (1, 2), 2, kv(b"17", 2, 2))
    capped = checker.check(h.ops, timeout=0)
    assert capped.verdict is Verdict.UNKNOWN
    assert "time cap reached" in capped.report()
    verification = verify(History(h.ops), timeout=0)
    assert not verification.findings.violations and not verification.ok
    h.ops.pop()
    assert checker.check(h.ops, timeout=10).verdict is Verdict.OK


def test_memoisation_keeps_the_search_from_trying_every_order() -> None:
    h = Ops()
    h.put(A, b"1", (0, 1), 2)
    for _ in range(8):  # whichever of them took effect, the key is absent after them
        h.delete(A, (2, None))
    h.get(A, (3, 4), 3, kv(b"nobody", 3, 3))
    result = checker.check(h.ops)
    assert result.verdict is Verdict.ILLEGAL
    # A (linearized set, state) pair is explored once: about 2^8 sets, not the 109,600
    # orders of the subsets.
    assert result.partitions[0].steps < 10 * 2**8


def test_a_history_survives_json() -> None:
    h = watched_history()
    history = History(h.ops, [WatchLog("w", 1, full_log(), [3])], 5)
    again = History.from_json(history.to_json())
    assert again == history


# -- across two keys ------------------------------------------------------------------------


def swap_history() -> list[MultiOp]:
    """Both keys put, swapped together, then read."""
    a1, b1 = kv(b"a1", 2, 2), kv(b"b1", 3, 3)
    return [
        MultiOp(
            0,
            0,
            MultiKind.PUT,
            0,
            (b"a1", b""),
            call=0,
            ret=1,
            outcome=MultiOutcome(2, (None, None)),
        ),
        MultiOp(
            1,
            0,
            MultiKind.PUT,
            1,
            (b"b1", b""),
            call=2,
            ret=3,
            outcome=MultiOutcome(3, (None, None)),
        ),
        MultiOp(2, 1, MultiKind.SWAP, 0, (b"a2", b"b2"), (2, 3), 4, 5, MultiOutcome(4, (a1, b1))),
        MultiOp(
            3,
            2,
            MultiKind.READ,
            call=6,
            ret=7,
            outcome=MultiOutcome(4, (kv(b"a2", 2, 4, 2), kv(b"b2", 3, 4, 2))),
        ),
    ]


def test_a_swap_of_two_keys_read_whole_passes() -> None:
    assert multikey.check(swap_history())[0] is Verdict.OK


def test_a_torn_read_of_a_swap_is_flagged() -> None:
    ops = swap_history()
    read = ops[3]
    # The swap's write of a, not yet of b: no single revision has that state.
    torn = MultiOutcome(4, (kv(b"a2", 2, 4, 2), kv(b"b1", 3, 3)))
    ops[3] = replace(read, outcome=torn)
    verdict, report = multikey.check(ops)
    assert verdict is Verdict.ILLEGAL, report
    # Concurrent with the swap, the read may see it whole or not at all, never half.
    ops[3] = replace(read, call=3, outcome=torn)
    assert multikey.check(ops)[0] is Verdict.ILLEGAL


def test_a_swap_that_held_on_one_key_only_is_flagged() -> None:
    ops = swap_history()
    ops.insert(
        2,
        MultiOp(
            4,
            3,
            MultiKind.PUT,
            1,
            (b"b9", b""),
            call=3,
            ret=3,
            outcome=MultiOutcome(4, (kv(b"b1", 3, 3), None)),
        ),
    )
    # b changed (r4) before the swap compared b's mod_revision 3; so the swap cannot hold.
    ops[3] = replace(ops[3], outcome=MultiOutcome(5, (kv(b"a1", 2, 2), kv(b"b9", 3, 4, 2))))
    ops[4] = replace(ops[4], outcome=MultiOutcome(5, (kv(b"a2", 2, 5, 2), kv(b"b2", 3, 5, 3))))
    verdict, report = multikey.check(ops)
    assert verdict is Verdict.ILLEGAL, report
