"""Restoring a snapshot into an empty store: the pieces `kine-server restore` shares.

Snapshots are etcd's bbolt files (etcd_backend/mvcc.py writes and reads them). What is here:
cutting off the SHA-256 that `etcdctl snapshot save` appends to the file, and copying a store
row for row (`copy_store`), which restores the kine-server SQLite snapshots of earlier releases
into an empty database of any kind.
"""

from __future__ import annotations

import hashlib
import os

from kine_server.drivers.base import Counters, Driver

PAGE = 1000

#: The counters a restore carries over; the target keeps its own schema version and cluster id
#: (a restored store is a new cluster, as with `etcdctl snapshot restore`).
COPIED_META = ("revision", "compact_revision", "compacted_through", "auth_enabled", "auth_revision")


class SnapshotError(Exception):
    """The copy cannot be made (e.g. the target is not empty)."""


def strip_checksum(path: str, into: str) -> str:
    """The database file of a saved snapshot: etcdctl keeps the SHA-256 that ends the stream
    (database pages are multiples of 512 bytes, the hash 32 more). Checked and cut off into
    `into`, a megabyte at a time (a snapshot can be larger than memory); a file without one
    is used as it is."""
    size = os.path.getsize(path)
    digest_size = hashlib.sha256().digest_size
    if size % 512 != digest_size:
        return path
    digest = hashlib.sha256()
    with open(path, "rb") as source, open(into, "wb") as target:
        left = size - digest_size
        while left:
            chunk = source.read(min(left, 1 << 20))
            if not chunk:
                raise SnapshotError(f"{path}: the file ended while it was read")
            digest.update(chunk)
            target.write(chunk)
            left -= len(chunk)
        checksum = source.read(digest_size)
    if digest.digest() != checksum:
        raise SnapshotError(f"{path}: the snapshot's SHA-256 does not match its contents")
    return into


async def copy_store(source: Driver, target: Driver) -> Counters:
    """Copy every row, lease and counter of `source` into the empty store `target`."""
    async with source.read() as reader, target.write() as writer:
        existing = await writer.lock()
        if existing.revision > 1 or await writer.dump((0, -1), 1):
            raise SnapshotError(
                "the target database already holds data; restore needs an empty one"
            )
        counters = await reader.counters()
        after = (0, -1)
        while rows := await reader.dump(after, PAGE):
            await writer.insert_raw(rows)
            after = (rows[-1].mod_revision, rows[-1].sub)
        # A restored lease starts its TTL again, as etcd's restored leases do.
        for lease_id, ttl, _ in await reader.all_leases():
            await writer.insert_lease(lease_id, ttl)
        # Users, roles and whether auth is on come along, as in etcd's snapshot; not the key
        # of the source's simple tokens (a restored store is a new cluster, its tokens new).
        for kind, user_or_role, value in await reader.auth_records():
            if kind in ("user", "role"):
                await writer.put_auth_record(kind, user_or_role, value)
        meta = await reader.all_meta()
        for name in COPIED_META:
            await writer.set_meta(name, meta[name])
    return counters
