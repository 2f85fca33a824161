"""The command line: kine's flags and KINE_* variables, Go durations, and clean start-up failures."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kine_server.drivers.sqlite import permission_hint
from kine_server.durations import format_duration, parse_duration
from kine_server.flags import FLAGS, load_config
from tests.support.ports import free_port
from tests.support.process import KineProcess


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("10m0s", 600.0),
        ("1h2m3.5s", 3723.5),
        ("0", 0.0),
        ("1.5h", 5400.0),
        ("300us", 0.0003),
        ("250µs", 0.00025),
        ("-2s", -2.0),
        ("1m30s", 90.0),
    ],
)
def test_go_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "5x", "1h-2m", "ms5", "five seconds"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.5, "500ms"), (5, "5s"), (600, "10m0s"), (3600, "1h0m0s"), (90.25, "1m30.25s")],
)
def test_go_durations_format(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_defaults_are_etcd_and_kine_defaults() -> None:
    config = load_config([], {})
    assert config.endpoint == "sqlite://./db/state.db"
    assert config.listen_address == "127.0.0.1:2379"
    assert config.max_request_bytes == 1536 * 1024
    assert config.max_txn_ops == 128
    assert config.compact_timeout == 5.0


def test_environment_sets_and_flags_override() -> None:
    env = {
        "KINE_ENDPOINT": "postgres://u@h/db",
        "KINE_LISTEN_ADDRESS": "unix:///tmp/kine.sock",
        "KINE_COMPACT_TIMEOUT": "1m30s",
        "KINE_DEBUG": "true",
    }
    config = load_config(["--listen-address", "0.0.0.0:2379"], env)
    assert config.endpoint == "postgres://u@h/db"
    assert config.listen_address == "0.0.0.0:2379"
    assert config.compact_timeout == 90.0
    assert config.debug is True


def test_bad_values_name_their_source() -> None:
    with pytest.raises(ValueError, match="KINE_COMPACT_TIMEOUT"):
        load_config([], {"KINE_COMPACT_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="--max-txn-ops"):
        load_config(["--max-txn-ops", "-1"], {})


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kine_server", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_help_documents_every_flag_and_its_env() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in FLAGS:
        assert f"--{flag.name}" in result.stdout
        assert flag.env in result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("kine-server: error: ")
    assert text in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("endpoint", "text"),
    [
        ("oracle://root@localhost/db", "unsupported scheme 'oracle'"),
        ("mysql://root@tcp(localhost:99999)/db", "invalid port 99999"),
        ("state.db", "expected sqlite://PATH"),
        ("sqlite://", "no SQLite file path"),
        ("postgres:///db", "no PostgreSQL host"),
    ],
)
def test_malformed_dsn_ends_with_one_line(endpoint: str, text: str) -> None:
    assert_one_line_error(run_cli("--endpoint", endpoint, "--listen-address", "127.0.0.1:0"), text)


@pytest.mark.parametrize(("scheme", "name"), [("postgres", "PostgreSQL"), ("mysql", "MySQL")])
def test_unreachable_database_ends_with_one_line(scheme: str, name: str) -> None:
    port = free_port()  # nothing listens there
    result = run_cli(
        "--endpoint",
        f"{scheme}://kine@127.0.0.1:{port}/db",
        "--listen-address",
        "127.0.0.1:0",
        "--datastore-connect-timeout",  # start-up retries this long (30s by default)
        "1s",
    )
    assert_one_line_error(result, f"cannot open {name} database")
    assert_one_line_error(result, f"cannot reach 127.0.0.1:{port}: connection refused")


def test_busy_port_ends_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli(
            "--endpoint", f"sqlite://{tmp_path}/s.db", "--listen-address", f"127.0.0.1:{port}"
        )
    assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}")


def test_bad_listen_address_ends_with_one_line(tmp_path: Path) -> None:
    result = run_cli("--endpoint", f"sqlite://{tmp_path}/s.db", "--listen-address", "localhost")
    assert_one_line_error(result, "invalid --listen-address")


def test_permission_denied_names_the_owner_and_the_servers_user(tmp_path: Path) -> None:
    """The one line for a database directory the server's user cannot write (a container's
    root-owned bind mount: tests/test_image.py starts that for real; as root, here, the kernel
    refuses nothing, so the error is made)."""
    directory = tmp_path / "db"
    directory.mkdir()
    directory.chmod(0o755)
    denied = PermissionError(13, "Permission denied", str(directory / "state.db"))
    uid, gid = os.getuid(), os.getgid()
    assert permission_hint(denied) == (
        f"permission denied on {directory}/state.db: {directory} belongs to uid {uid}:{gid} "
        f"(mode 0755) and kine-server runs as uid {uid}:{gid}; make it that user's "
        f"(chown {uid}:{gid} {directory})"
    )
    gone = PermissionError(13, "Permission denied", str(tmp_path / "gone" / "state.db"))
    assert permission_hint(gone) == str(gone)  # nothing to say about a directory not there


def test_sigterm_stops_cleanly_and_releases_the_database(tmp_path: Path) -> None:
    endpoint = f"sqlite://{tmp_path}/db/state.db"
    with KineProcess(endpoint, tmp_path) as first:
        assert first.stop() == 0
    assert "Traceback" not in first.log()
    with KineProcess(endpoint, tmp_path) as second:  # the file lock was released
        assert second.stop() == 0


def test_json_logs_are_one_object_per_line(tmp_path: Path) -> None:
    import json

    endpoint = f"sqlite://{tmp_path}/db/state.db"
    with KineProcess(endpoint, tmp_path, "--log-format", "json", "--debug") as kine:
        assert kine.stop() == 0
    lines = [line for line in kine.log().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    assert any("serving etcd v3" in e["msg"] for e in entries)
    assert {"time", "level", "logger", "msg"} <= set(entries[0])


def test_unix_socket_is_private_and_serves_etcdctl(tmp_path: Path) -> None:
    import os
    import stat
    import time

    from tests.test_etcdctl import etcdctl

    socket_path = tmp_path / "kine.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kine_server",
            "--endpoint",
            f"sqlite://{tmp_path}/s.db",
            "--listen-address",
            f"unix://{socket_path}",
            "--metrics-bind-address",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if socket_path.exists():
                break
            time.sleep(0.05)
        assert "[exit 0]" in etcdctl(f"unix://{socket_path}", "put /u 1")  # serving: chmod done
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_slow_transactions_are_logged(tmp_path: Path, workers: str) -> None:
    """Writes by the writer, reads by whichever process serves them (a front-end's too)."""
    from tests.test_etcdctl import etcdctl

    endpoint = f"sqlite://{tmp_path}/s.db"
    flags = ["--slow-sql-threshold", "1ns", "--workers", workers]
    with KineProcess(endpoint, tmp_path, *flags) as kine:
        etcdctl(kine.address, "put /slow 1")
        etcdctl(kine.address, "get /slow")
        assert kine.stop() == 0
    log = kine.log()
    assert "slow write transaction: 1 requests took" in log
    assert "slow read transaction: Range took" in log


async def test_sigterm_ends_streams_and_the_port_is_free_at_once(tmp_path: Path) -> None:
    """Streams end with UNAVAILABLE at shutdown (clients move on), and the restarted server
    binds its port although the old connections wait in TIME_WAIT."""
    import grpc

    from kine_server.pb import rpc_pb2 as pb
    from tests.support.client import connect

    endpoint = f"sqlite://{tmp_path}/db/state.db"
    kine = KineProcess(endpoint, tmp_path)
    kine.start()
    client = connect(kine.address)
    watch = client.watch.Watch()
    await watch.write(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"a")))
    assert (await watch.read()).created
    keepalive = client.lease.LeaseKeepAlive()
    grant = await client.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60))
    await keepalive.write(pb.LeaseKeepAliveRequest(ID=grant.ID))
    assert (await keepalive.read()).TTL == 60
    assert kine.proc is not None
    kine.proc.terminate()
    for call in (watch, keepalive):
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.value.details() == "kine-server: shutting down"
    assert await asyncio.to_thread(kine.proc.wait, 30) == 0
    await client.close()
    again = KineProcess(endpoint, tmp_path)
    again.port, again.address = kine.port, kine.address
    with again:
        assert again.stop() == 0
