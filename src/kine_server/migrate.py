"""`kine-server restore` and `kine-server import`: data into an empty store, revisions kept.

restore: a snapshot from `etcdctl snapshot save` (of etcd or of kine-server: both are etcd's
bbolt format), an etcd data directory's `member/snap/db`, or a kine-server SQLite snapshot of
an earlier release. import: a K3s kine database. Each writes in one transaction of an empty
target, reports progress on stderr, then reads the result back as a server would: the
revision and the number of keys must be what the source held, and the store's HashKV is
printed, for `etcdctl endpoint hashkv` on the new server to match.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from kine_server.config import Config
from kine_server.drivers import DriverError, EndpointError, make_driver
from kine_server.drivers.base import OPEN_END, Driver
from kine_server.drivers.kine_source import open_kine
from kine_server.drivers.sqlite import SQLiteDriver
from kine_server.etcd_backend.bbolt import BoltError, BoltFile
from kine_server.etcd_backend.mvcc import is_bbolt, restore_etcd
from kine_server.maintenance.kine_import import import_kine
from kine_server.maintenance.restore import SnapshotError, copy_store, strip_checksum
from kine_server.mvcc.kvstore import key_space_hash


@dataclass
class Loaded:
    """What a source held, for checking the store it was loaded into."""

    revision: int
    live_keys: int
    detail: str


class VerifyError(Exception):
    """The loaded store does not hold what the source did."""


async def verify(target: Driver, expected: Loaded) -> str:
    """Read the store back; the line that reports it, or VerifyError."""
    async with target.read() as tx:
        counters = await tx.counters()
        live = await tx.count(b"\x00", OPEN_END, None)
        crc = await key_space_hash(tx, counters.revision)
    if (counters.revision, live) != (expected.revision, expected.live_keys):
        raise VerifyError(
            f"the store holds {live} keys at revision {counters.revision}; the source held "
            f"{expected.live_keys} at revision {expected.revision}"
        )
    return (
        f"revision {counters.revision} into {target.location}: {expected.detail}{live} keys; "
        f"HashKV {crc} at revision {counters.revision}"
    )


def _parser(prog: str, description: str, environ: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--endpoint",
        default=environ.get("KINE_ENDPOINT", Config().endpoint),
        help="the empty database to load into, as for the server [env KINE_ENDPOINT]",
    )
    return parser


def _run(prog: str, verb: str, load: Coroutine[Any, Any, str]) -> int:
    """Run `load` (which returns the report line); one line on stderr on any failure."""
    try:
        line = asyncio.run(load)
    except (SnapshotError, DriverError, EndpointError, BoltError, VerifyError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(f"{verb} {line}")
    return 0


def _progress(prog: str) -> Callable[[str], None]:
    def progress(line: str) -> None:
        print(f"{prog}: {line}", file=sys.stderr, flush=True)

    return progress


def restore_command(argv: Sequence[str], environ: dict[str, str]) -> int:
    """`kine-server restore [--endpoint DSN] SNAPSHOT`."""
    prog = "kine-server restore"
    parser = _parser(
        prog,
        "Copy a snapshot (from `etcdctl snapshot save` of etcd or of kine-server, or an etcd "
        "data directory's member/snap/db) into an empty database.",
        environ,
    )
    parser.add_argument("snapshot", help="the snapshot file")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.snapshot):
        print(f"{prog}: error: no snapshot file {args.snapshot}", file=sys.stderr)
        return 1
    progress = _progress(prog)

    async def load(database: str) -> str:
        target = make_driver(args.endpoint)
        await target.open()
        try:
            if is_bbolt(database):  # etcd's format: `etcdctl snapshot save`, member/snap/db
                with BoltFile(database) as bolt:
                    report = await restore_etcd(bolt, target, progress)
                detail = f"{report.rows} rows, {report.leases} leases, "
                loaded = Loaded(report.revision, report.live_keys, detail)
            else:  # a kine-server SQLite snapshot of an earlier release
                loaded = await _copy_sqlite(database, target)
            return await verify(target, loaded)
        finally:
            await target.close()

    with tempfile.TemporaryDirectory(prefix="kine-restore-") as directory:
        try:
            database = strip_checksum(args.snapshot, os.path.join(directory, "snapshot.db"))
        except SnapshotError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 1
        return _run(prog, "restored", load(database))


async def _copy_sqlite(database: str, target: Driver) -> Loaded:
    source = SQLiteDriver(database, readers=1)
    await source.open()
    try:
        async with source.read() as tx:
            live = await tx.count(b"\x00", OPEN_END, None)
        counters = await copy_store(source, target)
    finally:
        await source.close()
    return Loaded(counters.revision, live, "")


def import_command(argv: Sequence[str], environ: dict[str, str]) -> int:
    """`kine-server import --from KINE_DSN [--endpoint DSN]`."""
    prog = "kine-server import"
    parser = _parser(
        prog,
        "Copy a K3s kine database (SQLite, PostgreSQL or MySQL) into an empty kine-server store, "
        "with "
        "its revisions, so kube-apiserver's resourceVersions and watches carry on.",
        environ,
    )
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        help="the kine database, as kine's --endpoint: sqlite://PATH, postgres://user@host/db or "
        "mysql://user:pass@tcp(host:3306)/db",
    )
    args = parser.parse_args(argv)

    async def load() -> str:
        source = open_kine(args.source)
        target = make_driver(args.endpoint)
        await target.open()
        try:
            report = await import_kine(source, target, _progress(prog))
            compacted = f"compacted through {report.compact_revision}, "
            if report.compact_revision <= 0:
                compacted = "never compacted, "
            detail = f"{report.rows} rows, {report.leases} leases, {compacted}"
            return await verify(target, Loaded(report.revision, report.live_keys, detail))
        finally:
            await target.close()

    return _run(prog, "imported", load())
