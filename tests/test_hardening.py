"""Defects found by hostile input and faults, each proven against the old code first.

Per-request failures stay their own; a lagging instance survives another's compaction; write
Txns on PostgreSQL never read half-compacted history; SQLite maintenance never fails on or
blocks behind compaction; background tasks come back after a bug; lease time is the database's
and stops only while nobody serves; the gRPC port opens last. On both databases where it applies.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from kine_server import errors
from kine_server.drivers.base import RawRow
from kine_server.mvcc.applier import Applier
from kine_server.mvcc.compactor import CompactionSettings
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.conftest import fresh_dsn, test_config
from tests.support.client import Client, connect
from tests.support.ports import free_port
from tests.support.process import KineProcess, failed_start
from tests.support.watching import WatchStream
from tests.test_compaction import Faults, write_history


def put(key: bytes, value: bytes = b"v", **options: Any) -> pb.PutRequest:
    return pb.PutRequest(key=key, value=value, **options)


def txn(*ops: pb.RequestOp) -> pb.TxnRequest:
    return pb.TxnRequest(success=list(ops))


# -- a request's failure is its own -----------------------------------------------------------


async def test_a_request_that_fails_after_writing_fails_alone_in_one_redo(
    server: SingleProcess,
) -> None:
    """A statement error half way through one request of a batch: that request gets INTERNAL,
    the others commit, and the batch is redone once (not one transaction per request)."""
    writer = server.write_side.writer

    async def breaks_a_constraint(applier: Applier) -> None:
        await applier.put(put(b"bad"))
        row = RawRow(b"bad2", 1, applier.begin + 1, 1, b"", 0, 0, None)  # same (revision, sub)
        await applier.write_tx.insert_raw([row])

    before = writer.batches
    bad = writer.submit(breaks_a_constraint)
    puts = [server.write_side.put(put(b"good/%d" % i), None) for i in range(20)]
    results = await asyncio.gather(bad, *puts, return_exceptions=True)
    assert isinstance(results[0], errors.Internal), results[0]
    assert all(isinstance(r, pb.PutResponse) for r in results[1:]), results[1:]
    assert sorted(r.header.revision for r in results[1:]) == list(range(2, 22))  # type: ignore[union-attr]
    assert writer.batches - before == 1
    assert (await server.store.range(pb.RangeRequest(key=b"bad"))).count == 0


async def test_huge_limits_in_write_txns_harm_no_other_writer(kine: Client) -> None:
    """Twenty write Txns reading with limit 2**63-1 among 32 clients' Puts: all succeed (the
    limit overflowed SQLite's binding and failed every Put of the same group commit)."""
    everything = pb.RangeRequest(key=b"\x00", range_end=b"\x00", limit=2**63 - 1)

    async def client(n: int) -> None:
        for i in range(10):
            await kine.kv.Put(put(b"c/%d/%d" % (n, i)))

    async def huge(n: int) -> pb.TxnResponse:
        request = txn(
            pb.RequestOp(request_range=everything), pb.RequestOp(request_put=put(b"h%d" % n))
        )
        response: pb.TxnResponse = await kine.kv.Txn(request)
        return response

    results = await asyncio.gather(*(client(n) for n in range(32)), *(huge(n) for n in range(20)))
    assert all(r is None or r.succeeded for r in results)
    assert (await kine.kv.Range(pb.RangeRequest(key=b"\x00", range_end=b"\x00"))).count == 340


# -- a lagging instance and another's compaction ---------------------------------------------


