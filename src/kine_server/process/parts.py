"""The store each kind of process is built around, from the flags.

A process that writes (one process, or the `--workers` writer process) has the write side in
it; a front-end has a store whose commands go to the writer process over `link`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kine_server.auth.store import AuthStore
from kine_server.config import Config
from kine_server.drivers.base import Driver
from kine_server.metrics import Metrics
from kine_server.mvcc.compactor import CompactionSettings
from kine_server.mvcc.hub import EventHub
from kine_server.process.link import WriterLink
from kine_server.store.commands import LocalWrites
from kine_server.store.local import WriteSettings, WriteSide
from kine_server.store.store import Store


def write_settings(config: Config) -> WriteSettings:
    return WriteSettings(
        compaction=CompactionSettings(
            interval=config.compact_interval,
            jitter_percent=config.compact_interval_jitter,
            min_retain=config.compact_min_retain,
            batch_size=config.compact_batch_size,
            timeout=config.compact_timeout,
        ),
        poll_interval=config.poll_interval,
        poll_batch_size=config.poll_batch_size,
        quota_bytes=config.quota_backend_bytes,
        member_name=config.member_name(),
        slow_threshold=config.slow_sql_threshold,
    )


@dataclass
class WritingStore:
    """The store of a process that writes, its write side, and its metrics."""

    store: Store
    side: WriteSide
    metrics: Metrics


def writing_store(config: Config, driver: Driver) -> WritingStore:
    hub, auth = EventHub(), AuthStore(driver)
    side = WriteSide(driver, hub, auth, write_settings(config))
    store = Store(driver, LocalWrites(side), hub, auth, config.slow_sql_threshold)
    metrics = Metrics(store, side.status)
    side.writer.observe = metrics.observe_batch
    return WritingStore(store, side, metrics)


def frontend_store(
    config: Config, driver: Driver, writer_socket: str, on_lost: Callable[[], None]
) -> tuple[Store, WriterLink]:
    """A front-end's store, and its link to the writer process (`on_lost`: the writer is gone)."""
    hub, auth = EventHub(), AuthStore(driver)
    link = WriterLink(writer_socket, hub, auth, on_lost)
    return Store(driver, link, hub, auth, config.slow_sql_threshold), link
