"""The HTTP/JSON gateway's Puts against a real etcd's gateway, side by side.

.venv/bin/python bench/gateway.py [--workers N] [--puts N]

Each client is a thread with one kept-alive HTTP connection, as etcd3gw's requests session keeps
one; the rows are one client (latency) and 16 clients (throughput). Both servers run on fresh
stores on this machine, one after the other; the ratio is kine-server's over etcd's.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1]),
    str(Path(__file__).resolve().parents[1] / "src"),
]

from tests.support.etcd import RealEtcd  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.process import KineProcess  # noqa: E402


def puts(port: int, clients: int, each: int) -> tuple[float, float]:
    """(Puts per second, p50 ms) for `clients` threads sending `each` Puts one after another."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(number: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for i in range(each):
            key = base64.b64encode(f"/bench/{number}/{i}".encode()).decode()
            body = json.dumps({"key": key, "value": base64.b64encode(b"x" * 256).decode()})
            began = time.perf_counter()
            connection.request("POST", "/v3/kv/put", body=body)
            response = connection.getresponse()
            response.read()
            mine.append(time.perf_counter() - began)
            assert response.status == 200, response.status
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    latencies.sort()
    return len(latencies) / elapsed, latencies[len(latencies) // 2] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="0", help="kine-server's --workers (0: its default)")
    parser.add_argument("--puts", type=int, default=1600, help="Puts per row")
    args = parser.parse_args()
    rows = [(1, args.puts // 2), (16, args.puts // 16)]
    results: dict[str, list[tuple[float, float]]] = {}
    with RealEtcd() as etcd:
        port = int(etcd.endpoint.rsplit(":", 1)[1])
        results["etcd"] = [puts(port, clients, each) for clients, each in rows]
    with tempfile.TemporaryDirectory() as directory:
        port = free_port()
        flags = ["--listen-gateway-urls", f"http://127.0.0.1:{port}", "--workers", args.workers]
        with KineProcess(f"sqlite://{directory}/s.db", Path(directory), *flags):
            results["kine"] = [puts(port, clients, each) for clients, each in rows]
    print(f"{'HTTP/JSON Puts':<16}{'etcd':>20}{'kine-server':>20}{'ratio':>8}")
    for (clients, _), etcd_row, kine_row in zip(
        rows, results["etcd"], results["kine"], strict=True
    ):
        print(
            f"{f'{clients} client(s)':<16}"
            f"{f'{etcd_row[0]:.0f}/s p50 {etcd_row[1]:.1f} ms':>20}"
            f"{f'{kine_row[0]:.0f}/s p50 {kine_row[1]:.1f} ms':>20}"
            f"{kine_row[0] / etcd_row[0]:>7.2f}x"
        )


if __name__ == "__main__":
    main()
