"""etcd's backend as its mvcc package lays it out in bbolt: a kine-server store written as one
(Maintenance.Snapshot), and one read into a kine-server store (`kine-server restore`).

The `key` bucket holds every revision etcd still has: the key is the revision, 8 bytes of main
revision (big-endian), `_`, 8 bytes of sub revision, and a trailing `t` for a tombstone (a
deletion); the value is the `mvccpb.KeyValue` as of that revision. The `lease` bucket maps each
lease id (8 bytes, big-endian) to a `leasepb.Lease` (ID, TTL); the `meta` bucket holds the
revisions compacted (`finishedCompactRev`) and to be compacted (`scheduledCompactRev`) in the
same 17-byte form; `auth`, `authUsers` and `authRoles` hold etcd's auth store. Each revision
becomes the kine-server row of the same revision and sub (and back), so revisions, versions and
history read as they did on the source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from kine_server.drivers.base import Counters, Driver, RawRow, ReadTx, WriteTx
from kine_server.etcd_backend.bbolt import BoltError, BoltFile, BoltWriter
from kine_server.maintenance.restore import SnapshotError
from kine_server.pb import kv_pb2
from kine_server.wire import read_varint, varint

#: Rows written per step.
PAGE = 1000
#: A progress line every this many rows.
PROGRESS_ROWS = 100_000


@dataclass
class RestoreReport:
    revision: int
    compact_revision: int
    rows: int
    leases: int
    #: Keys whose newest revision is not a deletion: what the restored store must count.
    live_keys: int


def is_bbolt(path: str) -> bool:
    """Whether the file starts with a bbolt meta page (etcd's backend), not a SQLite file."""
    with open(path, "rb") as file:
        head = file.read(24)
    return len(head) == 24 and int.from_bytes(head[16:20], "little") == 0xED0CDAED


def parse_revision(key: bytes) -> tuple[int, int, bool]:
    """(main, sub, is a tombstone) of a `key` bucket key."""
    if len(key) not in (17, 18) or key[8:9] != b"_" or (len(key) == 18 and key[17:] != b"t"):
        raise BoltError(f"not a revision key: {key!r}")
    return int.from_bytes(key[:8], "big"), int.from_bytes(key[9:17], "big"), len(key) == 18


def row(key: bytes, value: bytes) -> RawRow:
    main, sub, tombstone = parse_revision(key)
    try:
        kv = kv_pb2.KeyValue.FromString(value)
    except DecodeError as exc:
        raise BoltError(f"a damaged key-value at revision {main}: {exc}") from None
    if tombstone:  # as kine-server writes a deletion
        return RawRow(kv.key, 0, main, 0, b"", 0, sub, None)
    return RawRow(kv.key, kv.create_revision, main, kv.version, kv.value, kv.lease, sub, None)


def varint_fields(data: bytes) -> dict[int, int]:
    """The varint fields of a protobuf message (what leasepb.Lease is made of)."""
    fields: dict[int, int] = {}
    at = 0
    try:
        while at < len(data):
            tag, at = read_varint(data, at)
            if tag & 7 != 0:
                raise BoltError("a lease record with a field that is not a varint")
            value, at = read_varint(data, at)
            fields[tag >> 3] = value - (1 << 64) if value >= 1 << 63 else value
    except BoltError:
        raise
    except ValueError as exc:
        raise BoltError(f"a damaged lease record: {exc}") from None
    return fields


def compact_revisions(bolt: BoltFile) -> tuple[int, int]:
    """(finished, scheduled) compaction revisions; 0 where etcd has none."""
    meta = dict(bolt.items(b"meta"))
    found = [meta.get(name) for name in (b"finishedCompactRev", b"scheduledCompactRev")]
    finished, scheduled = (parse_revision(value)[0] if value else 0 for value in found)
    return finished, scheduled


async def restore_etcd(
    bolt: BoltFile, target: Driver, progress: Callable[[str], None] = lambda _: None
) -> RestoreReport:
    """Copy etcd's keys (every revision it holds), leases and compaction into the empty store
    `target`, in one transaction: a failure leaves the target empty."""
    async with target.write() as writer:
        existing = await writer.lock()
        if existing.revision > 1 or await writer.dump((0, -1), 1):
            raise SnapshotError(
                "the target database already holds data; restore needs an empty one"
            )
        revision = rows = 0
        page: list[RawRow] = []
        alive: dict[bytes, bool] = {}  # each key's newest revision so far is not a deletion
        for key, value in bolt.items(b"key"):
            converted = row(key, value)
            alive[converted.key] = converted.version > 0
            page.append(converted)
            revision = max(revision, converted.mod_revision)
            if len(page) >= PAGE:
                await writer.insert_raw(page)
                rows += len(page)
                page = []
                if rows % PROGRESS_ROWS == 0:
                    progress(f"restored {rows} rows, up to revision {revision}")
        if page:
            await writer.insert_raw(page)
            rows += len(page)
        await writer.link_history()
        leases = 0
        for _, value in bolt.items(b"lease"):
            fields = varint_fields(value)
            # As etcd restores a lease: with its whole TTL again, from now.
            await writer.insert_lease(fields.get(1, 0), fields.get(2, 0))
            leases += 1
        await restore_auth(bolt, writer)
        finished, scheduled = compact_revisions(bolt)
        # etcd compacts through a scheduled compaction when it restores; reads below it fail.
        compacted = max(finished, scheduled)
        # A compaction past the newest change (its revision deleted, then compacted) still
        # counts: etcd's current revision is never below its compact revision.
        revision = max(revision, compacted, 1)
        await writer.set_meta("revision", revision)
        await writer.set_meta("compact_revision", compacted if compacted > 0 else -1)
        await writer.set_meta("compacted_through", max(finished, 0))
    return RestoreReport(revision, compacted, rows, leases, sum(alive.values()))


def revision_key(main: int, sub: int, tombstone: bool) -> bytes:
    return main.to_bytes(8, "big") + b"_" + sub.to_bytes(8, "big") + (b"t" if tombstone else b"")


def etcd_value(raw: RawRow) -> bytes:
    """The mvccpb.KeyValue etcd stores for a row; a tombstone's holds only the key."""
    if raw.version == 0:
        return bytes(kv_pb2.KeyValue(key=raw.key).SerializeToString())
    kv = kv_pb2.KeyValue(
        key=raw.key,
        create_revision=raw.create_revision,
        mod_revision=raw.mod_revision,
        version=raw.version,
        value=raw.value,
        lease=raw.lease,
    )
    return bytes(kv.SerializeToString())


def lease_value(lease_id: int, ttl: int) -> bytes:
    """leasepb.Lease{ID, TTL}: two varint fields (an int64 as its two's complement)."""
    mask = 0xFFFFFFFFFFFFFFFF
    return varint(1 << 3) + varint(lease_id & mask) + varint(2 << 3) + varint(ttl & mask)


#: The buckets etcd's backend has, in bbolt's (byte) order; the ones not written here are
#: left empty (no alarms: a restored member starts without them).
BUCKETS = (
    b"alarm",
    b"auth",
    b"authRoles",
    b"authUsers",
    b"cluster",
    b"key",
    b"lease",
    b"members",
    b"members_removed",
    b"meta",
)


#: Where etcd keeps each kind of kine_auth's records.
AUTH_KINDS = {b"authRoles": "role", b"authUsers": "user"}


def auth_buckets(
    meta: dict[str, int], records: list[tuple[str, bytes, bytes]]
) -> list[tuple[bytes, list[tuple[bytes, bytes]]]]:
    """etcd's auth buckets, in bbolt's order: `auth` (enabled flag, auth revision as a
    big-endian uint64), then the roles and users, each an authpb message under its name."""
    enabled = b"\x01" if meta.get("auth_enabled") else b"\x00"
    revision = meta.get("auth_revision", 1).to_bytes(8, "big")
    buckets = [(b"auth", [(b"authEnabled", enabled), (b"authRevision", revision)])]
    for bucket, kind in AUTH_KINDS.items():
        buckets.append((bucket, sorted((n, v) for k, n, v in records if k == kind)))
    return buckets


async def restore_auth(bolt: BoltFile, writer: WriteTx) -> None:
    """etcd's users, roles, enabled flag and auth revision into the store being restored (a
    snapshot of an etcd that never had auth has empty buckets, or none)."""
    try:
        auth = dict(bolt.items(b"auth"))
    except BoltError:
        return
    for bucket, kind in AUTH_KINDS.items():
        for name, value in bolt.items(bucket):
            await writer.put_auth_record(kind, name, value)
    await writer.set_meta("auth_enabled", int(auth.get(b"authEnabled") == b"\x01"))
    await writer.set_meta("auth_generation", 1)  # a change: processes read the state again
    if len(auth.get(b"authRevision", b"")) == 8:
        await writer.set_meta("auth_revision", int.from_bytes(auth[b"authRevision"], "big"))


async def write_etcd_snapshot(tx: ReadTx, path: str) -> Counters:
    """The store as etcd's backend file (see the module), from one read transaction: what
    `etcdctl snapshot status` and `etcdctl snapshot restore` read. Written a page of rows at a
    time, so memory stays bounded."""
    counters = await tx.counters()
    bolt = BoltWriter(path)
    try:
        bolt.bucket(b"alarm")
        for name, items in auth_buckets(await tx.all_meta(), await tx.auth_records()):
            bolt.bucket(name, items)
        bolt.bucket(b"cluster")
        keys = bolt.bucket(b"key")
        after = (0, -1)
        while page := await tx.dump(after, PAGE):
            for raw in page:
                keys.add(revision_key(raw.mod_revision, raw.sub, raw.version == 0), etcd_value(raw))
            after = (page[-1].mod_revision, page[-1].sub)
        # etcd's key is the id as an unsigned 64-bit number (a client may grant a negative id):
        # in that order, as bbolt keeps keys.
        mask = 0xFFFFFFFFFFFFFFFF
        leases = sorted((i & mask, i, ttl) for i, ttl, _ in await tx.all_leases())
        bolt.bucket(b"lease", ((u.to_bytes(8, "big"), lease_value(i, ttl)) for u, i, ttl in leases))
        bolt.bucket(b"members")
        bolt.bucket(b"members_removed")
        meta: list[tuple[bytes, bytes]] = []
        if counters.compact_revision > 0:
            compacted = revision_key(counters.compact_revision, 0, False)
            meta = [(b"finishedCompactRev", compacted), (b"scheduledCompactRev", compacted)]
        bolt.bucket(b"meta", meta)
    finally:
        bolt.close()
    return counters