@pytest.fixture
def shared_dsn(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    return fresh_dsn("postgres", tmp_path, request)


async def test_a_lagging_instance_cancels_compacted_watches_and_keeps_delivering(
    shared_dsn: str, tmp_path: Path
) -> None:
    """B is stopped (SIGSTOP) while A writes and physically compacts; continued, B's watch
    that needed the compacted revisions is cancelled with compact_revision, as etcd does, and
    B goes on delivering, its own writes included (it spun forever on the missing rows)."""
    a = SingleProcess(test_config(shared_dsn))
    await a.start()
    a_client = connect(f"127.0.0.1:{a.port}")
    try:
        with KineProcess(shared_dsn, tmp_path) as b:
            await _lagging_instance(a_client, b)
    finally:  # a failure must not leave A's server to the garbage collector (it hung there)
        await a_client.close()
        await a.stop()


async def _lagging_instance(a_client: Client, b: KineProcess) -> None:
    b_client = connect(b.address)
    stream = WatchStream(b_client)
    try:
        await stream.create(b"/lag/", b"/lag0")
        assert (await stream.read(10)) is not None  # created
        await a_client.kv.Put(put(b"/lag/k", b"0"))
        first = await stream.read(10)
        assert first is not None and first.events[0].kv.value == b"0"
        assert b.proc is not None
        # All of B: its own process group (the writer process and its --workers front-ends).
        os.killpg(b.proc.pid, signal.SIGSTOP)
        try:
            for i in range(1, 21):
                response = await a_client.kv.Put(put(b"/lag/k", b"%d" % i))
            current = response.header.revision
            await a_client.kv.Compact(pb.CompactionRequest(revision=current, physical=True))
        finally:
            os.killpg(b.proc.pid, signal.SIGCONT)
        cancelled = await stream.read(15)
        assert cancelled is not None
        assert (cancelled.canceled, cancelled.compact_revision) == (True, current)
        await stream.create(b"/lag/", b"/lag0", watch_id=7)
        assert (await stream.read(10)) is not None  # created
        await b_client.kv.Put(put(b"/lag/k", b"b's own"))
        await a_client.kv.Put(put(b"/lag/k", b"a's"))
        seen = [await stream.read(10), await stream.read(10)]
        assert [r.events[0].kv.value for r in seen if r is not None] == [b"b's own", b"a's"]
    finally:
        await stream.close()
        await b_client.close()


# -- PostgreSQL: write Txns and periodic compaction -------------------------------------------


async def compaction_blocked_or_done(dsn: str, tick: asyncio.Task[bool]) -> None:
    """Return once `tick` is done or a session of the database waits for a lock (the compaction
    waiting for the write batch's): observed in pg_stat_activity, not guessed with a sleep."""
    watcher = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + 30
        while not tick.done():
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting:
                return
            assert time.monotonic() < deadline, "the compaction neither ran nor waited"
            await asyncio.sleep(0.01)
    finally:
        await watcher.close()


async def test_a_write_txn_reading_old_revisions_never_sees_half_compacted_history(
    shared_dsn: str,
) -> None:
    """At READ COMMITTED a periodic compaction committing in the middle of a write batch
    deleted the history that batch's Txn was reading at an old revision. Writers now lock the
    compact revision: the compaction waits, and the Txn reads the whole history."""
    server = SingleProcess(test_config(shared_dsn))
    compactor = server.write_side.compactor
    compactor.settings = CompactionSettings(interval=0, min_retain=2, batch_size=1000, timeout=5)
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    try:
        for i in range(30):
            await client.kv.Put(put(b"/rc/%d" % (i % 3), b"%d" % i))
        old = pb.RangeRequest(key=b"/rc/", range_end=b"/rc0", revision=10)
        expected = list((await client.kv.Range(old)).kvs)
        assert len(expected) == 3
        tick: asyncio.Task[bool] | None = None

        async def read_while_compacting(applier: Applier) -> pb.TxnResponse:
            nonlocal tick
            tick = asyncio.create_task(compactor.tick(advance=True))
            # Until the compaction has committed (were it free to) or waits on this batch's lock.
            await compaction_blocked_or_done(shared_dsn, tick)
            response: pb.TxnResponse = await applier.txn(txn(pb.RequestOp(request_range=old)))
            return response

        response: pb.TxnResponse = await server.write_side.writer.submit(read_while_compacting)
        assert list(response.responses[0].response_range.kvs) == expected
        assert tick is not None and await tick is True
        assert (await server.store.counters()).compact_revision == 29
    finally:
        await client.close()
        await server.stop()


# -- SQLite maintenance and compaction ---------------------------------------------------------


@pytest.fixture
async def sqlite_server(tmp_path: Path) -> AsyncIterator[tuple[SingleProcess, Client, Faults]]:
    server = SingleProcess(test_config(f"sqlite://{tmp_path}/db/state.db"))
    faults = Faults()
    server.write_side.compactor.settings = CompactionSettings(
        interval=0, min_retain=10, batch_size=20, timeout=20
    )
    server.write_side.compactor.hook = faults
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    yield server, client, faults
    await client.close()
    await server.stop()


async def test_defragment_waits_for_a_running_compaction_batch(
    sqlite_server: tuple[SingleProcess, Client, Faults],
) -> None:
    server, client, faults = sqlite_server
    await write_history(client)
    faults.delay = 0.3  # each batch holds its transaction a while
    tick = asyncio.create_task(server.write_side.compactor.tick())
    while server.write_side.compactor.status.batches_total == 0 and not tick.done():
        await asyncio.sleep(0.01)  # inside the pass now
    await client.maintenance.Defragment(pb.DefragmentRequest(), timeout=30)
    assert await tick is True


async def test_the_checkpoint_after_compaction_never_holds_writers_behind_old_readers(
    sqlite_server: tuple[SingleProcess, Client, Faults],
) -> None:
    """A reader keeps an old snapshot open across a compaction: the checkpoint that follows
    must not wait for it (TRUNCATE did, for --compact-timeout, with every writer stopped)."""
    server, client, _ = sqlite_server
    await write_history(client)
    async with server.driver.read() as snapshot:
        await snapshot.counters()  # the snapshot is taken
        await client.kv.Put(put(b"/after", b"x"))  # the WAL moves past it
        tick = asyncio.create_task(server.write_side.compactor.tick())
        # The bound is half the 20 s the old checkpoint waited with the writer lock held.
        await asyncio.wait_for(client.kv.Put(put(b"/during", b"y")), 10)
        assert await asyncio.wait_for(tick, 10) is True


# -- supervised background tasks -----------------------------------------------------------------


async def test_the_writer_comes_back_after_a_bug(
    server: SingleProcess, kine: Client, caplog: pytest.LogCaptureFixture
) -> None:
    writer = server.write_side.writer
    committed = writer._on_commit
    failures = iter([RuntimeError("injected bug in the commit callback")])

    def once(begin: int, events: list[Any]) -> None:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        committed(begin, events)

    writer._on_commit = once
    with caplog.at_level(logging.ERROR):
        await kine.kv.Put(put(b"a"), timeout=10)
        second = await kine.kv.Put(put(b"b"), timeout=10)  # hung forever: the writer was gone
    assert second.header.revision == 3
    assert "background task kine-writer failed" in caplog.text
    stream = WatchStream(kine)  # and the hub caught up with the revision it missed
    try:
        await stream.create(b"a", start_revision=2)
        await stream.read(5)
        event = await stream.read(5)
        assert event is not None and event.events[0].kv.key == b"a"
    finally:
        await stream.close()


async def test_lease_expiry_comes_back_after_a_bug(
    server: SingleProcess, kine: Client, caplog: pytest.LogCaptureFixture
) -> None:
    lessor = server.write_side.lessor
    expire_due = lessor.expire_due
    failures = iter([RuntimeError("injected bug in the expiry pass")])

    async def once(limit: int = 1000) -> int:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return await expire_due(limit)

    lessor.expire_due = once  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        await kine.lease.LeaseGrant(pb.LeaseGrantRequest(ID=5, TTL=2))
        await kine.kv.Put(put(b"leased", lease=5))
        for _ in range(100):
            if (await kine.kv.Range(pb.RangeRequest(key=b"leased"))).count == 0:
                break
            await asyncio.sleep(0.1)
    assert (await kine.kv.Range(pb.RangeRequest(key=b"leased"))).count == 0
    assert "background task kine-lease-expiry failed" in caplog.text


# -- lease time ------------------------------------------------------------------------------------


async def ttl_of(client: Client, lease: int) -> int:
    status = await client.lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=lease))
    return int(status.TTL)


