"""Fixtures: real databases (a SQLite file, a throwaway PostgreSQL), kine-servers and a real etcd."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kine_server.config import Config
from kine_server.drivers.postgres import with_database
from kine_server.process.single import SingleProcess
from tests.support import hangs
from tests.support.client import Client, connect
from tests.support.etcd import RealEtcd
from tests.support.mysql import ThrowawayMariaDB
from tests.support.postgres import ThrowawayPostgres
from tests.support.process import KineProcess

DATABASES = ["sqlite", "postgres"]
#: Tests marked `mysql` (the differential, watch, lease, compaction and multi-instance suites,
#: as issue #27 lists them) run on a throwaway MariaDB as well: all of them would add half again
#: to the suite's time.
MYSQL = "mysql"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "one_process: served in this process only, though it uses only a client (what it checks "
        "is the same code in every process, and a --workers start costs seconds)",
    )
    def write(text: str) -> None:
        terminal = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        if terminal is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                terminal.write_line("\n" + text)

    hangs.install(write)


@pytest.fixture(autouse=True)
def _hang_watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    """Covers setup, the test and teardown (autouse fixtures are set up first, torn down last)."""
    timer = hangs.watchdog(request.node.nodeid)
    yield
    timer.cancel()


@pytest.fixture(scope="session")
def postgres() -> Iterator[ThrowawayPostgres]:
    with ThrowawayPostgres() as pg:
        yield pg


@pytest.fixture(scope="session")
def mariadb() -> Iterator[ThrowawayMariaDB]:
    with ThrowawayMariaDB() as server:
        yield server


def fresh_dsn(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A DSN naming a database that does not exist yet; kine-server creates it."""
    if kind == "sqlite":
        return f"sqlite://{tmp_path}/db/state.db"
    if kind == MYSQL:
        server: ThrowawayMariaDB = request.getfixturevalue("mariadb")
        return f"{server.dsn.rstrip('/')}/kine_{uuid.uuid4().hex[:12]}"
    pg: ThrowawayPostgres = request.getfixturevalue("postgres")
    return with_database(pg.dsn, f"kine_{uuid.uuid4().hex[:12]}")


def _databases(metafunc: pytest.Metafunc) -> None:
    """`dsn` (and every fixture built on it) runs on each of DATABASES, and on MariaDB too for
    tests marked `mysql`."""
    direct = any(
        "dsn" in str(marker.args[0]) for marker in metafunc.definition.iter_markers("parametrize")
    )
    if "dsn" in metafunc.fixturenames and not direct:
        kinds = list(DATABASES)
        if metafunc.definition.get_closest_marker(MYSQL) is not None:
            kinds.append(MYSQL)
        metafunc.parametrize("dsn", kinds, indirect=True)


@pytest.fixture
def dsn(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_dsn(request.param, tmp_path, request)


def test_config(dsn: str, **overrides: object) -> Config:
    config = Config(
        endpoint=dsn,
        listen_address="127.0.0.1:0",
        metrics_bind_address="127.0.0.1:0",
        shutdown_grace=2.0,
    )
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


test_config.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture
async def server(dsn: str) -> AsyncIterator[SingleProcess]:
    srv = SingleProcess(test_config(dsn))
    await srv.start()
    yield srv
    await srv.stop()


#: How `kine` is served: in this process, as `--workers 1` serves it, or as operators run it by
#: default on a machine with more than one core, `--workers 2` (a writer process and two
#: front-ends: a client's requests reach one of them, its writes and its watches' events cross
#: to the writer process and back).
ONE_PROCESS, WORKERS = "workers1", "workers2"


@pytest.fixture
def process_model() -> str:
    """Tests that also use `server` (this process's store, its internals) have one process."""
    return ONE_PROCESS


def _process_models(metafunc: pytest.Metafunc) -> None:
    """Every test that reaches kine-server only through a client (`kine`, or a fixture of its
    own that asks for `process_model`) runs on both process models, unless marked
    `one_process`."""
    if "process_model" not in metafunc.fixturenames or "server" in metafunc.fixturenames:
        return
    if metafunc.definition.get_closest_marker("one_process") is None:
        metafunc.parametrize("process_model", [ONE_PROCESS, WORKERS])


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    _databases(metafunc)
    _process_models(metafunc)


@pytest.fixture
def kine_address(
    process_model: str, dsn: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[str]:
    """Where `kine` connects. A plain fixture: it may ask for the (asynchronous) `server` while
    no event loop runs."""
    if process_model == WORKERS:
        with KineProcess(dsn, tmp_path, "--workers", "2", "--shutdown-grace", "2s") as process:
            yield process.address
        return
    server: SingleProcess = request.getfixturevalue("server")
    yield f"127.0.0.1:{server.port}"


@pytest.fixture
async def kine(kine_address: str) -> AsyncIterator[Client]:
    client = connect(kine_address)
    yield client
    await client.close()


@pytest.fixture
async def kine_workers(dsn: str, tmp_path: Path) -> AsyncIterator[Client]:
    """A client of kine-server run as operators run it by default on a multi-core machine:
    `--workers 2`, a writer process and two front-ends (this client's requests reach one; its
    writes and its watches' events cross to the writer process and back)."""
    with KineProcess(dsn, tmp_path, "--workers", "2") as process:
        client = connect(process.address)
        yield client
        await client.close()


@pytest.fixture
def real_etcd() -> Iterator[RealEtcd]:
    with RealEtcd() as etcd:
        yield etcd


@pytest.fixture
async def etcd(real_etcd: RealEtcd) -> AsyncIterator[Client]:
    client = connect(real_etcd.endpoint)
    yield client
    await client.close()
