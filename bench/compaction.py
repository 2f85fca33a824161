"""Compaction at scale: time to compact N revisions, rows left, write p99 with and without it.

    .venv/bin/python bench/compaction.py [--pg] [--revisions 1000000]

Writes N revisions over 1000 keys through the store (batched, so that setting up takes minutes,
not hours), then measures sequential Put latency for 10 s without compaction, and again while
one Compact of the whole history runs with the default batch size.
"""

from __future__ import annotations

import argparse
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

from kine_server.config import Config  # noqa: E402
from kine_server.drivers.base import RawRow  # noqa: E402
from kine_server.pb import rpc_pb2 as pb  # noqa: E402
from kine_server.process.single import SingleProcess as Server  # noqa: E402
from tests.support.client import connect  # noqa: E402
from tests.support.postgres import ThrowawayPostgres  # noqa: E402


async def put_latencies(
    kv: object, seconds: float, stop: asyncio.Event | None = None
) -> list[float]:
    latencies = []
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline and not (stop and stop.is_set()):
        began = time.perf_counter()
        await kv.Put(pb.PutRequest(key=b"/lat/%d" % (n % 100), value=b"x" * 1024))  # type: ignore[attr-defined]
        latencies.append(time.perf_counter() - began)
        n += 1
    return latencies


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 100 else float("nan")


async def load_history(server: Server, revisions: int, keys: int = 1000) -> None:
    """Write the rows N puts round-robin over `keys` keys would leave, straight into the table:
    the same rows and counters, made in seconds instead of hours of gRPC calls."""
    chunk = 20_000
    last = revisions + 1  # revisions 2 .. last
    for first in range(2, last + 1, chunk):
        rows = []
        for r in range(first, min(first + chunk, last + 1)):
            n = r - 2
            key = b"/k/%04d" % (n % keys)
            nxt = r + keys if r + keys <= last else None
            rows.append(RawRow(key, 2 + n % keys, r, n // keys + 1, b"v" * 100, 0, 0, nxt))
        async with server.driver.write() as tx:
            await tx.lock()
            await tx.insert_raw(rows)
            await tx.set_revision(rows[-1].mod_revision)
    server.store.hub.revision = last


async def main(args: argparse.Namespace) -> None:
    tmp = tempfile.mkdtemp(prefix="kine-compaction-bench-")
    pg = ThrowawayPostgres() if args.pg else None
    if pg:
        pg.start()
    dsn = (pg.dsn.rsplit("/", 1)[0] + "/bench") if pg else f"sqlite://{tmp}/state.db"
    server = Server(
        Config(
            endpoint=dsn, listen_address="127.0.0.1:0", metrics_bind_address="0", compact_interval=0
        )
    )
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    try:
        began = time.monotonic()
        await load_history(server, args.revisions)
        setup = time.monotonic() - began
        counters = await server.store.counters()
        print(f"wrote {counters.revision - 1} revisions in {setup:.0f}s", flush=True)
        quiet = await put_latencies(client.kv, 10)
        target = (await server.store.counters()).revision
        stop = asyncio.Event()
        compact_began = time.monotonic()

        async def compact() -> float:
            await client.kv.Compact(
                pb.CompactionRequest(revision=target, physical=True), timeout=3600
            )
            stop.set()
            return time.monotonic() - compact_began

        busy, took = await asyncio.gather(put_latencies(client.kv, 3600, stop), compact())
        async with server.driver.read() as tx:
            rows = len(await tx.dump((0, -1), 10_000_000))
        print(f"database: {'postgres' if pg else 'sqlite'}")
        print(f"compacted {target - 1} revisions in {took:.1f}s; rows left: {rows}")
        print(
            f"put p50/p99 without compaction: {p(quiet, 50):.2f} / {p(quiet, 99):.2f} ms ({len(quiet)} puts)"
        )
        print(
            f"put p50/p99 during compaction:  {p(busy, 50):.2f} / {p(busy, 99):.2f} ms ({len(busy)} puts)"
        )
    finally:
        await client.close()
        await server.stop()
        if pg:
            pg.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--pg", action="store_true")
    parser.add_argument("--revisions", type=int, default=1_000_000)
    asyncio.run(main(parser.parse_args()))
