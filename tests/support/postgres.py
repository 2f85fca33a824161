"""A throwaway PostgreSQL server for tests that need a real database.

Each instance owns a fresh cluster in a temporary directory on a random
loopback port, so tests never touch a developer's own database and can be run
in parallel.  Set ``KINE_TEST_PG_DSN`` to point the suite at an existing server
instead (for example in CI where a service container is provided).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Self

from .ports import free_port
from .unprivileged import run_as

DSN_ENV_VAR = "KINE_TEST_PG_DSN"
"""Environment variable naming an existing server to use instead of starting one."""

DB_USER = "kine"
"""Superuser role created by initdb; trust auth means no password is needed."""


UNPRIVILEGED_OS_USER = "nobody"
"""PostgreSQL refuses to run as root, so as root we drop to this existing user."""

_PORT_ATTEMPTS = 3
"""free_port() can race with other processes; retry the first start this often."""


def _find_pg_binary(name: str) -> str:
    """Locate a PostgreSQL program, preferring the directory that holds pg_ctl.

    Debian's /usr/bin wrappers pick a version heuristically; the programs next to
    the real pg_ctl are guaranteed to match the server we start.
    """
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl is not None:
        candidate = Path(pg_ctl).resolve().parent / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"PostgreSQL program {name!r} not found on PATH")
    return found


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Field 4 of /proc/PID/stat, after the command in parentheses, is the parent's pid.
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _tail(path: Path, lines: int = 40) -> str:
    """Return the last lines of a log file, or a note if it cannot be read."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


