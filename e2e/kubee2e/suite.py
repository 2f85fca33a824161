"""One database from start to end: its server (PostgreSQL's and MariaDB's are throwaway ones),
kine-server, kube-apiserver, every check in order, then the shutdown and log checks. Everything started is
stopped on the way out, also when a check or the start fails."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from . import basics, compaction, crud, listing, logs, restart
from .apiserver import KubeApiserver
from .context import APISERVER_FLAGS, Context
from .outcome import CheckFailed, Results, check, tail
from .processes import Kine, free_port


class Suite:
    def __init__(
        self, db: str, binary: str, base: Path, extra: Sequence[str], results: Results
    ) -> None:
        self.db = db
        self.binary = binary
        self.extra = list(extra)
        self.results = results
        self.work = base / db
        self.work.mkdir()
        self.kine: Kine | None = None
        self.apiserver: KubeApiserver | None = None

    def run(self) -> None:
        print(f"== {self.db} ==", flush=True)
        failed_before = self.results.failed
        with ExitStack() as stack:
            dsn = self.start_database(stack)
            if dsn is None:
                return
            ctx: Context | None = None
            with check(self.results, f"{self.db}/start"):
                self.kine = kine = Kine(dsn, free_port(), self.work / "kine-server.log")
                stack.callback(kine.stop)
                kine.start_and_wait()
                etcd = f"127.0.0.1:{kine.port}"
                flags = [*APISERVER_FLAGS, *self.extra]
                self.apiserver = apiserver = KubeApiserver(self.binary, self.work, etcd, flags)
                stack.callback(apiserver.stop)
                apiserver.start()
                apiserver.wait_ready(120)
                ctx = Context(self.db, self.results, kine, apiserver)
            if ctx is None:
                self.dump_logs()
                return
            run_checks(ctx)
            shutdown_checks(ctx)
            if self.results.failed > failed_before:
                self.dump_logs()

    def start_database(self, stack: ExitStack) -> str | None:
        if self.db == "sqlite":
            return f"sqlite://{self.work / 'db' / 'state.db'}"
        if self.db == "mysql":
            from tests.support.mysql import ThrowawayMariaDB

            with check(self.results, f"{self.db}/mariadb-start"):
                mariadb = ThrowawayMariaDB()
                mariadb.start()
                stack.callback(mariadb.stop)
                return f"{mariadb.dsn.rstrip('/')}/kine_e2e"  # created by kine-server
            return None
        from tests.support.postgres import ThrowawayPostgres

        with check(self.results, f"{self.db}/postgres-start"):
            pg = ThrowawayPostgres()
            pg.start()
            stack.callback(pg.stop)
            # A database that does not exist yet: kine-server creates it.
            base = pg.dsn.rsplit("/", 1)[0]
            return f"{base}/kine_e2e"
        return None

    def dump_logs(self) -> None:
        for log_path in (
            self.apiserver.log_path if self.apiserver else None,
            self.kine.log_path if self.kine else None,
        ):
            if log_path is not None:
                print(f"--- {self.db}: last lines of {log_path.name} ---")
                print(tail(log_path, 30), flush=True)


def run_checks(ctx: Context) -> None:
    """The checks in the order they build on each other (the TTL'd event is created early so
    that its expiry overlaps the bulk work; compaction comes last, after the restart)."""
    basics.early_resource_version(ctx)
    basics.default_namespaces(ctx)
    basics.event_create(ctx)
    basics.create_namespaces(ctx)
    basics.create_configmaps(ctx)
    crud.run(ctx)
    listing.paginate(ctx)
    basics.event_ttl(ctx)
    restart.watch_across_restart(ctx)
    compaction.run(ctx)


def shutdown_checks(ctx: Context) -> None:
    ctx.apiserver.stop(30)
    with ctx.check("kine-clean-shutdown"):
        code = ctx.kine.stop()
        if code != 0:
            raise CheckFailed(f"kine-server exited {code} on SIGTERM")
    logs.run(ctx)
