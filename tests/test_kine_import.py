"""`kine-server import`: a kine database, made with kine's own DDL and rows shaped as kine writes
them (creates, updates, deletes, a re-create, TTLs, a gap row, a compaction), into kine-server on
both databases, revisions kept; from kine on SQLite, on PostgreSQL and on MySQL (MariaDB)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncmy
import asyncpg
import grpc
import pytest

from kine_server.drivers import make_driver
from kine_server.drivers.kine_source import open_kine
from kine_server.drivers.mysql_dsn import parse
from kine_server.drivers.postgres import with_database
from kine_server.maintenance import kine_import
from kine_server.maintenance.kine_import import LEASE_BASE, import_kine
from kine_server.maintenance.restore import SnapshotError
from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.conftest import test_config
from tests.support.client import connect
from tests.support.mysql import ThrowawayMariaDB
from tests.support.postgres import ThrowawayPostgres
from tests.support.process import KineProcess
from tests.test_etcdctl import etcdctl

#: kine's indexes, the same on both databases.
KINE_INDEXES = [
    "CREATE INDEX IF NOT EXISTS kine_name_index ON kine (name)",
    "CREATE INDEX IF NOT EXISTS kine_name_id_index ON kine (name,id)",
    "CREATE INDEX IF NOT EXISTS kine_id_deleted_index ON kine (id,deleted)",
    "CREATE INDEX IF NOT EXISTS kine_prev_revision_index ON kine (prev_revision)",
    "CREATE UNIQUE INDEX IF NOT EXISTS kine_name_prev_revision_uindex ON kine (name, prev_revision)",
]
#: kine's SQLite schema (pkg/drivers/sqlite), as every release since 0.10 creates it.
KINE_SQLITE_DDL = [
    """CREATE TABLE IF NOT EXISTS kine
        (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name INTEGER,
            created INTEGER,
            deleted INTEGER,
            create_revision INTEGER,
            prev_revision INTEGER,
            lease INTEGER,
            value BLOB,
            old_value BLOB
        )""",
    *KINE_INDEXES,
]
#: kine's PostgreSQL schema of the 0.10 releases (later ones widen id to BIGSERIAL).
KINE_POSTGRES_DDL = [
    """CREATE TABLE IF NOT EXISTS kine
        (
            id SERIAL PRIMARY KEY,
            name VARCHAR(630),
            created INTEGER,
            deleted INTEGER,
            create_revision INTEGER,
            prev_revision INTEGER,
            lease INTEGER,
            value bytea,
            old_value bytea
        )""",
    *KINE_INDEXES,
]
#: kine's MySQL schema (pkg/drivers/mysql); its names are ASCII text, as on PostgreSQL.
KINE_MYSQL_DDL = [
    """CREATE TABLE IF NOT EXISTS kine
        (
            id BIGINT UNSIGNED AUTO_INCREMENT,
            name VARCHAR(630) CHARACTER SET ascii,
            created INTEGER,
            deleted INTEGER,
            create_revision BIGINT UNSIGNED,
            prev_revision BIGINT UNSIGNED,
            lease INTEGER,
            value MEDIUMBLOB,
            old_value MEDIUMBLOB,
            PRIMARY KEY (id)
        )""",
    *KINE_INDEXES,
]
#: The columns kine's inserts fill, in its order.
COLUMNS = "name, created, deleted, create_revision, prev_revision, lease, value, old_value"
#: kine's compaction (pkg/drivers/generic CompactSQL): the rows that later rows at or below the
#: revision replaced, and the deletions at or below it.
COMPACT = (
    "DELETE FROM kine WHERE id IN ("
    "SELECT kp.prev_revision FROM kine kp WHERE kp.name != 'compact_rev_key' AND "
    "kp.prev_revision != 0 AND kp.id <= {p} "
    "UNION SELECT kd.id FROM kine kd WHERE kd.deleted != 0 AND kd.id <= {p})"
)


#: What kine writes, in order: revision 1 is kine's compact_rev_key row; (op, key, value, ttl).
HISTORY: list[tuple[str, str, bytes, int]] = [
    ("create", "/a", b"1", 0),  # 2
    ("create", "/b", b"x", 0),  # 3
    ("update", "/a", b"2", 0),  # 4
    ("gap", "", b"", 0),  # 5: a revision no write took
    ("create", "/t", b"ttl", 600),  # 6
    ("delete", "/b", b"", 0),  # 7
    ("update", "/a", b"3", 0),  # 8
    ("compact", "", b"", 7),  # kine compacts through 7
    ("create", "/b", b"y", 0),  # 9: created again after its deletion
    ("create", "/short", b"s", 2),  # 10
    ("update", "/t", b"ttl2", 600),  # 11
]


def kine_rows(
    history: list[tuple[str, str, bytes, int]] = HISTORY,
) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """The statements (with `?` placeholders) kine's writes make, for `history`."""
    yield f"INSERT INTO kine ({COLUMNS}) VALUES ('compact_rev_key', 0, 0, 0, 0, 0, '', '')", ()
    newest: dict[str, tuple[int, int, bytes]] = {}  # key: (row id, create revision, value)
    revision = 1
    for op, key, value, ttl in history:
        if op == "compact":
            yield COMPACT.format(p=ttl), ()
            yield f"UPDATE kine SET prev_revision = {ttl} WHERE name = 'compact_rev_key'", ()
            continue
        revision += 1
        prev_id, create, old = newest.get(key, (0, 0, b""))
        if op == "create":
            row = (key, 1, 0, 0, prev_id, ttl, value, old)
            newest[key] = (revision, revision, value)
        elif op == "update":
            row = (key, 0, 0, create, prev_id, ttl, value, old)
            newest[key] = (revision, create, value)
        elif op == "delete":
            row = (key, 0, 1, create, prev_id, 0, old, old)
            newest[key] = (revision, 0, b"")
        else:  # kine's fill of a revision
            row = (f"gap-{revision}", 0, 1, 0, 0, 0, b"", b"")
        yield f"INSERT INTO kine ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row


