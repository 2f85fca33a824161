"""`--workers 2`: a writer process and two front-ends sharing the port, as an operator runs it.

Real processes on both databases. Many TCP connections land on both front-ends (the kernel
spreads them; the metrics say how many requests each served), and etcd's guarantees hold across
them: revisions dense and unique, a read after an acknowledged write sees it whichever process
serves either, every watcher on every front-end gets every event once and in order. Then the
supervision: a killed front-end is started again, front-ends never outlive the writer, SIGTERM
stops them all.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from kine_server.pb import rpc_pb2 as pb
from kine_server.pb import rpc_pb2_grpc
from tests.support.ports import free_port
from tests.support.process import KineProcess
from tests.support.procs import children, state

#: P(every connection on the same one of two front-ends) = 2 * 2**-CONNECTIONS.
CONNECTIONS = 24


class Connection:
    """One TCP connection of its own (gRPC otherwise shares one per address in a process)."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.kv = rpc_pb2_grpc.KVStub(self.channel)
        self.watch = rpc_pb2_grpc.WatchStub(self.channel)


def metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def metric(text: str, name: str) -> float | None:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def frontends_serving(port: int) -> float:
    try:
        return metric(metrics(port), "kine_frontend_processes") or 0.0
    except OSError:
        return 0.0


def alive(pid: int) -> bool:
    return state(pid) not in (None, "Z")


def workers(dsn: str, tmp_path: Path) -> tuple[KineProcess, int]:
    """kine-server --workers 2 (not started: `with` starts it) and its metrics port."""
    port = free_port()
    kine = KineProcess(
        dsn, tmp_path, "--workers", "2", "--metrics-bind-address", f"127.0.0.1:{port}"
    )
    return kine, port


def wait_serving(port: int) -> None:
    wait_for(lambda: frontends_serving(port) == 2, 30, "both front-ends serve")


async def test_guarantees_hold_across_frontends(dsn: str, tmp_path: Path) -> None:
    kine, port = workers(dsn, tmp_path)
    with kine:
        wait_serving(port)
        connections = [Connection(kine.address) for _ in range(CONNECTIONS)]
        writes_each = 10
        total = CONNECTIONS * writes_each

        async def watch(conn: Connection) -> list[tuple[int, bytes]]:
            requests: asyncio.Queue[pb.WatchRequest | None] = asyncio.Queue()
            create = pb.WatchCreateRequest(key=b"/w/", range_end=b"/w0", start_revision=1)
            await requests.put(pb.WatchRequest(create_request=create))

            async def feed():  # type: ignore[no-untyped-def]
                while (request := await requests.get()) is not None:
                    yield request

            seen: list[tuple[int, bytes]] = []
            stream = conn.watch.Watch(feed())
            async for response in stream:
                seen += [(e.kv.mod_revision, e.kv.key) for e in response.events]
                if len(seen) >= total:
                    break
            stream.cancel()
            return seen

        watchers = [asyncio.create_task(watch(c)) for c in connections]

        async def write(index: int) -> list[int]:
            revisions = []
            neighbour = connections[(index + 1) % CONNECTIONS]
            for n in range(writes_each):
                key = b"/w/%02d/%02d" % (index, n)
                put = await connections[index].kv.Put(pb.PutRequest(key=key, value=b"v"))
                revisions.append(put.header.revision)
                # Linearizable: acknowledged on one connection, read on another.
                got = await neighbour.kv.Range(pb.RangeRequest(key=key))
                assert got.header.revision >= put.header.revision
                assert [kv.mod_revision for kv in got.kvs] == [put.header.revision]
            return revisions

        written = await asyncio.gather(*(write(i) for i in range(CONNECTIONS)))
        revisions = sorted(r for each in written for r in each)
        assert revisions == list(range(2, 2 + total)), "dense, unique revisions from revision 2"

        seen = await asyncio.wait_for(asyncio.gather(*watchers), 60)
        for events in seen:
            assert [r for r, _ in events] == revisions  # every event once, in order

        # An etcd error comes back from the writer process unchanged.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await connections[0].kv.Put(pb.PutRequest(key=b"/w/none", ignore_value=True))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refused.value.details() == "etcdserver: key not found"

        text = metrics(port)
        served = {
            worker: float(value)
            for worker, value in re.findall(
                r'^kine_frontend_requests_total\{worker="(\d)"\} (\S+)$', text, re.MULTILINE
            )
        }
        assert set(served) == {"1", "2"} and all(v > 0 for v in served.values()), served
        assert metric(text, "kine_revision") == 1 + total
        for conn in connections:
            await conn.channel.close()


