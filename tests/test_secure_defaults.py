"""Nothing open by accident: what kine-server creates is private to the user it runs as."""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.conftest import test_config
from tests.support.certs import Pair
from tests.support.client import connect
from tests.support.process import KineProcess
from tests.test_tls import pki as pki  # a fixture, used by name


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The umask many images run with (022): files would be world-readable by default."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("open_umask")
async def test_the_sqlite_files_and_their_new_directories_are_private(tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    existing.chmod(0o755)
    database = existing / "new" / "nested" / "state.db"
    server = SingleProcess(test_config(f"sqlite://{database}"))
    await server.start()
    try:
        client = connect(f"127.0.0.1:{server.port}")
        await client.kv.Put(pb.PutRequest(key=b"/secret", value=b"s3cr3t"))
        await client.close()
        files = [
            database,
            *(database.with_name(database.name + s) for s in ("-wal", "-shm", ".lock")),
        ]
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
        directories = [existing / "new", existing / "new" / "nested"]
        assert [mode(d) for d in directories] == [0o700, 0o700]
        assert mode(existing) == 0o755  # what existed keeps the mode its owner chose
    finally:
        await server.stop()


@pytest.mark.usefixtures("open_umask")
async def test_a_snapshot_copy_is_private(tmp_path: Path) -> None:
    from kine_server.drivers.sqlite import SQLiteDriver

    path = tmp_path / "copy.db"
    driver = SQLiteDriver(str(path), readers=1)
    await driver.open()
    await driver.close()
    assert mode(path) == 0o600


async def test_a_unix_socket_is_never_open_to_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gRPC binds the socket when the port is added; the server makes it 0600 after starting.
    Under an open umask it was 0777 in between, and a connection made then keeps its access:
    it must be created private."""
    socket_path = tmp_path / "kine.sock"
    seen: list[int] = []
    real_chmod = os.chmod

    def chmod(path: Any, mode_: int) -> None:
        if Path(path) == socket_path:
            seen.append(stat.S_IMODE(os.stat(path).st_mode))  # as gRPC created it
        real_chmod(path, mode_)

    monkeypatch.setattr(os, "chmod", chmod)  # the os module process/serving.py uses
    previous = os.umask(0)
    try:
        server = SingleProcess(
            test_config(f"sqlite://{tmp_path}/db/state.db", listen_address=f"unix://{socket_path}")
        )
        await server.start()
    finally:
        os.umask(previous)
    try:
        assert seen == [0o600]
        assert mode(socket_path) == 0o600
        client = connect(f"unix:{socket_path}")
        assert (await client.kv.Range(pb.RangeRequest(key=b"k"))).count == 0
        await client.close()
    finally:
        await server.stop()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ({"listen_address": "127.0.0.1:0"}, []),
        ({"listen_address": "0.0.0.0:0"}, ["serving insecure client requests on http://0.0.0.0:"]),
        (
            {"listen_address": "127.0.0.1:0", "listen_gateway_urls": "http://0.0.0.0:0"},
            ["serving insecure client requests on http://0.0.0.0:"],
        ),
        ({"listen_address": "0.0.0.0:0", "tls": True}, ["without client certificates"]),
        ({"listen_address": "0.0.0.0:0", "tls": True, "mutual": True}, []),
        # Auth on (users must sign in): TLS without client certificates is how etcd runs then.
        ({"listen_address": "0.0.0.0:0", "tls": True, "auth": True}, []),
    ],
)
async def test_a_listener_open_to_the_network_is_warned_about_as_etcd_does(
    tmp_path: Path,
    pki: dict[str, Pair],
    caplog: pytest.LogCaptureFixture,
    flags: dict[str, Any],
    expected: list[str],
) -> None:
    settings = dict(flags)
    if settings.pop("tls", False):
        settings["server_cert_file"] = str(pki["server"].cert)
        settings["server_key_file"] = str(pki["server"].key)
        if settings.pop("mutual", False):
            settings["trusted_ca_file"] = str(pki["ca"].cert)
    dsn = f"sqlite://{tmp_path}/db/state.db"
    if settings.pop("auth", False):
        await _enable_auth(dsn)
    server = SingleProcess(test_config(dsn, **settings))
    with caplog.at_level(logging.WARNING, logger="kine_server"):
        await server.start()
    try:
        warnings = _warnings(caplog)
        assert len(warnings) == len(expected), warnings
        for warning, start in zip(warnings, expected, strict=True):
            assert start in warning and "read and change every key" in warning, warning
        if expected:  # it names the port actually served, not port 0
            assert ":0," not in warnings[0] and ":0 " not in warnings[0], warnings[0]
    finally:
        await server.stop()


async def _enable_auth(dsn: str) -> None:
    """A store with a root user and auth on, made by a server run before the one tested."""
    server = SingleProcess(test_config(dsn))
    await server.start()
    try:
        client = connect(f"127.0.0.1:{server.port}")
        await client.auth.UserAdd(pb.AuthUserAddRequest(name="root", password="pw"))
        await client.auth.UserGrantRole(pb.AuthUserGrantRoleRequest(user="root", role="root"))
        await client.auth.AuthEnable(pb.AuthEnableRequest())
        await client.close()
    finally:
        await server.stop()


def test_the_writer_warns_once_with_workers(tmp_path: Path) -> None:
    """With --workers the writer says it once, not every front-end."""
    kine = KineProcess(f"sqlite://{tmp_path}/s.db", tmp_path, "--workers", "2")
    kine.args += ["--listen-address", f"0.0.0.0:{kine.port}"]  # the last one given counts
    with kine:
        deadline = time.monotonic() + 30
        while "serving insecure client requests on" not in kine.log():
            assert time.monotonic() < deadline, kine.log()
            time.sleep(0.05)
        time.sleep(0.5)  # for a second warning to have its chance (none is expected)
        log = kine.log()
    assert log.count("serving insecure client requests on") == 1, log
