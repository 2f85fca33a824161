"""A throwaway MariaDB server for tests that need a real MySQL-family database.

Like ThrowawayPostgres: a fresh data directory (`mariadb-install-db`) in a temporary directory,
`mariadbd` on a free loopback port, run as the unprivileged `mysql` user when the tests run as
root. Set ``KINE_TEST_MYSQL_DSN`` (``mysql://root@127.0.0.1:3306/``) to use an existing server
instead. :meth:`restart` stops it and starts it again on the same port and data (outage tests).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from .ports import free_port
from .unprivileged import run_as

DSN_ENV_VAR = "KINE_TEST_MYSQL_DSN"

#: mariadbd refuses to run as root; Debian's package creates this user.
UNPRIVILEGED_OS_USER = "mysql"

_PORT_ATTEMPTS = 3


def _program(*names: str) -> str:
    for name in names:
        for found in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
            if found and os.access(found, os.X_OK):
                return found
    raise FileNotFoundError(f"MariaDB program {names[0]!r} not found (apt-get install mariadb-server)")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


class ThrowawayMariaDB:
    """A private MariaDB server for the duration of a test session."""

    def __init__(
        self, startup_timeout: float = 60.0, durable: bool = False, options: Sequence[str] = ()
    ) -> None:
        #: More mariadbd options (TLS certificates and the like).
        self.options = list(options)
        #: Sync every commit's log to disk (a benchmark's fair comparison with etcd and SQLite,
        #: which do); the tests' server does not, as their PostgreSQL runs with fsync off.
        self.durable = durable
        external = os.environ.get(DSN_ENV_VAR)
        self.external = bool(external)
        #: mysql://root@127.0.0.1:PORT/ (no database: each test names its own).
        self.dsn = external or ""
        self.port = 0
        self.startup_timeout = startup_timeout
        self._base: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_as, self._owner = run_as(UNPRIVILEGED_OS_USER)

    @property
    def base_dir(self) -> Path:
        if self._base is None:
            raise RuntimeError("ThrowawayMariaDB has not been started")
        return self._base

    @property
    def log_path(self) -> Path:
        return self.base_dir / "mariadb.log"

    def start(self) -> None:
        if self.external or self._proc is not None:
            return
        if self._base is not None:
            self._start_server()
            return
        self._base = Path(tempfile.mkdtemp(prefix="kine-mariadb-", dir="/tmp"))
        self._base.chmod(0o755)
        # Its own temporary directory (also for mariadb-install-db's bootstrap server): a
        # starting mariadbd deletes every `#sql*` file in its tmpdir, so with a shared /tmp
        # each server started removed the temporary tables other servers were using (their
        # statement failed: "Error on delete of '/tmp/#sql-...'").
        (self._base / "tmp").mkdir()
        if self._owner is not None:
            os.chown(self._base, *self._owner)
            os.chown(self._base / "tmp", *self._owner)
        try:
            self._install()
            for attempt in range(_PORT_ATTEMPTS):
                self.port = free_port()
                try:
                    self._start_server()
                    break
                except RuntimeError:
                    taken = "Address already in use" in _tail(self.log_path, 20)
                    if not taken or attempt == _PORT_ATTEMPTS - 1:
                        raise
        except BaseException:
            self.stop()
            raise

    def _install(self) -> None:
        result = subprocess.run(
            [
                *self._run_as,
                _program("mariadb-install-db", "mysql_install_db"),
                "--no-defaults",
                f"--datadir={self.base_dir / 'data'}",
                f"--tmpdir={self.base_dir / 'tmp'}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ],
            cwd=self.base_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{result.stdout}{result.stderr}")

    def _start_server(self) -> None:
        base = self.base_dir
        self._proc = subprocess.Popen(
            [
                *self._run_as,
                _program("mariadbd", "mysqld"),
                "--no-defaults",
                f"--datadir={base / 'data'}",
                f"--socket={base / 'mysqld.sock'}",
                f"--tmpdir={base / 'tmp'}",
                f"--pid-file={base / 'mysqld.pid'}",
                f"--log-error={self.log_path}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                *self._durability(),
                "--innodb-buffer-pool-size=256M",
                "--innodb-log-file-size=256M",
                "--max-connections=500",
                "--skip-log-bin",
                *self.options,
            ],
            cwd=base,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.dsn = f"mysql://root@127.0.0.1:{self.port}/"
        self._wait_ready()

    def _durability(self) -> list[str]:
        if self.durable:
            return ["--innodb-flush-log-at-trx-commit=1", "--sync-binlog=1"]
        # A test database: the durability of the server's own files is not under test.
        return ["--innodb-flush-log-at-trx-commit=2", "--innodb-doublewrite=0"]

    def server_pid(self) -> int | None:
        """mariadbd's pid (the started process is `runuser` when the tests run as root)."""
        try:
            return int((self.base_dir / "mysqld.pid").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            return None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(
                    f"mariadbd exited at start-up\n--- {self.log_path} ---\n{_tail(self.log_path)}"
                )
            if "ready for connections" in _tail(self.log_path, 5):
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return
                except OSError:
                    pass
            if time.monotonic() >= deadline:
                self._stop_server()
                raise RuntimeError(
                    f"MariaDB on 127.0.0.1:{self.port} not ready after "
                    f"{self.startup_timeout:.0f}s\n--- {self.log_path} ---\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def restart(self) -> None:
        """Stop (SIGTERM, a clean shutdown) and start again on the same port and data."""
        if self.external:
            raise RuntimeError(f"cannot restart an external server ({DSN_ENV_VAR})")
        self._stop_server()
        # The old log says "ready for connections" too: start the new one's log afresh.
        self.log_path.rename(self.log_path.with_suffix(".old.log"))
        self._start_server()

    def _stop_server(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        if self.external or self._base is None:
            return
        try:
            self._stop_server()
        finally:
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None
            self.dsn = ""

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
