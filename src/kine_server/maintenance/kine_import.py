"""`kine-server import`: a K3s kine database into a fresh kine-server store, revisions kept.

kube-apiserver's resourceVersions are revisions, and its clients resume watches from them, so
every revision stays what it was: each kine row becomes the row of the same revision, with the
key's create revision, and the store's current and compact revisions are kine's. What kine does
not keep is made up as etcd would have it:

- versions: kine keeps none. A key's version counts its rows from its create row on; where
  compaction removed the create row, from the oldest row kine still has (so a long-lived key's
  version is lower than etcd's would be, and still goes up by one per change).
- leases: kine keeps a TTL per key, not a lease. Each distinct TTL becomes one lease, granted at
  the import, so a key written with a TTL still expires: at most its TTL after the import, as
  it would after a kine restart (kine starts every TTL again when it starts).
- revisions that only fill gaps (kine's `gap-N` rows) and kine's bookkeeping row hold no key:
  they stay revisions without events, as kine's clients saw them.

All of it is written in one transaction of the target, so an import that fails leaves the target
as empty as it was; the target must be empty. At the end the counts are compared and the new
store's HashKV printed, for checking against what a kine-server on it answers later.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from kine_server.drivers.base import Driver, RawRow
from kine_server.drivers.kine_source import KineRow, KineSource
from kine_server.maintenance.restore import SnapshotError

#: Rows read from kine, and written, per step.
PAGE = 1000
#: A progress line every this many rows.
PROGRESS_ROWS = 20_000
#: Lease ids for kine's TTLs: "kine" in the high 32 bits, the TTL in seconds below.
LEASE_BASE = 0x6B696E65 << 32

_GAP = re.compile(rb"gap-\d+")


def lease_for(ttl: int) -> int:
    """The lease id a TTL of `ttl` seconds becomes (0: no lease)."""
    return LEASE_BASE | ttl if ttl > 0 else 0


def is_gap(row: KineRow) -> bool:
    """A row kine wrote only to fill a revision (`gap-N`, a deletion of nothing)."""
    return row.deleted and not row.created and _GAP.fullmatch(row.name) is not None


@dataclass
class ImportReport:
    revision: int
    compact_revision: int
    rows: int
    live_keys: int
    leases: int


class _Versions:
    """Each key's version as the rows go by: the only state kept per key."""

    def __init__(self) -> None:
        self._current: dict[bytes, int] = {}

    def next(self, row: KineRow) -> int:
        if row.deleted:
            self._current.pop(row.name, None)
            return 0
        version = 1 if row.created else self._current.get(row.name, 0) + 1
        self._current[row.name] = version
        return version


def convert(row: KineRow, version: int) -> RawRow:
    """kine's row as kine-server's row of the same revision (one change per revision: sub 0)."""
    if row.deleted:  # a tombstone, as the applier writes one
        return RawRow(row.name, 0, row.id, 0, b"", 0, 0, row.next_id)
    create_revision = row.id if row.created else (row.create_revision or row.id)
    lease = lease_for(row.lease)
    return RawRow(row.name, create_revision, row.id, version, row.value, lease, 0, row.next_id)


async def import_kine(
    source: KineSource, target: Driver, progress: Callable[[str], None] = lambda _: None
) -> ImportReport:
    """Copy `source` into the empty store `target` in one transaction (see the module)."""
    async with source.snapshot() as kine, target.write() as writer:
        existing = await writer.lock()
        if existing.revision > 1 or await writer.dump((0, -1), 1):
            raise SnapshotError("the target database already holds data; import needs an empty one")
        newest, compacted = await kine.counters()
        versions = _Versions()
        ttls: set[int] = set()  # of the keys' newest rows: the leases to grant
        after = rows = 0
        report_at = PROGRESS_ROWS
        while page := await kine.rows(after, PAGE):
            converted = []
            for row in page:
                if is_gap(row):
                    continue
                converted.append(convert(row, versions.next(row)))
                if row.lease > 0 and not row.deleted and row.next_id is None:
                    ttls.add(row.lease)
            if converted:
                await writer.insert_raw(converted)
            rows += len(converted)
            after = page[-1].id
            if rows >= report_at:
                progress(f"imported {rows} rows, revision {after} of {newest}")
                report_at += PROGRESS_ROWS
        for ttl in sorted(ttls):
            await writer.insert_lease(lease_for(ttl), ttl)
        revision = max(newest, 1)
        await writer.set_meta("revision", revision)
        await writer.set_meta("compact_revision", compacted if compacted > 0 else -1)
        await writer.set_meta("compacted_through", max(compacted, 0))
        live = await kine.live_keys()
    return ImportReport(revision, compacted, rows, live, len(ttls))
