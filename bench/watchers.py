"""What idle watchers cost a Put: sequential Put p50 with N watchers that never match.

.venv/bin/python bench/watchers.py [--counts 0,10000,50000] [--puts 300] [--no-etcd] [--cpu]

kine-server (SQLite) runs as its own process, as in bench/run.py; so does etcd. For each N one
Watch stream opens N watchers, half on single keys and half on prefixes, none of which matches the
key that is then Put; the figure is the p50 of sequential Puts timed by this client. Every
committed event is matched against every watcher of every stream, so this isolates the matching
cost: before the watcher index it grew linearly with N.

`--cpu` also times, in this process and in CPU time (so a busy machine barely moves it), what
routing one published revision to N such watchers costs through the index, and what asking every
watcher (the code before the index) costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from kine_server.mvcc.hub import by_revision  # noqa: E402
from kine_server.mvcc.watcher import Watcher, WatchSpec, route  # noqa: E402
from kine_server.mvcc.watcher_group import WatcherGroup  # noqa: E402
from kine_server.pb import kv_pb2  # noqa: E402
from kine_server.pb import rpc_pb2 as pb  # noqa: E402
from tests.support.client import Client, connect  # noqa: E402
from tests.support.etcd import RealEtcd  # noqa: E402
from tests.support.ports import free_port  # noqa: E402


def start_kine(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KINE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    port = free_port()
    log = open(workdir / "kine.log", "ab")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kine_server",
            "--endpoint",
            f"sqlite://{workdir}/state.db",
            "--listen-address",
            f"127.0.0.1:{port}",
            "--metrics-bind-address",
            f"127.0.0.1:{free_port()}",
            "--compact-interval",
            "0",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"127.0.0.1:{port}"
        time.sleep(0.05)
    stop(proc)
    raise SystemExit(f"kine-server did not start; see {workdir / 'kine.log'}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def put_p50(client: Client, watchers: int, puts: int, round_: int) -> float:
    """Open `watchers` non-matching watches on one stream, then time `puts` sequential Puts."""
    call = client.watch.Watch()
    prefix = f"/idle/{round_}/".encode()
    for i in range(watchers):
        key = prefix + f"{i:06d}".encode()
        # Alternate single keys and prefixes ("<key>/" up to "<key>0": "0" follows "/").
        key, end = (key + b"/", key + b"0") if i % 2 else (key, b"")
        await call.write(
            pb.WatchRequest(create_request=pb.WatchCreateRequest(key=key, range_end=end))
        )
    created = 0
    while created < watchers:
        response = await call.read()
        created += int(response.created)
    value = os.urandom(1024)
    times: list[float] = []
    for i in range(puts):
        began = time.perf_counter()
        await client.kv.Put(pb.PutRequest(key=f"/busy/{i % 100}".encode(), value=value))
        times.append(time.perf_counter() - began)
    call.cancel()
    return statistics.median(times) * 1000


async def run(name: str, endpoint: str, counts: list[int], puts: int) -> None:
    client = connect(endpoint)
    try:
        for round_, n in enumerate(counts):
            p50 = await put_p50(client, n, puts, round_)
            print(f"{name:12s} watchers={n:6d}  Put p50 {p50:6.2f} ms", flush=True)
    finally:
        await client.close()


def routing_cpu(n: int, rounds: int = 2000) -> tuple[float, float]:
    """CPU µs to route one single-event revision to `n` idle watchers: (index, every watcher)."""
    group: WatcherGroup[Watcher] = WatcherGroup()
    watchers: list[Watcher] = []
    for i in range(n):
        key = f"/idle/{i:06d}".encode()
        spec = WatchSpec(key + b"/", key + b"0") if i % 2 else WatchSpec(key, None)
        watchers.append(Watcher(i, spec, next_revision=1, synced=True))
        group.add(watchers[-1], spec.key, spec.end)
    event = kv_pb2.Event(kv=kv_pb2.KeyValue(key=b"/busy/1", mod_revision=2))
    groups = by_revision([event])
    began = time.process_time()
    for _ in range(rounds):
        route(group, groups, 1024)
    indexed = (time.process_time() - began) / rounds
    rounds = max(1, rounds // max(1, n // 100))
    began = time.process_time()
    for _ in range(rounds):
        [w for w in watchers if w.offer(groups, 1024)]
    every = (time.process_time() - began) / rounds
    return indexed * 1e6, every * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", default="0,10000,50000")
    parser.add_argument("--puts", type=int, default=300)
    parser.add_argument("--no-etcd", action="store_true")
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    if args.cpu:
        for n in counts:
            indexed, every = routing_cpu(n)
            print(
                f"routing      watchers={n:6d}  index {indexed:8.1f} µs  every watcher {every:8.1f} µs"
            )
    with tempfile.TemporaryDirectory() as tmp:
        proc, endpoint = start_kine(Path(tmp))
        try:
            asyncio.run(run("kine-sqlite", endpoint, counts, args.puts))
        finally:
            stop(proc)
    if not args.no_etcd:
        with RealEtcd() as etcd:
            asyncio.run(run("etcd", etcd.endpoint, counts, args.puts))


if __name__ == "__main__":
    main()
