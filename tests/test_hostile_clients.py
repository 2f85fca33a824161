"""Clients that misbehave: bursts, writers that never read, garbage, abrupt disconnects, floods.

Each test is a defect found in review, proven first against the code before its fix. None of them
judges by elapsed time: waits are for a condition, bounded only by a guard against hanging.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import grpc
import pytest

from kine_server.drivers.postgres import PostgresDriver
from kine_server.pb import rpc_pb2 as pb
from kine_server.pb import rpc_pb2_grpc
from kine_server.process.single import SingleProcess
from tests.conftest import fresh_dsn, test_config
from tests.support.client import Client, connect
from tests.support.etcd import RealEtcd, etcdctl_binary
from tests.support.ports import free_port
from tests.support.postgres import ThrowawayPostgres
from tests.support.process import KineProcess, ignoring, with_default_signals
from tests.test_metrics import get

#: A guard against hanging, never a measure of speed: every wait ends on a condition first.
HANG_GUARD = 15.0


async def until(condition: Any, what: str, guard: float = HANG_GUARD) -> None:
    deadline = time.monotonic() + guard
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what} after {guard:.0f}s"
        await asyncio.sleep(0.01)


# -- 1. a burst of unary calls -------------------------------------------------------------------


async def burst(client: Client, calls: int) -> collections.Counter[str]:
    """`calls` Range and Put requests at once on one channel: how each one ended."""

    async def one(i: int) -> str:
        try:
            if i % 5:
                await client.kv.Range(pb.RangeRequest(key=b"burst/%d" % i), timeout=60)
            else:
                await client.kv.Put(pb.PutRequest(key=b"burst/%d" % i, value=b"v"), timeout=60)
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return "OK"

    return collections.Counter(await asyncio.gather(*(one(i) for i in range(calls))))


async def test_a_burst_of_unary_calls_is_queued_not_cancelled(kine: Client, etcd: Client) -> None:
    """gRPC core sheds calls that wait for the aio server to ask for them past 1,000 pending
    (all past 3,000) by dropping them: the client saw CANCELLED for a third of 5,000 calls."""
    assert await burst(etcd, 5000) == {"OK": 5000}
    assert await burst(kine, 5000) == {"OK": 5000}


# -- 2. a watch client that writes without reading -----------------------------------------------

#: The watching client's receive window (no BDP growth): the server can have only this many bytes
#: of responses in flight to it before its writes wait.
CLIENT_WINDOW = 16 * 1024


async def test_a_watch_client_that_never_reads_stops_being_read(server: SingleProcess) -> None:
    """The server queued a created response, and kept a watcher, for every create request it
    was sent, however long the client read none: 200,000 creates cost 130-225 MB. As etcd's
    recvLoop, it must stop reading requests once its control responses back up."""
    creates = 10_000
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}",
        options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", CLIENT_WINDOW)],
    )
    assert server.watch is not None
    stats = server.watch.stats
    try:
        call: Any = rpc_pb2_grpc.WatchStub(channel).Watch()
        request = pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"w"))

        async def write() -> None:
            for _ in range(creates):
                await call.write(request)

        writer = asyncio.create_task(write())
        # Either the server read every request (the defect), or gRPC took all the client's
        # writes into its buffers while the server had stopped reading.
        await until(
            lambda: (
                stats.watchers >= creates
                or (writer.done() and getattr(stats, "receive_pauses", 0) > 0)
            ),
            "the server to read every request or to stop reading",
        )
        smallest = pb.WatchResponse(created=True)
        smallest.header.revision = 1
        # What can be in flight to a client that reads nothing, plus etcd's 16 queued control
        # responses, with a generous margin: far below the creates sent.
        bound = 2 * CLIENT_WINDOW // smallest.ByteSize() + 16
        assert stats.watchers <= bound, (
            f"the server created {stats.watchers} watchers for a client that read no response"
        )
        # Once the client reads, every create is answered, in order.
        ids = []
        for _ in range(creates):
            response = await asyncio.wait_for(call.read(), HANG_GUARD)
            assert response.created and not response.canceled
            ids.append(response.watch_id)
        assert ids == list(range(creates))
        await writer
        assert stats.watchers == creates
        call.cancel()
    finally:
        await channel.close()


# -- 3. garbage request bodies -------------------------------------------------------------------

GARBAGE = bytes([0xFF, 0xFF, 0xFF, 0xFF, 0x0F, 0x07, 0x01])
UNARY = ["/etcdserverpb.KV/Range", "/etcdserverpb.KV/Put", "/etcdserverpb.KV/Txn"]
STREAMS = ["/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive"]


def _raw(data: bytes) -> bytes:
    return data


async def garbage_outcomes(endpoint: str) -> list[tuple[str, str, str]]:
    """(method, code, details) for a garbage body sent to each method."""
    outcomes = []
    async with grpc.aio.insecure_channel(endpoint) as channel:
        for method in UNARY:
            call = channel.unary_unary(method, request_serializer=_raw, response_deserializer=_raw)
            try:
                await call(GARBAGE, timeout=10)
                outcomes.append((method, "OK", ""))
            except grpc.aio.AioRpcError as exc:
                outcomes.append((method, exc.code().name, exc.details() or ""))
        for method in STREAMS:
            stream: Any = channel.stream_stream(
                method, request_serializer=_raw, response_deserializer=_raw
            )(timeout=10)
            try:
                await stream.write(GARBAGE)
                async for _ in stream:
                    pass
                outcomes.append((method, "OK", ""))
            except grpc.aio.AioRpcError as exc:
                outcomes.append((method, exc.code().name, exc.details() or ""))
    return outcomes


async def test_garbage_requests_are_internal_errors_on_one_debug_line(
    server: SingleProcess, real_etcd: RealEtcd, caplog: pytest.LogCaptureFixture
) -> None:
    """grpcio logged every undecodable request at ERROR with a traceback, and answered UNKNOWN
    "Unexpected <class 'DecodeError'>". etcd answers INTERNAL "grpc: error unmarshalling
    request: ..." (streams: "grpc: failed to unmarshal the received message ...")."""
    expected = await garbage_outcomes(real_etcd.endpoint)
    caplog.set_level(logging.DEBUG)
    got = await garbage_outcomes(f"127.0.0.1:{server.port}")
    for (method, code, details), (_, etcd_code, etcd_details) in zip(got, expected, strict=True):
        prefix = etcd_details.split("proto:")[0]
        assert (method, code, details[: len(prefix)]) == (method, etcd_code, prefix)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]
    for method in UNARY + STREAMS:
        lines = [r for r in caplog.records if method in r.getMessage()]
        assert len(lines) == 1, (method, [r.getMessage() for r in lines])
        assert lines[0].levelno == logging.DEBUG


