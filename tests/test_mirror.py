"""The live migration path the README gives: `etcdctl make-mirror`, etcd → kine-server and back.
It copies values (under new revisions in the destination) and then follows every change until
it is stopped, so clients can be switched over with no downtime beyond the switch."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.support.etcd import RealEtcd, etcdctl_binary
from tests.support.process import KineProcess
from tests.test_etcdctl import etcdctl


def wait_for(endpoint: str, key: str, value: str) -> None:
    deadline = time.monotonic() + 30
    while value not in etcdctl(endpoint, f"get {key} --print-value-only"):
        assert time.monotonic() < deadline, f"{key}={value} never reached {endpoint}"
        time.sleep(0.1)


def mirror(source: str, destination: str, *flags: str) -> subprocess.Popen[bytes]:
    ctl = etcdctl_binary()
    assert ctl is not None
    return subprocess.Popen(
        [ctl, "--endpoints", source, "make-mirror", destination, *flags],
        env={"ETCDCTL_API": "3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_make_mirror_both_ways(tmp_path: Path) -> None:
    with RealEtcd() as etcd, KineProcess(f"sqlite://{tmp_path}/s.db", tmp_path) as kine:
        for i in range(3):
            etcdctl(etcd.endpoint, f"put /m/{i} v{i}")
        into_kine = mirror(etcd.endpoint, kine.address)
        try:
            wait_for(kine.address, "/m/2", "v2")  # what was there
            etcdctl(etcd.endpoint, "put /m/live after")
            wait_for(kine.address, "/m/live", "after")  # and what follows
        finally:
            into_kine.terminate()
            into_kine.wait(10)
        back = mirror(kine.address, etcd.endpoint, "--prefix", "/m/", "--dest-prefix", "/back/")
        try:
            wait_for(etcd.endpoint, "/back/live", "after")
            etcdctl(kine.address, "put /m/again later")
            wait_for(etcd.endpoint, "/back/again", "later")
        finally:
            back.terminate()
            back.wait(10)
