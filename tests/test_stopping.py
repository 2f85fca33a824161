"""A background loop ends when it is stopped, even when its wake-up meets the cancellation.

On Python 3.11 asyncio.wait_for returns normally when what it waits for finishes just as the
waiting task is cancelled, and the cancellation is lost (CPython gh-86296). The loops waited for
their wake-up with it: an instance stopped just as its poller was woken (test_pg_faults'
cut-off instance, in a CI run) kept polling, and its stop() waited forever. They now wait with
supervise.woken (asyncio.timeout), which has no such window.
"""

from __future__ import annotations

import asyncio

import pytest

from kine_server import supervise
from kine_server.process.single import SingleProcess


async def test_a_cancel_in_the_same_turn_as_the_wake_up_is_not_lost() -> None:
    event = asyncio.Event()
    waiting = asyncio.create_task(supervise.woken(event, 10))
    await asyncio.sleep(0)  # it waits
    event.set()
    waiting.cancel()  # before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_woken_says_whether_the_event_was_set_in_time() -> None:
    event = asyncio.Event()
    assert not await supervise.woken(event, 0.01)
    event.set()
    assert await supervise.woken(event, 10)
    assert await supervise.woken(event, None)


async def test_the_poller_and_the_compactor_stop_when_woken_as_they_are_stopped(
    server: SingleProcess,
) -> None:
    side = server.write_side
    for loop in (side.poller, side.compactor):
        loop.wake()
        await asyncio.wait_for(loop.stop(), 10)  # before: the loop ran on, stop() never ended