def ttl_bounds(ttl: int, since: float) -> tuple[int, int]:
    """What LeaseTimeToLive may answer for a lease granted (or renewed) with `ttl` at `since`
    (time.monotonic()): its whole seconds left, rounded down, by any honest clock."""
    elapsed = math.ceil(time.monotonic() - since)
    return ttl - elapsed - 1, ttl


@pytest.mark.skipif(shutil.which("faketime") is None, reason="needs faketime (make deps)")
async def test_an_instance_whose_clock_is_a_day_ahead_expires_and_extends_nothing(
    shared_dsn: str, tmp_path: Path
) -> None:
    """B's clock is a day ahead; A's lease expiry is stopped, so only B expires leases. The lease
    is granted once B serves (B's start-up takes what it takes), then: B reports its TTL by the
    database's clock, renews it to 60 s and not a day more, and expires a 2 s lease of its own
    (so its expiry passes ran) while the 60 s lease and its key stay."""
    a = SingleProcess(test_config(shared_dsn))
    await a.start()
    await a.write_side.lessor.stop()
    client = connect(f"127.0.0.1:{a.port}")
    try:
        with KineProcess(shared_dsn, tmp_path, prefix=["faketime", "-f", "+1d"]) as b:
            b_client = connect(b.address)
            try:
                granted = time.monotonic()
                await client.lease.LeaseGrant(pb.LeaseGrantRequest(ID=77, TTL=60))
                await client.kv.Put(put(b"held", lease=77))
                low, high = ttl_bounds(60, granted)
                assert low <= await ttl_of(b_client, 77) <= high
                renewed = time.monotonic()
                keep_alive = b_client.lease.LeaseKeepAlive()
                await keep_alive.write(pb.LeaseKeepAliveRequest(ID=77))
                assert (await keep_alive.read()).TTL == 60
                await keep_alive.done_writing()
                await b_client.lease.LeaseGrant(pb.LeaseGrantRequest(ID=78, TTL=2))
                await b_client.kv.Put(put(b"short", lease=78))
                deadline = time.monotonic() + 30
                while (await b_client.kv.Range(pb.RangeRequest(key=b"short"))).count:
                    assert time.monotonic() < deadline, "B expired nothing"
                    await asyncio.sleep(0.1)
            finally:
                await b_client.close()
            b.stop()
        assert (await client.kv.Range(pb.RangeRequest(key=b"held"))).count == 1
        low, high = ttl_bounds(60, renewed)
        assert low <= await ttl_of(client, 77) <= high
    finally:
        await client.close()
        await a.stop()


