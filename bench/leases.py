"""What 10 000 live leases cost: the expiry pass, grants and keep-alives.

.venv/bin/python bench/leases.py [--pg]
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

from kine_server.config import Config  # noqa: E402
from kine_server.pb import rpc_pb2 as pb  # noqa: E402
from kine_server.server import Server  # noqa: E402
from tests.support.client import connect  # noqa: E402
from tests.support.postgres import ThrowawayPostgres  # noqa: E402

LEASES = 10_000


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
        for start in range(0, LEASES, 500):
            await asyncio.gather(
                *(
                    client.lease.LeaseGrant(pb.LeaseGrantRequest(ID=i + 1, TTL=3600))
                    for i in range(start, start + 500)
                )
            )
        grant = time.perf_counter() - began
        lessor = server.store.lessor
        began = time.perf_counter()
        for _ in range(20):
            await lessor.expire_due()
        expiry_pass = (time.perf_counter() - began) / 20
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
        keepalive = time.perf_counter() - began
        print(f"database: {'postgres' if pg else 'sqlite'}; {LEASES} live leases")
        print(f"grant: {LEASES / grant:.0f} leases/s (500 concurrent)")
        print(f"expiry pass with none due: {expiry_pass * 1000:.2f} ms (runs every 0.5 s)")
        print(
            f"keep-alive stream: {answered} renewed in {keepalive:.1f}s = {answered / keepalive:.0f}/s"
        )
    finally:
        await client.close()
        await server.stop()
        if pg:
            pg.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--pg", action="store_true")
    asyncio.run(main(parser.parse_args()))
