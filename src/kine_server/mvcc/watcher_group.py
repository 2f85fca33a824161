"""Which watchers a key concerns, in O(log n + matches) instead of asking every watcher.

etcd's mvcc/watcher_group.go keeps single-key watchers in a map and range watchers in an interval
tree; this is the same index. Matching every committed event against every watcher made 10 000
idle watchers cost a Put 10 ms: the hub hands every revision to every stream on the event loop.

Three kinds of watch, each in the structure that answers "who watches this key" directly:

- a single key (`end is None`): a dict from the key;
- every key from `start` on (`end == OPEN_END`, etcd's "\\0"): the sorted distinct starts, of which
  those at or below the key are exactly the matches (a bisect, then a slice);
- a range [start, end), prefixes included: a treap ordered by (start, end) and augmented with the
  largest end in each subtree, so a stabbing query skips every subtree that ends at or before the
  key and every right subtree that starts after it.

Watchers of the same key or range share one entry, so a thousand watches of one prefix are one
tree node. Watchers are kept in insertion-ordered dicts, for a deterministic order.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Hashable
from typing import Generic, TypeVar

from kine_server.drivers.base import OPEN_END

W = TypeVar("W", bound=Hashable)


class _Node(Generic[W]):
    """One distinct range [start, end) of the treap, with every watcher of exactly that range."""

    __slots__ = ("end", "left", "max_end", "priority", "right", "start", "watchers")

    def __init__(self, start: bytes, end: bytes, priority: float) -> None:
        self.start = start
        self.end = end
        #: The largest `end` in this subtree: no key at or above it is in any of its ranges.
        self.max_end = end
        self.priority = priority
        self.left: _Node[W] | None = None
        self.right: _Node[W] | None = None
        self.watchers: dict[W, None] = {}

    def key(self) -> tuple[bytes, bytes]:
        return (self.start, self.end)

    def update(self) -> None:
        best = self.end
        if self.left is not None and self.left.max_end > best:
            best = self.left.max_end
        if self.right is not None and self.right.max_end > best:
            best = self.right.max_end
        self.max_end = best


def _split(
    node: _Node[W] | None, key: tuple[bytes, bytes]
) -> tuple[_Node[W] | None, _Node[W] | None]:
    """The nodes before `key`, and those at or after it."""
    if node is None:
        return None, None
    if node.key() < key:
        node.right, right = _split(node.right, key)
        node.update()
        return node, right
    left, node.left = _split(node.left, key)
    node.update()
    return left, node


def _merge(left: _Node[W] | None, right: _Node[W] | None) -> _Node[W] | None:
    """Join two treaps, every key of `left` before every key of `right`."""
    if left is None:
        return right
    if right is None:
        return left
    if left.priority > right.priority:
        left.right = _merge(left.right, right)
        left.update()
        return left
    right.left = _merge(left, right.left)
    right.update()
    return right


def _remove(node: _Node[W] | None, key: tuple[bytes, bytes]) -> _Node[W] | None:
    """The treap without the node at `key` (which must be in it)."""
    if node is None:
        return None
    here = node.key()
    if key == here:
        return _merge(node.left, node.right)
    if key < here:
        node.left = _remove(node.left, key)
    else:
        node.right = _remove(node.right, key)
    node.update()
    return node


class WatcherGroup(Generic[W]):
    """Watchers indexed by what they watch: `match(key)` returns exactly those whose range holds it.

    `end` is the driver's encoding (see WatchSpec): None for one key, OPEN_END for every key from
    `start` on, otherwise the exclusive end of [start, end), which must be above `start`.
    """

    def __init__(self) -> None:
        self._keys: dict[bytes, dict[W, None]] = {}
        self._from_starts: list[bytes] = []
        self._from: dict[bytes, dict[W, None]] = {}
        self._root: _Node[W] | None = None
        self._ranges: dict[tuple[bytes, bytes], _Node[W]] = {}
        self._where: dict[W, tuple[bytes, bytes | None]] = {}
        #: Treap priorities: only their order matters, and a seeded generator keeps runs alike.
        self._random = random.Random(0)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, watcher: object) -> bool:
        return watcher in self._where

    def add(self, watcher: W, start: bytes, end: bytes | None) -> None:
        if watcher in self._where:
            raise ValueError("watcher is already in the group")
        if end is not None and end != OPEN_END and end <= start:
            raise ValueError("empty range")
        self._where[watcher] = (start, end)
        if end is None:
            self._keys.setdefault(start, {})[watcher] = None
        elif end == OPEN_END:
            watchers = self._from.get(start)
            if watchers is None:
                watchers = self._from[start] = {}
                bisect.insort(self._from_starts, start)
            watchers[watcher] = None
        else:
            node = self._ranges.get((start, end))
            if node is None:
                node = self._ranges[(start, end)] = _Node(start, end, self._random.random())
                left, right = _split(self._root, (start, end))
                self._root = _merge(_merge(left, node), right)
            node.watchers[watcher] = None

    def remove(self, watcher: W) -> bool:
        """Forget `watcher`; False if it was not in the group."""
        where = self._where.pop(watcher, None)
        if where is None:
            return False
        start, end = where
        if end is None:
            watchers = self._keys[start]
            del watchers[watcher]
            if not watchers:
                del self._keys[start]
        elif end == OPEN_END:
            watchers = self._from[start]
            del watchers[watcher]
            if not watchers:
                del self._from[start]
                del self._from_starts[bisect.bisect_left(self._from_starts, start)]
        else:
            node = self._ranges[(start, end)]
            del node.watchers[watcher]
            if not node.watchers:
                del self._ranges[(start, end)]
                self._root = _remove(self._root, (start, end))
        return True

    def match(self, key: bytes) -> list[W]:
        """Every watcher whose key or range holds `key`, each once."""
        found: list[W] = []
        single = self._keys.get(key)
        if single is not None:
            found.extend(single)
        if self._from_starts:
            for start in self._from_starts[: bisect.bisect_right(self._from_starts, key)]:
                found.extend(self._from[start])
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node is None or node.max_end <= key:
                continue  # every range below ends at or before the key
            if node.start <= key:
                if key < node.end:
                    found.extend(node.watchers)
                stack.append(node.right)
            # Right of a node that starts after the key, everything starts after it too.
            stack.append(node.left)
        return found
