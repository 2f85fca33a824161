"""The client side of the benchmark: jobs that run inside worker processes.

Every worker process keeps one asyncio event loop and serves jobs sent by `run.py` over a pipe.
A job opens its own gRPC channels (each with its own TCP connection), does its work and closes
them. Jobs that are measured wait until a `start_at` instant on CLOCK_MONOTONIC (shared by every
process on the machine, so several workers start together) and stop at a count limit or a time
cap, whichever comes first. Each measured job reports the CPU its own process used during the
measured window (`time.process_time`, all threads, gRPC's included), so the orchestrator can say
how busy the client was.

Messages a worker sends back: ("ready", info) once a measured job is ready (the orchestrator then
sends the start instant), then ("ok", result) or ("error", traceback text).
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from kine_server.pb import rpc_pb2, rpc_pb2_grpc

CHANNEL_OPTIONS = [
    # Without a local pool every channel to one target shares one TCP connection.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

RPC_TIMEOUT = 30.0

#: A measured job calls `await sync(info)` once it is ready to start; the orchestrator answers
#: with the CLOCK_MONOTONIC instant at which all jobs of the step start.
Sync = Callable[[Any], Awaitable[float]]

Compare = rpc_pb2.Compare


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key starting with prefix" (clientv3.GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\x00"


class Channels:
    """`n` channels to one endpoint, each its own connection, with the stubs the jobs use.

    An endpoint `user:password@host:port` (the bench's --auth) signs in once all are connected,
    and every call then carries the token, as an etcd client's do."""

    def __init__(self, endpoint: str, n: int) -> None:
        self._credentials, _, address = endpoint.rpartition("@")
        self.channels = [
            grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(max(1, n))
        ]
        self.kv: list[Any] = [rpc_pb2_grpc.KVStub(c) for c in self.channels]
        self.watch: list[Any] = [rpc_pb2_grpc.WatchStub(c) for c in self.channels]

    async def ready(self, timeout: float = 15.0) -> None:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in self.channels)), timeout)
        if self._credentials:
            name, _, password = self._credentials.partition(":")
            request = rpc_pb2.AuthenticateRequest(name=name, password=password)
            auth = rpc_pb2_grpc.AuthStub(self.channels[0])
            metadata = (("token", (await auth.Authenticate(request, timeout=RPC_TIMEOUT)).token),)
            self.kv = [Signed(stub, metadata) for stub in self.kv]
            self.watch = [Signed(stub, metadata) for stub in self.watch]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.channels), return_exceptions=True)


class Signed:
    """A stub whose calls all carry `metadata` (the token), for the cost of one partial."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        for name in ("Range", "Put", "DeleteRange", "Txn", "Compact", "Watch"):
            if hasattr(stub, name):
                setattr(self, name, functools.partial(getattr(stub, name), metadata=metadata))


class Errors:
    """gRPC errors and semantic problems seen by a job: counts by kind, first few messages."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.samples: list[str] = []

    def add(self, what: str, exc: BaseException | None = None, detail: str = "") -> None:
        if isinstance(exc, grpc.aio.AioRpcError):
            kind = f"{what}: {exc.code().name}"
            detail = detail or str(exc.details())
        elif exc is not None:
            kind = f"{what}: {type(exc).__name__}"
            detail = detail or str(exc)
        else:
            kind = what
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.samples) < 8:
            self.samples.append(f"{kind}: {detail}"[:500])

    def report(self) -> dict[str, Any]:
        return {"counts": self.counts, "samples": self.samples}


