"""The metrics listener: Prometheus text with request, store, watch and compaction figures,
and /health and /readyz."""

from __future__ import annotations

import asyncio
import re
import ssl
import urllib.request
from pathlib import Path

import grpc
import pytest

from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.support.certs import issue, make_ca
from tests.support.client import Client
from tests.support.ports import free_port
from tests.support.process import KineProcess
from tests.support.watching import WatchStream


async def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=10, context=context) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    return await asyncio.to_thread(fetch)


def sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            match = re.match(rf"{name}(\{{[^}}]*\}})? (\S+)$", line)
            if match:
                return float(match.group(2))
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


async def test_metrics_count_requests_and_show_the_store(server: SingleProcess, kine: Client) -> None:
    assert server.http is not None
    base = f"http://127.0.0.1:{server.http.port}"
    for i in range(5):
        await kine.kv.Put(pb.PutRequest(key=b"m%d" % i, value=b"v"))
    with pytest.raises(grpc.aio.AioRpcError):
        await kine.kv.Range(pb.RangeRequest(key=b""))
    stream = WatchStream(kine)
    await stream.create(b"m", b"n")
    await stream.create(b"x")
    assert (await stream.read()) is not None and (await stream.read()) is not None
    status, text = await get(f"{base}/metrics")
    assert status == 200
    assert sample(text, "kine_grpc_requests_total", method="Put", code="OK") == 5
    assert sample(text, "kine_grpc_requests_total", method="Range", code="INVALID_ARGUMENT") == 1
    assert sample(text, "kine_grpc_request_seconds_count", method="Put") == 5
    assert sample(text, "kine_revision") == 6
    assert sample(text, "kine_watchers") == 2
    assert sample(text, "kine_watch_streams") == 1
    assert sample(text, "kine_write_requests_total") >= 5
    assert sample(text, "kine_write_batch_requests_count") >= 1
    assert sample(text, "kine_db_size_bytes") > 0
    assert sample(text, "kine_compaction_failures_total") == 0
    assert (await get(f"{base}/health")) == (200, '{"health":"true","reason":""}')
    assert (await get(f"{base}/readyz"))[0] == 200
    assert (await get(f"{base}/nope"))[0] == 404
    await stream.close()


async def test_compaction_failures_show_in_metrics(server: SingleProcess, kine: Client) -> None:
    async def fail(stage: str, after: int, through: int) -> None:
        raise RuntimeError("injected")

    for i in range(20):
        await kine.kv.Put(pb.PutRequest(key=b"c", value=b"%d" % i))
    compactor = server.write_side.compactor
    compactor.hook = fail
    compactor.settings = type(compactor.settings)(interval=0, min_retain=5)
    assert await compactor.tick() is False
    assert await compactor.tick() is False
    assert server.http is not None
    _, text = await get(f"http://127.0.0.1:{server.http.port}/metrics")
    assert sample(text, "kine_compaction_failures_total") == 2
    assert sample(text, "kine_compaction_consecutive_failures") == 2
    assert sample(text, "kine_compaction_last_error_timestamp_seconds") > 0


def test_metrics_listener_follows_the_servers_tls(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki", "ca")
    server = issue(ca, tmp_path / "pki", "server", server=True)
    client = issue(ca, tmp_path / "pki", "client", server=False)
    port = free_port()
    flags = [
        "--server-cert-file",
        str(server.cert),
        "--server-key-file",
        str(server.key),
        "--trusted-ca-file",
        str(ca.cert),
        "--metrics-bind-address",
        f"127.0.0.1:{port}",
    ]
    with KineProcess(f"sqlite://{tmp_path}/s.db", tmp_path, *flags):
        context = ssl.create_default_context(cafile=str(ca.cert))
        context.load_cert_chain(str(client.cert), str(client.key))
        status, _ = asyncio.run(get(f"https://127.0.0.1:{port}/health", context))
        assert status == 200
        bare = ssl.create_default_context(cafile=str(ca.cert))  # no client certificate
        with pytest.raises(Exception):  # noqa: B017 - the handshake is refused, however reported
            asyncio.run(get(f"https://127.0.0.1:{port}/health", bare))
        with pytest.raises(Exception):  # noqa: B017
            asyncio.run(get(f"http://127.0.0.1:{port}/health"))


async def test_the_nospace_alarm_and_the_database_show_in_metrics(
    server: SingleProcess, kine: Client
) -> None:
    """What the alert rules in deploy/monitoring/ fire on."""
    assert server.http is not None
    url = f"http://127.0.0.1:{server.http.port}/metrics"
    _, text = await get(url)
    assert sample(text, "kine_alarm_nospace") == 0
    assert sample(text, "kine_database_up") == 1
    activate = pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE, memberID=0, alarm=pb.NOSPACE)
    await kine.maintenance.Alarm(activate)
    _, text = await get(url)
    assert sample(text, "kine_alarm_nospace") == 1
    deactivate = pb.AlarmRequest(action=pb.AlarmRequest.DEACTIVATE, memberID=0, alarm=pb.NOSPACE)
    await kine.maintenance.Alarm(deactivate)
    _, text = await get(url)
    assert sample(text, "kine_alarm_nospace") == 0
