"""What an etcd-format snapshot of a big store costs: time, and the writer's peak memory.

.venv/bin/python bench/snapshot.py [--revisions 1000000] [--value-bytes 100]

Builds a SQLite store of that many revisions (a tenth of them keys, each changed ten times,
rows written straight into the table), then, in a fresh process, writes the snapshot as
Maintenance.Snapshot does and reports the seconds, the file's size and the process's peak
resident memory: bounded means it does not grow with the number of revisions.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1]),
    str(Path(__file__).resolve().parents[1] / "src"),
]

from kine_server.drivers.base import RawRow  # noqa: E402
from kine_server.drivers.sqlite import SQLiteDriver  # noqa: E402


async def build(path: str, revisions: int, value_bytes: int) -> None:
    driver = SQLiteDriver(path)
    await driver.open()
    keys = max(1, revisions // 10)
    value = b"v" * value_bytes
    try:
        async with driver.write() as tx:
            await tx.lock()
            page: list[RawRow] = []
            for revision in range(2, revisions + 2):
                key = b"/bench/%08d" % (revision % keys)
                version = (revision - 2) // keys + 1
                create = revision - (version - 1) * keys
                nxt = revision + keys if revision + keys < revisions + 2 else None
                page.append(RawRow(key, create, revision, version, value, 0, 0, nxt))
                if len(page) == 10_000:
                    await tx.insert_raw(page)
                    page = []
            if page:
                await tx.insert_raw(page)
            await tx.set_meta("revision", revisions + 1)
    finally:
        await driver.close()


SNAPSHOT = """
import asyncio, resource, sys, time
from kine_server.drivers.sqlite import SQLiteDriver
from kine_server.etcd_backend.mvcc import write_etcd_snapshot

async def main():
    driver = SQLiteDriver(sys.argv[1], readers=1)
    await driver.open()
    began = time.perf_counter()
    async with driver.read() as tx:
        await write_etcd_snapshot(tx, sys.argv[2])
    took = time.perf_counter() - began
    await driver.close()
    print(took, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

asyncio.run(main())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", type=int, default=1_000_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kine-bench-snapshot-") as directory:
        store, out = f"{directory}/state.db", f"{directory}/snapshot.db"
        began = time.perf_counter()
        asyncio.run(build(store, args.revisions, args.value_bytes))
        print(f"built {args.revisions} revisions in {time.perf_counter() - began:.1f}s")
        done = subprocess.run(
            [sys.executable, "-c", SNAPSHOT, store, out],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")},
        )
        took, peak_kib = done.stdout.split()
        size = Path(out).stat().st_size
        print(
            f"snapshot: {float(took):.1f}s, {size / 2**20:.0f} MiB file, "
            f"peak RSS {int(peak_kib) / 1024:.0f} MiB (this machine's bench process idle: "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB incl. the build)"
        )


if __name__ == "__main__":
    main()
