"""Brings revisions the hub has not seen from the database into the hub, in revision order.

On a single instance every revision reaches the hub straight from the writer and this finds
nothing to do. When several instances share one PostgreSQL, the others' writes come in here:
woken at once by the database's notification of a commit (LISTEN/NOTIFY), or by the writer when
its own batch did not follow on from the hub's revision, and every `interval` in case a
notification was lost. Revisions are dense and commit-ordered in the table, so reading everything
after the hub's revision up to the current one never leaves a gap, except where compaction has
already removed history this instance had not yet read (it was stopped or cut off while another
compacted): then the hub skips to the compact revision, and the watches that needed what is gone
are cancelled with it, as etcd cancels a watch below its compact revision.
"""

from __future__ import annotations

import asyncio
import logging

from kine_server import supervise
from kine_server.drivers.base import OPEN_END, Driver, DriverError
from kine_server.mvcc.history import change_event, read_page
from kine_server.mvcc.hub import EventHub

log = logging.getLogger(__name__)

ALL_KEYS = b"\x00"


class Poller:
    def __init__(
        self, driver: Driver, hub: EventHub, interval: float = 1.0, batch_size: int = 500
    ) -> None:
        self._driver = driver
        self._hub = hub
        self._interval = interval
        self._batch_size = batch_size
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.polls = 0
        self.published_revisions = 0

    async def start(self) -> None:
        await self._driver.listen(self.notified)
        self._task = supervise.start("kine-poller", self._loop)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def wake(self) -> None:
        self._wake.set()

    def notified(self, revision: int) -> None:
        """A commit of `revision` somewhere; most are this instance's own, already published."""
        if revision > self._hub.revision:
            self._wake.set()

    async def _loop(self) -> None:
        while True:
            await supervise.woken(self._wake, self._interval)
            self._wake.clear()
            try:
                await self.poll()
            except DriverError as exc:
                log.warning("polling for new revisions failed, retrying: %s", exc)

    async def poll(self) -> None:
        """Publish every committed revision after the hub's, a page at a time."""
        self.polls += 1
        while True:
            after = self._hub.revision
            async with self._driver.read() as tx:
                counters = await tx.counters()
                if counters.revision <= after:
                    return
                if after < counters.compact_revision:
                    gap = counters.compact_revision
                else:
                    gap = 0
                    changes, _ = await read_page(
                        tx, after, counters.revision, ALL_KEYS, OPEN_END, self._batch_size
                    )
            if gap:
                log.warning(
                    "revisions %d to %d were compacted before this instance saw them; "
                    "cancelling the watches that needed them",
                    after + 1,
                    gap,
                )
                self._hub.skip(gap)
                continue
            if self._hub.publish([change_event(c) for c in changes]) and changes:
                self.published_revisions += max(0, self._hub.revision - after)
            elif self._hub.revision == after:
                # Not compaction, and nobody else moved the hub: revisions are missing from
                # the table itself. Never stall on it; watchers re-read what is there.
                through = changes[0].row.mod_revision - 1 if changes else counters.revision
                log.error("revisions %d to %d are missing from the table", after + 1, through)
                self._hub.skip(through)
            # else: the writer published meanwhile; read on from where the hub is now
