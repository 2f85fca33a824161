"""This process's view of the auth store: the state checks use, read again when it changes.

The state is in the database, so every process and every instance sharing a PostgreSQL database
sees the same users and roles. A process reads it at once after a change it made itself, after
hearing of one from the writer process (`expect`), and within `POLL_INTERVAL` after anyone
else's, so a revoked permission or a deleted user stops working everywhere within that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from kine_server import errors
from kine_server.auth.changes import Change
from kine_server.auth.permissions import AuthState, Identity
from kine_server.drivers.base import Driver
from kine_server.mvcc.applier import Applier
from kine_server.mvcc.writer import Writer

log = logging.getLogger(__name__)

#: How often a process looks for changes made elsewhere (another front-end, another instance).
POLL_INTERVAL = 0.1


class AuthStore:
    """This process's view of the auth store: the state requests are checked against, read
    again whenever the generation in the database moves."""

    def __init__(self, driver: Driver, poll_interval: float = POLL_INTERVAL) -> None:
        self._driver = driver
        self._poll_interval = poll_interval
        self.state = AuthState()
        self._poller: asyncio.Task[None] | None = None
        self._reading: asyncio.Lock | None = None
        self._loaded = False
        #: A generation this process has heard exists (`expect`) and may not have read yet.
        self._expected = 0
        #: Told each new generation this process reads (the writer tells its front-ends).
        self.observers: list[Callable[[int], None]] = []

    def expect(self, generation: int) -> None:
        """Another process changed the store (to `generation`): requests wait for it to be
        read (see `current`) instead of being checked against what it replaced."""
        self._expected = max(self._expected, generation)

    async def current(self) -> AuthState:
        """The state to check a request against: the one in force, read again first if a newer
        one is known to exist. Costs nothing when none is."""
        if self._expected > self.state.generation:
            await self.reload()
        return self.state

    async def start(self) -> None:
        await self.reload()
        self._poller = asyncio.create_task(self._poll(), name="kine-auth-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None

    async def reload(self) -> AuthState:
        """Read the state again (one at a time: concurrent callers share the newest)."""
        if self._reading is None:
            self._reading = asyncio.Lock()
        async with self._reading:
            with errors.database_errors():
                async with self._driver.read() as tx:
                    state = await AuthState.read(tx)
            # The same generation keeps the state in force, with the permissions it has built.
            if not self._loaded or state.generation > self.state.generation:
                self.state, self._loaded = state, True
                for observer in self.observers:
                    observer(state.generation)
            return self.state

    async def _poll(self) -> None:
        """Another process's or instance's changes: read again when the generation moves. A
        database that cannot be reached leaves the last state in force until it can."""
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                generation = await self._driver.meta("auth_generation")
                if generation is not None and generation != self.state.generation:
                    await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("cannot read the auth store's generation: %s", exc)

    async def change(self, writer: Writer, method: str, req: Any, who: Identity | None) -> Message:
        """Apply one Auth call through the writer (serialised with every other write, on the
        state as the database holds it in that transaction), then use the new state."""

        async def apply(applier: Applier) -> Message:
            tx = applier.write_tx
            change = Change(await AuthState.read(tx))
            response = change.apply(method, req, who)
            if change.changed:
                applier.auth_generation = await change.write(tx)
            return response

        response = await writer.submit(apply)
        await self.reload()
        return response

    async def ensure_secret(self, writer: Writer) -> None:
        """Give the store a key for simple tokens if it has none: one restored from etcd's
        snapshot (etcd keeps its tokens in memory) or made before there was auth. In the
        writer's transaction, so instances starting together agree on one key."""
        if (await self.reload()).secret:
            return

        async def apply(applier: Applier) -> None:
            change = Change(await AuthState.read(applier.write_tx))
            if not change.state.secret:
                change.secret = secrets.token_bytes(32)
                applier.auth_generation = await change.write(applier.write_tx)

        await writer.submit(apply)
        await self.reload()
