"""TLS to PostgreSQL: sslmode in the DSN, and kine's --ca-file/--skip-verify flags."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.support.certs import Pair, issue, make_ca
from tests.support.postgres import ThrowawayPostgres
from tests.support.process import KineProcess
from tests.test_etcdctl import etcdctl


@pytest.fixture(scope="module")
def tls_postgres(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ThrowawayPostgres, dict[str, Pair]]]:
    """A PostgreSQL of its own that speaks TLS with a certificate from a test CA."""
    pki = tmp_path_factory.mktemp("pgpki")
    ca, other = make_ca(pki, "pg-ca"), make_ca(pki, "other-ca")
    server = issue(ca, pki, "pg-server", server=True)
    with ThrowawayPostgres() as pg:
        for name, source in (("server.crt", server.cert), ("server.key", server.key)):
            target = pg.data_dir / name
            shutil.copy(source, target)
            os.chmod(target, 0o600)
            owner = pg.data_dir.stat()
            os.chown(target, owner.st_uid, owner.st_gid)

        async def enable() -> None:
            conn = await asyncpg.connect(pg.dsn)
            await conn.execute("ALTER SYSTEM SET ssl = on")
            await conn.execute("SELECT pg_reload_conf()")
            await conn.close()

        asyncio.run(enable())
        yield pg, {"ca": ca, "other": other}


def ssl_in_use(pg: ThrowawayPostgres, database: str) -> bool:
    async def query() -> bool:
        conn = await asyncpg.connect(pg.dsn)
        try:
            found = await conn.fetchval(
                "SELECT bool_or(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                "WHERE a.datname = $1",
                database,
            )
        finally:
            await conn.close()
        return bool(found)

    return asyncio.run(query())


def dsn(pg: ThrowawayPostgres, database: str, mode: str) -> str:
    return pg.dsn.rsplit("/", 1)[0] + f"/{database}?sslmode={mode}"


def test_sslmode_require_in_the_dsn(
    tls_postgres: tuple[ThrowawayPostgres, dict[str, Pair]], tmp_path: Path
) -> None:
    pg, _ = tls_postgres
    with KineProcess(dsn(pg, "tls_a", "require"), tmp_path) as kine:
        assert "[exit 0]" in etcdctl(kine.address, "put /t 1")
        assert ssl_in_use(pg, "tls_a")


def test_ca_file_verifies_the_server(
    tls_postgres: tuple[ThrowawayPostgres, dict[str, Pair]], tmp_path: Path
) -> None:
    pg, pki = tls_postgres
    with KineProcess(
        dsn(pg, "tls_b", "verify-full"), tmp_path, "--ca-file", str(pki["ca"].cert)
    ) as kine:
        assert "[exit 0]" in etcdctl(kine.address, "put /t 1")
        assert ssl_in_use(pg, "tls_b")
    wrong = subprocess.run(
        [
            sys.executable,
            "-m",
            "kine_server",
            "--endpoint",
            dsn(pg, "tls_c", "verify-full"),
            "--ca-file",
            str(pki["other"].cert),
            "--listen-address",
            "127.0.0.1:0",
            "--metrics-bind-address",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode == 1
    assert "certificate verify failed" in wrong.stderr and "Traceback" not in wrong.stderr
    with KineProcess(
        dsn(pg, "tls_d", "require"), tmp_path, "--ca-file", str(pki["other"].cert), "--skip-verify"
    ) as kine:
        assert "[exit 0]" in etcdctl(kine.address, "put /t 1")
        assert ssl_in_use(pg, "tls_d")
