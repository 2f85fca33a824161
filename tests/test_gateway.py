"""etcd's HTTP/JSON gateway (--listen-gateway-urls), compared with a real etcd's byte for byte
where the content is deterministic, on both databases, and used through a real client
(OpenStack's etcd3gw) as its users use it."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import etcd3gw
import pytest

from kine_server.gateway import jsonpb
from kine_server.gateway.routes import ROUTES
from tests.support.certs import Pair
from tests.support.etcd import RealEtcd
from tests.support.ports import free_port
from tests.support.process import KineProcess, failed_start
from tests.test_metrics import sample
from tests.test_tls import pki as pki  # a fixture, used by name
from tests.test_tls import tls_flags


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Gateway:
    """HTTP requests to one gateway, as curl makes them."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def request(
        self,
        path: str,
        body: str | None = "{}",
        method: str = "POST",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str, str]:
        """(status, content type, body) of one request."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.getheader("Content-Type", ""), response.read().decode()
        finally:
            connection.close()

    def post(self, path: str, body: dict[str, Any] | str) -> tuple[int, str]:
        text = body if isinstance(body, str) else json.dumps(body)
        status, _, answer = self.request("/v3/" + path, text)
        return status, answer

    def stream(self, path: str, body: str) -> http.client.HTTPResponse:
        """A streamed call: its response, to read a line at a time."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        connection.request("POST", "/v3/" + path, body=body)
        response = connection.getresponse()
        assert response.status == 200, response.read()
        return response


@pytest.fixture
def pair(dsn: str, tmp_path: Path) -> Iterator[tuple[Gateway, Gateway]]:
    """(etcd's gateway, kine-server's) on fresh stores; kine-server as operators run it by
    default here: a writer and two front-ends, which share the gateway's port too."""
    with RealEtcd() as etcd:
        kine = KineProcess(dsn, tmp_path, "--workers", "2")
        taken = {kine.port, etcd.client_port, etcd.peer_port}
        port = free_port()
        while port in taken:  # a port free a moment ago may be one of theirs by now
            port = free_port()
        kine.args += ["--listen-gateway-urls", f"http://127.0.0.1:{port}"]
        with kine:
            host, etcd_port = etcd.endpoint.rsplit(":", 1)
            yield Gateway(host, int(etcd_port)), Gateway("127.0.0.1", port)


#: Fields that name the member or count raft entries: each server has its own.
_MEMBER = re.compile(
    r'"(cluster_id|member_id|raft_term|leader|raftIndex|raftTerm|raftAppliedIndex)"'
    r':"\d+"'
)


def settle(text: str) -> str:
    return _MEMBER.sub(r'"\1":"N"', text)


