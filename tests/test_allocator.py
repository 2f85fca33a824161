"""kine-server sets glibc's allocator so that a large response does not fault in fresh pages
each time it is encoded (kine_server/process/allocator.py), and leaves an operator's own
setting alone.

Counted, not timed: the page faults a process takes (/proc/PID/stat, minflt) while it serves
the same 534 kB page again and again. glibc's initial thresholds (mmap and trim at 128 KiB,
spelled out in GLIBC_TUNABLES as an operator would) make each page fault in about 500 fresh
pages; kine-server's own settings make it none once warm.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from kine_server.pb import rpc_pb2, rpc_pb2_grpc
from kine_server.process.allocator import keep_freed_memory, operator_tuned
from tests.support.process import KineProcess

PAGE_KEYS = 500
VALUE = b"v" * 1024
PAGES = 20
GLIBC_INITIAL = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"


def minor_faults(pid: int) -> int:
    # /proc/PID/stat: the command is in parentheses and may hold spaces; minflt is the 10th
    # field, the 8th after it.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[7])


def faults_per_page(tmp_path: Path, prefix: list[str]) -> float:
    """Serve one 534 kB page PAGES times (after a few to warm up); page faults per page."""
    tmp_path.mkdir()
    with KineProcess(
        f"sqlite://{tmp_path}/state.db", tmp_path, "--workers", "1", prefix=prefix
    ) as server:
        assert server.proc is not None
        with grpc.insecure_channel(server.address) as channel:
            kv = rpc_pb2_grpc.KVStub(channel)
            for first in range(0, PAGE_KEYS + 1, 100):  # etcd's --max-txn-ops is 128
                puts = [
                    rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=b"k%04d" % i, value=VALUE))
                    for i in range(first, min(first + 100, PAGE_KEYS + 1))
                ]
                kv.Txn(rpc_pb2.TxnRequest(success=puts), timeout=30)
            page = rpc_pb2.RangeRequest(key=b"k", range_end=b"l", limit=PAGE_KEYS)
            for _ in range(5):
                kv.Range(page, timeout=30)
            before = minor_faults(server.proc.pid)
            for _ in range(PAGES):
                response = kv.Range(page, timeout=30)
                assert len(response.kvs) == PAGE_KEYS and response.more
            return (minor_faults(server.proc.pid) - before) / PAGES


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_a_large_page_served_again_faults_in_no_fresh_memory(tmp_path: Path) -> None:
    ours = faults_per_page(tmp_path / "ours", [])
    operators = faults_per_page(tmp_path / "operators", ["env", f"GLIBC_TUNABLES={GLIBC_INITIAL}"])
    # A 534 kB page is 130 pages of 4 KiB: with glibc's initial thresholds its encoding alone
    # faults in about four times that; with kine-server's, next to nothing.
    assert operators > 200, operators
    assert ours < 20, ours


def test_an_operators_threshold_wins() -> None:
    assert operator_tuned({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"})
    assert operator_tuned({"GLIBC_TUNABLES": "glibc.rtld.x=1:glibc.malloc.mmap_threshold=9"})
    assert operator_tuned({"MALLOC_TRIM_THRESHOLD_": "1"})
    assert operator_tuned({"MALLOC_MMAP_THRESHOLD_": "1"})
    assert not keep_freed_memory({"MALLOC_MMAP_THRESHOLD_": "1"})
    assert not operator_tuned(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "MALLOC_ARENA_MAX": "2"}
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc")
def test_glibc_takes_the_thresholds() -> None:
    """mallopt answers 1 for each setting it took; in a child, not to change the test run's."""
    code = (
        "from kine_server.process.allocator import keep_freed_memory; print(keep_freed_memory({}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "True", done
