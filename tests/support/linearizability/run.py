"""One recording: clients and two watches against a server while faults are injected, then the
final state read and the watches drained."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.support.linearizability.faults import Fault
from tests.support.linearizability.history import History
from tests.support.linearizability.recorder import Clients, Watcher, Workload


@dataclass
class Recording:
    history: History
    #: Each fault: its name, and when it began and ended (monotonic ns).
    faults: list[tuple[str, int, int]] = field(default_factory=list)
    seconds: float = 0.0
    #: Watches whose progress response never confirmed the final revision.
    undrained: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ops = self.history.operations
        ok = Counter(op.kind.value for op in ops if op.ok)
        failed = Counter(op.kind.value for op in ops if not op.ok)
        errors = Counter(op.error for op in ops if not op.ok)
        watches = ", ".join(
            f"{w.name} {len(w.events)} events, {len(w.reconnects)} reconnects"
            for w in self.history.watches
        )
        faults = ", ".join(f"{name} ({(end - at) / 1e9:.1f}s)" for name, at, end in self.faults)
        return (
            f"{len(ops)} operations in {self.seconds:.1f}s: {sum(ok.values())} ok "
            f"{dict(sorted(ok.items()))}, {sum(failed.values())} indeterminate "
            f"{dict(sorted(failed.items()))} {dict(errors)}; final revision "
            f"r{self.history.final_revision}; watches: {watches}; faults: {faults}"
        )

    def unanswered_after(self) -> list[str]:
        """The faults after whose end no write was answered (the server did not come back)."""
        ops = self.history.operations
        return [
            name
            for name, _, ended in self.faults
            if not any(op.writes and op.call > ended for op in ops)
        ]


async def record(
    addresses: str | Sequence[str],
    seconds: float,
    faults: Sequence[Fault] = (),
    workload: Workload | None = None,
    seed: int = 0,
    min_answered: int = 0,
    recover_within: float = 60.0,
) -> Recording:
    """Record for `seconds` (faults at their times, the mid-way watch opened halfway) and on
    until a write called after the last fault ended is answered and `min_answered` operations
    were (so a loaded machine makes a longer run, not a thinner one; `recover_within` seconds
    more at most), then read every key once more and drain both watches through the final
    revision.

    With several addresses (servers on one database) the clients take turns, the watch from
    the start is on the first, the mid-way one on the last."""
    workload = workload or Workload()
    addresses = [addresses] if isinstance(addresses, str) else list(addresses)
    began = time.monotonic()
    clients = Clients(addresses, workload, seed)
    from_start = Watcher(addresses[0], "from-start", workload, 1)
    mid_way = Watcher(addresses[-1], "mid-way", workload, 0)
    await from_start.start()
    stop = asyncio.Event()
    running = asyncio.create_task(clients.run(stop))
    recording = Recording(History([]))

    async def inject() -> None:
        for fault in faults:
            await asyncio.sleep(max(0.0, began + fault.at - time.monotonic()))
            started = time.monotonic_ns()
            await asyncio.to_thread(fault.inject)
            recording.faults.append((fault.name, started, time.monotonic_ns()))

    async def open_mid_way() -> None:
        await asyncio.sleep(seconds / 2)
        await mid_way.start()

    async def until_stop() -> None:
        await asyncio.sleep(seconds)
        await injecting
        ended = recording.faults[-1][2] if recording.faults else 0
        deadline = time.monotonic() + recover_within
        while time.monotonic() < deadline and not (
            clients.answered >= min_answered
            and (not recording.faults or clients.answered_write_after(ended))
        ):
            await asyncio.sleep(0.1)
        stop.set()

    injecting = asyncio.create_task(inject())
    try:
        await asyncio.gather(open_mid_way(), until_stop(), running)
    finally:
        stop.set()
        await running
        await injecting
    await clients.read_all(client=workload.clients)
    final = max(op.outcome.revision for op in clients.operations[-workload.keys :] if op.outcome)
    for watcher in (from_start, mid_way):
        if not await watcher.finish(final):
            recording.undrained.append(watcher.log.name)
    recording.history = History(clients.operations, [from_start.log, mid_way.log], final)
    recording.seconds = time.monotonic() - began
    return recording