SESSION: list[tuple[str, dict[str, Any] | str]] = [
    ("kv/put", {"key": b64("a"), "value": b64("1")}),
    ("kv/put", {"key": b64("a"), "value": b64("2"), "prev_kv": True}),
    ("kv/put", {"key": b64("b/1"), "value": b64("x")}),
    ("kv/put", {"key": b64("b/2"), "value": b64("<y&z>")}),
    ("kv/range", {"key": b64("a")}),
    (
        "kv/range",
        {
            "key": b64("b/"),
            "range_end": b64("b0"),
            "sort_order": "DESCEND",
            "sort_target": "KEY",
            "limit": 1,
        },
    ),
    ("kv/range", {"key": b64("b/"), "range_end": b64("b0"), "keys_only": True}),
    ("kv/range", {"key": b64("b/"), "range_end": b64("b0"), "count_only": True}),
    ("kv/range", {"key": b64("nothing")}),
    (
        "kv/txn",
        {
            "compare": [{"key": b64("a"), "result": "EQUAL", "target": "VALUE", "value": b64("2")}],
            "success": [{"request_put": {"key": b64("t"), "value": b64("yes")}}],
            "failure": [{"request_range": {"key": b64("a")}}],
        },
    ),
    (
        "kv/txn",
        {
            "compare": [{"key": b64("a"), "result": "GREATER", "target": "VERSION", "version": 9}],
            "success": [{"request_put": {"key": b64("t"), "value": b64("no")}}],
            "failure": [
                {"request_range": {"key": b64("a")}},
                {"request_delete_range": {"key": b64("t"), "prev_kv": True}},
            ],
        },
    ),
    ("kv/deleterange", {"key": b64("b/"), "range_end": b64("b0"), "prev_kv": True}),
    ("kv/deleterange", {"key": b64("b/")}),
    # etcd's errors, each with its HTTP status.
    ("kv/range", {"key": ""}),
    ("kv/put", {"key": b64("a"), "value": b64("v"), "lease": "99"}),
    ("kv/range", {"key": b64("a"), "revision": 1000}),
    (
        "kv/txn",
        {"success": [{"request_put": {"key": b64("d")}}, {"request_put": {"key": b64("d")}}]},
    ),
    ("kv/compaction", {"revision": 3}),
    ("kv/range", {"key": b64("a"), "revision": 2}),
    ("kv/compaction", {"revision": 2}),
    # Leases, under both of etcd's paths.
    ("lease/grant", {"TTL": 600, "ID": 1234}),
    ("lease/grant", {"TTL": 600, "ID": 1234}),
    ("kv/put", {"key": b64("leased"), "value": b64("v"), "lease": "1234"}),
    ("lease/leases", {}),
    ("kv/lease/leases", {}),
    ("lease/revoke", {"ID": 1234}),
    ("kv/lease/revoke", {"ID": 1234}),
    ("kv/range", {"key": b64("leased")}),
    ("lease/timetolive", {"ID": 1234}),
    # Unknown fields are ignored; an empty object and an empty body are an empty request.
    ("kv/range", {"key": b64("a"), "no_such_field": 1}),
    ("kv/range", ""),
]


def test_session_same_as_etcd(pair: tuple[Gateway, Gateway]) -> None:
    etcd, kine = pair
    for path, body in SESSION:
        expected = etcd.post(path, body)
        got = kine.post(path, body)
        assert (got[0], settle(got[1])) == (expected[0], settle(expected[1])), (path, body)
    # etcd 3.5 heads an AlarmResponse (v3rpc fills it); 3.4, the oracle here, sends none.
    for body in ({}, {"action": "GET"}):
        answers = [json.loads(gateway.post("maintenance/alarm", body)[1]) for gateway in pair]
        assert [a.get("alarms") for a in answers] == [None, None]


def test_time_to_live_and_keep_alive_same_as_etcd(pair: tuple[Gateway, Gateway]) -> None:
    """The remaining TTL counts down on each server's clock: it must be what the time since the
    grant allows; everything else is compared as it is."""
    answers = []
    for gateway in pair:
        granted = time.monotonic()
        gateway.post("lease/grant", {"TTL": 600, "ID": 77})
        gateway.post("kv/put", {"key": b64("k"), "value": b64("v"), "lease": "77"})
        status, text = gateway.post("kv/lease/timetolive", {"ID": 77, "keys": True})
        floor = 600 - int(time.monotonic() - granted) - 2
        answer = json.loads(text)
        assert status == 200 and floor <= int(answer.pop("TTL")) <= 600, text
        keep_alive = gateway.stream("lease/keepalive", '{"ID":77}\n{"ID":77}')
        lines = keep_alive.read().decode()  # the stream ends with the request body, as etcd's
        answers.append((settle(json.dumps(answer, separators=(",", ":"))), settle(lines)))
    assert answers[1] == answers[0]
    assert answers[0][1].count('"TTL":"600"') == 2


def test_watch_same_as_etcd(pair: tuple[Gateway, Gateway]) -> None:
    streams = []
    for gateway in pair:
        gateway.post("kv/put", {"key": b64("w/1"), "value": b64("one")})
        create = {
            "create_request": {
                "key": b64("w/"),
                "range_end": b64("w0"),
                "start_revision": 1,
                "prev_kv": True,
            }
        }
        watch = gateway.stream("watch", json.dumps(create))
        lines = [watch.readline(), watch.readline()]  # created, then the history from 1
        gateway.post("kv/put", {"key": b64("w/1"), "value": b64("two")})
        lines.append(watch.readline())
        gateway.post("kv/deleterange", {"key": b64("w/1")})
        lines.append(watch.readline())
        watch.close()
        streams.append([settle(line.decode()) for line in lines])
    assert streams[1] == streams[0]
    assert all(line.endswith("}}\n") and line.startswith('{"result":') for line in streams[0])


