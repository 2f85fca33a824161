"""--quota-backend-bytes and the NOSPACE alarm, driven by the real etcdctl."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.conftest import fresh_dsn
from tests.support.process import KineProcess
from tests.test_etcdctl import etcdctl

SPACE_ERROR = "Error: etcdserver: mvcc: database space exceeded"


@pytest.mark.parametrize("kind", ["sqlite", "postgres", "mysql"])
def test_nospace_alarm_refuses_puts_until_disarmed(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    endpoint = fresh_dsn(kind, tmp_path, request)
    with KineProcess(endpoint, tmp_path) as probe:
        size = int(
            etcdctl(probe.address, "endpoint status -w json").split('"dbSize":')[1].split(",")[0]
        )
    quota = size + 300_000
    value = os.urandom(10_000).hex()  # incompressible: PostgreSQL compresses what it can
    with KineProcess(endpoint, tmp_path, "--quota-backend-bytes", str(quota)) as kine:
        outputs = [etcdctl(kine.address, f"put /q/{i} {value}") for i in range(60)]
        refused = [i for i, out in enumerate(outputs) if SPACE_ERROR in out]
        assert refused, "the quota was never reached"
        first = refused[0]
        assert all("[exit 0]" in out for out in outputs[:first])
        assert refused == list(range(first, 60))  # once raised, every put is refused
        assert "alarm:NOSPACE" in etcdctl(kine.address, "alarm list")
        assert SPACE_ERROR in etcdctl(kine.address, "put /small x")
        assert "database space exceeded" in etcdctl(kine.address, "lease grant 60")
        # Reads, deletes and compaction still work; then free the space and disarm.
        assert "[exit 0]" in etcdctl(kine.address, "get /q/0 --keys-only")
        assert "[exit 0]" in etcdctl(kine.address, "del --prefix /q/")
        status = etcdctl(kine.address, "get /q/0 -w json")
        revision = re.search(r'"revision": ?(\d+)', status).group(1)  # type: ignore[union-attr]
        assert "[exit 0]" in etcdctl(kine.address, f"compaction --physical {revision}")
        assert "[exit 0]" in etcdctl(kine.address, "defrag")
        disarmed = etcdctl(kine.address, "alarm disarm")
        assert "alarm:NOSPACE" in disarmed
        assert "alarm:NOSPACE" not in etcdctl(kine.address, "alarm list")
        assert "[exit 0]" in etcdctl(kine.address, "put /small x")
