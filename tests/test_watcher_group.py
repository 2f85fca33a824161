"""WatcherGroup against a brute-force matcher: the index must find exactly the watchers whose key or
range holds a key, after any sequence of adds and removes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kine_server.drivers.base import OPEN_END
from kine_server.mvcc.applier import range_end
from kine_server.mvcc.watcher_group import WatcherGroup

# Few distinct bytes and short keys, so ranges overlap, nest, share starts and ends and coincide.
keys = st.binary(max_size=3).map(lambda b: bytes(x % 4 if x < 250 else 255 for x in b))


def prefix_end(key: bytes) -> bytes:
    """etcd's prefix range end (clientv3.GetPrefixRangeEnd): the key with its last byte below 255
    increased, or "\\0" (every key from the start on) if there is none."""
    stripped = key.rstrip(b"\xff")
    if not stripped:
        return b"\x00"
    return stripped[:-1] + bytes([stripped[-1] + 1])


@st.composite
def watches(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """(start, end) as WatchStream builds them from a WatchCreateRequest's key and range_end."""
    key = draw(keys) or b"\x00"  # etcd: an empty key is the smallest key
    kind = draw(st.sampled_from(["single", "from", "prefix", "range"]))
    if kind == "single":
        wire_end = b""
    elif kind == "from":
        wire_end = b"\x00"
    elif kind == "prefix":
        wire_end = prefix_end(key)
    else:
        wire_end = draw(keys.filter(lambda end: end > key))
    return key, range_end(wire_end)


def brute_force(key: bytes, start: bytes, end: bytes | None) -> bool:
    if end is None:
        return key == start
    if end == OPEN_END:
        return key >= start
    return start <= key < end


operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), watches()),
        st.tuples(st.just("remove"), st.integers(min_value=0, max_value=60)),
        st.tuples(st.just("match"), keys),
    ),
    max_size=120,
)


@settings(max_examples=400, deadline=None)
@given(operations)
def test_matches_exactly_the_watchers_whose_range_holds_the_key(
    ops: list[tuple[str, object]],
) -> None:
    group: WatcherGroup[int] = WatcherGroup()
    live: dict[int, tuple[bytes, bytes | None]] = {}
    next_id = 0
    for op, arg in ops:
        if op == "add":
            assert isinstance(arg, tuple)
            start: bytes = arg[0]
            end: bytes | None = arg[1]
            if end is not None and end != OPEN_END and end <= start:
                continue
            group.add(next_id, start, end)
            live[next_id] = (start, end)
            next_id += 1
        elif op == "remove":
            assert isinstance(arg, int)
            assert group.remove(arg) == (arg in live)
            live.pop(arg, None)
        else:
            assert isinstance(arg, bytes)
            found = group.match(arg)
            assert len(found) == len(set(found)), "a watcher matched twice"
            want = {w for w, (start, end) in live.items() if brute_force(arg, start, end)}
            assert set(found) == want
        assert len(group) == len(live)
    # Every start and end any watch names (the edges of its range), and the keys at either extreme.
    edges = {edge for where in live.values() for edge in where if edge}
    for probe in [*edges, b"\xff\xff\xff\xff", b"\x00"]:
        want = {w for w, (start, end) in live.items() if brute_force(probe, start, end)}
        assert set(group.match(probe)) == want


def test_many_watchers_of_one_range_are_one_entry_and_leave_one_by_one() -> None:
    group: WatcherGroup[str] = WatcherGroup()
    for name in "abc":
        group.add(name, b"/p/", b"/p0")
    assert group.match(b"/p/x") == ["a", "b", "c"]
    assert group.remove("b")
    assert not group.remove("b")
    assert group.match(b"/p/x") == ["a", "c"]
    group.remove("a")
    group.remove("c")
    assert group.match(b"/p/x") == []
    assert len(group) == 0


def test_refuses_an_empty_range_and_a_watcher_added_twice() -> None:
    group: WatcherGroup[str] = WatcherGroup()
    try:
        group.add("a", b"b", b"a")
    except ValueError:
        pass
    else:
        raise AssertionError("an empty range was accepted")
    group.add("a", b"a", None)
    try:
        group.add("a", b"b", None)
    except ValueError:
        pass
    else:
        raise AssertionError("a watcher was added twice")
    assert group.match(b"a") == ["a"]
