"""What an operator meets first, through the real CLI: every address syntax on every address
flag, etcd's URL flags beside kine's, the start-up log line, a database that comes up after the
server, --debug's line per request, and what `make run` installs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kine_server.addresses import outward_address
from tests.support.ports import free_port
from tests.support.postgres import DSN_ENV_VAR, ThrowawayPostgres
from tests.support.process import KineProcess
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_etcdctl import etcdctl

ROOT = Path(__file__).resolve().parent.parent


class Started:
    """`python -m kine_server FLAGS` (no flags added), logging to a file, until the test ends."""

    def __init__(self, tmp_path: Path, *flags: str) -> None:
        self.log_path = tmp_path / f"kine-{free_port()}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KINE_")}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kine_server", *flags],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )

    def wait_for(self, port: int, host: str = "127.0.0.1", timeout: float = 90.0) -> None:
        """Until `port` accepts; fails if the server exits first."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"kine-server exited:\n{self.log()}"
            with socket.socket(family) as sock:
                if sock.connect_ex((host, port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError(f"kine-server did not listen on {port}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # --workers front-ends


@contextlib.contextmanager
def started(tmp_path: Path, *flags: str) -> Iterator[Started]:
    server = Started(tmp_path, "--endpoint", f"sqlite://{tmp_path}/db/state.db", *flags)
    try:
        yield server
    finally:
        server.kill()


def member_list(endpoint: str) -> dict[str, object]:
    out = etcdctl(endpoint, "member list -w json")
    assert "[exit 0]" in out, out
    member: dict[str, object] = json.loads(out.split("\n", 1)[1])["members"][0]
    return member


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- one syntax for every address flag --------------------------------------------------------


@pytest.mark.parametrize(
    ("form", "host"),
    [
        (":{port}", "127.0.0.1"),  # every interface, as kine
        ("http://127.0.0.1:{port}", "127.0.0.1"),  # etcd's URL style
        ("http://127.0.0.1:{port}/", "127.0.0.1"),
        ("[::1]:{port}", "::1"),
    ],
)
def test_every_address_form_serves_grpc_and_metrics(tmp_path: Path, form: str, host: str) -> None:
    if host == "::1" and not ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    grpc_port, metrics_port = free_port(), free_port()
    listen, metrics = form.format(port=grpc_port), form.format(port=metrics_port)
    with started(tmp_path, "--listen-address", listen, "--metrics-bind-address", metrics) as kine:
        kine.wait_for(grpc_port, host)
        endpoint = f"[{host}]:{grpc_port}" if ":" in host else f"{host}:{grpc_port}"
        assert "[exit 0]" in etcdctl(endpoint, "put /form 1")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as sock:
            sock.connect((host, metrics_port))
            sock.sendall(b"GET /health HTTP/1.0\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200")
        assert kine.stop() == 0


@pytest.mark.parametrize("source", ["flag", "env"])
@pytest.mark.parametrize(
    ("flag", "value", "why"),
    [
        ("listen-address", "127.0.0.1:99999", "port 99999 is out of range: needs a port from 0 to"),
        ("listen-address", "localhost", "needs HOST:PORT, :PORT or a URL"),
        ("listen-address", "::1:2379", "an IPv6 host goes in brackets: [::1]:PORT"),
        ("listen-address", "http://127.0.0.1:2379/v3", "a listen URL has only a host and a port"),
        ("listen-client-urls", "http://127.0.0.1:1,ftp://h:2", "'ftp://h:2': unsupported scheme"),
        ("listen-client-urls", "http://127.0.0.1:1,", "an empty entry"),
        ("metrics-bind-address", "127.0.0.1:70000", "port 70000 is out of range"),
        ("metrics-bind-address", "unix:///tmp/m.sock", "a unix:// socket cannot be served here"),
        ("listen-metrics-urls", "http://a:1,http://b:2", "one URL only"),
        ("advertise-client-urls", "http://kine:port", "port 'port' is not a number"),
    ],
)
def test_a_bad_address_is_one_line_naming_its_flag(
    tmp_path: Path, source: str, flag: str, value: str, why: str
) -> None:
    env_name = "KINE_" + flag.upper().replace("-", "_")
    args = ["--endpoint", f"sqlite://{tmp_path}/s.db"]
    env = dict(os.environ)
    if source == "flag":
        args += [f"--{flag}", value]
    else:
        env[env_name] = value
    result = subprocess.run(
        [sys.executable, "-m", "kine_server", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    named = f"--{flag}" if source == "flag" else env_name
    assert_one_line_error(result, f"invalid {named} {value!r}: {why}")


def test_both_names_of_a_setting_with_different_values_are_refused() -> None:
    result = run_cli(
        "--listen-address", "127.0.0.1:2379", "--listen-client-urls", "http://127.0.0.1:2380"
    )
    assert_one_line_error(result, "--listen-address and --listen-client-urls are the same setting")


def test_help_shows_no_empty_default() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "(default )" not in result.stdout
    assert "--listen-client-urls" in result.stdout
    assert "--datastore-connect-timeout" in result.stdout


# -- etcd's flag names: several listeners, what MemberList advertises ------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_listen_client_urls_serve_each_and_member_list_advertises_reachable_urls(
    tmp_path: Path, workers: str
) -> None:
    """A wildcard listener is advertised by this host's address (a client that syncs its
    endpoints from MemberList must reach it), a loopback one as it is."""
    loopback, everywhere, metrics = free_port(), free_port(), free_port()
    with started(
        tmp_path,
        "--listen-client-urls",
        f"http://127.0.0.1:{loopback},http://0.0.0.0:{everywhere}",
        "--listen-metrics-urls",
        f"http://127.0.0.1:{metrics}",
        "--name",
        "kine-a",
        "--workers",
        workers,
    ) as kine:
        kine.wait_for(loopback)
        kine.wait_for(everywhere)
        member = member_list(f"127.0.0.1:{loopback}")
        outward = f"http://{outward_address()}:{everywhere}"
        assert member["name"] == "kine-a"
        assert member["clientURLs"] == [f"http://127.0.0.1:{loopback}", outward]
        assert "[exit 0]" in etcdctl(outward, "put /reached 1")  # the advertised URL works
        assert "/reached" in etcdctl(f"127.0.0.1:{loopback}", "get /reached")
        assert kine.stop() == 0


def test_advertise_client_urls_are_what_member_list_reports(tmp_path: Path) -> None:
    port = free_port()
    advertised = "https://kine.example.com:2379,http://10.1.2.3:2379"
    with started(
        tmp_path,
        "--listen-address",
        f"127.0.0.1:{port}",
        "--advertise-client-urls",
        advertised,
        "--metrics-bind-address",
        "0",
    ) as kine:
        kine.wait_for(port)
        member = member_list(f"127.0.0.1:{port}")
        assert member["clientURLs"] == advertised.split(",")
        assert member["name"] == socket.gethostname()  # without --name, as before
        assert kine.stop() == 0


# -- start-up ---------------------------------------------------------------------------------


def test_the_first_log_line_says_what_is_served_where(tmp_path: Path) -> None:
    port, metrics = free_port(), free_port()
    with started(
        tmp_path,
        "--listen-address",
        f"127.0.0.1:{port}",
        "--metrics-bind-address",
        f":{metrics}",
        "--workers",
        "2",
    ) as kine:
        kine.wait_for(port)
        assert kine.stop() == 0
    first = kine.log().splitlines()[0]
    assert f"serving etcd v3 on http://127.0.0.1:{port}" in first
    assert f"data in sqlite {tmp_path}/db/state.db" in first
    assert f"metrics on 0.0.0.0:{metrics}" in first
    assert "2 workers" in first
    assert "TLS off" in first


@pytest.mark.skipif(bool(os.environ.get(DSN_ENV_VAR)), reason="needs a PostgreSQL of its own")
def test_a_database_that_starts_after_the_server_is_waited_for(tmp_path: Path) -> None:
    """As compose or a pod starts both at once: the server keeps trying, then serves; the log
    names the database without its password."""
    pg_port, port = free_port(), free_port()
    dsn = f"postgres://kine:secret-password@127.0.0.1:{pg_port}/later"
    server = Started(
        tmp_path,
        "--endpoint",
        dsn,
        "--listen-address",
        f"127.0.0.1:{port}",
        "--metrics-bind-address",
        "0",
        "--datastore-connect-timeout",
        "2m",
    )
    try:
        with ThrowawayPostgres(port=pg_port):  # initdb alone takes the server a while
            server.wait_for(port)
            assert "[exit 0]" in etcdctl(f"127.0.0.1:{port}", "put /later 1")
            assert server.stop() == 0
    finally:
        server.kill()
    log = server.log()
    assert f"data in postgres 127.0.0.1:{pg_port}/later" in log
    assert "secret-password" not in log


# -- --debug ----------------------------------------------------------------------------------


def test_debug_logs_one_line_per_request(tmp_path: Path) -> None:
    endpoint = f"sqlite://{tmp_path}/db/state.db"
    with KineProcess(endpoint, tmp_path, "--debug") as kine:
        etcdctl(kine.address, "put /debug/a 1")
        etcdctl(kine.address, "get /debug/ --prefix")
        etcdctl(kine.address, "get /debug/a --rev=99")  # a future revision: OUT_OF_RANGE
        assert kine.stop() == 0
    lines = [line for line in kine.log().splitlines() if "kine_server.requests" in line]
    assert any("Put key=/debug/a revision=2 took=" in line and "code=OK" in line for line in lines)
    assert any(
        "Range key=/debug/ range_end=/debug0 revision=2 took=" in line and "code=OK" in line
        for line in lines
    )
    assert any(
        "Range key=/debug/a at_revision=99 revision=- took=" in line and "code=OUT_OF_RANGE" in line
        for line in lines
    ), lines


def test_without_debug_no_request_is_logged(tmp_path: Path) -> None:
    endpoint = f"sqlite://{tmp_path}/db/state.db"
    with KineProcess(endpoint, tmp_path) as kine:
        etcdctl(kine.address, "put /quiet 1")
        assert kine.stop() == 0
    assert "kine_server.requests" not in kine.log()


# -- make run ---------------------------------------------------------------------------------


def test_make_run_installs_no_dev_tools_and_make_test_does(tmp_path: Path) -> None:
    def planned(target: str) -> str:
        return subprocess.run(
            ["make", "-n", "-C", str(ROOT), target, f"VENV={tmp_path}/venv"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout

    run = planned("run")
    assert "pip install -q -e .\n" in run
    assert "[dev]" not in run
    assert "pip install -q -e '.[dev]'" in planned("lint")