# -- 4. clients that go away ---------------------------------------------------------------------

needs_etcdctl = pytest.mark.skipif(etcdctl_binary() is None, reason="etcdctl not installed")


def _etcdctl(address: str, *args: str, **options: Any) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    ctl = etcdctl_binary()
    assert ctl is not None
    return subprocess.Popen(
        with_default_signals([ctl, "--endpoints", f"http://{address}", *args]),
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **options,
    )


def _until_line(proc: subprocess.Popen[str], text: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(f"etcdctl ended without printing {text!r} (exit {proc.wait()})")


async def _catch_up_and_go_away(address: str) -> None:
    client = connect(address)
    for i in range(0, 2000, 250):
        await asyncio.gather(
            *(
                client.kv.Put(pb.PutRequest(key=b"/h/%05d" % n, value=b"x" * 1000))
                for n in range(i, i + 250)
            )
        )
    create = pb.WatchRequest(
        create_request=pb.WatchCreateRequest(key=b"/h/", range_end=b"/h0", start_revision=1)
    )
    for reads in (1, 3):  # the client cancels the call in the middle of the catch-up
        call: Any = client.watch.Watch()
        await call.write(create)
        for _ in range(reads):
            await call.read()
        call.cancel()
    for reads in (1, 3):  # the client's connection goes away in the middle of the catch-up
        other = connect(address)
        call = other.watch.Watch()
        await call.write(create)
        for _ in range(reads):
            await call.read()
        await other.close()
    await client.close()


@needs_etcdctl
def test_clients_that_go_away_log_no_error(dsn: str, tmp_path: Path) -> None:
    """Every LeaseKeepAlive stream that ended by the client going away (`etcdctl lock`,
    `etcdctl lease keep-alive` stopped by SIGINT) logged "Task exception was never retrieved"
    at ERROR: the read pending when the call was cancelled ended later, unretrieved."""
    with KineProcess(dsn, tmp_path) as kine:
        asyncio.run(_catch_up_and_go_away(kine.address))
        watch = _etcdctl(kine.address, "watch", "--prefix", "/h/", "--rev", "1")
        _until_line(watch, "/h/00000")  # catching up from the first revision
        watch.kill()
        watch.wait()
        lock = _etcdctl(kine.address, "lock", "mylock", "--", "true")
        assert lock.wait(30) == 0
        grant = _etcdctl(kine.address, "lease", "grant", "60")
        assert grant.stdout is not None
        lease = grant.stdout.read().split()[1]
        assert grant.wait(30) == 0
        with ignoring(signal.SIGINT):  # as `make test &` starts everything: SIGINT ignored
            keep_alive = _etcdctl(kine.address, "lease", "keep-alive", lease)
        _until_line(keep_alive, "keepalived")
        keep_alive.send_signal(signal.SIGINT)
        assert keep_alive.wait(30) == -signal.SIGINT
        once = _etcdctl(kine.address, "lease", "keep-alive", "--once", lease)
        assert once.wait(30) == 0
        assert kine.stop() == 0
        log = kine.log()
    bad = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
    assert not bad, log


async def test_a_read_cancelled_while_postgres_connects_logs_no_error(
    postgres: ThrowawayPostgres,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that goes away cancels its read; when the reader pool was opening a connection
    for it (after idle connections expire, or to grow), asyncpg's TLS negotiation (sslmode=prefer,
    the default) left a future whose ConnectionError asyncio logged at ERROR: "Future exception
    was never retrieved ... unexpected connection_lost() call". Cancel at every step of it."""
    driver = PostgresDriver(fresh_dsn("postgres", tmp_path, request))
    await driver.open()
    caplog.set_level(logging.WARNING)
    try:

        async def read() -> int:
            async with driver.read() as tx:
                return (await tx.counters()).revision

        pool = driver._readers
        assert pool is not None
        for steps in range(0, 400, 2):
            await pool.expire_connections()  # the next read opens a new connection
            task = asyncio.create_task(read())
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert await read() == 1  # no connection was lost to the pool
        gc.collect()  # an unretrieved future is reported when it is collected
        await asyncio.sleep(0.1)
    finally:
        await driver.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


# -- 5. a connection flood on the metrics port ---------------------------------------------------


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_a_connection_flood_on_the_metrics_port_is_capped_and_logged_once(
    tmp_path: Path,
) -> None:
    """asyncio's accept loop logged "socket.accept() out of system resource" with a traceback
    up to 100 times a second once held connections used up the process's descriptors (which
    gRPC and the database need too): 1,772 tracebacks for 5,000 connections at `ulimit -n 1024`."""
    port = free_port()
    flags = ["--metrics-bind-address", f"127.0.0.1:{port}"]
    with KineProcess(f"sqlite://{tmp_path}/s.db", tmp_path, *flags) as kine:
        assert kine.proc is not None
        pid = kine.proc.pid
        limit = _descriptors(pid) + 100  # room for the server's own use, not for a flood
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
        held: list[socket.socket] = []
        try:
            for n in range(1500):
                sock = socket.socket()
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))
                if n % 3 == 0:  # reset at once
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                else:
                    held.append(sock)
            # The flood has reached the server: it ran out of descriptors, or refused some.
            await until(
                lambda: _descriptors(pid) >= limit - 2 or "metrics listener" in kine.log(),
                "the server to run out of descriptors or to refuse connections",
            )
        finally:
            for sock in held:
                sock.close()
        healthy: list[tuple[int, str]] = []

        async def health() -> None:
            try:
                healthy.append(await get(f"http://127.0.0.1:{port}/health"))
            except OSError:
                await asyncio.sleep(0.05)

        deadline = time.monotonic() + HANG_GUARD
        while not healthy or healthy[-1][0] != 200:
            assert time.monotonic() < deadline, f"/health never answered 200: {healthy[-3:]}"
            await health()
        client = connect(kine.address)
        await client.kv.Put(pb.PutRequest(key=b"after", value=b"flood"), timeout=10)
        await client.close()
        assert kine.stop() == 0
        log = kine.log()
    assert "Traceback" not in log and " ERROR " not in log, log[:3000]
    assert len([line for line in log.splitlines() if "metrics listener" in line]) == 1, log


# -- 6. /health while the database is down -------------------------------------------------------


class Proxy:
    """A TCP relay to the database that can be cut, as a network partition would."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()


async def test_health_says_database_unavailable_without_its_address(
    postgres: ThrowawayPostgres, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """/health embedded the driver's error text, e.g. "Connect call failed ('127.0.0.1', PORT)":
    the database's address, to anyone who can reach the metrics port."""
    parts = urllib.parse.urlsplit(fresh_dsn("postgres", tmp_path, request))
    proxy = Proxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    await proxy.start()
    credentials = parts.netloc.rpartition("@")[0]
    relayed = parts._replace(netloc=f"{credentials}@127.0.0.1:{proxy.port}")
    server = SingleProcess(test_config(urllib.parse.urlunsplit(relayed)))
    await server.start()
    try:
        assert server.http is not None
        url = f"http://127.0.0.1:{server.http.port}/health"
        assert await get(url) == (200, '{"health":"true","reason":""}')
        await proxy.cut()
        down = '{"health":"false","reason":"database unavailable"}'
        for _ in range(3):  # the broken connection, then reconnecting to a closed port
            status, body = await get(url)
            assert (status, body) == (503, down)
            assert str(proxy.port) not in body
    finally:
        await server.stop()
