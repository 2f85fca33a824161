"""PostgreSQL behind a faulty network: requests fail fast with UNAVAILABLE, shutdown stays within
its grace, the server recovers by itself, and no acknowledged write is lost.

The server reaches PostgreSQL through tests.support.faultproxy, which can hold every byte back
while keeping the connections open (a partition, or a stalled server: nothing ever answers and
nothing is closed), reset every connection, or slow every chunk down.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest

from kine_server import errors
from kine_server.config import Config
from kine_server.drivers.postgres import with_database
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.conftest import test_config
from tests.support.client import Client, connect
from tests.support.faultproxy import FaultProxy, Mode
from tests.support.postgres import ThrowawayPostgres
from tests.support.process import KineProcess
from tests.support.watching import WatchStream

#: What a client waits at most in these tests: far longer than any bound asserted below.
CLIENT_DEADLINE = 60.0
#: A request to an unreachable database must fail within this, far below the client's deadline.
FAIL_WITHIN = 20.0
#: Cross-instance watch latency while notifications work, far below the poll interval below.
NOTIFIED_WITHIN = 15.0
LONG_POLL = 60.0


def proxy_for(pg: ThrowawayPostgres) -> FaultProxy:
    parts = urllib.parse.urlsplit(pg.dsn)
    return FaultProxy(parts.port or 5432, parts.hostname or "127.0.0.1")


@pytest.fixture
def proxy(postgres: ThrowawayPostgres) -> Iterator[FaultProxy]:
    with proxy_for(postgres) as p:
        yield p


@pytest.fixture
def database(postgres: ThrowawayPostgres) -> str:
    """A fresh database's DSN, straight to PostgreSQL."""
    return with_database(postgres.dsn, f"kine_{uuid.uuid4().hex[:12]}")


async def started(dsn: str, **overrides: object) -> SingleProcess:
    server = SingleProcess(test_config(dsn, **overrides))
    await server.start()
    return server


@pytest.fixture
async def proxied(proxy: FaultProxy, database: str) -> AsyncIterator[tuple[SingleProcess, Client]]:
    """A kine-server whose every database connection goes through the proxy."""
    server = await started(proxy.dsn(database))
    client = connect(f"127.0.0.1:{server.port}")
    yield server, client
    proxy.set_mode(Mode.FORWARD)
    await client.close()
    await asyncio.wait_for(server.stop(), 30)


async def failure_time(call: Awaitable[Any]) -> tuple[grpc.StatusCode, float]:
    """How a call fails and after how long (it must fail)."""
    began = time.monotonic()
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), time.monotonic() - began
    raise AssertionError("the call succeeded against an unreachable database")