class ThrowawayPostgres:
    """A private PostgreSQL cluster that lives for the duration of a test session.

    Use as ``with ThrowawayPostgres() as pg: connect(pg.dsn)`` or call
    :meth:`start` / :meth:`stop` explicitly.  :meth:`restart` bounces the server
    on the same port and data directory so tests can simulate a database outage.
    """

    def __init__(
        self,
        startup_timeout: float = 30.0,
        port: int = 0,
        settings: dict[str, str] | None = None,
        clone_of: ThrowawayPostgres | None = None,
        clone_via: int = 0,
    ) -> None:
        external = os.environ.get(DSN_ENV_VAR)
        self.external: bool = bool(external)
        """True when the DSN came from KINE_TEST_PG_DSN and nothing is started."""
        self.dsn: str = external or ""
        """libpq/asyncpg connection string; empty until :meth:`start` succeeds."""
        self.port: int = 0
        #: The port to start on; 0: a free one (and another if a race took it).
        self._wanted_port = port
        self.startup_timeout = startup_timeout
        #: Extra server settings (`-c NAME=VALUE` at every start).
        self.settings = dict(settings or {})
        #: A running server this one starts as a streaming standby of (pg_basebackup -R), in
        #: place of a fresh initdb; through this port if given (a proxy in front of it), which
        #: it then streams through too.
        self.clone_of = clone_of
        self.clone_via = clone_via
        self._base_dir: Path | None = None
        self._running = False
        self._run_as, self._owner = run_as(UNPRIVILEGED_OS_USER)

    # -- paths ---------------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        """Temporary directory holding the data dir, the socket and the log."""
        if self._base_dir is None:
            raise RuntimeError("ThrowawayPostgres has not been started")
        return self._base_dir

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgres.log"

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Create the cluster (first call only) and start the server.

        On a failed first start everything is cleaned up, because a context
        manager whose ``__enter__`` raises never reaches ``__exit__``.
        """
        if self.external or self._running:
            return
        if self._base_dir is not None:
            self._start_server()
            return
        self._base_dir = self._make_base_dir()
        try:
            if self.clone_of is None:
                self._initdb()
            else:
                self._base_backup(self.clone_of)
            for attempt in range(_PORT_ATTEMPTS):
                self.port = self._wanted_port or free_port()
                try:
                    self._start_server()
                    break
                except RuntimeError:
                    port_taken = "already in use" in _tail(self.log_path, 10)
                    if not port_taken or self._wanted_port or attempt == _PORT_ATTEMPTS - 1:
                        raise
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Shut the server down (fast mode) and delete its directory."""
        if self.external:
            return
        if self._base_dir is None:
            return
        try:
            if self._running or (self.data_dir / "postmaster.pid").exists():
                self._stop_server()
        finally:
            shutil.rmtree(self._base_dir, ignore_errors=True)
            self._base_dir = None
            self._running = False
            self.dsn = ""

    def restart(self) -> None:
        """Stop (fast mode) and start again on the same port and data directory.

        Existing client connections are terminated, which is what tests of
        reconnect behaviour need.
        """
        if self.external:
            raise RuntimeError(f"cannot restart an external server ({DSN_ENV_VAR})")
        if self._base_dir is None:
            raise RuntimeError("ThrowawayPostgres has not been started")
        self._stop_server()
        self._start_server()

    def kill(self) -> None:
        """SIGKILL the postmaster and every process it started, as a crash of the machine's
        PostgreSQL would end them: no shutdown checkpoint, no goodbye to any client."""
        if self.external:
            raise RuntimeError(f"cannot kill an external server ({DSN_ENV_VAR})")
        pid = self._postmaster_pid()
        if pid is None:
            raise RuntimeError("no postmaster to kill")
        children = _children(pid)
        for victim in [pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)
        self._running = False

    def promote(self) -> None:
        """End recovery: a standby becomes a primary that accepts writes (pg_ctl promote -w)."""
        self._run(
            [_find_pg_binary("pg_ctl"), "-D", str(self.data_dir), "-w", "-t", "30", "promote"],
            "pg_ctl promote",
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals -----------------------------------------------------------

    def _make_base_dir(self) -> Path:
        """Create a /tmp directory the server's OS user can own and traverse.

        mkdtemp creates 0700 directories, which ``nobody`` could not enter when
        we are root, hence the chmod/chown.
        """
        base = Path(tempfile.mkdtemp(prefix="kine-pg-", dir="/tmp"))
        base.chmod(0o755)
        if self._owner is not None:
            os.chown(base, *self._owner)
        return base

    def _run(self, args: list[str], what: str) -> None:
        """Run a PostgreSQL tool (as the unprivileged user if root), raising on failure."""
        result = subprocess.run(
            [*self._run_as, *args],
            cwd=self.base_dir,  # root's cwd may be unreadable for ``nobody``
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{what} failed (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}\n"
                f"--- server log tail ({self.log_path}) ---\n{_tail(self.log_path)}"
            )

    def _initdb(self) -> None:
        self._run(
            [
                _find_pg_binary("initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                DB_USER,
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",  # independent of the host's installed locales
            ],
            "initdb",
        )

    def _base_backup(self, primary: ThrowawayPostgres) -> None:
        """The data directory as a copy of `primary`'s, set up to stream from it (-R writes
        primary_conninfo and standby.signal)."""
        self._run(
            [
                _find_pg_binary("pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.clone_via or primary.port),
                "-U",
                DB_USER,
                "-D",
                str(self.data_dir),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
            f"pg_basebackup from port {primary.port}",
        )

    def _start_server(self) -> None:
        settings = [f"{name}={value}" for name, value in self.settings.items()]
        options = " ".join(
            [
                "-k",
                shlex.quote(str(self.base_dir)),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
                *(part for setting in settings for part in ("-c", shlex.quote(setting))),
            ]
        )
        self._run(
            [
                _find_pg_binary("pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(int(self.startup_timeout)),
                "-o",
                options,
                "start",
            ],
            f"pg_ctl start on port {self.port}",
        )
        self._running = True
        self.dsn = f"postgres://{DB_USER}@127.0.0.1:{self.port}/postgres"
        self._wait_ready()

    def _stop_server(self) -> None:
        """Stop via pg_ctl; fall back to SIGKILL so no server outlives the test run."""
        try:
            self._run(
                [
                    _find_pg_binary("pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "30",
                    "stop",
                ],
                "pg_ctl stop",
            )
        except RuntimeError:
            pid = self._postmaster_pid()
            if pid is None:
                raise
            with contextlib.suppress(ProcessLookupError):  # killed already (kill())
                os.kill(pid, signal.SIGKILL)
        finally:
            self._running = False

    def _postmaster_pid(self) -> int | None:
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first_line)
        except (OSError, IndexError, ValueError):
            return None

    def _wait_ready(self) -> None:
        """Poll until the server accepts connections over TCP as DB_USER.

        pg_ctl -w already waits for readiness, but it checks via the socket
        dir; this confirms the TCP path the tests actually use.
        """
        deadline = time.monotonic() + self.startup_timeout
        try:
            pg_isready: str | None = _find_pg_binary("pg_isready")
        except FileNotFoundError:
            pg_isready = None
        while True:
            if self._accepts_connections(pg_isready):
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"PostgreSQL on 127.0.0.1:{self.port} not ready after "
                    f"{self.startup_timeout:.0f}s\n--- server log tail ({self.log_path}) ---\n"
                    f"{_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def _accepts_connections(self, pg_isready: str | None) -> bool:
        if pg_isready is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False
        result = subprocess.run(
            [
                pg_isready,
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                DB_USER,
                "-d",
                "postgres",
                "-t",
                "2",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        return result.returncode == 0
