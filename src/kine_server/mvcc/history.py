"""Watch history read back from the database: a page of changes as events, whole revisions only.

A watch that starts in the past, or fell behind the live feed, reads its events from here a page
at a time (mvcc/watchable.py); so does the poller, for revisions another instance committed.
A page never splits a revision: one revision's events always go out in one response.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

from kine_server.drivers.base import Change, ReadTx
from kine_server.mvcc.applier import CHUNK, to_kv
from kine_server.mvcc.hub import WireEvent
from kine_server.pb import kv_pb2

Event = kv_pb2.Event

#: The most rows one statement reads of a revision larger than a page. A DeleteRange of a whole
#: key space is one revision of hundreds of thousands of changes, each read with its previous
#: value: read in one statement, it could outlast --datastore-timeout, and a poller or watch
#: retrying it would never get past it.
REVISION_PIECE = 5000


def change_event(change: Change) -> kv_pb2.Event:
    row, prev = change
    if row.version == 0:
        kv = kv_pb2.KeyValue(key=row.key, mod_revision=row.mod_revision)
        event = Event(type=Event.DELETE, kv=kv)
    else:
        event = Event(type=Event.PUT, kv=to_kv(row))
    if prev is not None:
        event.prev_kv.CopyFrom(to_kv(prev))
    return event


async def wire_events(changes: list[Change]) -> list[WireEvent]:
    """History as events, CHUNK at a time: one revision's history (a DeleteRange's) can be
    50 000 changes, and building them at once held the event loop for every other client."""
    events: list[WireEvent] = []
    for start in range(0, len(changes), CHUNK):
        if start:
            await asyncio.sleep(0)
        events += [WireEvent(change_event(c)) for c in changes[start : start + CHUNK]]
    return events


class HistoryPage(NamedTuple):
    """A page of history for a catching-up watcher: complete for every revision up to `through`."""

    compact_revision: int
    changes: list[Change]
    through: int


def whole_revisions(changes: list[Change]) -> list[Change]:
    """Drop a full page's last revision, which may continue past the page: one revision must
    never be split over two responses. Empty if the page holds part of a single revision."""
    last = changes[-1].row.mod_revision
    return [c for c in changes if c.row.mod_revision != last]


async def read_page(
    tx: ReadTx,
    after: int,
    through: int,
    key: bytes,
    end: bytes | None,
    limit: int,
    piece: int = REVISION_PIECE,
) -> tuple[list[Change], int]:
    """The changes of a key range after `after`, about `limit` of them, whole revisions only,
    and the revision they are complete through (`through` unless the page was full). A single
    revision larger than `limit` is read whole, `piece` rows per statement."""
    changes = await tx.changes(after, through, key, end, limit)
    if len(changes) < limit:
        return changes, through
    whole = whole_revisions(changes)
    if whole:
        return whole, whole[-1].row.mod_revision
    revision = changes[-1].row.mod_revision
    while True:
        more = await tx.revision_changes(revision, changes[-1].row.sub, key, end, piece)
        changes += more
        if len(more) < piece:
            return changes, revision
