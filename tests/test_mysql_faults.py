"""MySQL/MariaDB behind a faulty network, as tests/test_pg_faults.py for PostgreSQL: requests
fail with UNAVAILABLE within the datastore timeout, the server recovers by itself, nothing
acknowledged is lost, and an instance cut off while it holds the revision lock does not hold
the others up for longer than MariaDB's wait_timeout (twice its --datastore-timeout)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any

import grpc
import pytest

from kine_server.drivers.mysql_dsn import parse
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.support.client import Client, connect
from tests.support.faultproxy import FaultProxy, Mode
from tests.support.mysql import ThrowawayMariaDB
from tests.test_pg_faults import (
    FAIL_WITHIN,
    LONG_POLL,
    NOTIFIED_WITHIN,
    eventually,
    failure_time,
    notified_within,
    put,
    started,
    stored,
    watch_from,
)


@pytest.fixture
def proxy(mariadb: ThrowawayMariaDB) -> Iterator[FaultProxy]:
    with FaultProxy(parse(mariadb.dsn).port, "127.0.0.1") as p:
        yield p


@pytest.fixture
def database(mariadb: ThrowawayMariaDB) -> str:
    """A fresh database's DSN, straight to MariaDB."""
    return f"{mariadb.dsn.rstrip('/')}/kine_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def proxied(proxy: FaultProxy, database: str) -> AsyncIterator[tuple[SingleProcess, Client]]:
    server = await started(proxy.dsn(database), datastore_timeout=3.0)
    client = connect(f"127.0.0.1:{server.port}")
    yield server, client
    proxy.set_mode(Mode.FORWARD)
    await client.close()
    await asyncio.wait_for(server.stop(), 30)


async def test_blackhole_fails_puts_and_ranges_within_the_timeout_then_recovers_losing_nothing(
    proxy: FaultProxy, proxied: tuple[SingleProcess, Client]
) -> None:
    _, client = proxied
    acked = {b"/f/a/%02d" % i: await put(client, b"/f/a/%02d" % i) for i in range(20)}
    proxy.set_mode(Mode.BLACKHOLE)
    calls: list[Awaitable[Any]] = [put(client, b"/f/lost/%d" % i) for i in range(8)]
    calls += [stored(client, b"/f/"), client.kv.Range(pb.RangeRequest(key=b"/f/a/00"))]
    outcomes = await asyncio.gather(*(failure_time(c) for c in calls))
    assert {code for code, _ in outcomes} == {grpc.StatusCode.UNAVAILABLE}
    slowest = max(took for _, took in outcomes)
    assert slowest < FAIL_WITHIN, f"a request took {slowest:.1f}s to fail"
    proxy.set_mode(Mode.FORWARD)
    acked[b"/f/a/after"] = await eventually(lambda: put(client, b"/f/a/after"))
    after = await eventually(lambda: stored(client, b"/f/a/"))
    assert after == acked
    assert (await client.maintenance.Status(pb.StatusRequest(), timeout=10)).errors == []


async def test_reset_fails_fast_then_recovers_and_watches_again(
    proxy: FaultProxy, database: str
) -> None:
    """B reaches MariaDB through the proxy, A directly; B's revision watch brings A's commits
    long before its poll interval would, before the reset and again after it."""
    a = await started(database, poll_interval=LONG_POLL)
    b = await started(proxy.dsn(database), poll_interval=LONG_POLL, datastore_timeout=3.0)
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
        listing = await eventually(lambda: stored(cb, b"/f/r/"))
        assert listing == await stored(ca, b"/f/r/") and acked.items() <= listing.items()
        await stream.close()
    finally:
        proxy.set_mode(Mode.FORWARD)
        await ca.close()
        await cb.close()
        await asyncio.wait_for(b.stop(), 30)
        await a.stop()


async def test_an_instance_cut_off_inside_a_write_does_not_hold_the_others_up(
    proxy: FaultProxy, database: str
) -> None:
    """A is cut off while its writer holds the revision lock every instance needs: MariaDB
    ends A's silent session after its wait_timeout (twice A's --datastore-timeout), so B's
    write goes on instead of waiting for TCP keepalive."""
    a = await started(proxy.dsn(database), datastore_timeout=1.0)
    b = await started(database)
    b_client = connect(f"127.0.0.1:{b.port}")
    try:
        await put(b_client, b"/f/cut/before")

        async def cut_off_holding_the_lock(applier: Any) -> None:
            proxy.set_mode(Mode.BLACKHOLE)  # after the lock was taken, before anything else
            await applier.put(pb.PutRequest(key=b"/f/cut/a"))

        with pytest.raises(Exception):  # noqa: B017 - whatever A's driver makes of the silence
            await a.write_side.writer.submit(cut_off_holding_the_lock)
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
