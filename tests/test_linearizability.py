"""Linearizability of recorded histories under faults, as etcd's robustness suite checks etcd.

Concurrent clients (a connection each) run random Get / Put / Delete / Txn compare-and-set on a
few keys against a real kine-server process while it is killed with -9 (all of it, or one
front-end of `--workers 2`), PostgreSQL is restarted, or the network to PostgreSQL blackholes,
resets or slows down. Two watches (one from the first revision, one opened mid-way) reconnect
after each fault. The history must be linearizable as etcd's KV (tests.support.linearizability
.checker, per key, time-capped: UNKNOWN fails), keep etcd's revision guarantees, and both watches
must deliver every write exactly once, in revision order. Across two keys, a Txn writing both
must be atomic to Ranges reading both (the whole history searched, unpartitioned).

The short runs here record 5 s each (about 8 s with start-up and checks); `make soak` runs the
long ones (KINE_LIN_SECONDS each, default 60, a fault every few seconds; also two servers on one
PostgreSQL). A failing run saves its history as JSON in the test's tmp_path and names it:
`History.from_json` and `verify` reproduce the verdict offline.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from kine_server.drivers.postgres import with_database
from tests.support.faultproxy import FaultProxy, Mode
from tests.support.linearizability import faults, multikey, mutations
from tests.support.linearizability.checker import Verdict
from tests.support.linearizability.faults import Fault
from tests.support.linearizability.recorder import Workload
from tests.support.linearizability.run import Recording, record
from tests.support.linearizability.verify import verify
from tests.support.postgres import ThrowawayPostgres
from tests.support.process import KineProcess
from tests.test_pg_faults import proxy_for

#: Seconds each short run records.
SHORT = 5.0
LONG = float(os.environ.get("KINE_LIN_SECONDS", "60"))
#: The search's cap: past it the verdict is UNKNOWN, and the test fails.
CHECK_TIMEOUT = 60.0
#: Answered operations a run records at least: it goes on past its time until it has them (a
#: run on an idle machine makes thousands; a loaded one takes longer, it is not thinner).
MIN_OK = 200
SERVER_OPTIONS = ["--compact-interval", "0"]


def verified(recording: Recording, tmp_path: Path, timeout: float = CHECK_TIMEOUT) -> None:
    """The recording passes every check (else its history is saved and named), its watches were
    drained through the final revision, and the server answered writes after every fault."""
    verification = verify(recording.history, timeout=timeout)
    print(recording.summary())
    print(verification.report())
    if not verification.ok:
        saved = recording.history.save(tmp_path / "history.json")
        pytest.fail(f"{recording.summary()}\n{verification.report()}\nhistory: {saved}")
    assert not recording.undrained, f"no progress response through the end: {recording.undrained}"
    assert not recording.unanswered_after(), recording.summary()
    assert sum(op.ok for op in recording.history.operations) >= MIN_OK, recording.summary()


async def short_run(
    address: str, schedule: Sequence[Fault] = (), seconds: float = SHORT
) -> Recording:
    """A run of `make test`: SHORT seconds, and at least MIN_OK answered operations."""
    return await record(address, seconds, schedule, min_answered=MIN_OK)


def database(postgres: ThrowawayPostgres) -> str:
    return with_database(postgres.dsn, f"kine_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def proxy(postgres: ThrowawayPostgres) -> Iterator[FaultProxy]:
    with proxy_for(postgres) as p:
        yield p


async def test_sqlite_kill_9_of_the_server(tmp_path: Path) -> None:
    dsn = f"sqlite://{tmp_path}/db/state.db"
    with KineProcess(dsn, tmp_path, "--workers", "1", *SERVER_OPTIONS) as kine:
        kill = faults.kill_server(kine)
        recording = await short_run(
            kine.address, [Fault(1.5, "kill -9", kill), Fault(3.5, "kill -9", kill)]
        )
    verified(recording, tmp_path)
    # The first kill certainly cut its established stream (a later one may come before it is
    # back, while it waits for the server).
    assert recording.history.watches[0].reconnects, "the watch outlived the server it watched"


async def test_workers_2_kill_9_of_a_frontend_then_the_server(dsn: str, tmp_path: Path) -> None:
    with KineProcess(dsn, tmp_path, "--workers", "2", *SERVER_OPTIONS) as kine:
        recording = await short_run(
            kine.address,
            [
                Fault(1.5, "kill -9 front-end", faults.kill_frontend(kine)),
                Fault(3.5, "kill -9", faults.kill_server(kine)),
            ],
        )
    verified(recording, tmp_path)


async def test_postgres_restarted_and_its_network_faulty(
    postgres: ThrowawayPostgres, proxy: FaultProxy, tmp_path: Path
) -> None:
    if postgres.external:
        pytest.skip("needs the throwaway PostgreSQL this suite starts (it restarts it)")
    options = ["--workers", "1", "--datastore-timeout", "1s", *SERVER_OPTIONS]
    with KineProcess(proxy.dsn(database(postgres)), tmp_path, *options) as kine:
        recording = await short_run(
            kine.address,
            [
                Fault(0.8, "PostgreSQL restart", faults.restart_postgres(postgres)),
                Fault(2.0, "blackhole", faults.proxy_fault(proxy, Mode.BLACKHOLE, 1.5)),
                Fault(3.8, "reset", faults.proxy_fault(proxy, Mode.RESET, 0.3)),
                Fault(4.3, "slow", faults.proxy_fault(proxy, Mode.SLOW, 1.0)),
            ],
        )
    verified(recording, tmp_path)
    # A blackhole longer than --datastore-timeout fails every request in flight.
    assert any(not op.ok for op in recording.history.operations), recording.summary()


async def test_a_recorded_history_with_one_thing_wrong_fails(tmp_path: Path) -> None:
    """The checks on a real history: it passes as recorded, and each alteration is flagged."""
    dsn = f"sqlite://{tmp_path}/db/state.db"
    with KineProcess(dsn, tmp_path, "--workers", "1", *SERVER_OPTIONS) as kine:
        recording = await short_run(kine.address, seconds=2.0)
    verified(recording, tmp_path)
    history = recording.history
    for name, altered, expected in mutations.all_of(history):
        verification = verify(altered, timeout=CHECK_TIMEOUT)
        report = verification.report()
        assert not verification.ok and expected in report, f"{name} went unnoticed:\n{report}"
        print(
            f"{name}: {report.splitlines()[0]}; {len(verification.findings.violations)} violations"
        )


async def test_a_txn_over_two_keys_is_atomic_to_readers(tmp_path: Path) -> None:
    """A Txn swapping two keys against Ranges reading both, on `--workers 2` (reads and writes
    in different processes), one front-end killed: checked as one history, unpartitioned."""
    dsn = f"sqlite://{tmp_path}/db/state.db"
    with KineProcess(dsn, tmp_path, "--workers", "2", *SERVER_OPTIONS) as kine:
        clients = multikey.MultiClients(kine.address, clients=6, seed=5)
        stop = asyncio.Event()
        running = asyncio.create_task(clients.run(stop))
        await asyncio.sleep(0.8)
        await asyncio.to_thread(faults.kill_frontend(kine))
        await asyncio.sleep(1.2)
        deadline = time.monotonic() + 60  # a loaded machine: longer, not thinner
        while sum(op.outcome is not None for op in clients.operations) < MIN_OK:
            assert time.monotonic() < deadline, f"{len(clients.operations)} operations"
            await asyncio.sleep(0.1)
        stop.set()
        await running
    ops = clients.operations
    verdict, report = multikey.check(ops, CHECK_TIMEOUT)
    kinds = Counter((op.kind.value, op.outcome is not None) for op in ops)
    print(f"{len(ops)} operations {dict(kinds)}\n{report}")
    assert verdict is Verdict.OK, report
    # The runs' point was made: swaps held, and reads saw the keys written by them.
    swapped = {op.values for op in ops if op.outcome and op.outcome.succeeded and op.kind == "swap"}
    read_whole = [
        op
        for op in ops
        if op.kind == "read"
        and op.outcome
        and tuple(kv and kv.value for kv in op.outcome.kvs) in swapped
    ]
    assert swapped and read_whole, dict(kinds)
    # One of those reads torn: b as it was before the swap that wrote a. Flagged.
    read = read_whole[0]
    assert read.outcome is not None and read.outcome.kvs[0] is not None
    a = read.outcome.kvs[0]
    swap = next(op for op in ops if op.kind == "swap" and op.values[0] == a.value)
    assert swap.outcome is not None
    torn = replace(read.outcome, kvs=(a, swap.outcome.kvs[1]))
    ops[ops.index(read)] = replace(read, outcome=torn)
    assert multikey.check(ops, CHECK_TIMEOUT)[0] is Verdict.ILLEGAL


Injector = Callable[[random.Random], Callable[[], None]]


def soak_faults(
    kine: KineProcess,
    workers: int,
    postgres: ThrowawayPostgres | None = None,
    proxy: FaultProxy | None = None,
    label: str = "",
) -> list[tuple[str, Injector]]:
    """The faults that apply to a server: kill -9 of it or of a front-end, and of its database
    (restart) and of the network to it (through `proxy`), each made with random durations."""
    found: list[tuple[str, Injector]] = [("kill -9", lambda _: faults.kill_server(kine))]
    if workers > 1:
        found.append(("kill -9 front-end", lambda _: faults.kill_frontend(kine)))
    if postgres is not None and not postgres.external:
        found.append(("PostgreSQL restart", lambda _: faults.restart_postgres(postgres)))
    if proxy is not None:
        for mode, longest in ((Mode.BLACKHOLE, 3.0), (Mode.RESET, 0.5), (Mode.SLOW, 3.0)):

            def make(
                rng: random.Random, mode: Mode = mode, longest: float = longest
            ) -> Callable[[], None]:
                assert proxy is not None
                return faults.proxy_fault(proxy, mode, rng.uniform(0.2, longest))

            found.append((mode.value, make))
    return [(f"{name}{label}", make) for name, make in found]


def soak_schedule(rng: random.Random, kinds: list[tuple[str, Injector]]) -> list[Fault]:
    """A fault every 3 to 7 seconds through LONG, each drawn from `kinds`."""
    schedule = []
    at = rng.uniform(1, 3)
    while at < LONG - 3:
        name, make = rng.choice(kinds)
        schedule.append(Fault(at, name, make(rng)))
        at += rng.uniform(3, 7)
    return schedule


SOAK_OPTIONS = ["--datastore-timeout", "1s", *SERVER_OPTIONS]
SOAK_WORKLOAD = Workload(keys=5, clients=8)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
async def test_soak_sqlite(workers: int, tmp_path: Path) -> None:
    """LONG seconds of recording, a kill -9 (of the server or a front-end) every few seconds."""
    rng = random.Random(f"sqlite/{workers}")
    dsn = f"sqlite://{tmp_path}/db/state.db"
    with KineProcess(dsn, tmp_path, "--workers", str(workers), *SOAK_OPTIONS) as kine:
        schedule = soak_schedule(rng, soak_faults(kine, workers))
        recording = await record(
            kine.address, LONG, schedule, SOAK_WORKLOAD, rng.randrange(99), MIN_OK
        )
    verified(recording, tmp_path, timeout=10 * CHECK_TIMEOUT)


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
async def test_soak_postgres(
    workers: int, postgres: ThrowawayPostgres, proxy: FaultProxy, tmp_path: Path
) -> None:
    """LONG seconds of recording with a fault every few seconds: kill -9 of the server or a
    front-end, PostgreSQL restarted, its network blackholed, reset or slow."""
    rng = random.Random(f"postgres/{workers}")
    dsn = proxy.dsn(database(postgres))
    with KineProcess(dsn, tmp_path, "--workers", str(workers), *SOAK_OPTIONS) as kine:
        schedule = soak_schedule(rng, soak_faults(kine, workers, postgres, proxy))
        recording = await record(
            kine.address, LONG, schedule, SOAK_WORKLOAD, rng.randrange(99), MIN_OK
        )
    verified(recording, tmp_path, timeout=10 * CHECK_TIMEOUT)


@pytest.mark.slow
async def test_soak_two_instances_on_one_postgres(
    postgres: ThrowawayPostgres, proxy: FaultProxy, tmp_path: Path
) -> None:
    """Two servers on one database, the clients taking turns between them (the watch from the
    start on one, the mid-way one on the other): one history, as linearizable as one server's.
    Faults: either killed with -9, a front-end of the first, PostgreSQL restarted, the second's
    network to it faulty."""
    rng = random.Random("two instances")
    dsn = database(postgres)
    with (
        KineProcess(dsn, tmp_path, "--workers", "2", *SOAK_OPTIONS) as first,
        KineProcess(proxy.dsn(dsn), tmp_path, "--workers", "1", *SOAK_OPTIONS) as second,
    ):
        kinds = soak_faults(first, 2, postgres, label=" (first)")
        kinds += soak_faults(second, 1, proxy=proxy, label=" (second)")
        schedule = soak_schedule(rng, kinds)
        recording = await record(
            [first.address, second.address],
            LONG,
            schedule,
            SOAK_WORKLOAD,
            rng.randrange(99),
            MIN_OK,
        )
    verified(recording, tmp_path, timeout=10 * CHECK_TIMEOUT)
