"""bbolt files, etcd's backend (`member/snap/db`, or what `etcdctl snapshot save` writes): read
(`BoltFile`, for restores) and written (`BoltWriter`, for snapshots), only as much of the
format as etcd's files use. The layout (bbolt's page.go, bucket.go, db.go):
every page starts with a 16-byte header, `id u64 | flags u16 | count u16 | overflow u32`, and a
page with `overflow` N spans N more pages. Pages 0 and 1 are the two meta pages; the valid one
(magic, version 2, FNV-1a checksum) with the higher transaction id is current, and names the
root bucket's page. A branch page holds `count` elements `pos u32 | ksize u32 | pgid u64`, a
leaf page `flags u32 | pos u32 | ksize u32 | vsize u32`; `pos` counts from the element itself.
A leaf element with flag 1 is a bucket: its value is `root u64 | sequence u64`, and with root 0
the bucket is inline, its one leaf page following in the value. All integers little-endian.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Iterable, Iterator

_HEADER = struct.Struct("<QHHI")
_META = struct.Struct("<IIII QQ QQQ Q")
_BRANCH_ELEMENT = struct.Struct("<IIQ")
_LEAF_ELEMENT = struct.Struct("<IIII")
_BUCKET = struct.Struct("<QQ")

MAGIC = 0xED0CDAED
VERSION = 2
BRANCH_PAGE, LEAF_PAGE, META_PAGE = 0x01, 0x02, 0x04
BUCKET_LEAF = 0x01


class BoltError(ValueError):
    """Not a bbolt file, or a damaged one."""


def _fnv64a(data: bytes) -> int:
    value = 0xCBF29CE484222325
    for byte in data:
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


class BoltFile:
    """A bbolt file opened for reading (memory-mapped: bounded memory whatever its size)."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as file:
            try:
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file
                raise BoltError(f"{path}: not a bbolt database (empty)") from None
        self._data = memoryview(self._map)
        self.page_size, self._root = self._current_meta(path)

    def close(self) -> None:
        self._data.release()
        self._map.close()

    def __enter__(self) -> BoltFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _current_meta(self, path: str) -> tuple[int, int]:
        """(page size, the root bucket's page) from the newer valid meta page."""
        best: tuple[int, int, int] | None = None  # (txid, page size, root)
        page_size = 0
        for index in (0, 1):
            offset = index * page_size if index else 0
            if offset + _HEADER.size + _META.size > len(self._data):
                break
            fields = _META.unpack_from(self._data, offset + _HEADER.size)
            magic, version, size, _, root, _, _, _, txid, checksum = fields
            meta = bytes(self._data[offset + _HEADER.size : offset + _HEADER.size + _META.size - 8])
            if magic != MAGIC or version != VERSION or _fnv64a(meta) != checksum:
                if index == 0:
                    page_size = 4096  # meta 0 damaged: try meta 1 at the usual page size
                continue
            if index == 0:
                page_size = size
            if best is None or txid > best[0]:
                best = (txid, size, root)
        if best is None:
            raise BoltError(f"{path}: not a bbolt database (no valid meta page)")
        return best[1], best[2]

    def _page(self, pgid: int) -> memoryview:
        offset = pgid * self.page_size
        if offset + _HEADER.size > len(self._data):
            raise BoltError(f"page {pgid} is past the end of the file")
        overflow = _HEADER.unpack_from(self._data, offset)[3]
        return self._data[offset : offset + (overflow + 1) * self.page_size]

    def items(self, name: bytes) -> Iterator[tuple[bytes, bytes]]:
        """A top-level bucket's keys and values, in key order (nested buckets left out)."""
        with _damage():
            for key, value, is_bucket in _walk(self, self._page(self._root)):
                if is_bucket and key == name:
                    for inner_key, inner_value, inner_bucket in _walk_bucket(self, value):
                        if not inner_bucket:
                            yield inner_key, inner_value
                    return
        raise BoltError(f"no bucket {name.decode(errors='replace')!r}")


