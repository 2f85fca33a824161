"""MySQL/MariaDB behind a faulty network, as tests/test_pg_faults.py for PostgreSQL: requests
fail with UNAVAILABLE within the datastore timeout, the server recovers by itself, nothing
acknowledged is lost, and an instance cut off while it holds the revision lock does not hold
the others up for longer than MariaDB's wait_timeout (twice its --datastore-timeout)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from kine_server.drivers.mysql_dsn import parse
from kine_server.process.single import SingleProcess
from tests.support.client import Client, connect
from tests.support.faultproxy import FaultProxy, Mode
from tests.support.mysql import ThrowawayMariaDB
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
