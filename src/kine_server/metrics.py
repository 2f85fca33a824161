"""Prometheus metrics, and the HTTP listener that serves them with /health and /readyz.

Counters that components already keep (watch stats, compaction status, writer totals) are read at
scrape time by a collector, so nothing on a hot path pays for metrics it does not need; request
latencies and codes are recorded by a wrapper around each unary method's handler, made once at
start-up (a gRPC interceptor would run, and build a handler, for every call).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kine_server import errors
from kine_server.store.store import Store

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Every metric of one server, in a registry of its own (no module-level state)."""

    def __init__(self, store: Store) -> None:
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
        self.state = _StoreState(store)
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


class _StoreState(Collector):
    """Gauges and counters read from the store's components when Prometheus scrapes."""

    def __init__(self, store: Store) -> None:
        self._store = store
        #: Refreshed by `refresh()`: reading them needs the database, which a scrape cannot await.
        self.revision = 0
        self.compact_revision = 0
        self.db_size = 0
        self.db_size_in_use = 0
        self.watchers = 0
        self.buffered_events = 0
        self.streams = 0

    async def refresh(self) -> None:
        counters = await self._store.counters()
        self.revision, self.compact_revision = counters.revision, counters.compact_revision
        self.db_size, self.db_size_in_use = await self._store.size()

    def collect(self) -> Iterator[Any]:
        status = self._store.compactor.status
        writer = self._store.writer
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
                self._store.lessor.expired_total,
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
            "kine_write_requests": ("Write requests committed", writer.requests),
            "kine_write_batches": ("Write transactions committed", writer.batches),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


class HttpEndpoint:
    """GET /metrics, /health (the database answers) and /readyz, on --metrics-bind-address."""

    def __init__(
        self,
        metrics: Metrics,
        store: Store,
        address: str,
        ssl_context: ssl.SSLContext | None,
        watch_stats: Callable[[], tuple[int, int, int]],
    ) -> None:
        self._metrics = metrics
        self._store = store
        self._address = address
        self._ssl = ssl_context
        self._watch_stats = watch_stats
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        host, _, port = self._address.rpartition(":")
        self._server = await asyncio.start_server(
            self._serve, host.strip("[]") or "0.0.0.0", int(port), ssl=self._ssl
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            path = request.split(b" ", 2)[1].split(b"?", 1)[0].decode("latin-1")
            status, kind, body = await self._respond(path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await writer.drain()
        except (
            OSError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            IndexError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def _respond(self, path: str) -> tuple[str, str, bytes]:
        if path == "/metrics":
            state = self._metrics.state
            with contextlib.suppress(errors.EtcdError):  # a scrape still shows the rest
                await state.refresh()
            state.streams, state.watchers, state.buffered_events = self._watch_stats()
            return "200 OK", "text/plain; version=0.0.4", generate_latest(self._metrics.registry)
        if path in ("/health", "/readyz"):
            try:
                await self._store.counters()
            except errors.EtcdError as exc:
                return (
                    "503 Service Unavailable",
                    "application/json",
                    (
                        b'{"health":"false","reason":"'
                        + exc.message.replace('"', "'").encode()
                        + b'"}'
                    ),
                )
            return "200 OK", "application/json", b'{"health":"true","reason":""}'
        return "404 Not Found", "text/plain", b"not found\n"
