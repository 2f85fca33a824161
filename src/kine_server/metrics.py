"""Prometheus metrics, and the HTTP listener that serves them with /health and /readyz.

Counters that components already keep (watch stats, compaction status, writer totals) are read at
scrape time by a collector, so nothing on a hot path pays for metrics it does not need; request
latencies and codes are recorded by a wrapper around each unary method's handler, made once at
start-up (a gRPC interceptor would run, and build a handler, for every call).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from kine_server import errors
from kine_server.addresses import Address
from kine_server.httpd import HttpListener, Request, Response
from kine_server.mvcc.compactor import CompactionStatus
from kine_server.store.local import WriteSideStatus
from kine_server.store.store import Store

log = logging.getLogger(__name__)
#: --debug's line per request: a logger of its own, so that it can be turned up or down alone.
request_log = logging.getLogger("kine_server.requests")
#: Keys longer than this are cut in request lines.
LOGGED_KEY_CHARS = 120

#: Connections the metrics listener serves at once; scrapers and probes need a handful.
MAX_CONNECTIONS = 64
MAX_REQUEST_BYTES = 64 * 1024

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Every metric of one server, in a registry of its own (no module-level state)."""

    def __init__(
        self, store: Store, write_status: Callable[[], WriteSideStatus] | None = None
    ) -> None:
        """`write_status`: the write side's figures, where it runs in this process (a
        `--workers` front-end has none: the writer process reports them)."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kine_grpc_requests",
            "gRPC requests handled, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kine_grpc_request_seconds",
            "gRPC request latency (unary calls), by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.sql = Histogram(
            "kine_sql_transaction_seconds",
            "Database transaction latency, by kind (read, write batch, compaction batch)",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "kine_write_batch_requests",
            "Write requests committed per database transaction (group commit)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.state = _StoreState(store, write_status)
        self.registry.register(self.state)

    def observe_batch(self, requests: int, seconds: float) -> None:
        self.batch_size.observe(requests)
        self.sql.labels("write").observe(seconds)

    def timed(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """`handler`, recording the latency and status code of every call (unary calls only:
        streams are counted by their own gauges)."""
        behavior = handler.unary_unary
        if behavior is None:
            return handler
        if request_log.isEnabledFor(logging.DEBUG):  # decided once: no cost without --debug
            behavior = logged(method, behavior)
        latency = self.latency.labels(method)
        by_code: dict[str, Any] = {}
        requests = self.requests

        async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            began = time.perf_counter()
            code = "OK"
            try:
                return await behavior(request, context)
            except BaseException:
                code_value = context.code()
                code = code_value.name if code_value is not None else "UNKNOWN"
                raise
            finally:
                latency.observe(time.perf_counter() - began)
                counter = by_code.get(code)
                if counter is None:
                    counter = by_code[code] = requests.labels(method, code)
                counter.inc()

        return grpc.unary_unary_rpc_method_handler(
            timed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def logged(method: str, behavior: Behavior) -> Behavior:
    """`behavior`, logging one debug line per call: the method, what it asked for, the
    revision it answered at, how long it took and its status code."""

    async def logging_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        began = time.perf_counter()
        response, code = None, "OK"
        try:
            response = await behavior(request, context)
            return response
        except BaseException:
            code_value = context.code()
            code = code_value.name if code_value is not None else "UNKNOWN"
            raise
        finally:
            header = getattr(response, "header", None)
            request_log.debug(
                "%s %s revision=%s took=%.3fms code=%s",
                method,
                describe_request(request),
                header.revision if header is not None else "-",
                (time.perf_counter() - began) * 1000,
                code,
            )

    return logging_call


def describe_request(request: Any) -> str:
    """What a request asks for, in a few words: its key or range, and the fields that change
    what it does (a Range's revision and limit, a Txn's shape, a lease)."""
    descriptor = getattr(request, "DESCRIPTOR", None)  # None: a request that did not decode
    fields = set(descriptor.fields_by_name) if descriptor is not None else set()
    parts = []
    if "key" in fields:
        parts.append(f"key={_key(request.key)}")
        if "range_end" in fields and request.range_end:
            parts.append(f"range_end={_key(request.range_end)}")
    if "compare" in fields:
        keys = ",".join(_key(compare.key) for compare in request.compare[:3])
        parts.append(
            f"compare=[{keys}{',...' if len(request.compare) > 3 else ''}] "
            f"success={len(request.success)} failure={len(request.failure)}"
        )
    for name, shown in (("revision", "at_revision"), ("limit", "limit"), ("ID", "id")):
        if name in fields and getattr(request, name):
            parts.append(f"{shown}={getattr(request, name)}")
    for name in ("TTL", "lease"):
        if name in fields and getattr(request, name):
            parts.append(f"{name.lower()}={getattr(request, name)}")
    return " ".join(parts) or "-"


def _key(key: bytes) -> str:
    if key == b"\0":
        return "\\0"
    text = key.decode("utf-8", "backslashreplace")
    return text if len(text) <= LOGGED_KEY_CHARS else text[:LOGGED_KEY_CHARS] + "..."


class _StoreState(Collector):
    """Gauges and counters read from the store's components when Prometheus scrapes."""

    def __init__(
        self, store: Store, write_status: Callable[[], WriteSideStatus] | None
    ) -> None:
        self._store = store
        self._write_status = write_status
        self.write_side = WriteSideStatus(CompactionStatus(), False, 0, 0, 0)
        #: Refreshed by `refresh()`: reading them needs the database, which a scrape cannot await.
        self.revision = 0
        self.compact_revision = 0
        self.db_size = 0
        self.db_size_in_use = 0
        self.watchers = 0
        self.buffered_events = 0
        self.streams = 0
        #: Whether the database answered the last scrape's first query: the one figure an
        #: alert on an unreachable database can use (the others keep their last values).
        self.database_up = False

    async def refresh(self) -> None:
        try:
            counters = await self._store.counters()
        except errors.EtcdError:
            self.database_up = False
            raise
        self.database_up = True
        self.revision, self.compact_revision = counters.revision, counters.compact_revision
        self.db_size, self.db_size_in_use = await self._store.size()
        if self._write_status is not None:
            self.write_side = self._write_status()

    def collect(self) -> Iterator[Any]:
        status = self.write_side.compaction
        gauges = {
            "kine_revision": ("Current store revision", self.revision),
            "kine_compact_revision": (
                "Compact revision: reads below it fail",
                self.compact_revision,
            ),
            "kine_compacted_through": (
                "History removed at or below this revision",
                status.compacted_through,
            ),
            "kine_db_size_bytes": ("Database size", self.db_size),
            "kine_db_size_in_use_bytes": ("Database bytes in use", self.db_size_in_use),
            "kine_watch_streams": ("Open Watch streams", self.streams),
            "kine_watchers": ("Active watches", self.watchers),
            "kine_watch_buffered_events": ("Events queued for watchers", self.buffered_events),
            "kine_compaction_consecutive_failures": (
                "Compaction batches failed in a row",
                status.consecutive_failures,
            ),
            "kine_compaction_last_success_timestamp_seconds": (
                "Last successful compaction batch",
                status.last_success_time,
            ),
            "kine_compaction_last_error_timestamp_seconds": (
                "Last failed compaction batch",
                status.last_error_time,
            ),
            "kine_lease_expired": (
                "Leases expired by this instance",
                self.write_side.expired_leases,
            ),
            "kine_database_up": (
                "1 when the database answered this scrape, 0 when it did not",
                int(self.database_up),
            ),
            "kine_alarm_nospace": (
                "1 while etcd's NOSPACE alarm is raised (writes that add data are refused)",
                int(self.write_side.nospace),
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "kine_compaction_batches": ("Compaction batches committed", status.batches_total),
            "kine_compaction_failures": ("Compaction batches failed", status.failures_total),
            "kine_compaction_rows_deleted": (
                "History rows removed by compaction",
                status.rows_deleted_total,
            ),
            "kine_write_requests": ("Write requests committed", self.write_side.write_requests),
            "kine_write_batches": ("Write transactions committed", self.write_side.write_batches),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


#: Families each process of `--workers` counts for itself: one scrape shows their sum. The rest
#: (revisions, database size, compaction, the writer's batches) come from the writer process.
PER_PROCESS = frozenset(
    {
        "kine_grpc_requests",
        "kine_grpc_request_seconds",
        "kine_sql_transaction_seconds",
        "kine_watch_streams",
        "kine_watchers",
        "kine_watch_buffered_events",
    }
)


def merge_expositions(own: bytes, others: list[tuple[int, bytes]]) -> bytes:
    """The writer process's metrics with its front-ends' (worker number, metrics) added in: the
    per-process families summed, and each front-end's request count by worker (how evenly the
    kernel spreads connections)."""
    families = {f.name: f for f in text_string_to_metric_families(own.decode())}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    by_worker = CounterMetricFamily(
        "kine_frontend_requests",
        "gRPC requests (unary) each --workers front-end process has served",
        labels=["worker"],
    )
    for worker, text in others:
        served = 0.0
        for family in text_string_to_metric_families(text.decode()):
            if family.name == "kine_grpc_requests":
                served = sum(s.value for s in family.samples if s.name.endswith("_total"))
            if family.name not in PER_PROCESS:
                continue
            if family.name not in families:
                families[family.name] = family
                continue
            totals = sums.setdefault(family.name, {})
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (sample.name, tuple(sorted(sample.labels.items())))
                totals[key] = totals.get(key, 0.0) + sample.value
        by_worker.add_metric([str(worker)], served)
    families[by_worker.name] = by_worker
    serving = GaugeMetricFamily(
        "kine_frontend_processes",
        "--workers front-end processes that answered this scrape",
        value=len(others),
    )
    families[serving.name] = serving
    for name, totals in sums.items():
        family = families[name]
        seen = set()
        merged = []
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            seen.add(key)
            merged.append(sample._replace(value=sample.value + totals.get(key, 0.0)))
        for (sample_name, labels), value in totals.items():
            if (sample_name, labels) not in seen:
                merged.append(Sample(sample_name, dict(labels), value))
        family.samples = merged
    registry = CollectorRegistry()
    registry.register(_Fixed(list(families.values())))
    return bytes(generate_latest(registry))


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


async def health(store: Store, serving: Callable[[], bool] | None = None) -> tuple[int, bytes]:
    """/health's status and body, as etcd's: 200 when the database answers (and, with
    --workers, a front-end serves), else 503 with the reason."""
    try:
        await store.counters()
    except errors.EtcdError as exc:
        # The cause (the driver's text) can name the database's host and port: it is for the
        # operator's log, not for whoever can reach this port.
        log.debug("/health: %s", exc.message)
        return 503, b'{"health":"false","reason":"database unavailable"}'
    if serving is not None and not serving():
        return 503, b'{"health":"false","reason":"no front-end process serves"}'
    return 200, b'{"health":"true","reason":""}'


class HttpEndpoint:
    """GET /metrics, /health (the database answers) and /readyz, on --metrics-bind-address."""

    def __init__(
        self,
        metrics: Metrics,
        store: Store,
        address: Address,
        ssl_context: ssl.SSLContext | None,
        watch_stats: Callable[[], tuple[int, int, int]],
        gather: Callable[[], Awaitable[list[tuple[int, bytes]]]] | None = None,
        serving: Callable[[], bool] | None = None,
    ) -> None:
        #: With --workers: the other processes' metrics, and whether any front-end serves.
        self._gather = gather
        self._serving = serving
        self._metrics = metrics
        self._store = store
        self._watch_stats = watch_stats
        self._listener = HttpListener(
            "metrics",
            address,
            self._serve,
            ssl_context,
            max_connections=MAX_CONNECTIONS,
            max_body=MAX_REQUEST_BYTES,
            keep_alive=False,
        )

    @property
    def port(self) -> int:
        return self._listener.port

    @property
    def address(self) -> Address:
        """Where it listens, with the port bound."""
        return self._listener.address

    async def start(self) -> None:
        await self._listener.start()

    def bind(self) -> None:
        """Bind now (OSError if it cannot), serve from `accept`: see HttpListener.bind."""
        self._listener.bind()

    def accept(self) -> None:
        self._listener.accept()

    async def stop(self) -> None:
        await self._listener.stop()

    async def _serve(self, request: Request, response: Response) -> None:
        status, kind, body = await self._respond(request.path)
        await response.send(status, kind, body)

    async def _respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            state = self._metrics.state
            with contextlib.suppress(errors.EtcdError):  # a scrape still shows the rest
                await state.refresh()
            state.streams, state.watchers, state.buffered_events = self._watch_stats()
            body = generate_latest(self._metrics.registry)
            if self._gather is not None:
                body = merge_expositions(body, await self._gather())
            return 200, "text/plain; version=0.0.4", body
        if path in ("/health", "/readyz"):
            status, body = await health(self._store, self._serving)
            return status, "application/json", body
        return 404, "text/plain", b"not found\n"