class Window:
    """The measured window of one job in this process: wall time and this process's CPU."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.cpu0 = 0.0
        self.wall = 0.0
        self.cpu = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.cpu0 = time.process_time()

    def stop(self) -> None:
        self.wall = time.monotonic() - self.t0
        self.cpu = time.process_time() - self.cpu0

    def report(self) -> dict[str, float]:
        return {"wall": self.wall, "client_cpu": self.cpu, "t_start": self.t0}


async def sleep_until(instant: float) -> None:
    delay = instant - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def value_of(size: int) -> bytes:
    return os.urandom(size)


def create_txn(key: bytes, value: bytes) -> rpc_pb2.TxnRequest:
    """kube-apiserver's create: If mod_revision(key)==0 Then Put Else Get."""
    return rpc_pb2.TxnRequest(
        compare=[Compare(key=key, target=Compare.MOD, result=Compare.EQUAL, mod_revision=0)],
        success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value))],
        failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))],
    )


def update_txn(key: bytes, value: bytes, mod_revision: int) -> rpc_pb2.TxnRequest:
    """kube-apiserver's GuaranteedUpdate: If mod_revision(key)==X Then Put Else Get."""
    return rpc_pb2.TxnRequest(
        compare=[
            Compare(key=key, target=Compare.MOD, result=Compare.EQUAL, mod_revision=mod_revision)
        ],
        success=[rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value))],
        failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=key))],
    )


# -- utility jobs ------------------------------------------------------------------------------


async def current_revision(endpoint: str) -> int:
    chans = Channels(endpoint, 1)
    try:
        await chans.ready()
        response = await chans.kv[0].Range(
            rpc_pb2.RangeRequest(key=b"/", count_only=True), timeout=RPC_TIMEOUT
        )
        return int(response.header.revision)
    finally:
        await chans.close()


