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
    #: Each fault's name and the seconds it took.
    faults: list[tuple[str, float]] = field(default_factory=list)
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
        faults = ", ".join(f"{name} ({took:.1f}s)" for name, took in self.faults)
        return (
            f"{len(ops)} operations in {self.seconds:.1f}s: {sum(ok.values())} ok "
            f"{dict(sorted(ok.items()))}, {sum(failed.values())} indeterminate "
            f"{dict(sorted(failed.items()))} {dict(errors)}; final revision "
            f"r{self.history.final_revision}; watches: {watches}; faults: {faults}"
        )


async def record(
    address: str,
    seconds: float,
    faults: Sequence[Fault] = (),
    workload: Workload | None = None,
    seed: int = 0,
) -> Recording:
    """Record for `seconds` (faults at their times, the mid-way watch opened halfway), then
    read every key once more and drain both watches through the final revision."""
    workload = workload or Workload()
    began = time.monotonic()
    clients = Clients(address, workload, seed)
    from_start = Watcher(address, "from-start", workload, 1)
    mid_way = Watcher(address, "mid-way", workload, 0)
    await from_start.start()
    stop = asyncio.Event()
    running = asyncio.create_task(clients.run(stop))
    recording = Recording(History([]))

    async def inject() -> None:
        for fault in faults:
            await asyncio.sleep(max(0.0, began + fault.at - time.monotonic()))
            started = time.monotonic()
            await asyncio.to_thread(fault.inject)
            recording.faults.append((fault.name, time.monotonic() - started))

    async def open_mid_way() -> None:
        await asyncio.sleep(seconds / 2)
        await mid_way.start()

    async def until_stop() -> None:
        await asyncio.sleep(seconds)
        stop.set()

    try:
        await asyncio.gather(inject(), open_mid_way(), until_stop(), running)
    finally:
        stop.set()
        await running
    await clients.read_all(client=workload.clients)
    final = max(op.outcome.revision for op in clients.operations[-workload.keys :] if op.outcome)
    for watcher in (from_start, mid_way):
        if not await watcher.finish(final):
            recording.undrained.append(watcher.log.name)
    recording.history = History(clients.operations, [from_start.log, mid_way.log], final)
    recording.seconds = time.monotonic() - began
    return recording