def test_member_list_names_the_gateway_as_the_client_url(pair: tuple[Gateway, Gateway]) -> None:
    """Clients that sync endpoints from the member list (Patroni's etcd3 DCS) must be sent to
    an address that speaks HTTP/JSON: for etcd its client port, for kine-server its gateway."""
    for gateway in pair:
        status, text = gateway.post("cluster/member/list", {})
        members = json.loads(text)["members"]
        assert status == 200 and len(members) == 1
        assert members[0]["clientURLs"] == [f"http://{gateway.host}:{gateway.port}"]


def test_http_errors_same_as_etcd(pair: tuple[Gateway, Gateway]) -> None:
    etcd, kine = pair
    cases: list[tuple[str, str, str | None]] = [
        ("POST", "/v3/kv/nothing", "{}"),
        ("GET", "/v3/kv/range", None),
        ("POST", "/v3beta/kv/range", json.dumps({"key": b64("a")})),
    ]
    for method, path, body in cases:
        expected = etcd.request(path, body, method)
        got = kine.request(path, body, method)
        assert (got[0], got[1].split(";")[0], settle(got[2])) == (
            expected[0],
            expected[1].split(";")[0],
            settle(expected[2]),
        ), (method, path)
    # A body that is not JSON: Go's parser words it differently; status and code are etcd's.
    for body in ("{bad", '{"key": "@@"}', "[1]"):
        answers = [gateway.post("kv/range", body) for gateway in pair]
        assert [(s, json.loads(text)["code"]) for s, text in answers] == [(400, 3), (400, 3)], body
    # The version etcd3gw reads to choose its API prefix.
    status, _, text = kine.request("/version", None, "GET")
    assert status == 200 and set(json.loads(text)) == {"etcdserver", "etcdcluster"}


def watch_streams(metrics: int) -> float:
    """The server's kine_watch_streams, from its metrics listener on port `metrics`."""
    connection = http.client.HTTPConnection("127.0.0.1", metrics, timeout=10)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    return sample(text, "kine_watch_streams")


def test_a_watch_ends_when_its_client_goes_away(dsn: str, tmp_path: Path) -> None:
    """An HTTP watch holds a gRPC watch stream; a client that closes its connection must not
    leave it behind."""
    port, metrics = free_port(), free_port()
    flags = [
        "--listen-gateway-urls",
        f"127.0.0.1:{port}",
        "--workers",
        "1",
        "--metrics-bind-address",
        f"127.0.0.1:{metrics}",
    ]
    with KineProcess(dsn, tmp_path, *flags):
        gateway = Gateway("127.0.0.1", port)

        watches = [
            gateway.stream("watch", json.dumps({"create_request": {"key": b64("k")}}))
            for _ in range(3)
        ]
        for watch in watches:
            assert b'"created":true' in watch.readline()
        assert watch_streams(metrics) == 3
        for watch in watches:
            watch.close()
        deadline = time.monotonic() + 10
        while watch_streams(metrics) != 0:
            assert time.monotonic() < deadline, "watch streams left behind by closed connections"
            time.sleep(0.05)
        # The gateway still serves.
        assert gateway.post("kv/put", {"key": b64("k"), "value": b64("v")})[0] == 200


