"""Does kine-server's memory stay bounded as keys, revisions and watchers grow?

Starts kine-server as its own process, then: 100 000 keys of 1 KiB (100 000 revisions), 100 000
updates of them (200 000 revisions in all), 1 000 live watchers on 100 streams, 5 more streams
that watch from revision 1 and never read (a stalled client), 2 000 writes that every live watcher
must receive, and a paginated LIST of every key. The server's resident set is sampled from /proc
throughout; its peak (VmHWM) is the figure to hold under 200 MiB.

.venv/bin/python bench/memory.py [--pg] [--keys N] [--watchers N]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1]),
    str(Path(__file__).resolve().parents[1] / "src"),
]

import grpc  # noqa: E402

from kine_server.pb import rpc_pb2 as pb  # noqa: E402
from kine_server.pb import rpc_pb2_grpc  # noqa: E402
from tests.support.postgres import ThrowawayPostgres  # noqa: E402
from tests.support.process import KineProcess  # noqa: E402

PREFIX = b"/registry/configmaps/memory/"
END = b"/registry/configmaps/memory0"
VALUE = b"v" * 1024


def _status(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:  # a front-end being restarted
        return 0
    raise KeyError(field)


def status(pid: int, field: str) -> int:
    """A VmRSS/VmHWM-style field of /proc/PID/status in KiB, summed over the process and its
    descendants (with --workers, the writer process and its front-ends)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += _status(current, field)
        todo += children.get(current, [])
    return total


class Sampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kib = 0
        self.phases: list[tuple[str, float, int, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        began = time.perf_counter()
        reported = 0
        while True:
            rss = status(self.pid, "VmRSS")
            self.peak_kib = max(self.peak_kib, rss)
            if rss > reported + 50 * 1024:  # say when it grows, to place a peak in its phase
                print(f"  {time.perf_counter() - began:7.1f} s   RSS rose to {rss / 1024:.1f} MiB")
                reported = rss
            await asyncio.sleep(0.1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def phase(self, name: str, began: float) -> None:
        rss = status(self.pid, "VmRSS")
        self.phases.append((name, time.perf_counter() - began, rss, status(self.pid, "VmHWM")))
        print(f"{name:<44} {time.perf_counter() - began:7.1f} s   RSS {rss / 1024:6.1f} MiB")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()


async def put_all(kv: list[rpc_pb2_grpc.KVStub], count: int, round_: int) -> None:
    queue = iter(range(count))

    async def worker(i: int) -> None:
        stub = kv[i % len(kv)]
        for n in queue:
            await stub.Put(
                pb.PutRequest(key=PREFIX + b"%06d" % n, value=VALUE[:-2] + b"%02d" % round_)
            )

    await asyncio.gather(*(worker(i) for i in range(64)))


async def main(args: argparse.Namespace) -> None:
    pg = ThrowawayPostgres() if args.pg else None
    if pg:
        pg.start()
    workdir = Path(tempfile.mkdtemp(prefix="kine-memory-"))
    dsn = (pg.dsn.rsplit("/", 1)[0] + "/memory") if pg else f"sqlite://{workdir}/state.db"
    kine = KineProcess(dsn, workdir)
    kine.start()
    assert kine.proc is not None
    pid = kine.proc.pid
    channels = [grpc.aio.insecure_channel(kine.address) for _ in range(4)]
    kv = [rpc_pb2_grpc.KVStub(c) for c in channels]
    watch = [rpc_pb2_grpc.WatchStub(c) for c in channels]
    sampler = Sampler(pid)
    sampler.start()
    began = time.perf_counter()
    print(
        f"kine-server pid {pid} on {'postgres' if pg else 'sqlite'}; start RSS "
        f"{status(pid, 'VmRSS') / 1024:.1f} MiB"
    )
    calls: list[grpc.aio.StreamStreamCall] = []
    try:
        await put_all(kv, args.keys, 1)
        sampler.phase(f"{args.keys} keys created", began)
        await put_all(kv, args.keys, 2)
        sampler.phase(f"{args.keys} updates ({2 * args.keys} revisions)", began)

        current = (
            await kv[0].Range(pb.RangeRequest(key=PREFIX, range_end=END, limit=1))
        ).header.revision
        # Stalled clients: they ask for the whole history and never read a response.
        for i in range(5):
            call = watch[i % len(watch)].Watch()
            await call.write(
                pb.WatchRequest(
                    create_request=pb.WatchCreateRequest(
                        key=PREFIX, range_end=END, start_revision=1
                    )
                )
            )
            calls.append(call)

        streams = args.watchers // 10
        received = [0] * streams
        expected = args.writes * 10  # each stream holds 10 watches of the whole prefix

        async def live(index: int, ready: asyncio.Event) -> None:
            call = watch[index % len(watch)].Watch()
            calls.append(call)
            for _ in range(10):
                await call.write(
                    pb.WatchRequest(
                        create_request=pb.WatchCreateRequest(
                            key=PREFIX, range_end=END, start_revision=current + 1
                        )
                    )
                )
            created = 0
            async for response in call:
                if response.created:
                    created += 1
                    if created == 10:
                        ready.set()
                received[index] += len(response.events)
                if received[index] >= expected:
                    return

        readies = [asyncio.Event() for _ in range(streams)]
        watchers = [asyncio.create_task(live(i, readies[i])) for i in range(streams)]
        await asyncio.gather(*(r.wait() for r in readies))
        sampler.phase(f"{streams * 10} live watchers + 5 stalled streams", began)

        for n in range(args.writes):
            await kv[n % len(kv)].Put(pb.PutRequest(key=PREFIX + b"%06d" % n, value=VALUE))
        await asyncio.wait_for(asyncio.gather(*watchers), timeout=300)
        lost = sum(expected - r for r in received)
        sampler.phase(f"{args.writes} writes seen by every watcher (lost {lost})", began)

        keys = 0
        key = PREFIX
        revision = 0
        while True:
            page = await kv[0].Range(
                pb.RangeRequest(key=key, range_end=END, limit=500, revision=revision)
            )
            revision = page.header.revision
            keys += len(page.kvs)
            if not page.more:
                break
            key = page.kvs[-1].key + b"\x00"
        sampler.phase(f"paginated LIST of {keys} keys", began)
        peak = status(pid, "VmHWM")
        print(
            f"\npeak RSS (VmHWM): {peak / 1024:.1f} MiB   (sampled peak {sampler.peak_kib / 1024:.1f} MiB)"
        )
        print(f"live events lost: {lost}")
        if lost or keys != args.keys:
            raise SystemExit("FAILED: events lost or LIST incomplete")
    finally:
        await sampler.stop()
        for call in calls:
            call.cancel()
        for c in channels:
            await c.close()
        kine.stop()
        if pg:
            pg.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--pg", action="store_true")
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--writes", type=int, default=2000)
    asyncio.run(main(parser.parse_args()))
