"""Background tasks that survive their own bugs.

Every long-running task of the store (writer, poller, lease expiry, compactor, quota) runs under
`supervised`: an exception that escapes it is logged with its traceback and the task starts
again after a pause, instead of leaving a server that answers requests with nobody behind them
(a writer that is gone while `submit` waits forever). Cancellation still ends it.
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


def start(name: str, body: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """`body` as a supervised task named `name`."""
    return asyncio.create_task(supervised(name, body), name=name)