async def eventually(call: Callable[[], Awaitable[Any]], within: float = 30.0) -> Any:
    """Retry `call` on UNAVAILABLE until it succeeds (the server reconnecting by itself)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def put(client: Client, key: bytes, value: bytes = b"v") -> int:
    response = await client.kv.Put(pb.PutRequest(key=key, value=value), timeout=CLIENT_DEADLINE)
    return int(response.header.revision)


async def stored(client: Client, prefix: bytes) -> dict[bytes, int]:
    end = prefix[:-1] + bytes([prefix[-1] + 1])
    listing = await client.kv.Range(
        pb.RangeRequest(key=prefix, range_end=end, keys_only=True), timeout=CLIENT_DEADLINE
    )
    return {kv.key: kv.mod_revision for kv in listing.kvs}


async def test_blackhole_fails_puts_and_ranges_fast_then_recovers_losing_nothing(
    proxy: FaultProxy, proxied: tuple[SingleProcess, Client]
) -> None:
    await blackholed_then_recovered(proxy, proxied[1])


async def blackholed_then_recovered(proxy: FaultProxy, client: Client) -> None:
    """Requests in flight when the database goes silent fail UNAVAILABLE within FAIL_WITHIN;
    when it answers again the server recovers by itself and every acknowledged write is there.
    (MySQL's test runs it too.)"""
    acked = {b"/f/a/%02d" % i: await put(client, b"/f/a/%02d" % i) for i in range(20)}
    proxy.set_mode(Mode.BLACKHOLE)
    # Several writes at once (one batch in flight, others queued behind it) and two reads.
    calls: list[Awaitable[Any]] = [put(client, b"/f/lost/%d" % i) for i in range(8)]
    calls += [stored(client, b"/f/"), client.kv.Range(pb.RangeRequest(key=b"/f/a/00"))]
    outcomes = await asyncio.gather(*(failure_time(c) for c in calls))
    assert {code for code, _ in outcomes} == {grpc.StatusCode.UNAVAILABLE}
    slowest = max(took for _, took in outcomes)
    assert slowest < FAIL_WITHIN, f"a request took {slowest:.1f}s to fail"
    proxy.set_mode(Mode.FORWARD)
    # Recovered by itself: writes and reads work again, and every acknowledged write is there.
    acked[b"/f/a/after"] = await eventually(lambda: put(client, b"/f/a/after"))
    after = await eventually(lambda: stored(client, b"/f/a/"))
    assert after == acked
    assert (await client.maintenance.Status(pb.StatusRequest(), timeout=10)).errors == []


async def test_stop_finishes_within_its_grace_while_blackholed(
    proxy: FaultProxy, database: str
) -> None:
    server = await started(proxy.dsn(database))
    client = connect(f"127.0.0.1:{server.port}")
    await put(client, b"/f/s/before")
    proxy.set_mode(Mode.BLACKHOLE)
    # Requests stuck on the database while the server stops: writes in the writer, a read.
    pending: list[asyncio.Task[Any]] = [
        asyncio.create_task(put(client, b"/f/s/%d" % i)) for i in range(4)
    ]
    pending.append(asyncio.create_task(stored(client, b"/f/s/")))
    await asyncio.sleep(1.0)
    grace = server.config.shutdown_grace
    began = time.monotonic()
    # Not wait_for: a stop stuck in asyncpg's shielded release would not even let it cancel.
    stopping = asyncio.create_task(server.stop())
    done, _ = await asyncio.wait({stopping}, timeout=grace + 15)
    took = time.monotonic() - began
    proxy.set_mode(Mode.FORWARD)  # lets a stuck stop (the bug) finish for the clean-up
    await asyncio.wait({stopping, *pending}, timeout=60)
    await client.close()
    assert done, f"stop still running {took:.1f}s later"
    assert took < grace + 2.0, f"stop took {took:.1f}s"


def test_sigterm_stops_the_process_within_its_grace_while_blackholed(
    proxy: FaultProxy, database: str, tmp_path: Path
) -> None:
    grace = Config().shutdown_grace
    with KineProcess(proxy.dsn(database), tmp_path) as kine:
        time.sleep(1.5)  # the poller's next tick is stuck on the database too
        proxy.set_mode(Mode.BLACKHOLE)
        time.sleep(1.5)
        began = time.monotonic()
        assert kine.proc is not None
        kine.proc.terminate()
        try:
            code = kine.proc.wait(grace + 10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"running {grace + 10}s after SIGTERM:\n{kine.log()}") from None
        took = time.monotonic() - began
    assert code == 0, kine.log()
    assert took < grace + 2.0, f"SIGTERM took {took:.1f}s"


async def watch_from(client: Client, prefix: bytes) -> WatchStream:
    stream = WatchStream(client)
    await stream.create(prefix, prefix[:-1] + bytes([prefix[-1] + 1]))
    assert (await stream.read()) is not None  # created
    return stream


async def notified_within(stream: WatchStream, key: bytes, revision: int) -> float:
    """Seconds until `stream` delivers the Put of `key` at `revision`."""
    began = time.monotonic()
    while True:
        response = await stream.read(timeout=NOTIFIED_WITHIN)
        assert response is not None, f"no event within {NOTIFIED_WITHIN}s"
        events = [(e.kv.key, e.kv.mod_revision) for e in response.events]
        if (key, revision) in events:
            return time.monotonic() - began


async def test_reset_fails_fast_then_recovers_and_listens_again(
    proxy: FaultProxy, database: str
) -> None:
    """B reaches PostgreSQL through the proxy, A directly; B hears A's commits at once."""
    await reset_then_heard_again(proxy, database)


async def reset_then_heard_again(
    proxy: FaultProxy,
    database: str,
    datastore_timeout: float | None = None,
    listing_retried: bool = False,
) -> None:
    """Instance B reaches the database through the proxy, A directly, both polling only every
    LONG_POLL. When the proxy resets B's connections, B's requests fail UNAVAILABLE within
    FAIL_WITHIN; once it forwards again B writes, and its notifications came back with its
    connections: A's next write reaches B's watch long before B's poll would have brought it.
    Nothing acknowledged is lost. (MySQL's test runs it too, with its `datastore_timeout`, and
    `listing_retried`: there the final listing may first meet a reader connection the reset
    broke.)"""
    a = await started(database, poll_interval=LONG_POLL)
    options = {} if datastore_timeout is None else {"datastore_timeout": datastore_timeout}
    b = await started(proxy.dsn(database), poll_interval=LONG_POLL, **options)
    ca, cb = connect(f"127.0.0.1:{a.port}"), connect(f"127.0.0.1:{b.port}")
    try:
        stream = await watch_from(cb, b"/f/r/")
        first = await put(ca, b"/f/r/first")
        assert await notified_within(stream, b"/f/r/first", first) < NOTIFIED_WITHIN
        proxy.set_mode(Mode.RESET)
        for call in (put(cb, b"/f/r/lost"), stored(cb, b"/f/r/")):
            code, took = await failure_time(call)
            assert code == grpc.StatusCode.UNAVAILABLE and took < FAIL_WITHIN
        proxy.set_mode(Mode.FORWARD)
        via_b = await eventually(lambda: put(cb, b"/f/r/via-b"))
        assert await notified_within(stream, b"/f/r/via-b", via_b) < NOTIFIED_WITHIN
        second = await put(ca, b"/f/r/second")
        assert await notified_within(stream, b"/f/r/second", second) < NOTIFIED_WITHIN
        acked = {b"/f/r/first": first, b"/f/r/via-b": via_b, b"/f/r/second": second}
        listing = await (
            eventually(lambda: stored(cb, b"/f/r/")) if listing_retried else stored(cb, b"/f/r/")
        )
        assert listing == await stored(ca, b"/f/r/") and acked.items() <= listing.items()
        await stream.close()
    finally:
        proxy.set_mode(Mode.FORWARD)
        await ca.close()
        await cb.close()
        await asyncio.wait_for(b.stop(), 30)
        await a.stop()


async def test_notifications_resume_after_a_postgres_restart(
    postgres: ThrowawayPostgres, database: str
) -> None:
    if postgres.external:
        pytest.skip("needs the throwaway PostgreSQL this suite starts (it restarts it)")
    a = await started(database, poll_interval=LONG_POLL)
    b = await started(database, poll_interval=LONG_POLL)
    ca, cb = connect(f"127.0.0.1:{a.port}"), connect(f"127.0.0.1:{b.port}")
    try:
        stream = await watch_from(cb, b"/f/l/")
        before = await put(ca, b"/f/l/before")
        assert await notified_within(stream, b"/f/l/before", before) < NOTIFIED_WITHIN
        await asyncio.to_thread(postgres.restart)
        after = await eventually(lambda: put(ca, b"/f/l/after"))
        took = await notified_within(stream, b"/f/l/after", after)
        assert took < NOTIFIED_WITHIN  # the poll interval is 60 s
        again = await put(ca, b"/f/l/again")
        assert await notified_within(stream, b"/f/l/again", again) < NOTIFIED_WITHIN
        await stream.close()
    finally:
        await ca.close()
        await cb.close()
        await b.stop()
        await a.stop()


async def test_a_silent_listen_connection_is_found_out_and_replaced(
    proxy: FaultProxy, database: str
) -> None:
    """A LISTEN connection that nothing is sent over would never learn that the network dropped
    it (a NAT or firewall forgetting an idle flow): the driver checks it, and opens another."""
    server = SingleProcess(test_config(proxy.dsn(database), datastore_timeout=1.0))
    driver: Any = server.driver
    driver.listen_check_interval = 0.5
    await server.start()
    try:
        first = driver._listener
        assert first is not None
        proxy.set_mode(Mode.BLACKHOLE)
        deadline = time.monotonic() + 10
        while not first.is_closed():
            assert time.monotonic() < deadline, "the silent LISTEN connection went unnoticed"
            await asyncio.sleep(0.1)
        proxy.set_mode(Mode.FORWARD)
        while driver._listener is None or driver._listener is first:
            assert time.monotonic() < deadline + 10, "no new LISTEN connection"
            await asyncio.sleep(0.1)
    finally:
        proxy.set_mode(Mode.FORWARD)
        await server.stop()


async def test_an_instance_cut_off_inside_a_write_does_not_hold_the_others_up(
    proxy: FaultProxy, database: str
) -> None:
    """PostgreSQL ends A's idle session after twice A's --datastore-timeout, so B's writes go
    on; without it they waited for TCP keepalive (about two hours) and failed UNAVAILABLE all
    along."""
    await cut_off_holding_the_lock(proxy, database)


async def cut_off_holding_the_lock(proxy: FaultProxy, database: str) -> None:
    """Instance A is cut off (the proxy goes silent) while its writer holds the revision lock
    every instance needs: the database must end A's session so that B's next write goes on
    (within 8 s), and A's write never commits. (MySQL's test runs it too.)"""
    a = await started(proxy.dsn(database), datastore_timeout=1.0)
    b = await started(database)
    b_client = connect(f"127.0.0.1:{b.port}")
    try:
        await put(b_client, b"/f/cut/before")

        async def blackholed_inside(applier: Any) -> None:
            proxy.set_mode(Mode.BLACKHOLE)  # after the lock was taken, before anything else
            await applier.put(pb.PutRequest(key=b"/f/cut/a"))

        with pytest.raises(Exception):  # noqa: B017 - whatever A's driver makes of the silence
            await a.write_side.writer.submit(blackholed_inside)
        began = time.monotonic()
        revision = await b_client.kv.Put(pb.PutRequest(key=b"/f/cut/b"), timeout=8)
        assert revision.header.revision > 0, time.monotonic() - began
        keys = set(await stored(b_client, b"/f/cut/"))
        assert keys == {b"/f/cut/before", b"/f/cut/b"}  # A's write never committed
    finally:
        proxy.set_mode(Mode.FORWARD)
        await b_client.close()
        await asyncio.wait_for(b.stop(), 30)
        await asyncio.wait_for(a.stop(), 30)


def test_a_value_asyncpg_cannot_encode_is_the_statements_fault_not_a_lost_connection() -> None:
    """asyncpg's DataError is an InterfaceError, as a closed connection is; only the second
    means the connection is gone (dropped without a ROLLBACK, and UNAVAILABLE to clients)."""
    from kine_server.drivers import postgres_errors
    from kine_server.drivers.base import DatabaseUnreachable, StatementError

    data = asyncpg.DataError("invalid input for query argument $1: value out of int64 range")
    lost = asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation")
    assert not postgres_errors.unanswered(data)
    assert isinstance(postgres_errors.driver_error(data), StatementError)
    for gone in (lost, ConnectionResetError(), TimeoutError()):
        assert postgres_errors.unanswered(gone)
        assert isinstance(postgres_errors.driver_error(gone), DatabaseUnreachable)


async def test_a_value_past_int64_fails_its_own_request_and_the_writer_goes_on(
    database: str,
) -> None:
    server = await started(database)
    try:

        async def out_of_range(applier: Any) -> None:
            await applier.put(pb.PutRequest(key=b"/f/int/bad"))
            await applier.write_tx.set_meta("alarm_nospace", 2**64)

        results = await asyncio.gather(
            server.write_side.writer.submit(out_of_range),
            *(server.write_side.put(pb.PutRequest(key=b"/f/int/%d" % i), None) for i in range(5)),
            return_exceptions=True,
        )
        assert isinstance(results[0], errors.Internal), results[0]
        assert all(isinstance(r, pb.PutResponse) for r in results[1:]), results[1:]
        after = await server.write_side.put(pb.PutRequest(key=b"/f/int/after"), None)
        assert after.header.revision == 7  # 2-6 the Puts; the failed request took none
    finally:
        await asyncio.wait_for(server.stop(), 30)
