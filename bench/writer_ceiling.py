#!/usr/bin/env python3
"""The writer process alone: how many Puts per second its real channel takes, with fsync.

    .venv/bin/python bench/writer_ceiling.py [--puts 20000] [--frontends 2] [--depth 256] [--pg]

On a machine with many cores, `--workers` front-ends are many and the one writer process is the
ceiling. This runs that writer as `--workers` does (the store with its write side, the channel
on a unix socket) and feeds it from synthetic front-ends: processes that send PutRequest
commands exactly as a front-end's link frames them, keeping `--depth` in flight each, and
count the results, without gRPC or any parsing beyond a frame's first byte, so that the
writer, not they, is what is measured. Each front-end sends `--puts` commands; it prints Puts/s
from the first command to the last answer and the writer process's CPU per Put over the same
span (CPU time depends less than throughput on what else the machine runs).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT / "src", ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from kine_server.config import Config  # noqa: E402
from kine_server.pb import rpc_pb2  # noqa: E402
from kine_server.process.channel import WriterChannel  # noqa: E402
from kine_server.process.frames import ENVELOPE  # noqa: E402
from kine_server.process.parts import writing_store  # noqa: E402
from kine_server.process.startup import open_driver  # noqa: E402
from kine_server.store.commands import COMMAND_FIELDS  # noqa: E402
from kine_server.wire import length_delimited  # noqa: E402

#: A Result frame's first byte: Envelope field `result`, length-delimited.
RESULT_TAG = (ENVELOPE["result"] << 3) | 2


def put_frames(frontend: int, keys: int, value_size: int) -> list[bytes]:
    """One framed Put command per key, as a front-end's link sends it (command id 1: the
    synthetic front-end counts results, it does not match them)."""
    frames = []
    for n in range(keys):
        request = rpc_pb2.PutRequest(key=b"/bench/%d/%06d" % (frontend, n), value=b"v" * value_size)
        command = b"\x08\x01" + length_delimited(COMMAND_FIELDS["put"], request.SerializeToString())
        envelope = length_delimited(ENVELOPE["command"], command)
        frames.append(len(envelope).to_bytes(4, "big") + envelope)
    return frames


class Feeder(asyncio.Protocol):
    """Keeps `depth` commands in flight until `total` are sent; counts results, skips the
    feed and the hello; `done` gets the time the last result came."""

    def __init__(self, frames: list[bytes], depth: int, total: int) -> None:
        self._frames = frames
        self._depth = depth
        self._total = total
        self._sent = 0
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()
        self.results = 0
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def start(self) -> None:
        self._send(self._depth)

    def _send(self, count: int) -> None:
        assert self._transport is not None
        count = min(count, self._total - self._sent)
        frames = self._frames
        self._transport.write(
            b"".join(frames[(self._sent + i) % len(frames)] for i in range(count))
        )
        self._sent += count

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset, end, answered = 0, len(buffer), 0
        while end - offset >= 5:
            size = int.from_bytes(buffer[offset : offset + 4], "big")
            if end - offset - 4 < size:
                break
            if buffer[offset + 4] == RESULT_TAG:
                answered += 1
            offset += 4 + size
        del buffer[:offset]
        self.results += answered
        if self.results >= self._total and not self.done.done():
            self.done.set_result(time.time())
        elif answered:
            self._send(answered)


def frontend(socket_path: str, number: int, depth: int, total: int, go: Any, out: Any) -> None:
    async def run() -> float:
        loop = asyncio.get_running_loop()
        frames = put_frames(number, 1000, 100)
        transport, feeder = await loop.create_unix_connection(
            lambda: Feeder(frames, depth, total), socket_path
        )
        await loop.run_in_executor(None, go.wait)
        feeder.start()
        finished = await feeder.done
        transport.close()
        return finished

    out.put(asyncio.run(run()))


async def main(args: argparse.Namespace) -> None:
    directory = tempfile.mkdtemp(prefix="kine-writer-ceiling-")
    if args.pg:
        from tests.support.postgres import ThrowawayPostgres

        pg = ThrowawayPostgres()
        pg.start()
        endpoint = pg.dsn.rsplit("/", 1)[0] + "/ceiling"
    else:
        endpoint = f"sqlite://{directory}/db/state.db"
    config = Config(endpoint=endpoint, metrics_bind_address="0", compact_interval=0)
    driver = open_driver(config)
    await driver.open()
    parts = writing_store(config, driver)
    await parts.store.start()
    channel = WriterChannel(parts.side, os.path.join(directory, "writer.sock"), lambda _: None)
    await channel.start()
    ctx = multiprocessing.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    feeders = [
        ctx.Process(target=frontend, args=(channel.path, n, args.depth, args.puts, go, results))
        for n in range(args.frontends)
    ]
    for process in feeders:
        process.start()
    while channel.frontends < len(feeders):  # noqa: ASYNC110 - the channel has no event for it
        await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    cpu_began = resource.getrusage(resource.RUSAGE_SELF)
    began = time.time()
    go.set()
    finished = max([await loop.run_in_executor(None, results.get) for _ in feeders])
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    for process in feeders:
        process.join()
    puts = args.puts * args.frontends
    cpu_seconds = (cpu.ru_utime - cpu_began.ru_utime) + (cpu.ru_stime - cpu_began.ru_stime)
    batches = parts.side.writer.batches
    print(
        f"{config.endpoint.split(':')[0]}: {puts / (finished - began):,.0f} Puts/s "
        f"({args.frontends} front-ends x {args.depth} in flight, {puts} Puts); "
        f"writer CPU {cpu_seconds / puts * 1e6:.0f} us/Put; "
        f"{parts.side.writer.requests / max(batches, 1):.0f} requests per batch"
    )
    await channel.stop()
    await parts.store.stop()
    await driver.close()
    if args.pg:
        pg.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--puts", type=int, default=20000, help="Puts per front-end")
    parser.add_argument("--frontends", type=int, default=2)
    parser.add_argument("--depth", type=int, default=256, help="commands in flight per front-end")
    parser.add_argument("--pg", action="store_true", help="PostgreSQL instead of SQLite")
    asyncio.run(main(parser.parse_args()))
