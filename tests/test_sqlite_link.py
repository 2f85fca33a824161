"""The SQLite link's bookkeeping of what runs on its thread: a statement may run inline on the
event loop only when nothing of the link's is queued or running there, also when the caller who
queued it was cancelled (its step still runs, and the connection's statements must keep their
order)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from kine_server.drivers.sqlite_link import Link


async def test_a_cancelled_step_keeps_the_link_busy_until_the_thread_has_run_it(
    tmp_path: Path,
) -> None:
    link = await Link.connect(str(tmp_path / "x.db"), "test", busy_timeout_ms=1000)
    started, release = threading.Event(), threading.Event()

    def slow(conn: sqlite3.Connection) -> None:
        started.set()
        release.wait(10)
        conn.execute("BEGIN")

    try:
        step = link.submit(slow)
        queued_behind = link.submit(lambda conn: conn.in_transaction)
        assert await asyncio.to_thread(started.wait, 10)
        step.cancel()
        queued_behind.cancel()
        await asyncio.sleep(0)  # the cancellations' callbacks run
        assert not link.idle, "a statement run inline now would overtake the queued BEGIN"
        release.set()
        async with asyncio.timeout(10):
            while not link.idle:
                await asyncio.sleep(0.01)
        assert link.conn.in_transaction  # the cancelled step did run, in its turn
        link.conn.execute("ROLLBACK")
    finally:
        release.set()
        await link.close()