@contextlib.contextmanager
def _damage() -> Iterator[None]:
    """A damaged file (a short page, pages that point at each other) as one BoltError."""
    try:
        yield
    except (struct.error, RecursionError, IndexError) as exc:
        raise BoltError(f"a damaged bbolt database: {exc or type(exc).__name__}") from None


def _walk_bucket(bolt: BoltFile, header: bytes) -> Iterator[tuple[bytes, bytes, bool]]:
    root, _ = _BUCKET.unpack_from(header)
    if root == 0:  # inline: the bucket's leaf page follows its header
        return _walk(bolt, memoryview(header)[_BUCKET.size :])
    return _walk(bolt, bolt._page(root))


def _walk(bolt: BoltFile, page: memoryview) -> Iterator[tuple[bytes, bytes, bool]]:
    """(key, value, is a bucket) of every leaf element under `page`, in key order."""
    _, flags, count, _ = _HEADER.unpack_from(page)
    if flags & BRANCH_PAGE:
        for index in range(count):
            at = _HEADER.size + index * _BRANCH_ELEMENT.size
            _, _, child = _BRANCH_ELEMENT.unpack_from(page, at)
            yield from _walk(bolt, bolt._page(child))
        return
    if not flags & LEAF_PAGE:
        raise BoltError(f"page of kind {flags:#x} where a branch or leaf page belongs")
    for index in range(count):
        at = _HEADER.size + index * _LEAF_ELEMENT.size
        element_flags, pos, ksize, vsize = _LEAF_ELEMENT.unpack_from(page, at)
        start = at + pos
        key = bytes(page[start : start + ksize])
        value = bytes(page[start + ksize : start + ksize + vsize])
        yield key, value, bool(element_flags & BUCKET_LEAF)


# -- writing ---------------------------------------------------------------------------------

FREELIST_PAGE = 0x10
#: Pages 0 and 1 are the metas, 2 the (empty) freelist; data pages follow.
FIRST_DATA_PAGE = 3