async def test_a_killed_frontend_is_started_again(dsn: str, tmp_path: Path) -> None:
    kine, port = workers(dsn, tmp_path)
    with kine:
        wait_serving(port)
        assert kine.proc is not None
        writer = kine.proc.pid
        before = children(writer)
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: len(children(writer) - before) == 1 and frontends_serving(port) == 2,
            30,
            "a new front-end replaces the killed one",
        )
        assert "exited (killed by SIGKILL)" in kine.log()

        # Clients reconnect and are served, whichever front-end they reach.
        for n in range(CONNECTIONS):
            conn = Connection(kine.address)
            put = await conn.kv.Put(pb.PutRequest(key=b"/k/%d" % n, value=b"v"), timeout=10)
            assert put.header.revision == 2 + n
            await conn.channel.close()
        assert kine.stop() == 0


def test_frontends_never_outlive_the_writer(dsn: str, tmp_path: Path) -> None:
    kine, port = workers(dsn, tmp_path)
    with kine:
        wait_serving(port)
        assert kine.proc is not None
        frontends = children(kine.proc.pid)
        kine.kill()  # SIGKILL: no chance to stop them
        wait_for(
            lambda: not any(alive(pid) for pid in frontends), 20, "front-ends exit with the writer"
        )


def test_sigterm_stops_every_process_within_the_grace(dsn: str, tmp_path: Path) -> None:
    kine, port = workers(dsn, tmp_path)
    with kine:
        wait_serving(port)
        assert kine.proc is not None
        frontends = children(kine.proc.pid)
        began = time.monotonic()
        assert kine.stop() == 0
        assert time.monotonic() - began < 10  # --shutdown-grace's default
        assert not any(alive(pid) for pid in frontends)
        assert "Traceback" not in kine.log()


def test_the_default_is_one_worker_per_core_the_process_may_use(tmp_path: Path) -> None:
    from kine_server.config import Config, available_cores

    cores = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert available_cores(str(quota)) == cores
    quota.write_text("150000 100000\n")  # docker run --cpus 1.5
    assert available_cores(str(quota)) == min(cores, 2)
    quota.write_text("50000 100000\n")
    assert available_cores(str(quota)) == 1
    assert available_cores(str(tmp_path / "none")) == cores
    assert Config(workers=3).worker_count() == 3
    assert Config(workers=3, listen_address="unix:///run/kine.sock").worker_count() == 1


async def test_a_feed_that_arrives_with_the_hello_continues_from_it(tmp_path: Path) -> None:
    """The writer queues a front-end's hello and the next commit's feed in the same loop turn
    and sends them in one write: the front-end must take the hello's revision before it reads
    the feed (it used to take it only when start() resumed, and restarted itself on a "gap")."""
    from kine_server.auth.store import AuthStore
    from kine_server.drivers import DatabaseTLS, make_driver
    from kine_server.mvcc.hub import EventHub
    from kine_server.pb import kv_pb2, workers_pb2
    from kine_server.process.frames import ENVELOPE, FrameConnection
    from kine_server.process.link import WriterLink
    from kine_server.wire import length_delimited

    def opened(connection: FrameConnection) -> None:
        hello = workers_pb2.Hello(revision=7).SerializeToString()
        event = kv_pb2.Event(kv=kv_pb2.KeyValue(key=b"k", mod_revision=8, create_revision=8))
        feed = workers_pb2.Feed(events=[event]).SerializeToString()
        connection.send(length_delimited(ENVELOPE["hello"], hello))
        connection.send(length_delimited(ENVELOPE["feed"], feed))

    loop = asyncio.get_running_loop()
    path = str(tmp_path / "writer.sock")
    server = await loop.create_unix_server(
        lambda: FrameConnection(lambda _: None, lambda _: None, opened), path
    )
    driver = make_driver(f"sqlite://{tmp_path}/s.db", DatabaseTLS(), 5.0, False, None)
    lost: list[bool] = []
    hub = EventHub()
    link = WriterLink(path, hub, AuthStore(driver), lambda: lost.append(True))
    try:
        await link.start()
        await asyncio.sleep(0.1)
        assert not lost
        assert hub.revision == 8
    finally:
        await link.stop()
        server.close()
