"""Soak tests of crashes and network faults under load (`make soak`; excluded from `make test`).

(a) kill -9 of a real kine-server process at random moments under concurrent writers, on SQLite
and PostgreSQL: every acknowledged write survives, and revisions stay dense (each revision from 2
to the current one has an event).
(b) PostgreSQL behind tests.support.faultproxy, cycling blackhole, reset and slow under writers and
readers: every request that fails, fails with UNAVAILABLE (never a hang into the client's
deadline), no acknowledged write is lost, and afterwards the server serves, hears other instances'
commits at once, and stops within its grace on SIGTERM even while the database is blackholed.

Both are bounded: KINE_SOAK_ROUNDS kill rounds (default 10) and KINE_SOAK_CYCLES fault cycles
(default 12), each a few seconds.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest

from kine_server.config import Config
from kine_server.drivers.postgres import with_database
from kine_server.pb import rpc_pb2 as pb
from tests.support.client import Client, connect
from tests.support.faultproxy import Mode
from tests.support.postgres import ThrowawayPostgres
from tests.support.process import KineProcess
from tests.support.watching import WatchStream
from tests.test_pg_faults import NOTIFIED_WITHIN, eventually, notified_within, proxy_for
from tests.test_watch import collect

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("KINE_SOAK_ROUNDS", "10"))
CYCLES = int(os.environ.get("KINE_SOAK_CYCLES", "12"))
WRITERS = 8
#: Far longer than any request should take: a failure with DEADLINE_EXCEEDED is a hang.
DEADLINE = 30.0


class Load:
    """Writers putting unique keys (recording the acknowledged ones) and optional readers."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.client: Client | None = None
        self.acked: dict[bytes, int] = {}
        self.failures: list[grpc.StatusCode] = []
        self.reads = 0
        #: The longest any request took, answered or failed.
        self.slowest = 0.0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, writers: int, readers: int = 0) -> None:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._write(n)) for n in range(writers)]
        self._tasks += [asyncio.create_task(self._read()) for _ in range(readers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _write(self, n: int) -> None:
        rng = random.Random()
        while not self._stop.is_set():
            key = self.prefix + b"%d/%s" % (n, uuid.uuid4().hex[:12].encode())
            assert self.client is not None
            began = time.monotonic()
            try:
                response = await self.client.kv.Put(
                    pb.PutRequest(key=key, value=b"x" * rng.randrange(1, 200)), timeout=DEADLINE
                )
                self.acked[key] = response.header.revision
            except grpc.aio.AioRpcError as exc:
                self.failures.append(exc.code())
                await asyncio.sleep(0.05)
            finally:
                self.slowest = max(self.slowest, time.monotonic() - began)

    async def _read(self) -> None:
        while not self._stop.is_set():
            assert self.client is not None
            began = time.monotonic()
            try:
                await self.client.kv.Range(
                    pb.RangeRequest(
                        key=self.prefix, range_end=end_of(self.prefix), count_only=True
                    ),
                    timeout=DEADLINE,
                )
                self.reads += 1
            except grpc.aio.AioRpcError as exc:
                self.failures.append(exc.code())
                await asyncio.sleep(0.05)
            finally:
                self.slowest = max(self.slowest, time.monotonic() - began)


def end_of(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


async def check_store(client: Client, load: Load) -> None:
    """Every acknowledged write is there, at its revision; every revision has an event."""
    listing = await eventually(
        lambda: client.kv.Range(
            pb.RangeRequest(key=load.prefix, range_end=end_of(load.prefix), keys_only=True),
            timeout=DEADLINE,
        )
    )
    stored = {kv.key: kv.mod_revision for kv in listing.kvs}
    missing = {k: r for k, r in load.acked.items() if stored.get(k) != r}
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {next(iter(missing))!r}"
    current = listing.header.revision
    stream = WatchStream(client)
    await stream.create(b"\x00", b"\x00", start_revision=1)
    assert (await stream.read()) is not None
    events = (await collect(stream, {0}, current))[0]
    await stream.close()
    revisions = {r for r, _, _ in events}
    assert revisions == set(range(2, current + 1)), "revisions are not dense"


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_kill_9_loop_under_writers_loses_no_acknowledged_write(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "sqlite":
        dsn = f"sqlite://{tmp_path}/db/state.db"
    else:
        pg: ThrowawayPostgres = request.getfixturevalue("postgres")
        dsn = with_database(pg.dsn, f"kine_{uuid.uuid4().hex[:12]}")
    rng = random.Random(9)
    kine = KineProcess(dsn, tmp_path, "--compact-interval", "0")
    load = Load(b"/soak/k9/")
    try:
        for _ in range(ROUNDS):
            kine.start()
            load.client = connect(kine.address)
            load.start(WRITERS)
            await asyncio.sleep(rng.uniform(0.3, 2.0))  # a random moment, writes in flight
            assert kine.proc is not None
            kine.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(kine.proc.wait)
            await asyncio.sleep(rng.uniform(0, 0.3))  # writers meet the dead server too
            await load.stop()
            await load.client.close()
            kine.proc = None
        assert len(load.acked) > 10 * ROUNDS
        assert set(load.failures) <= {grpc.StatusCode.UNAVAILABLE}
        kine.start()
        client = connect(kine.address)
        try:
            await check_store(client, load)
        finally:
            await client.close()
    finally:
        if kine.proc is not None and kine.proc.poll() is None:
            kine.proc.kill()
            kine.proc.wait()


async def test_blackhole_reset_slow_cycles_under_load(
    postgres: ThrowawayPostgres, tmp_path: Path
) -> None:
    dsn = with_database(postgres.dsn, f"kine_{uuid.uuid4().hex[:12]}")
    rng = random.Random(23)
    timeout = 3.0  # --datastore-timeout: short, so that the cycles come thick and fast
    options = ["--poll-interval", "60s", "--compact-interval", "0"]
    with (
        proxy_for(postgres) as proxy,
        KineProcess(proxy.dsn(dsn), tmp_path, *options, "--datastore-timeout", "3s") as faulty,
        KineProcess(dsn, tmp_path, *options) as direct,
    ):
        client, other = connect(faulty.address), connect(direct.address)
        load = Load(b"/soak/faults/")
        load.client = client
        try:
            load.start(WRITERS, readers=2)
            # Every fault in each three cycles, in a random order: a short run (CI's) tries all.
            kinds = [Mode.BLACKHOLE, Mode.RESET, Mode.SLOW]
            modes = [m for _ in range(0, CYCLES, 3) for m in rng.sample(kinds, 3)][:CYCLES]
            assert set(modes) == set(kinds), "KINE_SOAK_CYCLES below 3 leaves a fault untried"
            for mode in modes:
                proxy.set_mode(mode, latency=rng.uniform(0.02, 0.2))
                # Blackholes end before the timeout (requests wait it out) or long after it
                # (requests must give up, not wait for the end).
                longest = 5 * timeout if mode is Mode.BLACKHOLE else 2.5 * timeout
                await asyncio.sleep(rng.uniform(0.5, longest))
                proxy.set_mode(Mode.FORWARD)
                await asyncio.sleep(rng.uniform(0.5, 3.0))
            await load.stop()
            assert load.failures, "the faults should have failed some requests"
            # Every failure was a prompt UNAVAILABLE: none waited into the client's deadline.
            assert set(load.failures) <= {grpc.StatusCode.UNAVAILABLE}, set(load.failures)
            # ... and none took much longer than the timeout, however long the blackhole.
            assert load.slowest < 4 * timeout, f"a request took {load.slowest:.1f}s"
            assert len(load.acked) > 100 and load.reads > 10
            await check_store(client, load)
            status = await client.maintenance.Status(pb.StatusRequest(), timeout=DEADLINE)
            assert status.errors == []
            # Healthy includes notifications: the other instance's next commit arrives at once,
            # not at the 60 s poll interval.
            stream = WatchStream(client)
            await stream.create(b"/soak/other", b"/soak/other0")
            assert (await stream.read()) is not None
            put = await other.kv.Put(pb.PutRequest(key=b"/soak/other", value=b"x"), timeout=10)
            took = await notified_within(stream, b"/soak/other", put.header.revision)
            assert took < NOTIFIED_WITHIN
            await stream.close()
        finally:
            proxy.set_mode(Mode.FORWARD)
            await client.close()
            await other.close()
        # And it stops within its grace on SIGTERM, database blackholed.
        proxy.set_mode(Mode.BLACKHOLE)
        await asyncio.sleep(2 * timeout)
        assert faulty.proc is not None
        began = time.monotonic()
        faulty.proc.terminate()
        grace = Config().shutdown_grace
        try:
            code = await asyncio.to_thread(faulty.proc.wait, grace + 10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"running {grace + 10}s after SIGTERM") from None
        assert code == 0 and time.monotonic() - began < grace + 2.0
