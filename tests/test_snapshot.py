"""etcdctl snapshot save, then `kine-server restore` into a fresh database of either kind."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import fresh_dsn
from tests.support.process import KineProcess
from tests.test_etcdctl import etcdctl


def state(address: str) -> tuple[object, ...]:
    """Every key now and one as of revision 25, with the store revision (ids left out)."""
    now = json.loads(etcdctl(address, "get --prefix / -w json").split("\n", 1)[1])
    old = json.loads(etcdctl(address, "get /s/1 --rev 25 -w json").split("\n", 1)[1])
    return now["header"]["revision"], now["kvs"], old["kvs"]


def restore(snapshot: Path, endpoint: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kine_server", "restore", "--endpoint", endpoint, str(snapshot)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("source", "target"), [("sqlite", "postgres"), ("postgres", "sqlite"), ("mysql", "mysql")]
)
def test_snapshot_save_and_restore(
    source: str, target: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    origin = fresh_dsn(source, tmp_path / "a", request)
    copy = fresh_dsn(target, tmp_path / "b", request)
    snapshot = tmp_path / "snap.db"
    with KineProcess(origin, tmp_path) as kine:
        for i in range(30):
            etcdctl(kine.address, f"put /s/{i % 7} v{i}")
        etcdctl(kine.address, "del /s/3")
        granted = re.search(r"lease ([0-9a-f]+) granted", etcdctl(kine.address, "lease grant 600"))
        assert granted is not None
        lease = granted.group(1)
        etcdctl(kine.address, f"put /leased x --lease={lease}")
        etcdctl(kine.address, "compaction 20")
        saved = etcdctl(kine.address, f"snapshot save {snapshot}")
        assert "[exit 0]" in saved and f"Snapshot saved at {snapshot}" in saved
        before = state(kine.address)
    restored = restore(snapshot, copy)
    assert restored.returncode == 0, restored.stderr
    assert restored.stdout.startswith("restored revision 33 into ")
    again = restore(snapshot, copy)
    assert again.returncode == 1 and "already holds data" in again.stderr
    with KineProcess(copy, tmp_path) as kine:
        after = state(kine.address)
        assert "required revision has been compacted" in etcdctl(kine.address, "get /s/1 --rev 19")
        assert "/leased" in etcdctl(kine.address, f"lease timetolive {lease} --keys")
    assert after == before


def test_a_kine_server_sqlite_snapshot_still_restores(tmp_path: Path) -> None:
    """Snapshots were kine-server SQLite files (with etcd's SHA-256 trailer) before they became
    etcd's format: those taken then still restore."""
    origin = f"sqlite://{tmp_path}/a/state.db"
    with KineProcess(origin, tmp_path) as kine:
        for i in range(5):
            etcdctl(kine.address, f"put /old/{i} v{i}")
        before = etcdctl(kine.address, "get --prefix /old/ -w json")
        assert kine.stop() == 0
    data = (tmp_path / "a" / "state.db").read_bytes()
    snapshot = tmp_path / "old.snapshot"
    snapshot.write_bytes(data + hashlib.sha256(data).digest())
    copy = f"sqlite://{tmp_path}/b/state.db"
    restored = restore(snapshot, copy)
    assert restored.returncode == 0, restored.stderr
    assert ": 5 keys; HashKV " in restored.stdout, restored.stdout
    with KineProcess(copy, tmp_path) as kine:
        assert etcdctl(kine.address, "get --prefix /old/ -w json") == before