async def test_restarting_over_and_over_does_not_keep_a_lease_alive(dsn: str) -> None:
    """Only time while no instance serves is given back; every restart gave the full TTL."""
    server = SingleProcess(test_config(dsn))
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    await client.lease.LeaseGrant(pb.LeaseGrantRequest(ID=9, TTL=3))
    await client.kv.Put(put(b"held", lease=9))
    began = time.monotonic()
    try:
        while time.monotonic() - began < 8:  # restarted about every 0.7 s, far past the TTL
            await client.close()
            await server.stop()
            server = SingleProcess(test_config(dsn))
            await server.start()
            client = connect(f"127.0.0.1:{server.port}")
            await asyncio.sleep(0.5)
            if (await client.kv.Range(pb.RangeRequest(key=b"held"))).count == 0:
                break
        assert (await client.kv.Range(pb.RangeRequest(key=b"held"))).count == 0
        assert await ttl_of(client, 9) == -1
    finally:
        await client.close()
        await server.stop()


# -- start-up ----------------------------------------------------------------------------------


def http_get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("attempt", range(3))
async def test_once_the_grpc_port_accepts_the_metrics_listener_is_up(
    tmp_path: Path, attempt: int
) -> None:
    """Probed as a supervisor would, the moment the port accepts: everything else is up."""
    metrics = free_port()
    endpoint = f"sqlite://{tmp_path}/db/state.db"
    server = KineProcess(endpoint, tmp_path, "--metrics-bind-address", f"127.0.0.1:{metrics}")
    server.start(probe_interval=0.0005)
    try:
        assert http_get(metrics, "/health").startswith(b"HTTP/1.1 200")
    finally:
        server.kill()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_failed_start_prints_one_line(tmp_path: Path, workers: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = failed_start(
            f"sqlite://{tmp_path}/db/state.db",
            "--listen-address",
            f"127.0.0.1:{free_port()}",
            "--metrics-bind-address",
            f"127.0.0.1:{port}",
            "--workers",
            workers,
        )
    assert "cannot serve metrics" in line


#: Each way a start fails, as flags (BUSY: a port something else listens on; FREE: a free one,
#: NOBODY: a port nobody listens on) and the words its one line says.
FAILED_STARTS = {
    "busy gRPC port": (["--listen-address", "127.0.0.1:BUSY"], "cannot listen on 127.0.0.1:BUSY"),
    "busy metrics port": (
        ["--listen-metrics-urls", "http://127.0.0.1:BUSY"],
        "cannot serve metrics on http://127.0.0.1:BUSY: address already in use",
    ),
    "busy gateway port": (
        ["--listen-gateway-urls", "http://127.0.0.1:BUSY"],
        "cannot serve the gateway on http://127.0.0.1:BUSY: address already in use",
    ),
    "second gRPC URL busy": (
        ["--listen-client-urls", "http://127.0.0.1:FREE,http://127.0.0.1:BUSY"],
        "cannot listen on http://127.0.0.1:BUSY",
    ),
    "port out of range": (
        ["--listen-address", "127.0.0.1:99999"],
        "invalid --listen-address '127.0.0.1:99999': port 99999 is out of range",
    ),
    "unreachable PostgreSQL": (
        ["--endpoint", "postgres://kine@127.0.0.1:NOBODY/db", "--datastore-connect-timeout", "1s"],
        "cannot reach 127.0.0.1:NOBODY: connection refused",
    ),
    "https without a certificate": (
        ["--listen-client-urls", "https://127.0.0.1:FREE"],
        "https needs --server-cert-file",
    ),
}


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("case", sorted(FAILED_STARTS))
def test_every_failed_start_prints_one_line_that_says_why(
    tmp_path: Path, workers: str, case: str
) -> None:
    """Whatever stops the start, and with or without --workers: one line, no traceback, no
    error of a background task that the failed start stopped."""
    flags, expected = FAILED_STARTS[case]
    defaults = []  # where the case sets neither of a setting's two names
    if not {"--listen-address", "--listen-client-urls"} & set(flags):
        defaults += ["--listen-address", f"127.0.0.1:{free_port()}"]
    if "--listen-metrics-urls" not in flags:
        defaults += ["--metrics-bind-address", "127.0.0.1:0"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = {"BUSY": str(busy.getsockname()[1]), "FREE": str(free_port())}
        ports["NOBODY"] = str(free_port())

        def filled(text: str) -> str:
            for name, port in ports.items():
                text = text.replace(name, port)
            return text

        line = failed_start(
            f"sqlite://{tmp_path}/db/state.db",
            *defaults,
            "--workers",
            workers,
            *map(filled, flags),
        )
    assert line.startswith("kine-server: error: ")
    assert filled(expected) in line


async def test_a_watch_stream_that_fails_on_a_revision_ends_with_internal_not_silence(
    server: SingleProcess,
    kine: Client,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug while a stream takes a committed revision: the stream ends with INTERNAL, so the
    client watches again, instead of staying open and deaf; other streams are unaffected. (The
    bug is injected into this process's code: one process.)"""
    from kine_server.mvcc.watcher import Watcher

    healthy = WatchStream(kine)
    await healthy.create(b"h")
    assert (await healthy.read(5)) is not None
    broken = kine.watch.Watch()
    await broken.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"w")))
    assert (await broken.read()).created
    offer = Watcher.offer

    def buggy(self: Watcher, groups: Any, max_pending: int) -> bool:
        if self.spec.key == b"w":
            raise RuntimeError("injected bug in a watch stream")
        return offer(self, groups, max_pending)

    monkeypatch.setattr(Watcher, "offer", buggy)
    with caplog.at_level(logging.ERROR):
        await kine.kv.Put(put(b"w", b"1"))
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(broken.read(), 10)
        await kine.kv.Put(put(b"h", b"1"))
        event = await healthy.read(5)
    assert ended.value.code() == grpc.StatusCode.INTERNAL
    assert "watch stream failed" in caplog.text
    assert event is not None and event.events[0].kv.key == b"h"
    await healthy.close()


async def test_a_put_of_a_key_its_own_txn_deleted_with_ignore_value_writes_nothing(
    kine: Client,
) -> None:
    """etcd 3.4 passes this Txn's checks (made before the Txn: the key exists) and then panics
    applying it. kine-server refuses it whole, as its checks would, and writes nothing."""
    await kine.kv.Put(put(b"/iv/k", b"old"))
    request = txn(
        pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=b"/iv/", range_end=b"\x00")),
        pb.RequestOp(request_put=put(b"/iv/k", b"", ignore_value=True)),
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await kine.kv.Txn(request)
    assert (refused.value.code(), refused.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "etcdserver: key not found",
    )
    after = await kine.kv.Range(pb.RangeRequest(key=b"/iv/k"))
    assert [kv.value for kv in after.kvs] == [b"old"] and after.header.revision == 2
