"""Reading a bbolt file: etcd's backend (`member/snap/db`, or what `etcdctl snapshot save` writes).

Only reading, and only what etcd's files use. The layout (bbolt's page.go, bucket.go, db.go):
every page starts with a 16-byte header, `id u64 | flags u16 | count u16 | overflow u32`, and a
page with `overflow` N spans N more pages. Pages 0 and 1 are the two meta pages; the valid one
(magic, version 2, FNV-1a checksum) with the higher transaction id is current, and names the
root bucket's page. A branch page holds `count` elements `pos u32 | ksize u32 | pgid u64`, a
leaf page `flags u32 | pos u32 | ksize u32 | vsize u32`; `pos` counts from the element itself.
A leaf element with flag 1 is a bucket: its value is `root u64 | sequence u64`, and with root 0
the bucket is inline, its one leaf page following in the value. All integers little-endian.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator

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

    def buckets(self) -> list[bytes]:
        """The top-level buckets' names."""
        return [name for name, _, bucket in _walk(self, self._page(self._root)) if bucket]

    def items(self, name: bytes) -> Iterator[tuple[bytes, bytes]]:
        """A top-level bucket's keys and values, in key order (nested buckets left out)."""
        for key, value, is_bucket in _walk(self, self._page(self._root)):
            if is_bucket and key == name:
                for inner_key, inner_value, inner_bucket in _walk_bucket(self, value):
                    if not inner_bucket:
                        yield inner_key, inner_value
                return
        raise BoltError(f"no bucket {name.decode(errors='replace')!r}")


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
