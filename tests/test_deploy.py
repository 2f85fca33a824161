"""What operators deploy: the container image, the Kubernetes manifests, the dashboard and alerts.

No cluster runs here, so the manifests are validated offline against Kubernetes' API schemas
(kubernetes-validate, strict: unknown fields are errors), and what they say about kine-server
(its environment, ports, probes, user) is checked against kine-server itself. The probe they and
the image's HEALTHCHECK run is exercised against real servers; every metric the dashboard and the
alert rules name must appear in a real scrape.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError
from prometheus_client.parser import text_string_to_metric_families

from kine_server import healthcheck
from kine_server.drivers.postgres import with_database
from kine_server.durations import parse_duration
from kine_server.flags import FLAGS, load_config
from kine_server.pb import rpc_pb2 as pb
from tests.support.certs import issue, make_ca
from tests.support.client import Client, connect
from tests.support.faultproxy import FaultProxy, Mode
from tests.support.ports import free_port
from tests.support.postgres import ThrowawayPostgres
from tests.support.process import KineProcess
from tests.support.watching import WatchStream

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
DASHBOARD = DEPLOY / "monitoring" / "grafana-dashboard.json"
RULES = DEPLOY / "monitoring" / "prometheus-rules.yaml"
#: The oldest Kubernetes the bundled schemas cover, and the newest.
KUBERNETES_VERSIONS = ("1.25.0", "1.37.0")
FLAG_ENV = {flag.env for flag in FLAGS}
#: Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"instance", "job"}
IMAGE_UID = 10001
DOCKER_STOP_TIMEOUT = 10.0
#: After --shutdown-grace, the database connections get at most this long to close.
CLOSE_SECONDS = 1.0


# -- schema validation ---------------------------------------------------------------------------


def documents(path: Path) -> list[dict[str, Any]]:
    with open(path) as file:
        return [doc for doc in yaml.safe_load_all(file) if doc]


def schema_errors(path: Path, version: str) -> list[str]:
    """Every way `path`'s objects break the API schema of Kubernetes `version`; a kind the
    schemas do not know is an error too (a typo in apiVersion or kind)."""
    errors = []
    for doc in documents(path):
        name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            errors.append(f"{name}: {where}: {exc.message}")
        except SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message}")
    return errors


def test_the_manifests_are_there() -> None:
    names = {path.name for path in MANIFESTS}
    assert {"sqlite-statefulset.yaml", "postgres-deployment.yaml"} <= names


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_every_manifest_validates_against_the_api_schema(path: Path, version: str) -> None:
    assert schema_errors(path, version) == []


def _break_replicas(docs: list[dict[str, Any]]) -> None:
    workload(docs)["spec"]["replicas"] = "one"


def _break_unknown_field(docs: list[dict[str, Any]]) -> None:
    container(docs)["livenesProbe"] = container(docs).pop("livenessProbe")


def _break_missing_selector(docs: list[dict[str, Any]]) -> None:
    del workload(docs)["spec"]["selector"]


def _break_kind(docs: list[dict[str, Any]]) -> None:
    workload(docs)["kind"] = "StatefullSet"


BREAKAGES = [_break_replicas, _break_unknown_field, _break_missing_selector, _break_kind]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__.removeprefix("_break_"))
def test_a_broken_manifest_is_rejected(breakage: Any, tmp_path: Path) -> None:
    docs = documents(DEPLOY / "kubernetes" / "sqlite-statefulset.yaml")
    breakage(docs)
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(docs))
    assert schema_errors(broken, KUBERNETES_VERSIONS[-1]) != []


# -- what the manifests say about kine-server ---------------------------------------------------


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [found] = [doc for doc in docs if doc["kind"] in ("StatefulSet", "Deployment")]
    return found


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = workload(docs)["spec"]["template"]["spec"]
    return spec


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [found] = pod_spec(docs)["containers"]
    assert isinstance(found, dict)
    return found


def env_values(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's plain env values (those from a Secret as `<secret NAME/KEY>`)."""
    values = {}
    for entry in container(docs)["env"]:
        if "value" in entry:
            values[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            values[entry["name"]] = f"<secret {ref['name']}/{ref['key']}>"
    return values


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


@pytest.fixture(params=MANIFESTS, ids=lambda path: path.name)
def manifest(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return documents(request.param)


def test_every_env_name_is_a_kine_server_flag(manifest: list[dict[str, Any]]) -> None:
    names = [entry["name"] for entry in container(manifest)["env"]]
    assert names and set(names) <= FLAG_ENV, set(names) - FLAG_ENV


def test_the_env_values_are_ones_kine_server_accepts(manifest: list[dict[str, Any]]) -> None:
    plain = {k: v for k, v in env_values(manifest).items() if not v.startswith("<secret")}
    load_config([], plain)  # raises ValueError naming the variable otherwise


def test_ports_match_the_listeners(manifest: list[dict[str, Any]]) -> None:
    env = env_values(manifest)
    ports = {port["name"]: port["containerPort"] for port in container(manifest)["ports"]}
    assert ports == {
        "client": port_of(env["KINE_LISTEN_ADDRESS"]),
        "metrics": port_of(env["KINE_METRICS_BIND_ADDRESS"]),
    }
    # Reachable from other pods: every interface, not loopback.
    assert env["KINE_LISTEN_ADDRESS"].startswith("0.0.0.0:")
    assert env["KINE_METRICS_BIND_ADDRESS"].startswith("0.0.0.0:")
    labels = workload(manifest)["spec"]["template"]["metadata"]["labels"]
    for doc in manifest:
        if doc["kind"] == "Service":
            assert doc["spec"]["selector"].items() <= labels.items()
            assert {p["targetPort"] for p in doc["spec"]["ports"]} <= set(ports)
        if doc["kind"] == "PodDisruptionBudget":
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert workload(manifest)["spec"]["selector"]["matchLabels"].items() <= labels.items()
    kinds = [doc["kind"] for doc in manifest]
    assert kinds.count("Service") == 1 and kinds.count("PodDisruptionBudget") == 1


def test_probes_run_the_healthcheck_on_health_and_readyz(manifest: list[dict[str, Any]]) -> None:
    spec = container(manifest)
    probe = ["python", "-m", "kine_server.healthcheck"]
    assert spec["readinessProbe"]["exec"]["command"] == [*probe, "/readyz"]
    assert spec["livenessProbe"]["exec"]["command"] == [*probe, "/health"]
    assert spec["startupProbe"]["exec"]["command"] == [*probe, "/health"]
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        # The probe's own HTTP timeout must end before Kubernetes gives up on the command.
        assert spec[kind]["timeoutSeconds"] > healthcheck.TIMEOUT_SECONDS
    assert spec["resources"]["requests"].keys() >= {"cpu", "memory"}


def test_tls_comes_from_a_mounted_secret(manifest: list[dict[str, Any]]) -> None:
    env = env_values(manifest)
    spec = pod_spec(manifest)
    secrets = {
        volume["name"]: volume["secret"]["secretName"]
        for volume in spec["volumes"]
        if "secret" in volume
    }
    mounts = {m["mountPath"]: m["name"] for m in container(manifest)["volumeMounts"]}
    for name in ("KINE_SERVER_CERT_FILE", "KINE_SERVER_KEY_FILE", "KINE_TRUSTED_CA_FILE"):
        directory = os.path.dirname(env[name])
        assert mounts.get(directory) in secrets, f"{name} {env[name]} is not in a Secret"


def test_the_pod_runs_as_the_images_user(manifest: list[dict[str, Any]]) -> None:
    context = pod_spec(manifest)["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["fsGroup"]) == (IMAGE_UID,) * 3
    assert f"USER {IMAGE_UID}:{IMAGE_UID}" in dockerfile_lines()
    grace = load_config([], {"KINE_SHUTDOWN_GRACE": image_env()["KINE_SHUTDOWN_GRACE"]})
    assert pod_spec(manifest)["terminationGracePeriodSeconds"] > grace.shutdown_grace + 1


def test_sqlite_is_one_replica_on_a_persistent_volume() -> None:
    docs = documents(DEPLOY / "kubernetes" / "sqlite-statefulset.yaml")
    assert workload(docs)["kind"] == "StatefulSet"
    assert workload(docs)["spec"]["replicas"] == 1
    [claim] = workload(docs)["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    database = env_values(docs)["KINE_ENDPOINT"].removeprefix("sqlite://")
    assert os.path.dirname(database) == mounts[claim["metadata"]["name"]]
    [service] = [doc for doc in docs if doc["kind"] == "Service"]
    assert workload(docs)["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"  # a StatefulSet's governing Service


def test_postgres_is_several_replicas_with_the_dsn_from_a_secret() -> None:
    docs = documents(DEPLOY / "kubernetes" / "postgres-deployment.yaml")
    assert workload(docs)["kind"] == "Deployment"
    assert workload(docs)["spec"]["replicas"] > 1
    assert env_values(docs)["KINE_ENDPOINT"].startswith("<secret ")


# -- the container image --------------------------------------------------------------------------


def dockerfile_lines() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def image_env() -> dict[str, str]:
    """The KINE_* settings the image's ENV lines give the server."""
    lines = [line.removeprefix("ENV ") for line in dockerfile_lines() if line.startswith("ENV ")]
    pairs = dict(pair.split("=", 1) for line in lines for pair in line.split())
    return {name: value for name, value in pairs.items() if name.startswith("KINE_")}


def test_the_image_is_pinned_and_configured_with_kine_server_flags() -> None:
    # Debian 12 and its own Python 3.11 (tests/test_image.py builds the image on a local stand-in
    # of this base, made by debootstrap: the same release).
    [base] = [line for line in dockerfile_lines() if line.startswith("FROM ")]
    assert re.fullmatch(r"FROM debian:bookworm-slim(@sha256:[0-9a-f]{64})?", base), base
    env = image_env()
    assert set(env) <= FLAG_ENV, set(env) - FLAG_ENV
    config = load_config([], env)
    assert config.shutdown_grace + CLOSE_SECONDS < DOCKER_STOP_TIMEOUT
    assert port_of(config.metrics_bind_address) == 8080
    assert config.metrics_bind_address.startswith("0.0.0.0:")
    exposed = [line for line in dockerfile_lines() if line.startswith("EXPOSE ")]
    assert exposed == ["EXPOSE 2379 8080"]
    [check] = [line for line in dockerfile_lines() if line.startswith("HEALTHCHECK ")]
    assert check.endswith('CMD ["python", "-m", "kine_server.healthcheck", "/health"]'), check
    timeout = re.search(r"--timeout=(\S+)", check)
    assert timeout is not None and parse_duration(timeout.group(1)) > healthcheck.TIMEOUT_SECONDS


def proxy_to(postgres: ThrowawayPostgres) -> FaultProxy:
    """A fault proxy in front of the test PostgreSQL."""
    parts = urllib.parse.urlsplit(postgres.dsn)
    return FaultProxy(parts.port or 5432, parts.hostname or "127.0.0.1")


@pytest.fixture
def postgres_dsn(postgres: ThrowawayPostgres) -> str:
    return with_database(postgres.dsn, f"kine_{uuid.uuid4().hex[:12]}")


async def sigterm_with_a_stuck_put(
    kine: KineProcess, client: Client
) -> tuple[int, float, BaseException | pb.PutResponse]:
    """Send a Put the database will not answer, SIGTERM the server while it waits: (exit code,
    seconds SIGTERM took, what the Put got)."""
    assert kine.proc is not None
    put = asyncio.ensure_future(
        client.kv.Put(pb.PutRequest(key=b"/g/stuck", value=b"v"), timeout=120)
    )
    await asyncio.sleep(0.5)  # the Put reaches the server and waits on the database
    assert not put.done()
    began = time.monotonic()
    kine.proc.terminate()
    code = await asyncio.to_thread(kine.proc.wait, 60)
    took = time.monotonic() - began
    outcome: BaseException | pb.PutResponse
    [outcome] = await asyncio.gather(put, return_exceptions=True)
    return code, took, outcome


async def test_shutdown_grace_bounds_sigterm_with_a_request_stuck_on_the_database(
    postgres: ThrowawayPostgres, postgres_dsn: str, tmp_path: Path
) -> None:
    """What `docker stop` relies on: with --shutdown-grace below its 10 s, a request that the
    database never answers (a partition) is cut off in time instead of the server being killed."""
    grace = 1.0
    flags = ["--shutdown-grace", "1s", "--datastore-timeout", "5m", "--workers", "1"]
    with (
        proxy_to(postgres) as proxy,
        KineProcess(proxy.dsn(postgres_dsn), tmp_path, *flags) as kine,
    ):
        assert kine.proc is not None
        client = connect(kine.address)
        await client.kv.Put(pb.PutRequest(key=b"/g/before", value=b"v"))
        proxy.set_mode(Mode.BLACKHOLE)
        code, took, outcome = await sigterm_with_a_stuck_put(kine, client)
        await client.close()
        proxy.set_mode(Mode.FORWARD)
    assert code == 0, kine.log()
    assert isinstance(outcome, grpc.aio.AioRpcError), outcome
    assert outcome.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    # Far from the default grace (10 s): the flag, not the default, bounded the stop.
    assert took < grace + CLOSE_SECONDS + 5, f"SIGTERM took {took:.1f}s"


async def test_shutdown_grace_bounds_sigterm_while_another_process_holds_the_sqlite_lock(
    tmp_path: Path,
) -> None:
    """A Put waiting for SQLite's write lock, held by another process (a backup, the sqlite3
    shell): SQLite's 30 s busy timeout held SIGTERM for 30 s whatever the grace."""
    grace = 1.0
    database = tmp_path / "state.db"
    flags = ["--shutdown-grace", "1s", "--workers", "1"]
    with KineProcess(f"sqlite://{database}", tmp_path, *flags) as kine:
        assert kine.proc is not None
        client = connect(kine.address)
        await client.kv.Put(pb.PutRequest(key=b"/g/before", value=b"v"))
        holder = sqlite3.connect(database, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # SQLite's one write lock, held
        try:
            code, took, outcome = await sigterm_with_a_stuck_put(kine, client)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await client.close()
    assert code == 0, kine.log()
    assert isinstance(outcome, grpc.aio.AioRpcError), outcome
    assert took < grace + CLOSE_SECONDS + 5, f"SIGTERM took {took:.1f}s"


# -- the probe, against real servers --------------------------------------------------------------


def run_probe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m kine_server.healthcheck` as the HEALTHCHECK runs it, with only `env`'s KINE_*."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KINE_")}
    return subprocess.run(
        [sys.executable, "-m", "kine_server.healthcheck", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_probe_finds_the_listener_however_its_address_is_written(tmp_path: Path) -> None:
    port = free_port()
    flags = ["--metrics-bind-address", f"127.0.0.1:{port}"]
    with KineProcess(f"sqlite://{tmp_path}/db/state.db", tmp_path, *flags):
        for address in (f"127.0.0.1:{port}", f"0.0.0.0:{port}", f":{port}", str(port)):
            for path in ("/health", "/readyz"):
                result = run_probe({"KINE_METRICS_BIND_ADDRESS": address}, path)
                assert result.returncode == 0, (address, path, result.stderr)
                assert '"health":"true"' in result.stdout
        assert run_probe({"KINE_METRICS_BIND_ADDRESS": f"http://127.0.0.1:{port}"}).returncode == 0


def test_the_probe_fails_with_one_line_when_nothing_answers() -> None:
    port = free_port()
    result = run_probe({"KINE_METRICS_BIND_ADDRESS": f"127.0.0.1:{port}"})
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1
    assert f"http://127.0.0.1:{port}/health" in result.stderr
    disabled = run_probe({"KINE_METRICS_BIND_ADDRESS": "0"})
    assert disabled.returncode == 1 and "disabled" in disabled.stderr
    assert run_probe({}, "/metrics").returncode == 2  # not a health path


def test_the_probe_presents_the_servers_certificate_under_mutual_tls(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "pki", "ca")
    server = issue(ca, tmp_path / "pki", "server", server=True, client_too=True)
    port = free_port()
    env = {
        "KINE_SERVER_CERT_FILE": str(server.cert),
        "KINE_SERVER_KEY_FILE": str(server.key),
        "KINE_TRUSTED_CA_FILE": str(ca.cert),
        "KINE_METRICS_BIND_ADDRESS": f"0.0.0.0:{port}",
    }
    flags = [
        *("--server-cert-file", str(server.cert), "--server-key-file", str(server.key)),
        *("--trusted-ca-file", str(ca.cert), "--metrics-bind-address", f"127.0.0.1:{port}"),
    ]
    with KineProcess(f"sqlite://{tmp_path}/db/state.db", tmp_path, *flags):
        result = run_probe(env, "/readyz")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"https://127.0.0.1:{port}/readyz: 200")
        # Without the certificate the listener refuses the probe: it is not fooled into "healthy".
        plain = {"KINE_METRICS_BIND_ADDRESS": env["KINE_METRICS_BIND_ADDRESS"]}
        assert run_probe(plain).returncode == 1


def scrape(port: int) -> dict[str, list[dict[str, str]]]:
    """Every sample name in a real GET /metrics, with the label sets it has."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(dict(sample.labels))
    return samples


def gauge(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no {name} in the scrape")


def test_an_unreachable_database_fails_the_probe_and_shows_in_the_metrics(
    postgres: ThrowawayPostgres, postgres_dsn: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {"KINE_METRICS_BIND_ADDRESS": f"127.0.0.1:{port}"}
    flags = ["--metrics-bind-address", f"127.0.0.1:{port}"]
    with (
        proxy_to(postgres) as proxy,
        KineProcess(proxy.dsn(postgres_dsn), tmp_path, *flags),
    ):
        assert run_probe(env).returncode == 0
        assert gauge(port, "kine_database_up") == 1
        proxy.set_mode(Mode.RESET)
        result = run_probe(env)
        assert result.returncode == 1
        assert "503" in result.stderr and "database unavailable" in result.stderr
        assert gauge(port, "kine_database_up") == 0
        proxy.set_mode(Mode.FORWARD)
        # The pool reconnects by itself; a few probes at most.
        for _ in range(50):
            if run_probe(env).returncode == 0:
                break
        assert gauge(port, "kine_database_up") == 1


# -- the dashboard and the alert rules ------------------------------------------------------------

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
PROMQL_KEYWORDS |= {"and", "or", "unless", "bool", "offset"}


def dashboard_expressions() -> Iterator[str]:
    dashboard = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            yield variable["query"]["query"]


def rules() -> list[dict[str, Any]]:
    with open(RULES) as file:
        groups = yaml.safe_load(file)["groups"]
    return [rule for group in groups for rule in group["rules"]]


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """The metric names an expression reads, each with the labels its matchers name; fails on
    a name that is no kine-server metric (an `up` or a typo the regexes would not notice)."""
    found = []
    for match in re.finditer(r"\b(kine_[a-z0-9_]+)\s*(\{[^}]*\})?", expr):
        labels = set(re.findall(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", match.group(2) or ""))
        found.append((match.group(1), labels))
    rest = re.sub(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]|\$\w+', " ", expr)
    rest = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", rest)
    for word in re.finditer(r"\b([a-zA-Z_:][\w:]*)\b(\s*\()?", rest):
        name, call = word.group(1), word.group(2)
        if call or name in PROMQL_KEYWORDS or name.startswith("kine_"):
            continue
        if name == "instance" and "label_values" in expr:  # label_values(METRIC, LABEL)
            continue
        raise AssertionError(f"{name!r} in {expr!r} is not a kine-server metric")
    return found


def grouping_labels(expr: str) -> set[str]:
    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    return labels


def test_the_expression_check_catches_what_does_not_exist() -> None:
    assert selectors('rate(kine_nope_total{code="OK"}[5m])') == [("kine_nope_total", {"code"})]
    with pytest.raises(AssertionError, match="'up'"):
        selectors("up == 0")
    assert grouping_labels("sum by (le, method) (x)") == {"le", "method"}


def test_the_rules_are_well_formed() -> None:
    alerts = {rule["alert"]: rule for rule in rules()}
    assert {"KineDatabaseUnreachable", "KineNoSpaceAlarm", "KineCompactionFailing"} <= set(alerts)
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if "for" in rule:
            assert parse_duration(rule["for"]) > 0
        assert selectors(rule["expr"])


async def test_every_metric_the_dashboard_and_rules_name_is_served(tmp_path: Path) -> None:
    port = free_port()
    flags = ["--metrics-bind-address", f"127.0.0.1:{port}"]
    with KineProcess(f"sqlite://{tmp_path}/db/state.db", tmp_path, *flags) as kine:
        client = connect(kine.address)
        for i in range(5):
            await client.kv.Put(pb.PutRequest(key=b"/d/%d" % i, value=b"v"))
        stream = WatchStream(client)
        await stream.create(b"/d/", b"/d0")
        assert await stream.read() is not None
        put = await client.kv.Put(pb.PutRequest(key=b"/d/x", value=b"v"))
        await client.kv.Compact(pb.CompactionRequest(revision=put.header.revision))
        await client.lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60))
        served = await asyncio.to_thread(scrape, port)
        await stream.close()
        await client.close()
    expressions = [*dashboard_expressions(), *(rule["expr"] for rule in rules())]
    used: set[str] = set()
    for expr in expressions:
        names = selectors(expr)
        assert names, f"{expr!r} reads no kine-server metric"
        for name, labels in names:
            assert name in served, f"{name} (in {expr!r}) is not in a real scrape"
            present = {label for series in served[name] for label in series}
            assert labels - TARGET_LABELS <= present, (name, labels, present)
            used.add(name)
        grouped = grouping_labels(expr) - TARGET_LABELS
        present = {label for name, _ in names for series in served[name] for label in series}
        assert grouped <= present, (expr, grouped, present)
    # What the issue asks the dashboard and rules to cover.
    for name in (
        "kine_grpc_requests_total",
        "kine_grpc_request_seconds_bucket",
        "kine_write_batch_requests_bucket",
        "kine_revision",
        "kine_compact_revision",
        "kine_db_size_bytes",
        "kine_watchers",
        "kine_compaction_failures_total",
        "kine_alarm_nospace",
        "kine_database_up",
    ):
        assert name in used, f"{name} is on neither the dashboard nor in the rules"