async def load_keys(
    endpoint: str,
    keys: list[bytes],
    value_size: int,
    per_txn: int = 100,
    clients: int = 4,
) -> dict[str, Any]:
    """Unmeasured set-up: write `keys` with Txns of `per_txn` plain puts, `clients` at a time."""
    value = value_of(value_size)
    chans = Channels(endpoint, clients)
    errors = Errors()
    batches = [keys[i : i + per_txn] for i in range(0, len(keys), per_txn)]
    revisions: dict[bytes, int] = {}
    try:
        await chans.ready()

        async def client(index: int) -> None:
            stub = chans.kv[index % len(chans.kv)]
            for b in range(index, len(batches), clients):
                batch = batches[b]
                request = rpc_pb2.TxnRequest(
                    success=[
                        rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=k, value=value))
                        for k in batch
                    ]
                )
                try:
                    response = await stub.Txn(request, timeout=RPC_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    errors.add("load Txn", exc)
                    continue
                for k in batch:
                    revisions[k] = response.header.revision

        await asyncio.gather(*(client(i) for i in range(clients)))
    finally:
        await chans.close()
    return {"revisions": revisions, "errors": errors.report()}


# -- workload 1: sequential Put ---------------------------------------------------------------


async def put_sequential(
    endpoint: str,
    prefix: bytes,
    count: int,
    warmup: int,
    value_size: int,
    time_cap: float,
    sync: Sync,
) -> dict[str, Any]:
    value = value_of(value_size)
    chans = Channels(endpoint, 1)
    errors = Errors()
    latencies: list[float] = []
    window = Window()
    try:
        await chans.ready()
        stub = chans.kv[0]
        for i in range(warmup):
            await stub.Put(
                rpc_pb2.PutRequest(key=prefix + b"warmup/%06d" % i, value=value),
                timeout=RPC_TIMEOUT,
            )
        await sleep_until(await sync(None))
        window.start()
        deadline = window.t0 + time_cap
        perf = time.perf_counter
        for i in range(count):
            request = rpc_pb2.PutRequest(key=prefix + b"%06d" % i, value=value)
            t = perf()
            try:
                await stub.Put(request, timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                errors.add("Put", exc)
                continue
            latencies.append(perf() - t)
            if time.monotonic() >= deadline:
                break
        window.stop()
    finally:
        await chans.close()
    return {"latencies": latencies, "errors": errors.report(), **window.report()}


# -- workload 2: kube-apiserver create Txn -----------------------------------------------------


async def create_txns(
    endpoint: str,
    tag: str,
    clients: int,
    channels: int,
    quota: int,
    value_size: int,
    time_cap: float,
    sync: Sync,
    namespaces: int = 20,
) -> dict[str, Any]:
    """`clients` concurrent creators; this process stops after `quota` ops or at the time cap."""
    value = value_of(value_size)
    chans = Channels(endpoint, channels)
    errors = Errors()
    latencies: list[float] = []
    window = Window()
    remaining = quota
    writes = 0
    not_created = 0
    try:
        await chans.ready()
        # One unmeasured create per channel: connections warm, the server's code paths too.
        for i, stub in enumerate(chans.kv):
            await stub.Txn(
                create_txn(b"/registry/pods/warmup/%s-%d" % (tag.encode(), i), value),
                timeout=RPC_TIMEOUT,
            )
        await sleep_until(await sync(None))
        window.start()
        deadline = window.t0 + time_cap

        async def client(index: int) -> None:
            nonlocal remaining, writes, not_created
            stub = chans.kv[index % len(chans.kv)]
            perf = time.perf_counter
            n = 0
            while remaining > 0 and time.monotonic() < deadline:
                remaining -= 1
                key = b"/registry/pods/ns-%d/pod-%s-%d-%d" % (
                    (index + n) % namespaces,
                    tag.encode(),
                    index,
                    n,
                )
                n += 1
                request = create_txn(key, value)
                t = perf()
                try:
                    response = await stub.Txn(request, timeout=RPC_TIMEOUT)
                except grpc.aio.AioRpcError as exc:
                    errors.add("create Txn", exc)
                    continue
                latencies.append(perf() - t)
                if response.succeeded:
                    writes += 1
                else:
                    not_created += 1
                    errors.add("create Txn took the Else branch for a new key", detail=repr(key))

        await asyncio.gather(*(client(i) for i in range(clients)))
        window.stop()
    finally:
        await chans.close()
    return {
        "latencies": latencies,
        "writes": writes,
        "not_created": not_created,
        "errors": errors.report(),
        **window.report(),
    }


# -- workload 3: update churn ------------------------------------------------------------------


async def churn(
    endpoint: str,
    revisions: dict[bytes, int],
    versions: int,
    clients: int,
    channels: int,
    value_size: int,
    time_cap: float,
    sync: Sync,
) -> dict[str, Any]:
    """Each key gets `versions` updates, each conditional on the mod_revision the previous
    response reported. Keys are split between `clients`; one key's updates are sequential."""
    value = value_of(value_size)
    chans = Channels(endpoint, channels)
    errors = Errors()
    latencies: list[float] = []
    window = Window()
    keys = sorted(revisions)
    current = dict(revisions)
    updated = dict.fromkeys(keys, 0)
    conflicts = 0
    ops = 0
    try:
        await chans.ready()
        await sleep_until(await sync(None))
        window.start()
        deadline = window.t0 + time_cap

        async def client(index: int) -> None:
            nonlocal conflicts, ops
            stub = chans.kv[index % len(chans.kv)]
            mine = keys[index::clients]
            perf = time.perf_counter
            for _ in range(versions):
                for key in mine:
                    if time.monotonic() >= deadline:
                        return
                    request = update_txn(key, value, current[key])
                    t = perf()
                    try:
                        response = await stub.Txn(request, timeout=RPC_TIMEOUT)
                    except grpc.aio.AioRpcError as exc:
                        errors.add("update Txn", exc)
                        continue
                    latencies.append(perf() - t)
                    ops += 1
                    if response.succeeded:
                        current[key] = response.header.revision
                        updated[key] += 1
                    else:
                        # Nobody else writes these keys: the Else branch means a wrong mod_revision.
                        conflicts += 1
                        kvs = response.responses[0].response_range.kvs
                        got = kvs[0].mod_revision if kvs else 0
                        errors.add(
                            "update Txn compare failed",
                            detail=f"{key!r}: expected mod {current[key]}, server has {got}",
                        )
                        current[key] = got

        await asyncio.gather(*(client(i) for i in range(clients)))
        window.stop()
        # Check: every key's version is 1 + the updates that succeeded, mod_revision the last one.
        wrong = 0
        for key in keys:
            response = await chans.kv[0].Range(rpc_pb2.RangeRequest(key=key), timeout=RPC_TIMEOUT)
            kv = response.kvs[0] if response.kvs else None
            if kv is None or kv.version != 1 + updated[key] or kv.mod_revision != current[key]:
                wrong += 1
                errors.add(
                    "churn final state wrong",
                    detail=f"{key!r}: got version={kv.version if kv else None} "
                    f"mod={kv.mod_revision if kv else None}, expected version={1 + updated[key]} "
                    f"mod={current[key]}",
                )
    finally:
        await chans.close()
    return {
        "latencies": latencies,
        "ops": ops,
        "updates": sum(updated.values()),
        "conflicts": conflicts,
        "wrong_final": wrong,
        "errors": errors.report(),
        **window.report(),
    }


# -- workload 4: paginated LIST at a pinned revision --------------------------------------------


async def _list_once(
    stub: rpc_pb2_grpc.KVStub, prefix: bytes, page: int
) -> tuple[list[Any], int, list[float]]:
    """The apiserver's paginated LIST: the first page reads the newest revision, the following
    pages read at that revision, each starting just after the previous page's last key."""
    end = prefix_end(prefix)
    perf = time.perf_counter
    kvs: list[Any] = []
    t = perf()
    response = await stub.Range(
        rpc_pb2.RangeRequest(key=prefix, range_end=end, limit=page), timeout=RPC_TIMEOUT
    )
    pages = [perf() - t]
    revision = response.header.revision
    kvs.extend(response.kvs)
    while response.more:
        start = response.kvs[-1].key + b"\x00"
        t = perf()
        response = await stub.Range(
            rpc_pb2.RangeRequest(key=start, range_end=end, limit=page, revision=revision),
            timeout=RPC_TIMEOUT,
        )
        pages.append(perf() - t)
        kvs.extend(response.kvs)
    return kvs, revision, pages


async def list_runs(
    endpoint: str,
    prefix: bytes,
    page: int,
    runs: int,
    expected: int,
    time_cap: float,
    sync: Sync,
) -> dict[str, Any]:
    chans = Channels(endpoint, 1)
    errors = Errors()
    totals: list[float] = []
    page_latencies: list[float] = []
    window = Window()
    try:
        await chans.ready()
        stub = chans.kv[0]
        await _list_once(stub, prefix, page)  # unmeasured: warms the server's caches
        await sleep_until(await sync(None))
        window.start()
        deadline = window.t0 + time_cap
        for _ in range(runs):
            t = time.perf_counter()
            try:
                kvs, _, pages = await _list_once(stub, prefix, page)
            except grpc.aio.AioRpcError as exc:
                errors.add("LIST Range", exc)
                continue
            totals.append(time.perf_counter() - t)
            page_latencies.extend(pages)
            keys = [kv.key for kv in kvs]
            if len(keys) != expected or len(set(keys)) != expected or keys != sorted(keys):
                errors.add(
                    "LIST result wrong",
                    detail=f"{len(keys)} keys ({len(set(keys))} distinct), expected {expected}",
                )
            if time.monotonic() >= deadline:
                break
        window.stop()
        pinned = await _pinned_check(chans.kv[0], prefix, page, expected, errors)
    finally:
        await chans.close()
    return {
        "totals": totals,
        "pages": page_latencies,
        "pinned_check": pinned,
        "errors": errors.report(),
        **window.report(),
    }


async def _pinned_check(
    stub: rpc_pb2_grpc.KVStub, prefix: bytes, page: int, expected: int, errors: Errors
) -> str:
    """Unmeasured: after the first page, change a key of the last page and delete one of the second;
    the remaining pages must still show the state at the pinned revision."""
    end = prefix_end(prefix)
    first = await stub.Range(
        rpc_pb2.RangeRequest(key=prefix, range_end=end, limit=page), timeout=RPC_TIMEOUT
    )
    revision = first.header.revision
    everything = await stub.Range(
        rpc_pb2.RangeRequest(key=prefix, range_end=end, keys_only=True), timeout=RPC_TIMEOUT
    )
    all_keys = [kv.key for kv in everything.kvs]
    if len(all_keys) < 3 * page:
        return "skipped (too few keys)"
    changed, deleted = all_keys[-1], all_keys[page + 1]
    old = {}
    for key in (changed, deleted):
        r = await stub.Range(rpc_pb2.RangeRequest(key=key), timeout=RPC_TIMEOUT)
        old[key] = (r.kvs[0].mod_revision, r.kvs[0].value)
    await stub.Put(rpc_pb2.PutRequest(key=changed, value=b"changed"), timeout=RPC_TIMEOUT)
    await stub.DeleteRange(rpc_pb2.DeleteRangeRequest(key=deleted), timeout=RPC_TIMEOUT)
    kvs = list(first.kvs)
    response = first
    while response.more:
        response = await stub.Range(
            rpc_pb2.RangeRequest(
                key=response.kvs[-1].key + b"\x00", range_end=end, limit=page, revision=revision
            ),
            timeout=RPC_TIMEOUT,
        )
        if response.header.revision != revision + 2:  # etcd: the store's revision, not the read's
            errors.add(
                "pinned LIST header revision",
                detail=f"{response.header.revision}, expected current {revision + 2}",
            )
        kvs.extend(response.kvs)
    seen = {kv.key: kv for kv in kvs}
    problems = []
    if len(kvs) != len(all_keys):
        problems.append(f"{len(kvs)} keys at pinned revision, expected {len(all_keys)}")
    for key in (changed, deleted):
        kv = seen.get(key)
        if kv is None or (kv.mod_revision, kv.value) != old[key]:
            problems.append(f"{key!r} not as at revision {revision}")
    # Restore the prefix for later runs: the deleted key back, the changed value as it was.
    await stub.Put(rpc_pb2.PutRequest(key=changed, value=old[changed][1]), timeout=RPC_TIMEOUT)
    await stub.Put(rpc_pb2.PutRequest(key=deleted, value=old[deleted][1]), timeout=RPC_TIMEOUT)
    for problem in problems:
        errors.add("pinned-revision LIST wrong", detail=problem)
    return "ok" if not problems else "; ".join(problems)


# -- workload 5: watch fan-out -----------------------------------------------------------------


async def watchers(
    endpoint: str,
    prefix: bytes,
    sentinel: bytes,
    count: int,
    channels: int,
    start_revision: int,
    max_duration: float,
    sync: Sync,
) -> dict[str, Any]:
    """`count` watch streams (one watch each) on `prefix` from `start_revision`. Reports progress
    once all are created, then records (mod_revision, key, time received) of every event until
    it sees `sentinel` or `max_duration` seconds have passed since then."""
    chans = Channels(endpoint, channels)
    errors = Errors()
    received: list[list[tuple[int, bytes, float]]] = [[] for _ in range(count)]
    created = [asyncio.get_running_loop().create_future() for _ in range(count)]
    finished = [False] * count
    responses = [0]  # WatchResponses that carried events (etcd may batch several revisions)
    window = Window()
    end = prefix_end(prefix)
    try:
        await chans.ready()

        async def watch(index: int) -> None:
            stub = chans.watch[index % len(chans.watch)]
            call = stub.Watch()
            try:
                await call.write(
                    rpc_pb2.WatchRequest(
                        create_request=rpc_pb2.WatchCreateRequest(
                            key=prefix, range_end=end, start_revision=start_revision
                        )
                    )
                )
                mine = received[index]
                monotonic = time.monotonic
                while True:
                    response = await call.read()
                    now = monotonic()
                    if response is grpc.aio.EOF:
                        errors.add("watch stream ended by the server")
                        return
                    if response.created and not created[index].done():
                        created[index].set_result(now)
                    if response.canceled:
                        errors.add("watch canceled", detail=response.cancel_reason)
                        return
                    if response.events:
                        responses[0] += 1
                    for event in response.events:
                        kv = event.kv
                        if kv.key == sentinel:
                            finished[index] = True
                            return
                        mine.append((kv.mod_revision, kv.key, now))
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    errors.add("Watch", exc)
            finally:
                if not created[index].done():
                    created[index].set_result(-1.0)
                call.cancel()

        tasks = [asyncio.create_task(watch(i)) for i in range(count)]
        times = await asyncio.wait_for(asyncio.gather(*created), 60)
        failed = sum(1 for t in times if t < 0)
        await sleep_until(await sync({"created": count - failed, "failed": failed}))
        window.start()
        _, late = await asyncio.wait(tasks, timeout=max_duration)
        window.stop()
        for task in late:
            errors.add("watch had not seen the sentinel by the deadline")
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await chans.close()
    return {
        "received": received,
        "finished": sum(finished),
        "responses": responses[0],
        "errors": errors.report(),
        **window.report(),
    }


async def watch_writer(
    endpoint: str,
    prefix: bytes,
    sentinel: bytes,
    count: int,
    rate: float,
    max_inflight: int,
    value_size: int,
    time_cap: float,
    sync: Sync,
    channels: int = 2,
) -> dict[str, Any]:
    """Open-loop writer: Put number i is sent at start_at + i/rate (no later than that unless
    `max_inflight` Puts are already outstanding). Records send and acknowledgement times."""
    value = value_of(value_size)
    chans = Channels(endpoint, channels)
    errors = Errors()
    writes: list[tuple[int, bytes, float, float]] = []  # revision, key, sent, acked
    window = Window()
    try:
        await chans.ready()
        slots = asyncio.Semaphore(max_inflight)
        await sleep_until(await sync(None))
        window.start()
        deadline = window.t0 + time_cap

        async def put(i: int) -> None:
            key = prefix + b"k%06d" % i
            try:
                sent = time.monotonic()
                response = await chans.kv[i % len(chans.kv)].Put(
                    rpc_pb2.PutRequest(key=key, value=value), timeout=RPC_TIMEOUT
                )
                writes.append((response.header.revision, key, sent, time.monotonic()))
            except grpc.aio.AioRpcError as exc:
                errors.add("watched Put", exc)
            finally:
                slots.release()

        tasks = []
        for i in range(count):
            await sleep_until(window.t0 + i / rate)
            if time.monotonic() >= deadline:
                break
            await slots.acquire()
            tasks.append(asyncio.create_task(put(i)))
        await asyncio.gather(*tasks)
        window.stop()
        await chans.kv[0].Put(rpc_pb2.PutRequest(key=sentinel, value=b"end"), timeout=RPC_TIMEOUT)
    finally:
        await chans.close()
    return {"writes": writes, "errors": errors.report(), **window.report()}


JOBS: dict[str, Callable[..., Any]] = {
    "current_revision": current_revision,
    "load_keys": load_keys,
    "put_sequential": put_sequential,
    "create_txns": create_txns,
    "churn": churn,
    "list_runs": list_runs,
    "watchers": watchers,
    "watch_writer": watch_writer,
}

MEASURED_JOBS = {"put_sequential", "create_txns", "churn", "list_runs", "watchers", "watch_writer"}


def serve(conn: Any) -> None:
    """Worker process main loop: run the jobs the orchestrator sends until it sends None."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    async def sync(info: Any) -> float:
        conn.send(("ready", info))
        start_at: float = await loop.run_in_executor(None, conn.recv)
        return start_at

    try:
        while True:
            message = conn.recv()
            if message is None:
                return
            name, kwargs = message
            try:
                if name in MEASURED_JOBS:
                    kwargs = {**kwargs, "sync": sync}
                result = loop.run_until_complete(JOBS[name](**kwargs))
                conn.send(("ok", result))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        return
    finally:
        loop.close()
