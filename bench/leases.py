"""What 10 000 live leases cost: the expiry pass, grants and keep-alives.

.venv/bin/python bench/leases.py [--pg] [--compare]

The keep-alive row is one LeaseKeepAlive stream with a request for every lease written without
waiting for the answers, as etcd's Go client sends them (one per lease every TTL/3 on a shared
stream, answers read by another goroutine). In-process, the client shares the server's event
loop; `--compare` also runs the same stream against kine-server in a process of its own and
against a real etcd, each with the client in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1]),
    str(Path(__file__).resolve().parents[1] / "src"),
]

from kine_server.config import Config  # noqa: E402
from kine_server.pb import rpc_pb2 as pb  # noqa: E402
from kine_server.process.single import SingleProcess as Server  # noqa: E402
from tests.support.client import Client, connect  # noqa: E402
from tests.support.etcd import RealEtcd, etcd_binary  # noqa: E402
from tests.support.postgres import ThrowawayPostgres  # noqa: E402
from tests.support.process import KineProcess  # noqa: E402

LEASES = 10_000


async def grant_all(client: Client) -> None:
    for start in range(0, LEASES, 500):
        await asyncio.gather(
            *(
                client.lease.LeaseGrant(pb.LeaseGrantRequest(ID=i + 1, TTL=3600))
                for i in range(start, start + 500)
            )
        )


async def keep_alive_stream(client: Client) -> tuple[int, float]:
    """(renewals answered with the full TTL, seconds) for one keep-alive per lease, pipelined."""
    call = client.lease.LeaseKeepAlive()
    began = time.perf_counter()

    async def send() -> None:
        for i in range(LEASES):
            await call.write(pb.LeaseKeepAliveRequest(ID=i + 1))
        await call.done_writing()

    sender = asyncio.create_task(send())
    answered = 0
    async for response in call:
        answered += response.TTL == 3600
    await sender
    return answered, time.perf_counter() - began


def rate(answered: int, seconds: float) -> str:
    return f"{answered} renewed in {seconds:.1f}s = {answered / seconds:.0f}/s"


async def measure(address: str) -> str:
    client = connect(address)
    try:
        await grant_all(client)
        return rate(*await keep_alive_stream(client))
    finally:
        await client.close()


async def compare(dsn: str) -> None:
    with tempfile.TemporaryDirectory() as logs, KineProcess(dsn, Path(logs)) as kine:
        print(f"keep-alive stream, kine-server process: {await measure(kine.address)}")
    with RealEtcd() as etcd:
        print(f"keep-alive stream, etcd {etcd_version()}: {await measure(etcd.endpoint)}")


def etcd_version() -> str:
    binary = etcd_binary()
    assert binary is not None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return out.split()[2] if out.startswith("etcd Version:") else "?"


async def main(args: argparse.Namespace) -> None:
    pg = ThrowawayPostgres() if args.pg else None
    if pg:
        pg.start()
    dsn = (pg.dsn.rsplit("/", 1)[0] + "/leases") if pg else f"sqlite://{tempfile.mkdtemp()}/s.db"
    server = Server(Config(endpoint=dsn, listen_address="127.0.0.1:0", metrics_bind_address="0"))
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    try:
        began = time.perf_counter()
        await grant_all(client)
        grant = time.perf_counter() - began
        lessor = server.write_side.lessor
        began = time.perf_counter()
        for _ in range(20):
            await lessor.expire_due()
        expiry_pass = (time.perf_counter() - began) / 20
        answered, keepalive = await keep_alive_stream(client)
        print(f"database: {'postgres' if pg else 'sqlite'}; {LEASES} live leases")
        print(f"grant: {LEASES / grant:.0f} leases/s (500 concurrent)")
        print(f"expiry pass with none due: {expiry_pass * 1000:.2f} ms (runs every 0.5 s)")
        print(f"keep-alive stream, in-process: {rate(answered, keepalive)}")
        if args.compare:
            await compare(dsn.rsplit("/", 1)[0] + "/process" if pg else dsn + ".process")
    finally:
        await client.close()
        await server.stop()
        if pg:
            pg.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--pg", action="store_true")
    parser.add_argument(
        "--compare", action="store_true", help="also a kine-server process and a real etcd"
    )
    asyncio.run(main(parser.parse_args()))