def test_a_streamed_request_body_is_read_as_it_arrives(dsn: str, tmp_path: Path) -> None:
    """A chunked body, written over time: each WatchRequest takes effect when it arrives (a
    create, then later a cancel), and a malformed chunk ends only that request."""
    port = free_port()
    flags = ["--listen-gateway-urls", f"127.0.0.1:{port}", "--workers", "1"]
    with KineProcess(dsn, tmp_path, *flags):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v3/watch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            )

            def chunk(data: bytes) -> None:
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

            create = json.dumps({"create_request": {"key": b64("s"), "watch_id": 7}}).encode()
            chunk(create[:10])  # one request split over two chunks
            chunk(create[10:])
            reader = sock.makefile("rb")
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += reader.readline()
            assert head.startswith(b"HTTP/1.1 200")
            reader.readline()  # the first chunk's size
            assert b'"created":true' in reader.readline()
            Gateway("127.0.0.1", port).post("kv/put", {"key": b64("s"), "value": b64("1")})
            reader.readline(), reader.readline()  # the chunk's end, the next one's size
            assert b'"events"' in reader.readline()
            chunk(json.dumps({"cancel_request": {"watch_id": 7}}).encode())
            reader.readline(), reader.readline()
            assert b'"canceled":true' in reader.readline()
        assert Gateway("127.0.0.1", port).post("kv/range", {"key": b64("s")})[0] == 200


def test_limits_and_bad_requests(dsn: str, tmp_path: Path) -> None:
    port = free_port()
    flags = ["--listen-gateway-urls", f"127.0.0.1:{port}", "--workers", "1"]
    with KineProcess(dsn, tmp_path, *flags):
        gateway = Gateway("127.0.0.1", port)
        # Far over: refused before it is read.
        status, _, _ = gateway.request("/v3/kv/put", "x" * (8 * 1024 * 1024))
        assert status == 413
        # A request line that is not HTTP: 400, and the server goes on.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"NONSENSE\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
        assert gateway.post("kv/range", {"key": b64("big")})[0] == 200


def test_request_size_limits_same_as_etcd(pair: tuple[Gateway, Gateway]) -> None:
    """The gRPC server's own limits apply, as for a gRPC client: past --max-request-bytes
    etcd's "request is too large", past the gRPC message limit RESOURCE_EXHAUSTED (429)."""
    for size in (1_600_000, 2_500_000):
        body = {"key": b64("big"), "value": base64.b64encode(b"x" * size).decode()}
        answers = [gateway.post("kv/put", body) for gateway in pair]
        (status, text), (expected_status, expected) = answers[1], answers[0]
        assert (status, json.loads(text)["code"]) == (expected_status, json.loads(expected)["code"])
        if size < 2_000_000:
            assert text == expected


def test_snapshot_streams_the_store(dsn: str, tmp_path: Path) -> None:
    port = free_port()
    flags = ["--listen-gateway-urls", f"127.0.0.1:{port}", "--workers", "1"]
    with KineProcess(dsn, tmp_path, *flags):
        gateway = Gateway("127.0.0.1", port)
        gateway.post("kv/put", {"key": b64("snap"), "value": b64("shot")})
        lines = gateway.stream("maintenance/snapshot", "{}").read().decode().splitlines()
        results = [json.loads(line)["result"] for line in lines]
        blob = b"".join(base64.b64decode(r.get("blob", "")) for r in results)
        assert blob and "remaining_bytes" not in results[-1]


def test_go_json_escapes() -> None:
    """Go's encoding/json escapes HTML characters and the JS line separators, and writes other
    characters as UTF-8 (json.Marshal("<a&b>\u2028é") in Go 1.19)."""
    assert jsonpb.dumps({"m": "<a&b>\u2028é"}) == '{"m":"\\u003ca\\u0026b\\u003e\\u2028é"}'.encode()


def test_every_route_names_a_method_of_the_server() -> None:
    from kine_server.pb import rpc_pb2

    services = {s.full_name: s for s in rpc_pb2.DESCRIPTOR.services_by_name.values()}
    for path, route in ROUTES.items():
        service, method = route.method.strip("/").rsplit("/", 1)
        found = services[service].methods_by_name[method]
        assert found.input_type.full_name == route.request.DESCRIPTOR.full_name, path
        assert found.output_type.full_name == route.response.DESCRIPTOR.full_name, path


# -- etcd3gw, OpenStack's client of the gateway ------------------------------------------------