class BoltWriter:
    """Writes a new bbolt file in one pass: top-level buckets, each filled in key order.

    Leaves are written as they fill and only each page's first key is kept for the branch
    pages above them, so memory stays bounded however large the file. The file is what bbolt
    itself would leave after one transaction: two meta pages, an empty freelist, every page in
    use. `close()` writes the root bucket and the metas.
    """

    def __init__(self, path: str, page_size: int = 4096) -> None:
        self.page_size = page_size
        # 0600: a snapshot holds every Secret of the cluster (closed by close()).
        self._file = os.fdopen(os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600), "wb")
        self._next = FIRST_DATA_PAGE
        self._buckets: list[tuple[bytes, int]] = []
        self._open: tuple[bytes, _Tree] | None = None

    def write_page(self, flags: int, count: int, body: bytes) -> int:
        """One page (and its overflow pages) at the next id; returns the id."""
        size = _HEADER.size + len(body)
        pages = max(1, -(-size // self.page_size))
        pgid = self._next
        self._next += pages
        header = _HEADER.pack(pgid, flags, count, pages - 1)
        self._file.seek(pgid * self.page_size)
        self._file.write(header + body + b"\0" * (pages * self.page_size - size))
        return pgid

    def bucket(self, name: bytes, items: Iterable[tuple[bytes, bytes]] = ()) -> _Tree:
        """Start a top-level bucket (names must ascend) holding `items` so far; more can be
        `add`ed, in ascending key order, until the next bucket starts or the file closes."""
        if self._buckets and name <= self._buckets[-1][0]:
            raise ValueError("buckets must be written in name order")
        self._finish_bucket()
        tree = _Tree(self)
        for key, value in items:
            tree.add(key, value)
        self._open = (name, tree)
        return tree

    def _finish_bucket(self) -> None:
        if self._open is not None:
            name, tree = self._open
            self._buckets.append((name, tree.finish()))
            self._open = None

    def write_branch(self, children: list[tuple[bytes, int]]) -> int:
        elements = b""
        keys = b""
        table = _BRANCH_ELEMENT.size * len(children)
        for index, (key, pgid) in enumerate(children):
            pos = table - index * _BRANCH_ELEMENT.size + len(keys)
            elements += _BRANCH_ELEMENT.pack(pos, len(key), pgid)
            keys += key
        return self.write_page(BRANCH_PAGE, len(children), elements + keys)

    def close(self) -> None:
        """The root bucket, the freelist and both metas; the file is then complete."""
        try:
            self._finish_bucket()
            tree = _Tree(self)
            for name, bucket_root in self._buckets:
                tree.add(name, _BUCKET.pack(bucket_root, 0), BUCKET_LEAF)
            root = tree.finish()
            self._file.seek(2 * self.page_size)
            freelist = _HEADER.pack(2, FREELIST_PAGE, 0, 0)
            self._file.write(freelist + b"\0" * (self.page_size - len(freelist)))
            for pgid in (0, 1):
                meta = struct.pack(
                    "<IIII QQ QQQ", MAGIC, VERSION, self.page_size, 0, root, 0, 2, self._next, pgid
                )
                body = _HEADER.pack(pgid, META_PAGE, 0, 0) + meta + struct.pack("<Q", _fnv64a(meta))
                self._file.seek(pgid * self.page_size)
                self._file.write(body + b"\0" * (self.page_size - len(body)))
            self._file.truncate(self._next * self.page_size)
        finally:
            self._file.close()


class _Tree:
    """One B+tree, built bottom up: leaves as they fill, then the branch levels above them."""

    def __init__(self, writer: BoltWriter) -> None:
        self._writer = writer
        self._level: list[tuple[bytes, int]] = []  # each leaf's first key and page id
        self._page: list[tuple[int, bytes, bytes]] = []
        self._used = _HEADER.size
        self._last: bytes | None = None

    def add(self, key: bytes, value: bytes, flags: int = 0) -> None:
        if self._last is not None and key <= self._last:
            raise ValueError("keys must be added in ascending order")
        self._last = key
        size = _LEAF_ELEMENT.size + len(key) + len(value)
        if self._page and self._used + size > self._writer.page_size:
            self._flush()
        self._page.append((flags, key, value))
        self._used += size

    def _flush(self) -> None:
        body = _leaf_body(self._page)
        pgid = self._writer.write_page(LEAF_PAGE, len(self._page), body)
        self._level.append((self._page[0][1] if self._page else b"", pgid))
        self._page, self._used = [], _HEADER.size

    def finish(self) -> int:
        """Write what is left and the branches; the root's page id."""
        if self._page or not self._level:
            self._flush()
        level = self._level
        while len(level) > 1:
            above: list[tuple[bytes, int]] = []
            children: list[tuple[bytes, int]] = []
            used = _HEADER.size
            for key, pgid in level:
                size = _BRANCH_ELEMENT.size + len(key)
                if children and used + size > self._writer.page_size:
                    above.append((children[0][0], self._writer.write_branch(children)))
                    children, used = [], _HEADER.size
                children.append((key, pgid))
                used += size
            above.append((children[0][0], self._writer.write_branch(children)))
            level = above
        return level[0][1]


def _leaf_body(elements: list[tuple[int, bytes, bytes]]) -> bytes:
    table = _LEAF_ELEMENT.size * len(elements)
    heads = []
    data = []
    offset = 0
    for index, (flags, key, value) in enumerate(elements):
        pos = table - index * _LEAF_ELEMENT.size + offset
        heads.append(_LEAF_ELEMENT.pack(flags, pos, len(key), len(value)))
        data.append(key + value)
        offset += len(key) + len(value)
    return b"".join(heads) + b"".join(data)
