"""How long other clients wait while one client makes a huge request.

    .venv/bin/python bench/big_requests.py [--pg | --etcd] [--keys 50000] [--repeat 2]

Starts the server as its own process (kine-server on SQLite or PostgreSQL, or the real etcd),
then, for each big request (a DeleteRange of N keys, a LeaseRevoke of a lease with N keys, an
unpaginated LIST of N keys), fills the store with N keys under /big/ and makes the request while
other clients, each in a loop, issue a Range of an unrelated key, a Put of an unrelated key, a
LeaseKeepAlive, and (kine-server) GET /health. Prints the big request's own duration and the
longest wait of each probe while it ran. The probes run in this process, the server in another,
so the figures include no waits of the client's own event loop beyond its own scheduling.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from kine_server.pb import rpc_pb2 as pb  # noqa: E402
from tests.support.client import Client, connect  # noqa: E402
from tests.support.etcd import RealEtcd  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.postgres import ThrowawayPostgres  # noqa: E402

PREFIX = b"/big/"
VALUE = b"v" * 100


async def fill(client: Client, keys: int, lease: int = 0) -> None:
    """N keys under PREFIX, 100 Puts per Txn, 8 Txns at a time."""
    ops = 100

    async def txn(start: int) -> None:
        puts = [
            pb.RequestOp(
                request_put=pb.PutRequest(key=PREFIX + b"%08d" % i, value=VALUE, lease=lease)
            )
            for i in range(start, min(start + ops, keys))
        ]
        await client.kv.Txn(pb.TxnRequest(success=puts))

    starts = list(range(0, keys, ops))
    for chunk in range(0, len(starts), 8):
        await asyncio.gather(*(txn(s) for s in starts[chunk : chunk + 8]))


class Probe:
    """Calls `call` in a loop; the longest wait among calls that overlapped the window."""

    def __init__(self, name: str, call: Callable[[], Awaitable[object]]) -> None:
        self.name = name
        self._call = call
        self.window: tuple[float, float] | None = None
        self.longest = 0.0
        self.calls = 0
        self.stopping = False

    async def run(self) -> None:
        while not self.stopping:
            began = time.perf_counter()
            await self._call()
            ended = time.perf_counter()
            window = self.window
            if window is not None and ended >= window[0] and (window[1] == 0 or began <= window[1]):
                self.longest = max(self.longest, ended - began)
                self.calls += 1
            await asyncio.sleep(0.005)


async def scenario(
    endpoint: str, health: str | None, kind: str, keys: int, spy: list[str] | None = None
) -> dict[str, float]:
    client = connect(endpoint)  # the big request's own channel
    other = connect(endpoint)  # the unrelated clients'
    try:
        await client.kv.DeleteRange(pb.DeleteRangeRequest(key=b"\0", range_end=b"\0"))
        lease = 0
        if kind == "revoke":
            lease = (await client.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=3600))).ID
        await fill(client, keys, lease)
        other_lease = (await other.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=3600))).ID
        keepalive = other.lease.LeaseKeepAlive()

        async def keep() -> object:
            await keepalive.write(pb.LeaseKeepAliveRequest(ID=other_lease))
            return await keepalive.read()

        async def get_health() -> object:
            assert health is not None
            url = health
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=60).read())

        probes = [
            Probe("range", lambda: other.kv.Range(pb.RangeRequest(key=b"/other"))),
            Probe("put", lambda: other.kv.Put(pb.PutRequest(key=b"/other", value=b"x"))),
            Probe("keepalive", keep),
        ]
        if health:
            probes.append(Probe("health", get_health))
        watch = other.watch.Watch()
        await watch.write(
            pb.WatchRequest(create_request=pb.WatchCreateRequest(key=PREFIX, range_end=b"/big0"))
        )
        assert (await watch.read()).created
        deletes = 0
        last_event = 0.0

        async def watching() -> None:
            nonlocal deletes, last_event
            while True:
                response = await watch.read()
                deletes += len(response.events)
                last_event = time.perf_counter()

        watcher = asyncio.create_task(watching())
        tasks = [asyncio.create_task(p.run()) for p in probes]
        profiler = subprocess.Popen(spy) if spy else None  # noqa: ASYNC220 - a bench tool
        await asyncio.sleep(1.0 if spy else 0.5)
        began = time.perf_counter()
        for p in probes:
            p.window = (began, 0.0)
        if kind == "delete":
            deleted = (
                await client.kv.DeleteRange(pb.DeleteRangeRequest(key=PREFIX, range_end=b"/big0"))
            ).deleted
        elif kind == "revoke":
            await client.lease.LeaseRevoke(pb.LeaseRevokeRequest(ID=lease))
            deleted = (
                await client.kv.Range(
                    pb.RangeRequest(key=PREFIX, range_end=b"/big0", count_only=True)
                )
            ).count
            deleted = keys - deleted
        else:
            deleted = len(
                (await client.kv.Range(pb.RangeRequest(key=PREFIX, range_end=b"/big0"))).kvs
            )
        took = time.perf_counter() - began
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait()
        for p in probes:
            p.window = (began, began + took)
        if kind != "list":
            while deletes < keys and time.perf_counter() - began < 120:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        watch.cancel()
        watcher.cancel()
        for p in probes:
            p.stopping = True
        await asyncio.gather(*tasks)
        keepalive.cancel()
        assert deleted == keys, (kind, deleted)
        result = {"request": took}
        if kind != "list":
            assert deletes == keys, (kind, deletes)
            result["watch_all"] = last_event - began
        result.update({p.name: p.longest for p in probes})
        return result
    finally:
        await client.close()
        await other.close()


async def wait_ready(endpoint: str, timeout: float = 30.0) -> None:
    client = connect(endpoint)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                await client.kv.Range(pb.RangeRequest(key=b"x"), timeout=1)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await client.close()


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="kine-big-"))
    proc: subprocess.Popen[bytes] | None = None
    pg = etcd = None
    health: str | None = None
    try:
        if args.etcd:
            etcd = RealEtcd()
            etcd.start()
            endpoint = etcd.client_url.removeprefix("http://")
            name = "etcd"
        else:
            if args.pg:
                pg = ThrowawayPostgres()
                pg.start()
                dsn = pg.dsn.rsplit("/", 1)[0] + "/big"
                name = "kine-pg"
            else:
                dsn = f"sqlite://{work}/s.db"
                name = "kine-sqlite"
            port, metrics = free_port(), free_port()
            endpoint = f"127.0.0.1:{port}"
            health = f"http://127.0.0.1:{metrics}/health"
            env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}")
            log = open(work / "server.log", "wb")  # noqa: SIM115, ASYNC230
            proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before anything runs
                [
                    sys.executable,
                    "-m",
                    "kine_server",
                    "--endpoint",
                    dsn,
                    "--listen-address",
                    endpoint,
                    "--metrics-bind-address",
                    f"127.0.0.1:{metrics}",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        await wait_ready(endpoint)
        print(
            f"{name}: {args.keys} keys; longest wait (ms) of each unrelated client during the big request"
        )
        for kind in args.kinds.split(","):
            for run in range(args.repeat):
                spy = None
                if args.py_spy and proc is not None:
                    spy = [
                        str(Path(sys.executable).parent / "py-spy"),
                        "record",
                        "-f",
                        "raw",
                        "--threads",
                        "-r",
                        "200",
                        "-p",
                        str(proc.pid),
                        "-o",
                        f"{args.py_spy}.{kind}.{run + 1}.txt",
                    ]
                r = await scenario(endpoint, health, kind, args.keys, spy)
                figures = "  ".join(f"{k} {v * 1000:7.0f}" for k, v in r.items())
                print(f"  {kind:7} run {run + 1}: {figures}", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        if etcd is not None:
            etcd.stop()
        if pg is not None:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--pg", action="store_true", help="kine-server on PostgreSQL")
    group.add_argument("--etcd", action="store_true", help="the real etcd (/usr/bin/etcd)")
    parser.add_argument("--keys", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--py-spy", metavar="PREFIX", help="profile kine-server during each big request"
    )
    parser.add_argument("--kinds", default="delete,revoke,list")
    asyncio.run(main(parser.parse_args()))