def etcd3gw_session(client: etcd3gw.Etcd3Client) -> list[Any]:
    """What tooz and other etcd3gw users do: keys, prefixes, transactions, leases, watches and
    locks. Returns what each call answered."""
    out: list[Any] = [client.status()["version"] != ""]
    out.append(client.put("k", "v"))
    out.append(client.get("k"))
    value, meta = client.get("k", metadata=True)[0]
    out.append((value, sorted(meta)))
    out.append(client.create("k", "again"))
    out.append(client.create("fresh", "1"))
    out.append(client.replace("k", "v", "w"))
    out.append(client.replace("k", "v", "x"))
    for i in range(3):
        client.put(f"p/{i}", str(i))
    out.append(sorted(client.get_prefix("p/")))
    out.append(client.delete("nothing"))
    out.append(client.delete("fresh"))
    out.append(client.delete_prefix("p/"))
    out.append(client.get_prefix("p/"))

    lease = client.lease(ttl=60)
    out.append(lease.refresh())
    client.put("leased", "v", lease=lease)
    out.append(lease.keys())
    out.append(60 - 3 <= lease.ttl() <= 60)
    out.append(lease.revoke())
    out.append(client.get("leased"))

    events, cancel = client.watch("w")
    client.put("w", "1")
    client.delete("w")
    out.append(
        [
            (e.get("type", "PUT"), e["kv"]["key"], e["kv"].get("value"))
            for e in (next(events), next(events))
        ]
    )
    cancel()

    prefix_events, cancel_prefix = client.watch_prefix("wp/")
    client.put("wp/a", "1")
    client.put("other", "1")
    client.put("wp/b", "2")
    out.append([next(prefix_events)["kv"]["key"], next(prefix_events)["kv"]["key"]])
    cancel_prefix()

    timer = threading.Timer(0.5, client.put, ("once", "here"))
    timer.start()
    try:
        event = client.watch_once("once", timeout=10)
    finally:
        timer.join()
    out.append((event["kv"]["key"], event["kv"]["value"]))

    lock = client.lock("resource", ttl=60)
    out.append(lock.acquire())
    out.append(lock.is_acquired())
    rival = client.lock("resource", ttl=60)
    out.append(rival.acquire())
    out.append(lock.refresh())
    out.append(lock.release())
    out.append(rival.acquire())
    out.append(rival.release())
    return out


def test_etcd3gw_same_as_etcd(pair: tuple[Gateway, Gateway]) -> None:
    results = []
    for gateway in pair:
        client = etcd3gw.client(host=gateway.host, port=gateway.port, timeout=10)
        try:
            results.append(etcd3gw_session(client))
        finally:
            client.session.close()
    assert results[1] == results[0]
    assert results[0][1:4] == [
        True,
        [b"v"],
        (b"v", ["create_revision", "key", "mod_revision", "version"]),
    ]


# -- TLS and start-up ----------------------------------------------------------------------------


