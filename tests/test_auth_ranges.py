"""The permission intervals of auth/permissions.py: etcd's range-permission semantics (a point, a range,
from a key on; a request covered by the union of a user's permissions, adjacent ones joining)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from kine_server.auth.permissions import Ranges, interval

POINT, FROM = b"", b"\0"


def test_a_single_key_a_range_and_everything_from_a_key() -> None:
    ranges = Ranges([interval(b"k", POINT), interval(b"a", b"c"), interval(b"x", FROM)])
    assert ranges.covers(*interval(b"k", POINT))
    assert not ranges.covers(*interval(b"k0", POINT))
    assert not ranges.covers(*interval(b"k", b"l"))  # the prefix k, not only the key
    assert ranges.covers(*interval(b"b", POINT))
    assert ranges.covers(*interval(b"a", b"c"))
    assert not ranges.covers(*interval(b"a", b"c\0"))
    assert not ranges.covers(*interval(b"c", POINT))
    assert ranges.covers(*interval(b"zzz", FROM))
    assert not ranges.covers(*interval(b"w", FROM))


def test_a_request_may_span_several_permissions_that_meet() -> None:
    ranges = Ranges([interval(b"a", b"b"), interval(b"b", b"c"), interval(b"d", b"e")])
    assert ranges.covers(*interval(b"a", b"c"))  # [a,b) and [b,c) meet: no gap
    assert not ranges.covers(*interval(b"a", b"e"))  # [c,d) is a gap
    overlapping = Ranges([interval(b"a", b"m"), interval(b"c", b"f"), interval(b"e", b"z")])
    assert overlapping.covers(*interval(b"a", b"z"))


def test_empty_and_backwards_requests_are_not_covered() -> None:
    ranges = Ranges([interval(b"", FROM)])
    assert ranges.covers(*interval(b"\0", FROM))
    assert not ranges.covers(b"b", b"a")
    assert not Ranges([]).covers(*interval(b"a", POINT))


KEYS = [bytes(k) for n in range(1, 3) for k in itertools.product(b"abc", repeat=n)]
SPAN = st.tuples(st.sampled_from(KEYS), st.sampled_from([POINT, FROM, *KEYS]))


@given(st.lists(SPAN, max_size=6), SPAN)
def test_whatever_is_covered_is_inside_some_permission(
    perms: list[tuple[bytes, bytes]], request: tuple[bytes, bytes]
) -> None:
    """Sound: when a request is said to be covered, every probe key in it lies in a permission."""
    spans = [interval(k, e) for k, e in perms if not e or e == FROM or e > k]
    start, end = interval(*request)
    if not Ranges(spans).covers(start, end):
        return
    probes = [
        k for k in KEYS + [k + b"\0" for k in KEYS] if start <= k and (end is None or k < end)
    ]
    for key in probes:
        assert any(s <= key and (e is None or key < e) for s, e in spans), key
