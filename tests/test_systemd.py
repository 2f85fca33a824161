"""kine-server as a systemd service: the unit in deploy/systemd/, checked offline by systemd's own
tools (`systemd-analyze verify` and `security`, `systemd-sysusers`), and the readiness protocol
against a fake $NOTIFY_SOCKET, with real servers: READY=1 must mean a client is served.

systemd itself is not PID 1 where these tests run, so nothing here starts the unit.
"""

from __future__ import annotations

import configparser
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kine_server import sd_notify
from kine_server.flags import FLAGS, load_config
from kine_server.durations import parse_duration
from kine_server.pb import rpc_pb2 as pb
from kine_server.pb import rpc_pb2_grpc
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "kine-server.service"
ENV_FILE = SYSTEMD / "kine-server.env"
SYSUSERS = SYSTEMD / "kine-server.sysusers"
#: After --shutdown-grace, the database connections get at most this long to close.
CLOSE_SECONDS = 1.0
#: The units systemd ships (sysinit.target, ...), which verify loads with the one it checks.
SYSTEM_UNITS = Path("/lib/systemd/system")
#: Where the unit's header and the README install the server (a virtualenv, as in the image).
INSTALLED = "/opt/kine-server/bin/kine-server"


def unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)  # SystemCallFilter= appears twice
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser


def env_file() -> dict[str, str]:
    lines = ENV_FILE.read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {name: value for name, value in pairs}


def systemd_tool(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} missing: Debian's systemd package (make deps installs it)"
    return path


# -- the unit, offline ----------------------------------------------------------------------------


def verify(unit_text: str, tmp_path: Path) -> str:
    """`systemd-analyze verify` of `unit_text` installed as the README installs it, in a root
    of its own (the host's unit library, the server at /opt/kine-server: verify checks that
    ExecStart exists); everything it says."""
    root = tmp_path / f"root-{uuid.uuid4().hex[:6]}"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system/kine-server.service").write_text(unit_text)
    # A copy: a symlink to it would resolve inside the root, to itself.
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    binary = root / INSTALLED.lstrip("/")
    binary.parent.mkdir(parents=True)
    shutil.copy2(Path(sys.executable).parent / "kine-server", binary)  # a link resolves in root
    done = subprocess.run(
        [systemd_tool("systemd-analyze"), "verify", f"--root={root}", "kine-server.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return f"[exit {done.returncode}] {done.stdout}{done.stderr}".strip()


def test_the_unit_verifies(tmp_path: Path) -> None:
    assert verify(UNIT.read_text(), tmp_path) == "[exit 0]"
    # The check sees a mistake: systemd only warns about an unknown value, and goes on.
    broken = UNIT.read_text().replace("Type=notify", "Type=notifyy")
    assert "Failed to parse service type" in verify(broken, tmp_path)


def test_the_unit_is_hardened() -> None:
    service = unit()["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    assert service["User"] == "kine-server" and service["StateDirectory"] == "kine-server"
    assert service["Restart"] == "on-failure"
    assert service["ExecStart"] == INSTALLED
    # systemd's own scoring of the sandbox: exposure at most 2.0 of 10 ("OK").
    done = subprocess.run(
        [systemd_tool("systemd-analyze"), "security", "--offline=yes", "--threshold=20", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=SYSTEMD,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr


def test_the_env_file_is_kine_server_settings_within_the_stop_timeout() -> None:
    env = env_file()
    assert set(env) <= {flag.env for flag in FLAGS}, set(env) - {flag.env for flag in FLAGS}
    config = load_config([], env)  # raises ValueError naming a variable it refuses
    service = unit()["Service"]
    assert service["EnvironmentFile"] == "/etc/kine-server/kine-server.env"
    # systemd kills the server if it has not stopped by then: after the grace and the close.
    assert parse_duration(service["TimeoutStopSec"]) > config.shutdown_grace + CLOSE_SECONDS
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    # The database lives in the unit's StateDirectory, which ProtectSystem=strict leaves writable.
    state = f"/var/lib/{service['StateDirectory']}/"
    assert config.endpoint.removeprefix("sqlite://").startswith(state), config.endpoint
    assert config.server_cert_file and config.trusted_ca_file  # clients with certificates only


def test_the_sysusers_file_makes_the_units_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    for name in ("passwd", "group"):
        (tmp_path / "etc" / name).touch()
    done = subprocess.run(
        [systemd_tool("systemd-sysusers"), f"--root={tmp_path}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    [entry] = (tmp_path / "etc/passwd").read_text().splitlines()
    name, _, uid, gid, _, home, shell = entry.split(":")
    service = unit()["Service"]
    assert (name, home) == (service["User"], f"/var/lib/{service['StateDirectory']}")
    assert int(uid) < 1000 and shell == "/usr/sbin/nologin"
    assert f"{service['Group']}:x:{gid}:" in (tmp_path / "etc/group").read_text()


# -- the protocol ---------------------------------------------------------------------------------


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A fake systemd's notification socket: (the socket, its NOTIFY_SOCKET value)."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(120)
        yield sock, str(path)


def test_a_notification_is_one_datagram_of_assignments(
    listener: tuple[socket.socket, str],
) -> None:
    sock, path = listener
    assert sd_notify.notify({"NOTIFY_SOCKET": path}, "READY=1", "STATUS=serving")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving"


def test_an_abstract_socket_is_named_with_an_at_sign() -> None:
    name = f"kine-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert sd_notify.notify({"NOTIFY_SOCKET": "@" + name}, "STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_without_a_socket_nothing_is_sent_and_nothing_fails(tmp_path: Path) -> None:
    assert not sd_notify.notify({}, "READY=1")
    assert not sd_notify.notify({"NOTIFY_SOCKET": ""}, "READY=1")
    assert not sd_notify.notify({"NOTIFY_SOCKET": "vsock:2:1234"}, "READY=1")
    assert not sd_notify.notify({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}, "READY=1")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ready_means_a_client_is_served_and_stopping_comes_with_sigterm(
    workers: str, listener: tuple[socket.socket, str], tmp_path: Path
) -> None:
    """A fake systemd: the moment READY=1 arrives, one Put with no retry (gRPC fails it at once
    when nothing listens) must be served; with --workers 2 too, where the writer process starts
    its front-ends before it notifies. SIGTERM then brings STOPPING=1 and a clean exit."""
    sock, path = listener
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KINE_")}
    env["NOTIFY_SOCKET"] = path
    command = [sys.executable, "-m", "kine_server", "--endpoint", f"sqlite://{tmp_path}/state.db"]
    command += ["--listen-address", f"127.0.0.1:{port}", "--metrics-bind-address", "0"]
    command += ["--workers", workers]
    log = tmp_path / "kine.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        ready = sock.recv(4096).decode().split("\n")
        assert ready == ["READY=1", "STATUS=serving"], (ready, log.read_text())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            kv = rpc_pb2_grpc.KVStub(channel)
            put = kv.Put(pb.PutRequest(key=b"/ready", value=b"served"), timeout=30)
            got = kv.Range(pb.RangeRequest(key=b"/ready"), timeout=30)
        assert got.kvs[0].value == b"served" and got.header.revision == put.header.revision
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096).decode().split("\n") == ["STOPPING=1", "STATUS=shutting down"]
        assert proc.wait(60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # front-ends a failure left behind
