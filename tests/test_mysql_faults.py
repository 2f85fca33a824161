"""MySQL/MariaDB behind a faulty network, as tests/test_pg_faults.py for PostgreSQL: requests
fail with UNAVAILABLE within the datastore timeout, the server recovers by itself, nothing
acknowledged is lost, and an instance cut off while it holds the revision lock does not hold
the others up for longer than MariaDB's wait_timeout (twice its --datastore-timeout). Also the
database server's own trouble with its files, and the tests' servers' with each other's."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncmy
import grpc
import pytest

from kine_server.drivers.mysql_dsn import parse
from kine_server.pb import kv_pb2
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.support.client import Client, connect
from tests.support.faultproxy import FaultProxy, Mode
from tests.support.mysql import UNPRIVILEGED_OS_USER, ThrowawayMariaDB
from tests.support.unprivileged import run_as
from tests.test_pg_faults import (
    blackholed_then_recovered,
    cut_off_holding_the_lock,
    reset_then_heard_again,
    started,
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
    await blackholed_then_recovered(proxy, proxied[1])


async def test_reset_fails_fast_then_recovers_and_watches_again(
    proxy: FaultProxy, database: str
) -> None:
    """B reaches MariaDB through the proxy, A directly; B's revision watch brings A's commits
    long before its poll interval would, before the reset and again after it."""
    await reset_then_heard_again(proxy, database, datastore_timeout=3.0, listing_retried=True)


async def test_an_instance_cut_off_inside_a_write_does_not_hold_the_others_up(
    proxy: FaultProxy, database: str
) -> None:
    """MariaDB ends A's silent session after its wait_timeout (twice A's --datastore-timeout),
    so B's write goes on instead of waiting for TCP keepalive."""
    await cut_off_holding_the_lock(proxy, database)


async def test_another_mariadb_starting_leaves_this_ones_temporary_tables_alone(
    mariadb: ThrowawayMariaDB,
) -> None:
    """A starting mariadbd (mariadb-install-db's too) deletes every `#sql*` file in its tmpdir.
    While the tests' servers shared /tmp, one started mid-run (test_mysql_tls's, a bench's)
    removed the on-disk temporary table of a statement the session's server was running, and a
    watch's catch-up read failed with "Error on delete of '/tmp/#sql-temptable-...'"."""
    if mariadb.external:
        pytest.skip("an external server's tmpdir is its operator's")
    at = parse(mariadb.dsn)
    conn = await asyncmy.connect(host=at.host, port=at.port, user=at.user, password=at.password)
    try:
        async with conn.cursor() as cursor:
            await cursor.execute("SELECT @@tmpdir")
            [(tmpdir,)] = await cursor.fetchall()
    finally:
        conn.close()
    in_use = Path(tmpdir) / f"#sql-temptable-{uuid.uuid4().hex[:8]}.MAI"
    in_use.touch()
    try:
        _, owner = run_as(UNPRIVILEGED_OS_USER)
        if owner is not None:
            os.chown(in_use, *owner)  # the server's own file, which it may delete
        with ThrowawayMariaDB():
            pass
        assert in_use.exists()
    finally:
        in_use.unlink(missing_ok=True)


async def test_the_servers_own_file_trouble_is_unavailable_and_passes() -> None:
    """MariaDB cannot create the on-disk temporary table a history read needs (its tmpdir not
    writable): the database's trouble, not the statement's, so a watch catching up ends with
    UNAVAILABLE, which clients retry (as PostgreSQL's class 58), not INTERNAL; the same watch
    made again once the directory is writable delivers every event."""
    with ThrowawayMariaDB() as db:  # its own: the session's server's tmpdir stays writable
        server = await started(f"{db.dsn.rstrip('/')}/kine")
        client = connect(f"127.0.0.1:{server.port}")
        try:
            for i in range(20):
                await client.kv.Put(pb.PutRequest(key=b"h/%02d" % i, value=b"v" * 100))
            create = pb.WatchRequest(
                create_request=pb.WatchCreateRequest(
                    key=b"h/", range_end=b"h0", start_revision=2, prev_kv=True
                )
            )
            tmpdir = db.base_dir / "tmp"
            tmpdir.chmod(0)
            try:
                call = client.watch.Watch()
                await call.write(create)
                assert (await call.read()).created
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await asyncio.wait_for(call.read(), 10)
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "Can't create/write to file" in (ended.value.details() or "")
            finally:
                tmpdir.chmod(0o755)
            call = client.watch.Watch()
            await call.write(create)
            assert (await call.read()).created
            events: list[kv_pb2.Event] = []
            while len(events) < 20:
                events += (await asyncio.wait_for(call.read(), 10)).events
            assert [e.kv.key for e in events] == [b"h/%02d" % i for i in range(20)]
            call.cancel()
        finally:
            await client.close()
            await asyncio.wait_for(server.stop(), 30)
