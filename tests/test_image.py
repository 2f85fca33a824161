"""The container image, built from the project's Dockerfile and run with podman as the README
runs it: etcdctl through the published port, the HEALTHCHECK, the user, SIGTERM, a restart, a
volume the server cannot write, /metrics, and K3s's move onto kine-server (`kine-server import`
in the image, then a real kube-apiserver over mutual TLS, as K3s runs it). Then the systemd
unit under a real systemd, in a container made from the image, installed by the README's
commands.

Behind the `image` marker (`make image-test`, run by .ci/run): the first run installs podman and
makes its base image (scripts/podman-setup.sh), and the build fetches Python packages. As root.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.kube_apiserver import KubeApiserver
from tests.support.podman import ROOT, Podman
from tests.support.ports import free_port
from tests.support.process import KineProcess
from tests.test_deploy import image_env
from tests.test_kine_import import make_sqlite_kine

pytestmark = pytest.mark.image

UID = 10001
#: Where K3s keeps its kine database; the import reads it there, as the README says.
K3S_DB = "/var/lib/rancher/k3s/server/db"
#: Mozilla's roots as Debian's ca-certificates installs them on this host.
MOZILLA = Path("/usr/share/ca-certificates/mozilla")


def build_bundle() -> Path | None:
    """The CA bundle pip uses on this host, given to the build as a secret: on a network with a
    TLS-intercepting proxy its CA is only there."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    debian = Path("/etc/ssl/certs/ca-certificates.crt")
    return debian if debian.is_file() else None


@pytest.fixture(scope="module")
def podman() -> Podman:
    return Podman.set_up()


@pytest.fixture(scope="module")
def image(podman: Podman) -> Iterator[str]:
    """The Dockerfile, built as the README builds it (--format docker keeps the HEALTHCHECK)."""
    tag = f"localhost/kine-server:test-{os.getpid()}"
    secret = [] if (bundle := build_bundle()) is None else ["--secret", f"id=pip-cert,src={bundle}"]
    began = time.monotonic()
    podman.run(
        "build", "--pull=never", "--format", "docker", *secret, "-t", tag, str(ROOT), timeout=900
    )
    print(f"image built in {time.monotonic() - began:.0f}s")
    yield tag
    podman.run("rmi", "-f", tag, check=False)


def owned_directory(path: Path, uid: int = UID, mode: int = 0o700) -> Path:
    path.mkdir(parents=True)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