def make_sqlite_kine(path: Path, history: list[tuple[str, str, bytes, int]] = HISTORY) -> str:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in KINE_SQLITE_DDL:
        conn.execute(statement)
    for statement, params in kine_rows(history):
        conn.execute(statement, params)
    conn.close()
    return f"sqlite://{path}?_journal=WAL&cache=shared"  # kine's own endpoint syntax


async def make_postgres_kine(pg: ThrowawayPostgres) -> str:
    name = f"kine_src_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg.dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    dsn = with_database(pg.dsn, name)
    conn = await asyncpg.connect(dsn)
    for statement in KINE_POSTGRES_DDL:
        await conn.execute(statement)
    for statement, params in kine_rows():
        numbered = statement
        for n in range(1, len(params) + 1):
            numbered = numbered.replace("?", f"${n}", 1)
        await conn.execute(numbered, *params)
    await conn.close()
    return dsn


async def make_mysql_kine(mariadb: ThrowawayMariaDB) -> str:
    """kine's MySQL database, written with kine's DSN form (`tcp(host:port)`) in mind."""
    name = f"kine_src_{uuid.uuid4().hex[:10]}"
    conn = await asyncmy.connect(
        host="127.0.0.1", port=mariadb_port(mariadb), user="root", autocommit=True
    )
    async with conn.cursor() as cursor:
        await cursor.execute(f"CREATE DATABASE {name}")
        await cursor.execute(f"USE {name}")
        for statement in KINE_MYSQL_DDL:
            await cursor.execute(statement)
        for statement, params in kine_rows():
            if statement.startswith("DELETE"):
                # MySQL reads no table a DELETE writes in a subquery: through a derived table,
                # as kine's MySQL driver does.
                statement = statement.replace(
                    "WHERE id IN (", "WHERE id IN (SELECT * FROM ("
                ).removesuffix(")") + ") AS compacted)"
            await cursor.execute(statement.replace("?", "%s"), params)
    conn.close()
    return f"mysql://root:@tcp(127.0.0.1:{mariadb_port(mariadb)})/{name}"


def mariadb_port(mariadb: ThrowawayMariaDB) -> int:
    return parse(mariadb.dsn).port


async def check_imported(address: str) -> None:
    """What a client of the imported store sees: kine's revisions, history from the compact
    revision on, and leases for the TTLs."""
    client = connect(address)
    try:
        status = await client.maintenance.Status(pb.StatusRequest())
        assert status.header.revision == 11
        now = await client.kv.Range(pb.RangeRequest(key=b"/", range_end=b"0"))
        got = {
            kv.key: (kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)
            for kv in now.kvs
        }
        assert got == {
            # Its create row was compacted away: versions count from the oldest row kept.
            b"/a": (b"3", 2, 8, 2, 0),
            b"/b": (b"y", 9, 9, 1, 0),
            b"/short": (b"s", 10, 10, 1, LEASE_BASE | 2),
            b"/t": (b"ttl2", 6, 11, 2, LEASE_BASE | 600),
        }
        at7 = await client.kv.Range(pb.RangeRequest(key=b"/", range_end=b"0", revision=7))
        assert [(kv.key, kv.value) for kv in at7.kvs] == [(b"/a", b"2"), (b"/t", b"ttl")]
        with pytest.raises(grpc.aio.AioRpcError) as compacted:
            await client.kv.Range(pb.RangeRequest(key=b"/a", revision=6))
        assert compacted.value.code() == grpc.StatusCode.OUT_OF_RANGE
        # A watch resumed from a revision after the compaction, as kube-apiserver's would.
        watch = client.watch.Watch()
        create = pb.WatchCreateRequest(key=b"/", range_end=b"0", start_revision=8, prev_kv=True)
        await watch.write(pb.WatchRequest(create_request=create))
        assert (await watch.read()).created
        events: list[tuple[int, bytes, bytes]] = []
        while len(events) < 4:
            response = await asyncio.wait_for(watch.read(), 10)
            events += [(e.kv.mod_revision, e.kv.key, e.prev_kv.value) for e in response.events]
        assert events == [
            (8, b"/a", b"2"),
            (9, b"/b", b""),
            (10, b"/short", b""),
            (11, b"/t", b"ttl"),
        ]
        watch.cancel()
        leases = await client.lease.LeaseLeases(pb.LeaseLeasesRequest())
        assert sorted(lease.ID for lease in leases.leases) == [LEASE_BASE | 2, LEASE_BASE | 600]
        ttl = await client.lease.LeaseTimeToLive(
            pb.LeaseTimeToLiveRequest(ID=LEASE_BASE | 600, keys=True)
        )
        assert ttl.grantedTTL == 600 and list(ttl.keys) == [b"/t"]
        # The 2 s TTL still expires its key.
        deadline = time.monotonic() + 15
        while (await client.kv.Range(pb.RangeRequest(key=b"/short"))).count:
            assert time.monotonic() < deadline, "the key with a 2 s TTL never expired"
            await asyncio.sleep(0.2)
    finally:
        await client.close()