def test_https_gateway_with_the_grpc_listeners_client_certificates(
    tmp_path: Path, pki: dict[str, Pair], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--listen-gateway-urls https://… serves the gRPC listener's certificate and, with
    --trusted-ca-file, admits only clients with a certificate from that CA; on every front-end."""
    # requests lets these override the CA a session is given (etcd3gw's ca_cert).
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    port = free_port()
    flags = [*tls_flags(pki, mutual=True), "--listen-gateway-urls", f"https://127.0.0.1:{port}"]
    with KineProcess(f"sqlite://{tmp_path}/s.db", tmp_path, *flags, "--workers", "2"):
        ca, client = pki["ca"], pki["client"]
        good = etcd3gw.client(
            host="127.0.0.1",
            port=port,
            protocol="https",
            ca_cert=str(ca.cert),
            cert_cert=str(client.cert),
            cert_key=str(client.key),
            timeout=10,
        )
        assert good.put("secure", "yes")
        assert good.get("secure") == [b"yes"]
        stranger = pki["stranger"]
        for cert in (None, (str(stranger.cert), str(stranger.key))):
            context = ssl.create_default_context(cafile=str(ca.cert))
            if cert is not None:
                context.load_cert_chain(*cert)
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
            with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
                connection.request("POST", "/v3/kv/range", body=json.dumps({"key": b64("secure")}))
                connection.getresponse().read()
            connection.close()


@pytest.mark.parametrize(
    ("url", "tls", "says"),
    [
        ("https://127.0.0.1:1", False, "https needs --server-cert-file"),
        ("http://127.0.0.1:1", True, "use https"),
        ("ftp://127.0.0.1:1", False, "must be http://HOST:PORT or https://HOST:PORT"),
        ("http://127.0.0.1:99999", False, "a port from 0 to 65535"),
        ("http://127.0.0.1", False, "needs HOST:PORT"),
        ("http://127.0.0.1:GRPC", False, "the port is the gRPC listener's"),
    ],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_bad_gateway_url_fails_the_start_in_one_line(
    tmp_path: Path, pki: dict[str, Pair], url: str, tls: bool, says: str, workers: str
) -> None:
    grpc_port = str(free_port())
    url = url.replace("GRPC", grpc_port)
    line = failed_start(
        f"sqlite://{tmp_path}/db/state.db",
        "--listen-address",
        f"127.0.0.1:{grpc_port}",
        "--metrics-bind-address",
        "0",
        "--workers",
        workers,
        "--listen-gateway-urls",
        url,
        *(tls_flags(pki, mutual=False) if tls else []),
    )
    assert f"--listen-gateway-urls {url}: " in line and says in line, line


async def test_a_handler_that_fails_answers_500_and_the_listener_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from kine_server.addresses import parse
    from kine_server.httpd import HttpListener, Request, Response

    async def handler(request: Request, response: Response) -> None:
        if request.path == "/bug":
            raise RuntimeError("a bug")
        await response.send(200, "text/plain", b"fine\n")

    listener = HttpListener("test", parse("127.0.0.1:0"), handler, max_connections=4, max_body=1024)
    await listener.start()
    try:
        plain = Gateway("127.0.0.1", listener.port)
        bug = await asyncio.to_thread(plain.request, "/bug", None, "GET")
        assert bug[0] == 500, bug
        fine = await asyncio.to_thread(plain.request, "/ok", None, "GET")
        assert fine == (200, "text/plain", "fine\n")
    finally:
        await listener.stop()
    assert "test listener: request failed" in caplog.text


def test_a_chunked_watch_whose_connection_breaks_ends_its_watch(dsn: str, tmp_path: Path) -> None:
    """The body of a streamed watch never ended (no last chunk) when the client vanished: the
    gRPC watch must still end, or each such client holds a stream and a connection forever."""
    port, metrics = free_port(), free_port()
    flags = ["--listen-gateway-urls", f"127.0.0.1:{port}", "--workers", "1"]
    flags += ["--metrics-bind-address", f"127.0.0.1:{metrics}"]
    with KineProcess(dsn, tmp_path, *flags):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /v3/watch HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        create = json.dumps({"create_request": {"key": b64("k")}}).encode()
        sock.sendall(b"%x\r\n%s\r\n" % (len(create), create))
        assert b'"created":true' in sock.recv(4096) or b'"created":true' in sock.recv(4096)
        assert watch_streams(metrics) == 1
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # a reset, in the middle of the body
        deadline = time.monotonic() + 10
        while watch_streams(metrics) != 0:
            assert time.monotonic() < deadline, "the watch of a broken connection was left behind"
            time.sleep(0.05)


async def test_a_streamed_body_limits_each_request_not_the_total() -> None:
    """A keep-alive stream over the gateway lasts as long as its leases: its body has no end,
    so only one request's size is limited (the whole body's size limits a unary call)."""
    from kine_server.httpd import BadRequest, Request

    def request(chunks: int) -> Request:
        reader = asyncio.StreamReader()
        body = b"".join(b"%x\r\n%s\r\n" % (10, b"{" + b'"ID":1' + b"}  ") for _ in range(chunks))
        reader.feed_data(body + b"0\r\n\r\n")
        reader.feed_eof()
        return Request(
            "POST", "/v3/lease/keepalive", "HTTP/1.1", {"transfer-encoding": "chunked"}, reader, 100
        )

    total = 0
    async for part in request(50).chunks(total_limit=False):  # 500 bytes, over the 100 limit
        total += len(part)
    assert total == 500
    with pytest.raises(BadRequest):
        async for _ in request(50).chunks():
            pass
    objects = jsonpb.ObjectStream(max_pending=8)
    assert objects.feed(b'{"ID":1}') == ['{"ID":1}']
    with pytest.raises(jsonpb.DecodeError, match="larger than 8 bytes"):
        objects.feed(b'{"ID": 12345')


def test_a_content_length_that_is_not_ascii_digits_is_a_bad_request() -> None:
    from kine_server.httpd import BadRequest, _content_length

    with pytest.raises(BadRequest) as refused:
        _content_length({"content-length": "\u00b2"})  # "²".isdigit() is True
    assert refused.value.status == 400


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]], ids=["one-process", "workers"])
def test_the_gateway_accepts_as_soon_as_the_grpc_port_does(
    workers: list[str], tmp_path: Path
) -> None:
    """A TCP probe of the gRPC port means ready (operators' and our own start-up checks rely on
    it), so the gateway must accept by then: probed without a pause, a few starts in a row."""
    for attempt in range(5):
        port = free_port()
        kine = KineProcess(
            f"sqlite://{tmp_path}/{attempt}.db",
            tmp_path,
            "--listen-gateway-urls",
            f"http://127.0.0.1:{port}",
            *workers,
        )
        kine.start(probe_interval=0.0)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                pass
        finally:
            kine.stop()


def test_auth_through_the_gateway_same_as_etcd(pair: tuple[Gateway, Gateway]) -> None:
    """etcd's gateway documentation's auth session: users and roles over /v3/auth/*, a token
    from /v3/auth/authenticate, then the token in the Authorization header."""
    steps: list[tuple[str, dict[str, Any], str | None]] = [
        ("auth/user/add", {"name": "root", "password": "pw"}, None),
        ("auth/user/grant", {"user": "root", "role": "root"}, None),
        ("auth/user/add", {"name": "u1", "password": "pw1"}, None),
        ("auth/role/add", {"name": "r1"}, None),
        (
            "auth/role/grant",
            {
                "name": "r1",
                "perm": {"key": b64("a"), "range_end": b64("b"), "permType": "READWRITE"},
            },
            None,
        ),
        ("auth/user/grant", {"user": "u1", "role": "r1"}, None),
        ("auth/enable", {}, None),
        ("kv/put", {"key": b64("a"), "value": b64("1")}, None),
        ("kv/put", {"key": b64("a"), "value": b64("1")}, "made-up"),
        ("kv/put", {"key": b64("a"), "value": b64("1")}, "u1"),
        ("kv/range", {"key": b64("a")}, "u1"),
        ("kv/put", {"key": b64("c"), "value": b64("1")}, "u1"),
        ("auth/user/list", {}, "u1"),
        ("auth/user/list", {}, "root"),
        ("auth/role/get", {"role": "r1"}, "root"),
        ("auth/disable", {}, "root"),
    ]
    transcripts = []
    for gateway in pair:
        tokens: dict[str, str] = {}
        lines = []
        for path, body, user in steps:
            if user is not None and user != "made-up" and user not in tokens:
                password = {"root": "pw", "u1": "pw1"}[user]
                _, answer = gateway.post("auth/authenticate", {"name": user, "password": password})
                tokens[user] = json.loads(answer)["token"]
            headers = {"Authorization": tokens.get(user, user)} if user else None
            status, _, answer = gateway.request("/v3/" + path, json.dumps(body), headers=headers)
            lines.append(f"{user} {path} -> {status} {settle(answer)}")
        transcripts.append(lines)
    theirs, ours = transcripts
    for mine, expected in zip(ours, theirs, strict=True):
        assert mine == expected
    text = "\n".join(ours)
    for refusal in ["user name is empty", "invalid auth token", "permission denied"]:
        assert refusal in text
    assert '"kvs":[{"key":"YQ==","create_revision":"2"' in text
