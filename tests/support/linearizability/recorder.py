"""Records a history from a live server: concurrent clients and watchers, each on a TCP
connection of its own (grpcio shares one per target within a process unless told otherwise).

Clients run random single-key operations on a few keys: Get, Put (prev_kv), Delete (prev_kv), and
a Txn compare-and-set whose compare is what that client last saw of the key (its mod_revision,
0 for absent, or its value), putting a new value with prev_kv if it holds and reading the key if
not. So every operation shows what it found, and every written value is unique. An error or a
timeout makes the operation indeterminate, never "no effect".

Calls wait for the server to be reachable (wait_for_ready, a short reconnect backoff) within
their deadline, so a server being restarted delays calls rather than failing every one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from kine_server.pb import kv_pb2, rpc_pb2_grpc
from kine_server.pb import rpc_pb2 as pb
from tests.support.linearizability.history import (
    Compare,
    EventType,
    KeyValue,
    Kind,
    Operation,
    Outcome,
    WatchEvent,
    WatchLog,
)

CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


@dataclass
class Workload:
    keys: int = 4
    clients: int = 6
    prefix: bytes = b"/lin/"
    #: Per call: past it the operation is indeterminate.
    deadline: float = 5.0
    weights: dict[Kind, float] = field(
        default_factory=lambda: {Kind.GET: 3, Kind.PUT: 3, Kind.CAS: 3, Kind.DELETE: 1}
    )

    def key(self, n: int) -> bytes:
        return self.prefix + b"k%d" % n

    @property
    def range_end(self) -> bytes:
        return self.prefix[:-1] + bytes([self.prefix[-1] + 1])


def _after(op: Operation) -> KeyValue | None:
    """The key as an answered operation left it, as far as its client can tell."""
    assert op.outcome is not None
    prev, revision = op.outcome.kv, op.outcome.revision
    if op.kind is Kind.DELETE:
        return None
    if not op.writes:
        return prev
    if prev is None:
        return KeyValue(op.value, revision, revision, 1)
    return KeyValue(op.value, prev.create_revision, revision, prev.version + 1)


def _kv(item: Any) -> KeyValue:
    return KeyValue(item.value, item.create_revision, item.mod_revision, item.version)


class Clients:
    """The clients of one recording; `operations` grows as they run."""

    def __init__(self, addresses: Sequence[str], workload: Workload, seed: int) -> None:
        #: Client n connects to addresses[n % len(addresses)].
        self.addresses = addresses
        self.workload = workload
        self.seed = seed
        self.operations: list[Operation] = []
        #: Operations answered so far.
        self.answered = 0
        self._ids = itertools.count()

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._client(n, stop) for n in range(self.workload.clients)))

    def answered_write_after(self, moment: int) -> bool:
        """Whether a write called after `moment` (monotonic ns) was answered."""
        for op in reversed(self.operations):  # in completion order, roughly: newest first
            if op.writes and op.call > moment:
                return True
            if op.ret is not None and op.ret < moment:
                return False
        return False

    async def read_all(self, client: int) -> None:
        """One more client reads every key once (retrying until answered): the final state."""
        async with self._connection(client) as kv:
            for n in range(self.workload.keys):
                while not await self._one(kv, client, Kind.GET, self.workload.key(n), None):
                    await asyncio.sleep(0.1)

    @contextlib.asynccontextmanager
    async def _connection(self, client: int) -> AsyncIterator[rpc_pb2_grpc.KVStub]:
        conn = channel(self.addresses[client % len(self.addresses)])
        try:
            yield rpc_pb2_grpc.KVStub(conn)
        finally:
            await conn.close()

    async def _client(self, client: int, stop: asyncio.Event) -> None:
        rng = random.Random(self.seed * 1_000 + client)
        kinds = list(self.workload.weights)
        weights = list(self.workload.weights.values())
        #: What this client last saw of each key (a CAS compares against it).
        seen: dict[bytes, KeyValue | None] = {}
        async with self._connection(client) as kv:
            while not stop.is_set():
                key = self.workload.key(rng.randrange(self.workload.keys))
                kind = rng.choices(kinds, weights)[0]
                compare = None
                if kind is Kind.CAS:
                    last = seen.get(key)
                    if last is not None and rng.random() < 0.3:
                        compare = Compare(value=last.value)
                    else:
                        compare = Compare(0 if last is None else last.mod_revision)
                op = await self._one(kv, client, kind, key, compare)
                if op is None:
                    seen.pop(key, None)
                    await asyncio.sleep(0.02)
                else:
                    seen[key] = _after(op)

    async def _one(
        self,
        kv: rpc_pb2_grpc.KVStub,
        client: int,
        kind: Kind,
        key: bytes,
        compare: Compare | None,
    ) -> Operation | None:
        """Run and record one operation; None if it failed (it is recorded as indeterminate)."""
        op_id = next(self._ids)
        value = b"c%d-%d" % (client, op_id) if kind in (Kind.PUT, Kind.CAS) else b""
        call = time.monotonic_ns()
        try:
            outcome = await self._call(kv, kind, key, value, compare)
        except grpc.aio.AioRpcError as exc:
            self.operations.append(
                Operation(
                    op_id, client, kind, key, value, compare, call, None, None, exc.code().name
                )
            )
            return None
        op = Operation(op_id, client, kind, key, value, compare, call, time.monotonic_ns(), outcome)
        self.operations.append(op)
        self.answered += 1
        return op

    async def _call(
        self,
        kv: rpc_pb2_grpc.KVStub,
        kind: Kind,
        key: bytes,
        value: bytes,
        compare: Compare | None,
    ) -> Outcome:
        options: dict[str, Any] = {"timeout": self.workload.deadline, "wait_for_ready": True}
        if kind is Kind.GET:
            got = await kv.Range(pb.RangeRequest(key=key), **options)
            return Outcome(got.header.revision, _kv(got.kvs[0]) if got.kvs else None)
        if kind is Kind.PUT:
            put = await kv.Put(pb.PutRequest(key=key, value=value, prev_kv=True), **options)
            prev = _kv(put.prev_kv) if put.HasField("prev_kv") else None
            return Outcome(put.header.revision, prev)
        if kind is Kind.DELETE:
            request = pb.DeleteRangeRequest(key=key, prev_kv=True)
            deleted = await kv.DeleteRange(request, **options)
            prev = _kv(deleted.prev_kvs[0]) if deleted.prev_kvs else None
            return Outcome(deleted.header.revision, prev, deleted.deleted == 1)
        assert compare is not None
        if compare.value is not None:
            condition = pb.Compare(
                key=key, target=pb.Compare.VALUE, result=pb.Compare.EQUAL, value=compare.value
            )
        else:
            condition = pb.Compare(
                key=key,
                target=pb.Compare.MOD,
                result=pb.Compare.EQUAL,
                mod_revision=compare.mod_revision,
            )
        txn = await kv.Txn(
            pb.TxnRequest(
                compare=[condition],
                success=[
                    pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, prev_kv=True))
                ],
                failure=[pb.RequestOp(request_range=pb.RangeRequest(key=key))],
            ),
            **options,
        )
        if txn.succeeded:
            put = txn.responses[0].response_put
            prev = _kv(put.prev_kv) if put.HasField("prev_kv") else None
            return Outcome(txn.header.revision, prev, True)
        got = txn.responses[0].response_range
        return Outcome(txn.header.revision, _kv(got.kvs[0]) if got.kvs else None, False)


class Watcher:
    """One logical watch of the workload's keys that reconnects from the last revision it saw
    + 1 whenever its stream ends. `start_revision` 0: from the current revision, as a watch
    created without one (its first event is the created response's header revision + 1)."""

    def __init__(self, address: str, name: str, workload: Workload, start_revision: int) -> None:
        self.address = address
        self.workload = workload
        self.log = WatchLog(name, start_revision)
        #: The highest revision a progress response confirmed as fully delivered.
        self.progress = 0
        self._started = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._requests: asyncio.Queue[pb.WatchRequest] | None = None

    async def start(self, within: float = 30.0) -> None:
        """Start, and return once the first stream's watch is created."""
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._started.wait(), within)

    async def finish(self, final_revision: int, within: float = 20.0) -> bool:
        """Wait until a progress response says everything through `final_revision` was sent
        (etcd sends one only once each watch of the stream is that far), then stop. False: not
        within `within` seconds."""
        deadline = time.monotonic() + within
        while self.progress < final_revision and time.monotonic() < deadline:
            if self._requests is not None:
                self._requests.put_nowait(
                    pb.WatchRequest(progress_request=pb.WatchProgressRequest())
                )
            await asyncio.sleep(0.2)
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if not self._task.cancelled() and self._task.exception() is not None:
            raise AssertionError(f"watch {self.log.name} failed") from self._task.exception()
        return self.progress >= final_revision

    def _next_revision(self) -> int:
        if self.log.events:
            return self.log.events[-1].revision + 1
        return self.log.start_revision

    async def _run(self) -> None:
        first = True
        while True:
            start = self._next_revision()
            if not first:
                self.log.reconnects.append(start)
            first = False
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._stream(start)
            await asyncio.sleep(0.1)

    async def _stream(self, start: int) -> None:
        requests: asyncio.Queue[pb.WatchRequest] = asyncio.Queue()
        create = pb.WatchCreateRequest(
            key=self.workload.prefix, range_end=self.workload.range_end, start_revision=start
        )
        requests.put_nowait(pb.WatchRequest(create_request=create))

        async def feed() -> AsyncIterator[pb.WatchRequest]:
            while True:
                yield await requests.get()

        conn = channel(self.address)
        try:
            call = rpc_pb2_grpc.WatchStub(conn).Watch(feed(), wait_for_ready=True)
            async for response in call:
                if response.created:
                    if self.log.start_revision == 0:
                        self.log.start_revision = response.header.revision + 1
                    self._requests = requests
                    self._started.set()
                if response.canceled:
                    raise AssertionError(f"watch {self.log.name} canceled: {response}")
                self.log.events += [_event(e) for e in response.events]
                if response.watch_id == -1 and not response.events:
                    self.progress = max(self.progress, response.header.revision)
        finally:
            self._requests = None
            await conn.close()


def _event(event: Any) -> WatchEvent:
    kv = event.kv
    kind = EventType.DELETE if event.type == kv_pb2.Event.DELETE else EventType.PUT
    return WatchEvent(kv.mod_revision, kind, kv.key, kv.value, kv.create_revision, kv.version)
