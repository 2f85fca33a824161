"""The DSN's list of PostgreSQL servers: parsed as libpq reads it, tried host by host each within
its own time, left for another server when a transaction waits on a lost one, and a write refused
by a read-only server answered as retryable.

One throwaway PostgreSQL serves here: reached once through a fault proxy and once directly, it is
two servers to the driver, so a silent first host costs no replication.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import asyncpg
import grpc
import pytest

from kine_server.drivers import EndpointError, make_driver
from kine_server.drivers.base import DatabaseUnreachable
from kine_server.drivers.postgres import PostgresDriver, with_database
from kine_server.drivers.postgres_errors import driver_error
from kine_server.drivers.postgres_hosts import (
    BadEndpoint,
    Host,
    HostConnector,
    NoUsableHost,
    parse_endpoint,
)
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.conftest import test_config
from tests.support.client import connect
from tests.support.faultproxy import FaultProxy, Mode
from tests.support.postgres import ThrowawayPostgres
from tests.test_pg_faults import eventually, proxy_for


def test_a_dsn_names_its_servers_as_libpq_reads_them() -> None:
    one = parse_endpoint("postgres://u:p@db:5433/kine")
    assert one.hosts == (Host("db", 5433),) and one.target_session_attrs == "any"
    netloc = parse_endpoint("postgres://u:p@h1:1,h2/kine?target_session_attrs=primary")
    assert netloc.hosts == (Host("h1", 1), Host("h2", 5432))
    assert netloc.target_session_attrs == "primary"
    query = parse_endpoint("postgres://u@/kine?host=h1,h2&port=7,8&sslmode=disable")
    assert query.hosts == (Host("h1", 7), Host("h2", 8))
    one_port = parse_endpoint("postgres://u@/kine?host=h1,h2&port=7")
    assert one_port.hosts == (Host("h1", 7), Host("h2", 7))
    v6 = parse_endpoint("postgres://u@[::1]:6,[fe80::1]/kine")
    assert v6.hosts == (Host("::1", 6), Host("fe80::1", 5432))
    assert str(v6.hosts[0]) == "[::1]:6"
    socket = parse_endpoint("postgres://u@/kine?host=/run/postgresql")
    assert socket.hosts == (Host("/run/postgresql", 5432),)
    assert parse_endpoint("postgres://u@/kine").hosts == ()


def test_several_servers_mean_the_one_that_takes_writes() -> None:
    """Reads must see every acknowledged write, and a standby's may lag: kine-server wants the
    primary unless told otherwise, and refuses what can only find a standby."""
    assert parse_endpoint("postgres://u@h1,h2/kine").target_session_attrs == "read-write"
    given = parse_endpoint("postgres://u@h1,h2/kine?target_session_attrs=any")
    assert given.target_session_attrs == "any"
    for attrs in ("standby", "read-only", "prefer-standby", "bogus"):
        with pytest.raises(BadEndpoint, match=f"target_session_attrs={attrs}"):
            parse_endpoint(f"postgres://u@h1,h2/kine?target_session_attrs={attrs}")


def test_connect_timeout_is_per_host_and_never_reaches_the_server() -> None:
    endpoint = parse_endpoint("postgres://u@h1,h2/kine?sslmode=disable&connect_timeout=3")
    assert endpoint.connect_timeout == 3.0
    assert endpoint.dsn == "postgres://u@h1,h2/kine?sslmode=disable"
    assert HostConnector(endpoint, timeout=10.0).per_host == 3.0
    # Without it, each of the servers gets its share of --datastore-timeout.
    shared = HostConnector(parse_endpoint("postgres://u@h1,h2/kine"), timeout=10.0)
    assert shared.per_host == 5.0
    with pytest.raises(BadEndpoint, match="connect_timeout"):
        parse_endpoint("postgres://u@h1/kine?connect_timeout=soon")


def test_a_malformed_host_list_is_an_endpoint_error() -> None:
    for dsn in (
        "postgres://u@h1:port/kine",
        "postgres://u@h1,,h2/kine",
        "postgres://u@/kine?host=a,b,c&port=1,2",
        "postgres://u@h1:70000/kine",
    ):
        with pytest.raises(EndpointError, match="host list"):
            make_driver(dsn)


def test_the_location_names_every_server() -> None:
    """The start-up line said `postgres 127.0.0.1:5432/kine` for any multi-host DSN."""
    driver = make_driver("postgres://kine:secret@10.0.0.1:5433,[::1]:5434/kine?sslmode=disable")
    assert driver.location == "postgres 10.0.0.1:5433,[::1]:5434/kine"
    query = make_driver("postgres://kine@/kine?host=a,b&port=1,2")
    assert query.location == "postgres a:1,b:2/kine"
    assert make_driver("postgres://kine@db/kine").location == "postgres db:5432/kine"


async def test_a_dsn_with_connect_timeout_opens(postgres: ThrowawayPostgres) -> None:
    """asyncpg passed libpq's connect_timeout on to the server as a setting, and the server
    refused the connection: "unrecognized configuration parameter"."""
    dsn = with_database(postgres.dsn, f"kine_{uuid.uuid4().hex[:12]}") + "?connect_timeout=5"
    driver = make_driver(dsn)
    await driver.open()
    try:
        async with driver.read() as tx:
            assert (await tx.counters()).revision == 1
    finally:
        await driver.close()


@pytest.fixture
def silent_first(postgres: ThrowawayPostgres) -> Iterator[tuple[FaultProxy, str]]:
    """A DSN of two servers, the first a proxy that has gone silent, the second the database."""
    if postgres.external:
        pytest.skip("needs the throwaway PostgreSQL this suite starts")
    with proxy_for(postgres) as proxy:
        dsn = with_database(postgres.dsn, f"kine_{uuid.uuid4().hex[:12]}")
        first = proxy.dsn(dsn).split("@")[1].split("/")[0]
        second = f"127.0.0.1:{postgres.port}"
        yield proxy, dsn.replace(second, f"{first},{second}")
        proxy.set_mode(Mode.FORWARD)


async def test_a_silent_first_server_does_not_keep_the_second_from_being_tried(
    silent_first: tuple[FaultProxy, str],
) -> None:
    """asyncpg gives the whole attempt one timeout and spends it all on a first host that does
    not answer: the second was never tried. Each host gets its own share now."""
    proxy, dsn = silent_first
    proxy.set_mode(Mode.BLACKHOLE)
    driver = PostgresDriver(dsn, timeout=4.0)
    await driver.open()  # creates the database through the second server; it timed out
    try:
        assert driver.hosts.current == 1
        async with driver.read() as tx:
            assert (await tx.counters()).revision == 1
    finally:
        await driver.close()


async def test_no_usable_server_names_each_ones_reason(
    silent_first: tuple[FaultProxy, str], postgres: ThrowawayPostgres
) -> None:
    proxy, dsn = silent_first
    proxy.set_mode(Mode.BLACKHOLE)
    # Every session read-only, as on a hot standby (in the existing database `postgres`).
    standby_like = with_database(dsn, "postgres") + (
        "?target_session_attrs=read-write&options=-c%20default_transaction_read_only%3Don"
    )
    connector = HostConnector(parse_endpoint(standby_like), timeout=2.0)
    with pytest.raises(NoUsableHost) as failure:
        await connector.connect()
    message = str(failure.value)
    assert f"127.0.0.1:{proxy.port}: no answer in 1.0s" in message, message
    assert f"127.0.0.1:{postgres.port}: does not match target_session_attrs" in message, message


async def test_a_write_waiting_on_a_lost_server_fails_over_long_before_its_timeout(
    silent_first: tuple[FaultProxy, str],
) -> None:
    """A transaction waits on the first server, which goes silent; the second takes writes: the
    driver finds it out while the transaction waits, closes what it had on the first, and the
    next write goes through the second, long before --datastore-timeout (60 s here)."""
    proxy, dsn = silent_first
    server = SingleProcess(test_config(dsn, datastore_timeout=60.0))
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    try:
        await client.kv.Put(pb.PutRequest(key=b"/h/before", value=b"v"), timeout=30)
        assert server.driver.hosts.current == 0  # type: ignore[attr-defined]
        proxy.set_mode(Mode.BLACKHOLE)
        began = time.monotonic()
        # Its transaction waits on a pooled connection to the first server, or a new one.
        try:
            await client.kv.Put(pb.PutRequest(key=b"/h/during", value=b"v"), timeout=50)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        after = await client.kv.Put(pb.PutRequest(key=b"/h/after", value=b"v"), timeout=50)
        took = time.monotonic() - began
        assert server.driver.hosts.current == 1  # type: ignore[attr-defined]
        assert took < 30, f"writes came back {took:.1f}s after the first server went silent"
        listing = await client.kv.Range(
            pb.RangeRequest(key=b"/h/", range_end=b"/h0", keys_only=True), timeout=30
        )
        assert b"/h/after" in [kv.key for kv in listing.kvs] and after.header.revision > 0
    finally:
        await client.close()
        proxy.set_mode(Mode.FORWARD)
        await asyncio.wait_for(server.stop(), 30)


async def test_a_write_refused_as_read_only_is_unavailable_then_recovers(
    postgres: ThrowawayPostgres,
) -> None:
    """A standby not yet promoted refuses every write (SQLSTATE 25006): a retry may find the
    primary, so clients hear UNAVAILABLE, not INTERNAL, and the connection is not kept."""
    name = f"kine_{uuid.uuid4().hex[:12]}"
    server = SingleProcess(test_config(with_database(postgres.dsn, name)))
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    admin = await asyncpg.connect(postgres.dsn, timeout=10)
    try:
        await client.kv.Put(pb.PutRequest(key=b"/ro/before", value=b"v"), timeout=30)
        # Every new session of that database is read-only, as on a hot standby.
        await admin.execute(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        failures = []
        for _ in range(3):  # the first may meet a terminated connection; then the refusals
            try:
                await client.kv.Put(pb.PutRequest(key=b"/ro/during", value=b"v"), timeout=30)
            except grpc.aio.AioRpcError as exc:
                failures.append((exc.code(), exc.details() or ""))
        assert {code for code, _ in failures} == {grpc.StatusCode.UNAVAILABLE}, failures
        assert any("read-only transaction" in details for _, details in failures), failures
        await admin.execute(f"ALTER DATABASE {name} RESET default_transaction_read_only")
        # Each refused connection is dropped (some made meanwhile are still read-only), so
        # clients retrying UNAVAILABLE, as etcd's do, get through on a new one.
        await eventually(
            lambda: client.kv.Put(pb.PutRequest(key=b"/ro/after", value=b"v"), timeout=30)
        )
    finally:
        await admin.close()
        await client.close()
        await server.stop()


def test_read_only_refusal_is_retryable() -> None:
    refusal = asyncpg.ReadOnlySQLTransactionError(
        "cannot execute INSERT in a read-only transaction"
    )
    error = driver_error(refusal)
    assert error.retryable and not isinstance(error, DatabaseUnreachable)
