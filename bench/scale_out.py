"""Several instances on one PostgreSQL (or MariaDB): write throughput with 1, 2 and 3 instances,
delivery latency of a write on one instance to a watcher on another, and read-after-write across
instances.

    .venv/bin/python bench/scale_out.py [--mysql]

Each instance is a real `kine-server` process. Latency is the time from the write's
acknowledgement to the watcher on the other instance receiving its event, both seen by this one
client process; lost events are writes never delivered. Read-after-write: a Put acknowledged by
one instance, then a Range of the key on the other; a stale answer is a failure. PostgreSQL's
instances hear each other's commits by NOTIFY, MariaDB's by each one's revision watch (every
20 ms).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1]),
    str(Path(__file__).resolve().parents[1] / "src"),
]

from kine_server.pb import rpc_pb2 as pb  # noqa: E402
from tests.support.client import Client, connect  # noqa: E402
from tests.support.mysql import ThrowawayMariaDB  # noqa: E402
from tests.support.postgres import ThrowawayPostgres  # noqa: E402
from tests.support.process import KineProcess  # noqa: E402
from tests.support.watching import WatchStream  # noqa: E402


async def throughput(clients: list[Client], seconds: float = 10, workers: int = 64) -> float:
    deadline = time.monotonic() + seconds
    done = 0

    async def worker(n: int) -> None:
        nonlocal done
        kv = clients[n % len(clients)].kv
        i = 0
        while time.monotonic() < deadline:
            await kv.Put(pb.PutRequest(key=b"/t/%d/%d" % (n, i % 50), value=b"x" * 1024))
            i += 1
            done += 1

    began = time.monotonic()
    await asyncio.gather(*(worker(n) for n in range(workers)))
    return done / (time.monotonic() - began)


async def cross_latency(writer: Client, watcher: Client, rate: float = 200, seconds: float = 10):
    stream = WatchStream(watcher)
    await stream.create(b"/x/", b"/x0")
    await stream.read()
    acked: dict[int, float] = {}
    received: dict[int, float] = {}

    async def reader() -> None:
        while True:
            response = await stream.read(timeout=5)
            if response is None:
                return
            now = time.perf_counter()
            for event in response.events:
                received[event.kv.mod_revision] = now

    task = asyncio.create_task(reader())
    interval = 1 / rate
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, start + i * interval - time.perf_counter()))
        response = await writer.kv.Put(pb.PutRequest(key=b"/x/%d" % (i % 100), value=b"v"))
        acked[response.header.revision] = time.perf_counter()
    await task
    await stream.close()
    latencies = [received[r] - t for r, t in acked.items() if r in received]
    lost = len(acked) - len(latencies)
    q = statistics.quantiles(latencies, n=100)
    return q[49] * 1000, q[98] * 1000, lost, len(acked)


async def read_after_write(writer: Client, reader: Client, count: int = 1000) -> int:
    """How many of `count` reads on `reader` right after a Put acknowledged by `writer` missed
    it."""
    stale = 0
    for i in range(count):
        put = await writer.kv.Put(pb.PutRequest(key=b"/raw", value=b"%d" % i))
        got = await reader.kv.Range(pb.RangeRequest(key=b"/raw"))
        if not got.kvs or got.kvs[0].value != b"%d" % i or got.header.revision < put.header.revision:
            stale += 1
    return stale


async def main(mysql: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="kine-scale-bench-"))
    with ThrowawayMariaDB() if mysql else ThrowawayPostgres() as db:
        print(f"on {'MariaDB' if mysql else 'PostgreSQL'}", flush=True)
        for count in (1, 2, 3):
            dsn = db.dsn.rstrip("/").rsplit("/", 1)[0] if not mysql else db.dsn.rstrip("/")
            dsn += f"/bench{count}"
            procs = [KineProcess(dsn, tmp) for _ in range(count)]
            for proc in procs:
                proc.start()
            clients = [connect(p.address) for p in procs]
            try:
                ops = await throughput(clients)
                print(
                    f"{count} instance(s): 64 clients, 1 KiB puts: {ops:.0f} writes/s", flush=True
                )
                if count >= 2:
                    p50, p99, lost, total = await cross_latency(clients[0], clients[1])
                    print(
                        f"  cross-instance delivery at 200 writes/s: p50 {p50:.1f} ms, "
                        f"p99 {p99:.1f} ms, lost {lost} of {total}",
                        flush=True,
                    )
                    stale = await read_after_write(clients[0], clients[1])
                    print(f"  read-after-write across instances: {stale} of 1000 stale")
            finally:
                for client in clients:
                    await client.close()
                for proc in procs:
                    proc.stop()


if __name__ == "__main__":
    asyncio.run(main("--mysql" in sys.argv[1:]))
