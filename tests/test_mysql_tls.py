"""TLS to MySQL/MariaDB: the DSN's `tls` parameter (kine's), and the --ca-file/--skip-verify
flags, against a MariaDB that refuses every connection without TLS."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.certs import Pair, issue, make_ca
from tests.support.mysql import ThrowawayMariaDB
from tests.support.process import KineProcess
from tests.test_etcdctl import etcdctl

#: One process is enough to see TLS to the database work, and starts faster.
ONE = ("--workers", "1")


@pytest.fixture(scope="module")
def tls_mariadb(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ThrowawayMariaDB, dict[str, Pair]]]:
    pki = tmp_path_factory.mktemp("mypki")
    ca, other = make_ca(pki, "my-ca"), make_ca(pki, "other-ca")
    server = issue(ca, pki, "my-server", server=True)
    # The server's user must read its key: a directory of its own, as the data directory is.
    keys = Path(tempfile.mkdtemp(prefix="kine-mariadb-tls-", dir="/tmp"))
    for source in (server.cert, server.key):
        shutil.copy(source, keys / source.name)
        os.chmod(keys / source.name, 0o644)
    keys.chmod(0o755)
    options = [
        f"--ssl-cert={keys / server.cert.name}",
        f"--ssl-key={keys / server.key.name}",
        "--require-secure-transport=ON",
    ]
    try:
        with ThrowawayMariaDB(options=options) as mariadb:
            yield mariadb, {"ca": ca, "other": other}
    finally:
        shutil.rmtree(keys, ignore_errors=True)


def dsn(mariadb: ThrowawayMariaDB, database: str, tls: str = "") -> str:
    query = f"?tls={tls}" if tls else ""
    return f"{mariadb.dsn.rstrip('/')}/{database}{query}"


def refused(endpoint: str, *flags: str) -> str:
    """kine-server's stderr when it cannot open the database (it must exit 1)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kine_server",
            "--endpoint",
            endpoint,
            *flags,
            "--listen-address",
            "127.0.0.1:0",
            "--metrics-bind-address",
            "0",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_tls_in_the_dsn_as_kines(
    tls_mariadb: tuple[ThrowawayMariaDB, dict[str, Pair]], tmp_path: Path
) -> None:
    mariadb, _ = tls_mariadb
    # MariaDB refuses a connection without TLS as it refuses a wrong password.
    plain = refused(dsn(mariadb, "tls_plain"))
    assert "insecure transport" in plain or "(1045) Access denied" in plain
    with KineProcess(dsn(mariadb, "tls_a", "skip-verify"), tmp_path, *ONE) as kine:
        assert "[exit 0]" in etcdctl(kine.address, "put /t 1")
    assert "certificate verify failed" in refused(dsn(mariadb, "tls_b", "true"))


def test_ca_file_verifies_the_server_and_skip_verify_does_not(
    tls_mariadb: tuple[ThrowawayMariaDB, dict[str, Pair]], tmp_path: Path
) -> None:
    mariadb, pki = tls_mariadb
    with KineProcess(dsn(mariadb, "tls_c"), tmp_path, "--ca-file", str(pki["ca"].cert), *ONE) as kine:
        assert "[exit 0]" in etcdctl(kine.address, "put /t 1")
    wrong = refused(dsn(mariadb, "tls_d"), "--ca-file", str(pki["other"].cert))
    assert "certificate verify failed" in wrong
    with KineProcess(
        dsn(mariadb, "tls_e"), tmp_path, "--ca-file", str(pki["other"].cert), "--skip-verify", *ONE
    ) as kine:
        assert "[exit 0]" in etcdctl(kine.address, "put /t 1")
