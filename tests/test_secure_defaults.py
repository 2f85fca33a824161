"""Nothing open by accident: what kine-server creates is private to the user it runs as."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kine_server.pb import rpc_pb2 as pb
from kine_server.server import Server
from tests.conftest import test_config
from tests.support.client import connect


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
    server = Server(test_config(f"sqlite://{database}"))
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
