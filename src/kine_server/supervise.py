"""Background tasks that survive their own bugs.

Every long-running task of the store (writer, poller, lease expiry, compactor, quota) runs under
`supervised`: an exception that escapes it is logged with its traceback and the task starts
again after a pause, instead of leaving a server that answers requests with nobody behind them
(a writer that is gone while `submit` waits forever). Cancellation still ends it.

A task's loop waits for its wake-up with `woken`, not asyncio.wait_for: on Python 3.11,
wait_for returns normally when what it waits for finishes just as the waiting task is
cancelled, and the cancellation is lost (CPython gh-86296, fixed in 3.12): the loop runs on and
the stop() that cancelled it waits forever. asyncio.timeout has no such window.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

#: Pause before a failed task runs again: long enough not to spin on a persistent fault.
RESTART_DELAY = 1.0


async def supervised(
    name: str, body: Callable[[], Awaitable[None]], restart_delay: float = RESTART_DELAY
) -> None:
    """Run `body()` until it returns; if it raises, log it and run it again."""
    while True:
        try:
            await body()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("background task %s failed; restarting it in %gs", name, restart_delay)
        await asyncio.sleep(restart_delay)


async def woken(event: asyncio.Event, timeout: float | None) -> bool:
    """Whether `event` is set within `timeout` seconds (None: no limit)."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


def start(name: str, body: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """`body` as a supervised task named `name`."""
    return asyncio.create_task(supervised(name, body), name=name)