async def imported_into(dsn: str, kine_dsn: str) -> None:
    target = make_driver(dsn)
    await target.open()
    try:
        report = await import_kine(open_kine(kine_dsn), target)
    finally:
        await target.close()
    assert (report.revision, report.compact_revision, report.live_keys) == (11, 7, 4)
    assert report.leases == 2
    server = SingleProcess(test_config(dsn))
    await server.start()
    try:
        await check_imported(f"127.0.0.1:{server.port}")
    finally:
        await server.stop()


@pytest.mark.mysql
async def test_a_kine_sqlite_database_imports_with_its_revisions(dsn: str, tmp_path: Path) -> None:
    await imported_into(dsn, make_sqlite_kine(tmp_path / "kine.db"))


async def test_a_kine_postgres_database_imports_with_its_revisions(
    postgres: ThrowawayPostgres, tmp_path: Path
) -> None:
    kine_dsn = await make_postgres_kine(postgres)
    await imported_into(f"sqlite://{tmp_path}/db/state.db", kine_dsn)


async def test_a_kine_mysql_database_imports_with_its_revisions(
    mariadb: ThrowawayMariaDB, tmp_path: Path
) -> None:
    kine_dsn = await make_mysql_kine(mariadb)
    await imported_into(f"sqlite://{tmp_path}/db/state.db", kine_dsn)


async def test_the_import_refuses_a_store_with_data(tmp_path: Path) -> None:
    dsn = f"sqlite://{tmp_path}/db/state.db"
    server = SingleProcess(test_config(dsn))
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    await client.kv.Put(pb.PutRequest(key=b"/mine", value=b"1"))
    await client.close()
    await server.stop()
    target = make_driver(dsn)
    await target.open()
    try:
        with pytest.raises(SnapshotError, match="already holds data"):
            await import_kine(open_kine(make_sqlite_kine(tmp_path / "kine.db")), target)
    finally:
        await target.close()


async def test_an_import_that_fails_midway_leaves_the_store_empty(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One transaction: a failure after some pages are written leaves nothing behind, and the
    import can simply be run again."""
    kine_dsn = make_sqlite_kine(tmp_path / "kine.db")
    monkeypatch.setattr(kine_import, "PAGE", 2)
    target = make_driver(dsn)
    await target.open()
    pages = 0
    real = kine_import.convert

    def failing(row: Any, version: int) -> Any:
        nonlocal pages
        pages += 1
        if pages == 5:
            raise RuntimeError("the disk is full")
        return real(row, version)

    monkeypatch.setattr(kine_import, "convert", failing)
    try:
        with pytest.raises(RuntimeError, match="the disk is full"):
            await import_kine(open_kine(kine_dsn), target)
        async with target.read() as tx:
            assert (await tx.counters()).revision == 1
            assert await tx.dump((0, -1), 10) == []
        monkeypatch.setattr(kine_import, "convert", real)
        report = await import_kine(open_kine(kine_dsn), target)
        assert report.revision == 11
    finally:
        await target.close()


def test_the_import_command_then_etcdctl(tmp_path: Path) -> None:
    kine_dsn = make_sqlite_kine(tmp_path / "kine.db")
    endpoint = f"sqlite://{tmp_path}/db/state.db"
    done = subprocess.run(
        [sys.executable, "-m", "kine_server", "import", "--from", kine_dsn, "--endpoint", endpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported revision 11 into sqlite "), done.stdout
    assert ": 6 rows, 2 leases, compacted through 7, 4 keys; HashKV " in done.stdout, done.stdout
    with KineProcess(endpoint, tmp_path) as kine:
        got = etcdctl(kine.address, "get /a -w fields")
        assert '"ModRevision" : 8' in got and '"Value" : "3"' in got, got
        # At the imported revision: /short's 2 s lease may expire (a new revision) before this
        # runs, on a slow start.
        hashed = etcdctl(kine.address, "endpoint hashkv --rev=11 -w json")
        assert done.stdout.split("HashKV ")[1].split()[0] in hashed, (done.stdout, hashed)
    again = subprocess.run(
        [sys.executable, "-m", "kine_server", "import", "--from", kine_dsn, "--endpoint", endpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1
    assert again.stderr.strip().endswith("already holds data; import needs an empty one")