def etcdctl(port: int, *args: str, pki: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL")}
    env["ETCDCTL_API"] = "3"
    scheme = "http"
    if pki is not None:
        scheme = "https"
        env |= {"ETCDCTL_CACERT": f"{pki}/ca.crt", "ETCDCTL_CERT": f"{pki}/client.crt"}
        env["ETCDCTL_KEY"] = f"{pki}/client.key"
    return subprocess.run(
        ["etcdctl", f"--endpoints={scheme}://127.0.0.1:{port}", "--dial-timeout=3s", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def wait_serving(podman: Podman, name: str, port: int, pki: Path | None = None) -> None:
    deadline = time.monotonic() + 90
    while (health := etcdctl(port, "endpoint", "health", pki=pki)).returncode != 0:
        state = podman.inspect(name)["State"]
        assert state["Running"], f"the container exited {state['ExitCode']}:\n{podman.logs(name)}"
        assert time.monotonic() < deadline, f"not serving: {health.stderr}\n{podman.logs(name)}"
        time.sleep(0.5)


def get(port: int, key: str, pki: Path | None = None) -> dict[str, Any]:
    done = etcdctl(port, "get", key, "-w", "json", pki=pki)
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def put(port: int, key: str, value: str) -> int:
    done = etcdctl(port, "put", key, value, "-w", "json")
    assert done.returncode == 0, done.stderr
    revision: int = json.loads(done.stdout)["header"]["revision"]
    return revision


def ids(pid: int) -> tuple[list[str], list[str]]:
    """A process's real, effective, saved and filesystem uids, and gids, as the host sees them."""
    status = Path(f"/proc/{pid}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    gids = re.search(r"^Gid:\s+(.*)$", status, re.M)
    assert uids and gids
    return uids.group(1).split(), gids.group(1).split()


def healthcheck(podman: Podman, name: str) -> tuple[int, str]:
    """`podman healthcheck run`: there is no systemd here to run the HEALTHCHECK on its timer."""
    done = podman.run("healthcheck", "run", name, check=False)
    return done.returncode, podman.inspect(name)["State"]["Health"]["Status"]


# -- what the image is ----------------------------------------------------------------------------


def pem_certificates(text: str) -> list[bytes]:
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", text, re.S)
    return [base64.b64decode("".join(block.split())) for block in blocks]


def files_under(root: Path) -> Iterator[Path]:
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                yield path


def test_the_image_is_configured_as_the_dockerfile_says(podman: Podman, image: str) -> None:
    described = podman.inspect(image)
    config = described["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["kine-server"]
    assert set(config["ExposedPorts"]) == {"2379/tcp", "8080/tcp"}
    assert set(config["Volumes"]) == {"/db"}
    assert config["StopSignal"] in ("SIGTERM", "15")
    probe = ["CMD", "python", "-m", "kine_server.healthcheck", "/health"]
    assert described["Healthcheck"]["Test"] == probe  # kept: --format docker
    env = dict(pair.split("=", 1) for pair in config["Env"])
    assert {k: v for k, v in env.items() if k.startswith("KINE_")} == image_env()
    assert not [k for k in env if k.startswith(("PIP", "SSL", "REQUESTS"))], env


def test_the_image_keeps_no_certificate_of_the_builds_secret(podman: Podman, image: str) -> None:
    """pip's CA bundle reached the build as a secret: none of its certificates that are not
    Mozilla's public roots (the proxy's own CA, others this host added) may be anywhere in the
    image."""
    bundle = build_bundle()
    if bundle is None:
        pytest.skip("this build had no CA bundle to leak")
    public = {der for path in MOZILLA.glob("*.crt") for der in pem_certificates(path.read_text())}
    foreign = [der for der in pem_certificates(bundle.read_text()) if der not in public]
    if not public or not foreign:
        pytest.skip(f"no public roots in {MOZILLA} to tell local CAs by, or no local CA")
    rootfs = Path(podman.run("image", "mount", image).stdout.strip())
    try:
        # Found in a file as PEM (its first line of base64) or as DER.
        needles = [base64.b64encode(der)[:64] for der in foreign] + foreign
        leaks = [
            str(path.relative_to(rootfs))
            for path in files_under(rootfs)
            if any(needle in path.read_bytes() for needle in needles)
        ]
        assert leaks == []
        secrets = rootfs / "run" / "secrets"
        assert not secrets.exists() or not any(secrets.iterdir())
        # The needles are what a PEM file holds: the bundle itself is found by them.
        assert all(base64.b64encode(der)[:64] in bundle.read_bytes() for der in foreign)
    finally:
        podman.run("image", "unmount", image, check=False)


# -- running it -----------------------------------------------------------------------------------


def test_the_image_serves_stops_cleanly_and_keeps_its_data(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    """The README's `podman run`: a bind mount owned by 10001, etcdctl and /metrics through the
    published ports, the HEALTHCHECK; `podman stop` (SIGTERM) exits 0 with the WAL written into
    the database file; a new container on the same directory has the data, confined as the
    Kubernetes manifests confine it."""
    data = owned_directory(tmp_path / "data")
    port, metrics = free_port(), free_port()
    published = ["-p", f"127.0.0.1:{port}:2379", "-p", f"127.0.0.1:{metrics}:8080"]
    with podman.container(image, *published, "-v", f"{data}:/db") as name:
        wait_serving(podman, name, port)
        revision = put(port, "/image/a", "1")
        [kv] = get(port, "/image/a")["kvs"]
        assert base64.b64decode(kv["value"]) == b"1" and kv["mod_revision"] == revision
        assert healthcheck(podman, name) == (0, "healthy")
        # The server, and with the default --workers its front-ends, run as 10001 on the host.
        pid = podman.inspect(name)["State"]["Pid"]
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert children, "no front-end processes"
        for process in [pid, *map(int, children)]:
            assert ids(process) == ([str(UID)] * 4, [str(UID)] * 4)
        assert {(p.stat().st_uid, p.stat().st_gid) for p in data.iterdir()} == {(UID, UID)}
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as answer:
            scraped = answer.read().decode()
        assert f"kine_revision {float(revision)}" in scraped.splitlines()
        stop = podman.run("stop", name)  # SIGTERM; SIGKILL after 10 s would make it 137
        assert stop.returncode == 0
        state = podman.inspect(name)["State"]
        assert state["ExitCode"] == 0, podman.logs(name)
        assert "kine-server shutting down" in podman.logs(name)
    # Checkpointed: the database file alone holds the write.
    wal = data / "state.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(data / "state.db", alone / "state.db")
    with KineProcess(f"sqlite://{alone}/state.db", tmp_path, "--workers", "1") as copy:
        [kv] = get(copy.port, "/image/a")["kvs"]
        assert base64.b64decode(kv["value"]) == b"1" and kv["mod_revision"] == revision
    # Again, confined as deploy/kubernetes/ runs it: a read-only root, /tmp for --workers'
    # socket, no capabilities, no privilege escalation.
    confined = ["--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL"]
    confined += ["--security-opt", "no-new-privileges", "-p", f"127.0.0.1:{port}:2379"]
    with podman.container(image, *confined, "-v", f"{data}:/db") as again:
        wait_serving(podman, again, port)
        [kv] = get(port, "/image/a")["kvs"]
        assert base64.b64decode(kv["value"]) == b"1" and kv["mod_revision"] == revision
        assert put(port, "/image/b", "2") == revision + 1


def test_a_volume_the_server_cannot_write_fails_with_one_line(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    data = owned_directory(tmp_path / "root-owned", uid=0, mode=0o755)
    with podman.container(image, "-v", f"{data}:/db") as name:
        assert podman.wait(name) == 1
        lines = [line for line in podman.logs(name).splitlines() if line.strip()]
    assert lines == [
        "kine-server: error: cannot open SQLite database /db/state.db: permission denied on "
        "/db/state.db: /db belongs to uid 0:0 (mode 0755) and kine-server runs as uid "
        "10001:10001; make it that user's (chown 10001:10001 /db)"
    ]


# -- K3s moving onto kine-server ------------------------------------------------------------------


def k8s(kind: str, name: str, namespace: str = "", data: dict[str, str] | None = None) -> bytes:
    """A Kubernetes object as JSON, which kube-apiserver reads from storage as it reads its
    protobuf (K3s's database holds either)."""
    metadata = {"name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{name}"))}
    metadata["creationTimestamp"] = "2026-01-01T00:00:00Z"
    if namespace:
        metadata["namespace"] = namespace
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": metadata}
    if data is not None:
        obj["data"] = data
    if kind == "Namespace":
        obj |= {"spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}
    return json.dumps(obj).encode()


CM = "/registry/configmaps/k3s-import/"
#: What K3s's kine database holds (kine's row shapes: tests/test_kine_import.py), revision by
#: revision: (op, key, value, ttl; for "compact", the revision kine compacted through).
K3S_HISTORY: list[tuple[str, str, bytes, int]] = [
    ("create", "/registry/namespaces/k3s-import", k8s("Namespace", "k3s-import"), 0),  # 2
    ("create", CM + "kept", k8s("ConfigMap", "kept", "k3s-import", {"v": "1"}), 0),  # 3
    ("create", CM + "gone", k8s("ConfigMap", "gone", "k3s-import", {"v": "x"}), 0),  # 4
    ("update", CM + "kept", k8s("ConfigMap", "kept", "k3s-import", {"v": "2"}), 0),  # 5
    ("gap", "", b"", 0),  # 6
    ("delete", CM + "gone", b"", 0),  # 7
    ("update", CM + "kept", k8s("ConfigMap", "kept", "k3s-import", {"v": "3"}), 0),  # 8
    ("compact", "", b"", 7),
    ("create", CM + "late", k8s("ConfigMap", "late", "k3s-import", {"v": "l"}), 0),  # 9
]


def readme_commands(start: str) -> list[str]:
    """The shell commands of the README's code block from the line that begins with `start`
    on: one per command (continuation lines joined), comments dropped."""
    readme = (ROOT / "README.md").read_text()
    found = re.search(rf"^{re.escape(start)}", readme, re.M)
    assert found is not None, f"no line {start!r} in README.md"
    block = readme[found.start() :].split("```")[0].replace("\\\n", "")
    return [re.sub(r"\s+#.*$", "", line) for line in block.splitlines() if not line.startswith("#")]


def as_root(command: str) -> str:
    return command.replace("sudo ", "")  # the README's commands, where root runs them


def readme_pki_commands() -> list[str]:
    """The README's commands that make the certificates (its "With client certificates" block,
    from `mkdir pki && cd pki` to the chown): the test makes them as an operator would."""
    block = readme_commands("mkdir pki && cd pki")
    commands = [line for line in block if line.startswith(("openssl ", "printf "))]
    assert len(commands) == 7, commands
    return commands


def make_pki(directory: Path) -> Path:
    """`pki/` as the README makes it: a CA, kine-server's certificate (server and client auth:
    the HEALTHCHECK presents it), kube-apiserver's client one; the server's key given to 10001."""
    directory.mkdir(mode=0o755)
    for command in readme_pki_commands():
        subprocess.run(["bash", "-c", command], cwd=directory, check=True, capture_output=True)
    os.chown(directory / "server.key", UID, 0)  # the README's `sudo chown 10001 server.key`
    return directory


def test_k3s_moves_onto_the_container_with_every_resource_version(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    """The README's K3s steps: K3s stopped, its kine database imported by the image's
    `kine-server import`, the container started with client certificates, and kube-apiserver
    started with the flags K3s gives it for an external etcd (--etcd-servers=https://...,
    --etcd-cafile, --etcd-certfile, --etcd-keyfile): K3s's objects come back with the
    resourceVersions they had, and optimistic concurrency goes on from them."""
    k3s = tmp_path / "k3s-db"
    k3s.mkdir(mode=0o700)
    make_sqlite_kine(k3s / "state.db", K3S_HISTORY)
    data = tmp_path / "kine-server"
    data.mkdir()
    mounts = ["-v", f"{k3s}:{K3S_DB}:ro", "-v", f"{data}:/db"]
    command = ["import", "--from", f"sqlite://{K3S_DB}/state.db"]
    imported = podman.run("run", "--rm", "--pull=never", "--user", "0", *mounts, image, *command)
    assert imported.stdout.startswith("imported revision 9 into sqlite /db/state.db"), imported
    subprocess.run(["chown", "-R", f"{UID}:{UID}", str(data)], check=True)
    pki = make_pki(tmp_path / "pki")
    port = free_port()
    tls = ["-v", f"{pki}:/pki:ro", "-e", "KINE_SERVER_CERT_FILE=/pki/server.crt"]
    tls += ["-e", "KINE_SERVER_KEY_FILE=/pki/server.key", "-e", "KINE_TRUSTED_CA_FILE=/pki/ca.crt"]
    with podman.container(image, "-p", f"127.0.0.1:{port}:2379", "-v", f"{data}:/db", *tls) as name:
        wait_serving(podman, name, port, pki)
        assert healthcheck(podman, name) == (0, "healthy")  # it presented its certificate
        plain = etcdctl(port, "endpoint", "health", f"--cacert={pki}/ca.crt")
        assert plain.returncode != 0  # no client certificate, no service
        flags = [
            f"--etcd-servers=https://127.0.0.1:{port}",
            f"--etcd-cafile={pki}/ca.crt",
            f"--etcd-certfile={pki}/client.crt",
            f"--etcd-keyfile={pki}/client.key",
        ]
        with KubeApiserver(tmp_path / "apiserver", flags) as api:
            base = "/api/v1/namespaces/k3s-import/configmaps"
            kept = api.expect(200, "GET", f"{base}/kept")
            assert (kept["metadata"]["resourceVersion"], kept["data"]) == ("8", {"v": "3"})
            late = api.expect(200, "GET", f"{base}/late")
            assert late["metadata"]["resourceVersion"] == "9"
            api.expect(404, "GET", f"{base}/gone")
            listed = api.expect(200, "GET", base)
            assert sorted(item["metadata"]["name"] for item in listed["items"]) == ["kept", "late"]
            assert int(listed["metadata"]["resourceVersion"]) >= 9
            api.expect(200, "GET", "/api/v1/namespaces/k3s-import")
            # A write on K3s's resourceVersion is accepted; the same one again is stale.
            kept["data"] = {"v": "4"}
            updated = api.expect(200, "PUT", f"{base}/kept", kept)
            assert int(updated["metadata"]["resourceVersion"]) > 9
            api.expect(409, "PUT", f"{base}/kept", kept)
        [kv] = get(port, CM + "kept", pki)["kvs"]
        assert str(kv["mod_revision"]) == updated["metadata"]["resourceVersion"]
        assert kv["create_revision"] == 3  # K3s's create revision, kept
        assert podman.run("stop", name).returncode == 0
        assert podman.inspect(name)["State"]["ExitCode"] == 0


# -- the systemd unit, under a real systemd -------------------------------------------------------

SYSTEMD_IMAGE = """\
FROM {image}
USER 0
RUN apt-get update && apt-get install -y --no-install-recommends systemd \\
    && apt-get clean && rm -rf /var/lib/apt/lists/*
WORKDIR /root/checkout
COPY . .
RUN {install}
ENTRYPOINT ["/lib/systemd/systemd"]
"""


def systemctl_show(podman: Podman, name: str, *properties: str) -> dict[str, str]:
    shown = podman.run("exec", name, "systemctl", "show", "kine-server", "-p", ",".join(properties))
    return dict(line.split("=", 1) for line in shown.stdout.splitlines())


def test_the_unit_serves_under_systemd_and_takes_k3s_data(
    podman: Podman, image: str, tmp_path: Path
) -> None:
    """systemd as PID 1 in a container made from the image (its virtualenv is the unit's
    /opt/kine-server), the README's install commands run as written, then `systemctl enable
    --now`, which returns once kine-server said READY=1, in the unit's sandbox; then the README's
    K3s steps for the host service (stop, import, chown, start) and `systemctl stop`."""
    install = readme_commands(
        "sudo python3 -m venv /opt/kine-server && sudo /opt/kine-server/bin/pip install ."
    )
    assert install[-2:] == [
        "sudo systemctl daemon-reload && sudo systemctl enable --now kine-server",
        "systemctl status kine-server",
    ]
    context = tmp_path / "checkout"
    shutil.copytree(ROOT / "deploy" / "systemd", context / "deploy" / "systemd")
    make_pki(context / "pki")
    steps = " && ".join(as_root(command) for command in install[1:-2])
    (context / "Containerfile").write_text(SYSTEMD_IMAGE.format(image=image, install=steps))
    tag = f"{image}-systemd"
    podman.run("build", "--pull=never", "--format", "docker", "-t", tag, str(context), timeout=600)
    k3s = tmp_path / "k3s-db"
    k3s.mkdir(mode=0o700)
    make_sqlite_kine(k3s / "state.db", K3S_HISTORY)
    pki, port = context / "pki", free_port()
    options = ["--systemd=always", "-p", f"127.0.0.1:{port}:2379", "-v", f"{k3s}:{K3S_DB}:ro"]
    try:
        with podman.container(tag, *options) as name:
            deadline = time.monotonic() + 60
            while podman.run(
                "exec", name, "systemctl", "is-system-running", check=False
            ).stdout.strip() not in ("running", "degraded"):
                assert time.monotonic() < deadline, podman.logs(name)
                time.sleep(0.5)
            podman.run("exec", name, "sh", "-c", as_root(install[-2]), timeout=300)
            shown = systemctl_show(podman, name, "ActiveState", "SubState", "StatusText", "MainPID")
            assert (shown["ActiveState"], shown["SubState"], shown["StatusText"]) == (
                "active",
                "running",
                "serving",
            )
            main = shown["MainPID"]
            status = podman.run("exec", name, "cat", f"/proc/{main}/status").stdout
            assert re.search(r"^NoNewPrivs:\s+1$", status, re.M) and re.search(
                r"^Seccomp:\s+2$", status, re.M
            )
            owner = podman.run("exec", name, "stat", "-c", "%U", f"/proc/{main}").stdout.strip()
            assert owner == "kine-server"
            assert etcdctl(port, "endpoint", "health", pki=pki).returncode == 0
            k3s_steps = readme_commands("sudo systemctl stop k3s")
            host = [
                c
                for c in k3s_steps
                if "kine-server:kine-server" in c
                or "stop kine-server" in c
                or "bin/kine-server import" in c
            ]
            assert len(host) == 3, k3s_steps
            for command in host:
                done = podman.run("exec", name, "sh", "-c", as_root(command), timeout=300)
                if "import" in command:
                    assert done.stdout.startswith(
                        "imported revision 9 into sqlite /var/lib/kine-server/state.db"
                    ), done
            assert systemctl_show(podman, name, "StatusText")["StatusText"] == "serving"
            [kv] = get(port, CM + "kept", pki)["kvs"]
            assert (kv["create_revision"], kv["mod_revision"]) == (3, 8)
            podman.run("exec", name, "systemctl", "stop", "kine-server", timeout=120)
            stopped = systemctl_show(podman, name, "Result", "ExecMainStatus", "ActiveState")
            assert stopped == {
                "Result": "success",
                "ExecMainStatus": "0",
                "ActiveState": "inactive",
            }
    finally:
        podman.run("rmi", "-f", tag, check=False)
