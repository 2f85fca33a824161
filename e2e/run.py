#!/usr/bin/env python3
"""End to end: Kubernetes' kube-apiserver running on kine-server, on SQLite and PostgreSQL.

    .venv/bin/python e2e/run.py [--db sqlite|postgres|both] [--kube-apiserver PATH] [--keep]
                                [--no-watch-cache]

For each database this starts kine-server (and, for PostgreSQL, a throwaway PostgreSQL server),
then a kube-apiserver 1.20 on loopback pointed at it (the binary comes from
scripts/kube-apiserver.sh, which builds it once from Debian's source package), and drives the
apiserver's REST API over HTTPS with a static bearer token: namespaces, 1000 configmaps, CRUD with
optimistic concurrency, paginated LIST, WATCH from a resourceVersion across a kine-server restart,
events expiring through leases, the apiserver's own compaction, and clean logs. Every check prints
`PASS name` or `FAIL name: reason`; the last line is `N passed, M failed`, and the exit code is 0
only if nothing failed. Every process started is stopped and the temporary directory removed, also
on failure or Ctrl-C (--keep keeps the directory with the logs).

Standard library only (and the repository's tests/support/postgres.py for PostgreSQL).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import itertools
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EVENT_TTL_S = 20
COMPACTION_INTERVAL_S = 30
N_NAMESPACES = 20
N_CONFIGMAPS = 1000
WORKERS = 16
BULK_LABEL = "e2e-bulk"


# --------------------------------------------------------------------------- results


class Results:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.lock = threading.Lock()

    def ok(self, name: str, note: str = "") -> None:
        with self.lock:
            self.passed += 1
            print(f"PASS {name}" + (f"  ({note})" if note else ""), flush=True)

    def fail(self, name: str, reason: str) -> None:
        with self.lock:
            self.failed += 1
            print(f"FAIL {name}: {reason}", flush=True)


RESULTS = Results()


class CheckFailed(Exception):
    pass


def info(text: str) -> None:
    for line in text.splitlines():
        print(f"     {line}", flush=True)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def free_port() -> int:
    """A free loopback port *below* the kernel's ephemeral range.

    kine-server is restarted on the same port while kube-apiserver's ~70 etcd clients keep
    redialling it; a port inside the ephemeral range can then be taken by one of those dials
    itself (a TCP self-connect: source port == destination port), and the restart fails with
    "Address already in use".
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_until(
    what: str, predicate: Callable[[], bool], timeout: float, every: float = 0.5
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


# --------------------------------------------------------------------------- processes


class Process:
    """A server process with its own session (so Ctrl-C reaches only us) and a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=ROOT,
                start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the process group; returns the exit code of SIGTERM."""
        if self.proc is None:
            return None
        code: int | None = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                code = None
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything it left behind
        if self.proc.poll() is None:
            self.proc.wait()
        return code


class Kine(Process):
    def __init__(self, dsn: str, port: int, log_path: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KINE_")}
        env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
        argv = [
            sys.executable, "-m", "kine_server",
            "--endpoint", dsn,
            "--listen-address", f"127.0.0.1:{port}",
            "--compact-interval", "0",
        ]  # fmt: skip
        help_text = subprocess.run(
            [sys.executable, "-m", "kine_server", "--help"],
            env=env, capture_output=True, text=True, check=False, cwd=ROOT,
        ).stdout  # fmt: skip
        if "--metrics-bind-address" in help_text:
            argv += ["--metrics-bind-address", "0"]  # 8080 may be taken; not needed here
        super().__init__("kine-server", argv, log_path, env)
        self.port = port

    def start_and_wait(self, timeout: float = 30.0) -> None:
        self.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise CheckFailed(f"kine-server exited at start:\n{tail(self.log_path)}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise CheckFailed(f"kine-server not listening after {timeout:.0f}s:\n{tail(self.log_path)}")


def kube_apiserver_binary(explicit: str | None) -> str:
    if explicit:
        return explicit
    if os.environ.get("KUBE_APISERVER"):
        return os.environ["KUBE_APISERVER"]
    print("-- locating kube-apiserver (scripts/kube-apiserver.sh; the first run builds it) --",
          flush=True)  # fmt: skip
    out = subprocess.run(
        [str(ROOT / "scripts" / "kube-apiserver.sh")], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit("e2e: scripts/kube-apiserver.sh failed")
    return out.stdout.strip().splitlines()[-1]


def make_apiserver_files(work: Path, token: str) -> None:
    (work / "tokens.csv").write_text(f"{token},e2e-admin,e2e-admin,system:masters\n")
    subprocess.run(
        ["openssl", "genrsa", "-out", str(work / "sa.key"), "2048"], check=True,
        capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "rsa", "-in", str(work / "sa.key"), "-pubout", "-out", str(work / "sa.pub")],
        check=True, capture_output=True,
    )  # fmt: skip


def apiserver_process(
    binary: str, work: Path, etcd_port: int, port: int, extra: list[str]
) -> Process:
    argv = [
        binary,
        f"--etcd-servers=http://127.0.0.1:{etcd_port}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={port}",
        f"--cert-dir={work / 'certs'}",
        f"--token-auth-file={work / 'tokens.csv'}",
        "--authorization-mode=AlwaysAllow",
        f"--service-account-key-file={work / 'sa.pub'}",
        f"--service-account-signing-key-file={work / 'sa.key'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--endpoint-reconciler-type=none",
        f"--event-ttl={EVENT_TTL_S}s",
        f"--etcd-compaction-interval={COMPACTION_INTERVAL_S}s",
        "--service-cluster-ip-range=10.0.0.0/24",
        "--profiling=false",
        "--vmodule=compact=4",  # logs "etcd: compacted rev (N)" each time its compactor runs
        *extra,
    ]
    env = dict(os.environ)
    env["HOME"] = str(work)
    return Process("kube-apiserver", argv, work / "kube-apiserver.log", env)


# --------------------------------------------------------------------------- REST client


class Api:
    """A tiny Kubernetes REST client: one keep-alive HTTPS connection per thread."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.token = token
        self.ctx = ssl.create_default_context()
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE  # the apiserver's self-signed serving cert
        self.local = threading.local()

    def connection(self, timeout: float | None = 60.0) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, context=self.ctx,
                                           timeout=timeout)  # fmt: skip

    def headers(self, content_type: str | None = None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if content_type:
            h["Content-Type"] = content_type
        return h

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(2):
            conn = getattr(self.local, "conn", None)
            reused = conn is not None
            if conn is None:
                conn = self.local.conn = self.connection()
            try:
                conn.request(method, path, body=data,
                             headers=self.headers(content_type if data is not None else None))  # fmt: skip
                resp = conn.getresponse()
                raw = resp.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                self.local.conn = None
                if attempt or not reused:  # only a stale keep-alive connection is retried
                    raise
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                raise
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")

    def expect(self, status: int, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        got, obj = self.request(method, path, body, **kw)
        if got != status:
            raise CheckFailed(f"{method} {path}: HTTP {got} (expected {status}): {brief(obj)}")
        return obj


def brief(obj: Any) -> str:
    if isinstance(obj, dict) and obj.get("kind") == "Status":
        return f"{obj.get('reason')}: {obj.get('message')}"
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return text[:300]


def cm_body(
    name: str, data: dict[str, str], labels: dict[str, str] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def cms(ns: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{ns}/configmaps" + (f"/{name}" if name else "")


# --------------------------------------------------------------------------- watch


@dataclass
class Seen:
    type: str
    name: str
    rv: int
    data: dict[str, str]


@dataclass
class Watcher:
    """Watches one namespace's configmaps from a resourceVersion, re-watching from the last
    resourceVersion seen whenever the apiserver ends the stream."""

    api: Api
    namespace: str
    rv: int
    events: list[Seen] = field(default_factory=list)
    reconnects: list[str] = field(default_factory=list)
    fatal: str = ""
    stopping: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)
    conn: http.client.HTTPSConnection | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="watch", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        conn = self.conn
        if conn is not None and conn.sock is not None:
            with suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        if self.thread is not None:
            self.thread.join(10)

    def wait_for(self, count: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.events) >= count or bool(self.fatal),
                                      timeout)  # fmt: skip

    def run(self) -> None:
        failing_since: float | None = None
        while not self.stopping:
            path = (f"{cms(self.namespace)}?watch=1&resourceVersion={self.rv}"
                    "&timeoutSeconds=900")  # fmt: skip
            try:
                self.conn = self.api.connection(timeout=120)
                self.conn.request("GET", path, headers=self.api.headers())
                resp = self.conn.getresponse()
                if resp.status != 200:
                    body = resp.read().decode(errors="replace")
                    if resp.status == 410:
                        self.fatal = f"re-watch from {self.rv}: HTTP 410: {body[:300]}"
                        return
                    raise OSError(f"HTTP {resp.status}: {body[:200]}")
                failing_since = None
                while True:
                    line = resp.readline()
                    if not line:
                        raise OSError("stream ended")
                    ev = json.loads(line)
                    obj = ev.get("object", {})
                    if ev.get("type") == "ERROR":
                        if obj.get("code") == 410:
                            self.fatal = f"watch from {self.rv}: ERROR event 410: {brief(obj)}"
                            return
                        raise OSError(f"ERROR event: {brief(obj)}")
                    rv = int(obj["metadata"]["resourceVersion"])
                    if ev.get("type") != "BOOKMARK":
                        seen = Seen(ev["type"], obj["metadata"]["name"], rv, obj.get("data") or {})
                        with self.cond:
                            self.events.append(seen)
                            self.cond.notify_all()
                    self.rv = rv
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if self.stopping:
                    return
                self.reconnects.append(f"after rv {self.rv}: {exc}")
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > 180:
                    self.fatal = f"could not re-watch for 180s: {exc}"
                    return
                time.sleep(0.5)
            finally:
                if self.conn is not None:
                    self.conn.close()


# --------------------------------------------------------------------------- one database


@dataclass
class Expected:
    type: str
    name: str
    rv: int | None  # None for deletes: DELETE answers a Status, not the deletion's revision
    data: dict[str, str] | None


class Suite:
    def __init__(self, db: str, binary: str, base: Path, extra: list[str]) -> None:
        self.extra = extra
        self.db = db
        self.binary = binary
        self.work = base / db
        self.work.mkdir()
        self.token = secrets.token_hex(16)
        self.kine: Kine | None = None
        self.apiserver: Process | None = None
        self.api: Api | None = None
        self.restart_window: tuple[int, int] | None = None  # apiserver log byte offsets
        self.early_rv = 0
        self.early_exact_ok = ""
        self.apiserver_started = 0.0
        self.recovered_at = 0.0  # when the apiserver wrote again after the kine-server restart
        self.event_created = 0.0
        self.namespaces: list[str] = []
        self.bulk: dict[str, str] = {}  # "ns/name" -> uid

    # -- reporting ----------------------------------------------------------

    @contextmanager
    def check(self, name: str) -> Iterator[list[str]]:
        """Run a check's body; exceptions become FAIL. The body may append a note."""
        full = f"{self.db}/{name}"
        note: list[str] = []
        try:
            yield note
        except CheckFailed as exc:
            RESULTS.fail(full, str(exc))
        except Exception as exc:  # every failure is reported, none stops the run
            RESULTS.fail(full, f"{type(exc).__name__}: {exc}")
        else:
            RESULTS.ok(full, "; ".join(note))

    # -- lifecycle -----------------------------------------------------------

    def run(self) -> None:
        print(f"== {self.db} ==", flush=True)
        failed_before = RESULTS.failed
        with ExitStack() as stack:
            dsn = self.start_database(stack)
            if dsn is None:
                return
            ok = False
            with self.check("start"):
                self.kine = Kine(dsn, free_port(), self.work / "kine-server.log")
                stack.callback(self.kine.stop)
                self.kine.start_and_wait()
                make_apiserver_files(self.work, self.token)
                port = free_port()
                self.apiserver = apiserver_process(self.binary, self.work, self.kine.port, port,
                                                   self.extra)  # fmt: skip
                stack.callback(self.apiserver.stop)
                self.apiserver_started = time.monotonic()
                self.apiserver.start()
                self.api = Api(port, self.token)
                self.wait_ready(120)
                ok = True
            if not ok:
                self.dump_logs()
                return
            self.checks()
            self.shutdown_checks()
            if RESULTS.failed > failed_before:
                self.dump_logs()

    def start_database(self, stack: ExitStack) -> str | None:
        if self.db == "sqlite":
            return f"sqlite://{self.work / 'db' / 'state.db'}"
        from tests.support.postgres import ThrowawayPostgres

        with self.check("postgres-start"):
            pg = ThrowawayPostgres()
            pg.start()
            stack.callback(pg.stop)
            # A database that does not exist yet: kine-server creates it.
            base = pg.dsn.rsplit("/", 1)[0]
            return f"{base}/kine_e2e"
        return None

    def wait_ready(self, timeout: float) -> None:
        assert self.api is not None and self.apiserver is not None
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.apiserver.running():
                raise CheckFailed(
                    f"kube-apiserver exited ({self.apiserver.proc.returncode})"  # type: ignore[union-attr]
                    f"; log tail:\n{tail(self.apiserver.log_path)}"
                )
            try:
                status, body = self.api.request("GET", "/readyz")
                if status == 200:
                    return
                last = f"HTTP {status}: {brief(body)}"
            except (OSError, http.client.HTTPException) as exc:
                last = str(exc)
            time.sleep(0.5)
        raise CheckFailed(f"/readyz not ready after {timeout:.0f}s (last: {last}); "
                          f"apiserver log tail:\n{tail(self.apiserver.log_path)}")  # fmt: skip

    def dump_logs(self) -> None:
        for proc in (self.apiserver, self.kine):
            if proc is not None:
                print(f"--- {self.db}: last lines of {proc.log_path.name} ---")
                print(tail(proc.log_path, 30), flush=True)

    # -- the checks ------------------------------------------------------------

    def checks(self) -> None:
        api = self.api
        assert api is not None

        with self.check("early-resource-version"):
            listing = api.expect(200, "GET", "/api/v1/namespaces")
            self.early_rv = int(listing["metadata"]["resourceVersion"])
            exact = api.expect(
                200, "GET",
                f"/api/v1/namespaces?resourceVersion={self.early_rv}&resourceVersionMatch=Exact",
            )  # fmt: skip
            if int(exact["metadata"]["resourceVersion"]) != self.early_rv:
                raise CheckFailed(f"Exact list at {self.early_rv} answered "
                                  f"{exact['metadata']['resourceVersion']}")  # fmt: skip
            note_rv = self.early_rv
            self.early_exact_ok = f"LIST Exact at rv {note_rv} answered 200"

        with self.check("default-namespaces") as note:
            # The apiserver creates them from its bootstrap controllers, after /readyz is fine.
            want = {"default", "kube-system", "kube-public"}
            names: set[str] = set()

            def present() -> bool:
                nonlocal names
                listing = api.expect(200, "GET", "/api/v1/namespaces")
                names = {i["metadata"]["name"] for i in listing["items"]}
                return want <= names

            try:
                wait_until("the default namespaces", present, 60)
            except CheckFailed as exc:
                raise CheckFailed(f"{exc}: missing {sorted(want - names)}, "
                                  f"have {sorted(names)}") from None  # fmt: skip
            note.append(", ".join(sorted(names)))

        with self.check("event-create"):
            api.expect(201, "POST", "/api/v1/namespaces",
                       {"metadata": {"name": "e2e-events"}})  # fmt: skip
            event = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": "e2e-ttl"},
                "involvedObject": {
                    "kind": "ConfigMap",
                    "apiVersion": "v1",
                    "namespace": "e2e-events",
                    "name": "anything",
                },
                "reason": "E2E",
                "message": "expires through a kine-server lease",
                "type": "Normal",
                "firstTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            api.expect(201, "POST", "/api/v1/namespaces/e2e-events/events", event)
            self.event_created = time.monotonic()
            api.expect(200, "GET", "/api/v1/namespaces/e2e-events/events/e2e-ttl")

        with self.check("create-namespaces") as note:
            self.namespaces = [f"e2e-{i:02d}" for i in range(N_NAMESPACES)]
            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
                list(pool.map(lambda n: api.expect(201, "POST", "/api/v1/namespaces",
                                                   {"metadata": {"name": n}}),
                              self.namespaces))  # fmt: skip
            note.append(f"{N_NAMESPACES} in {time.monotonic() - started:.1f}s")

        with self.check("create-configmaps") as note:
            started = time.monotonic()

            def create(i: int) -> tuple[str, str]:
                ns = self.namespaces[i % N_NAMESPACES]
                name = f"cm-{i:04d}"
                obj = api.expect(201, "POST", cms(ns),
                                 cm_body(name, {"i": str(i), "pad": "x" * 200},
                                         {BULK_LABEL: "yes"}))  # fmt: skip
                return f"{ns}/{name}", obj["metadata"]["uid"]

            with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
                self.bulk = dict(pool.map(create, range(N_CONFIGMAPS)))
            took = time.monotonic() - started
            note.append(f"{N_CONFIGMAPS} over {N_NAMESPACES} namespaces by {WORKERS} threads "
                        f"in {took:.1f}s, {N_CONFIGMAPS / took:.0f}/s")  # fmt: skip

        self.crud_checks()

        with self.check("list-pagination") as note:
            self.paginate(note)

        with self.check("event-ttl") as note:
            if not self.event_created:
                raise CheckFailed("no event was created")
            path = "/api/v1/namespaces/e2e-events/events/e2e-ttl"
            deadline = self.event_created + 60 + EVENT_TTL_S
            while True:
                status, body = api.request("GET", path)
                gone_after = time.monotonic() - self.event_created
                if status == 404:
                    break
                if status != 200:
                    raise CheckFailed(f"GET event: HTTP {status}: {brief(body)}")
                if time.monotonic() > deadline:
                    raise CheckFailed(f"event still there {gone_after:.0f}s after creation "
                                      f"(--event-ttl={EVENT_TTL_S}s)")  # fmt: skip
                time.sleep(0.5)
            if gone_after < EVENT_TTL_S - 1:
                raise CheckFailed(f"event gone after {gone_after:.1f}s, before its TTL")
            note.append(f"gone {gone_after:.1f}s after creation (TTL {EVENT_TTL_S}s, "
                        "lease expiry in kine-server)")  # fmt: skip
            # Only this event disappeared: the namespace and its other objects are intact.
            api.expect(200, "GET", "/api/v1/namespaces/e2e-events")

        with self.check("watch-across-restart") as note:
            self.watch_across_restart(note)

        with self.check("compaction") as note:
            self.compaction(note)

    def crud_checks(self) -> None:
        api = self.api
        assert api is not None
        ns = self.namespaces[0]
        state: dict[str, Any] = {}

        with self.check("crud-create-get"):
            created = api.expect(201, "POST", cms(ns), cm_body("crud", {"a": "1"}))
            got = api.expect(200, "GET", cms(ns, "crud"))
            if got["data"] != {"a": "1"} or got["metadata"]["uid"] != created["metadata"]["uid"]:
                raise CheckFailed(f"GET returned {brief(got)}")
            status, body = api.request("POST", cms(ns), cm_body("crud", {"a": "dup"}))
            if status != 409 or body.get("reason") != "AlreadyExists":
                raise CheckFailed(f"duplicate create: HTTP {status} {brief(body)} (want 409)")
            state["v1"] = got

        with self.check("crud-update-current-rv") as note:
            v1 = state["v1"]
            body = dict(v1, data={"a": "2"})
            v2 = api.expect(200, "PUT", cms(ns, "crud"), body)
            rv1, rv2 = (
                int(v1["metadata"]["resourceVersion"]),
                int(v2["metadata"]["resourceVersion"]),
            )
            if rv2 <= rv1 or v2["data"] != {"a": "2"}:
                raise CheckFailed(f"update answered rv {rv2} (was {rv1}), data {v2['data']}")
            note.append(f"rv {rv1} -> {rv2}")
            state["v2"] = v2

        with self.check("crud-update-stale-rv-409") as note:
            stale = dict(state["v1"], data={"a": "stale"})
            status, body = api.request("PUT", cms(ns, "crud"), stale)
            if status != 409 or body.get("reason") != "Conflict":
                raise CheckFailed(f"HTTP {status} {brief(body)} (want 409 Conflict)")
            now = api.expect(200, "GET", cms(ns, "crud"))
            if now["data"] != {"a": "2"}:
                raise CheckFailed(f"the stale update changed the object: {now['data']}")
            note.append(body.get("message", "")[:90])

        with self.check("crud-merge-patch"):
            got = api.expect(200, "PATCH", cms(ns, "crud"), {"data": {"b": "3"}},
                             content_type="application/merge-patch+json")  # fmt: skip
            if got["data"] != {"a": "2", "b": "3"}:
                raise CheckFailed(f"data after patch: {got['data']}")

        with self.check("crud-strategic-merge-patch"):
            got = api.expect(200, "PATCH", cms(ns, "crud"),
                             {"metadata": {"labels": {"patched": "yes"}}, "data": {"a": None}},
                             content_type="application/strategic-merge-patch+json")  # fmt: skip
            if got["data"] != {"b": "3"} or got["metadata"].get("labels") != {"patched": "yes"}:
                raise CheckFailed(f"after patch: data {got['data']}, labels "
                                  f"{got['metadata'].get('labels')}")  # fmt: skip

        with self.check("crud-delete"):
            api.expect(200, "DELETE", cms(ns, "crud"))
            status, body = api.request("GET", cms(ns, "crud"))
            if status != 404:
                raise CheckFailed(f"GET after delete: HTTP {status} {brief(body)}")
            status, body = api.request("DELETE", cms(ns, "crud"))
            if status != 404:
                raise CheckFailed(f"second delete: HTTP {status} {brief(body)}")

    def paginate(self, note: list[str]) -> None:
        api = self.api
        assert api is not None
        seen: dict[str, int] = {}
        bulk_seen: dict[str, str] = {}
        pages = 0
        rvs: set[str] = set()
        cont = ""
        while True:
            query = "limit=100" + (f"&continue={urllib.parse.quote(cont)}" if cont else "")
            page = api.expect(200, "GET", f"/api/v1/configmaps?{query}")
            pages += 1
            items = page["items"]
            cont = page["metadata"].get("continue", "")
            rvs.add(page["metadata"]["resourceVersion"])
            if len(items) > 100 or (cont and len(items) != 100):
                raise CheckFailed(f"page {pages} has {len(items)} items (limit 100), "
                                  f"continue={'yes' if cont else 'no'}")  # fmt: skip
            for item in items:
                uid = item["metadata"]["uid"]
                seen[uid] = seen.get(uid, 0) + 1
                if (item["metadata"].get("labels") or {}).get(BULK_LABEL):
                    key = f"{item['metadata']['namespace']}/{item['metadata']['name']}"
                    bulk_seen[key] = uid
            if not cont:
                break
            if pages > 100:
                raise CheckFailed("more than 100 pages")
        dups = [u for u, n in seen.items() if n > 1]
        if dups:
            raise CheckFailed(f"{len(dups)} objects listed more than once")
        if bulk_seen != self.bulk:
            missing = set(self.bulk) - set(bulk_seen)
            extra = set(bulk_seen) - set(self.bulk)
            raise CheckFailed(f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), "
                              f"{len(extra)} unexpected")  # fmt: skip
        if len(rvs) != 1:
            raise CheckFailed(f"pages answered at different resourceVersions: {sorted(rvs)}")
        # One namespace through the same path, with a label selector.
        ns = self.namespaces[3]
        items = api.expect(200, "GET", f"{cms(ns)}?limit=7&labelSelector={BULK_LABEL}%3Dyes")
        want = sum(1 for k in self.bulk if k.startswith(f"{ns}/"))
        got_n = len(items["items"])
        if got_n != 7 or not items["metadata"].get("continue"):
            raise CheckFailed(f"namespaced page: {got_n} items (want 7 of {want}) ")
        note.append(f"{len(seen)} configmaps in {pages} pages of <=100 at rv "
                    f"{rvs.pop()}, each exactly once, all {len(self.bulk)} bulk ones")  # fmt: skip

    # -- watch across a kine-server restart -------------------------------------

    def write(self, op: str, ns: str, name: str, data: dict[str, str] | None,
              rv: int | None, timeout: float = 180.0) -> Expected:  # fmt: skip
        """One change, retried through a kine-server outage; a retry that finds the first attempt
        committed after all (AlreadyExists, Conflict with our data, NotFound) counts it as done."""
        api = self.api
        assert api is not None
        deadline = time.monotonic() + timeout
        attempts = 0
        while True:
            attempts += 1
            try:
                if op == "create":
                    status, body = api.request("POST", cms(ns), cm_body(name, data or {}))
                    if status == 201:
                        return Expected(
                            "ADDED", name, int(body["metadata"]["resourceVersion"]), data
                        )
                    if status == 409 and attempts > 1:
                        cur = api.expect(200, "GET", cms(ns, name))
                        return Expected(
                            "ADDED", name, int(cur["metadata"]["resourceVersion"]), data
                        )
                elif op == "update":
                    body_in = {**cm_body(name, data or {}),
                               "metadata": {"name": name, "resourceVersion": str(rv)}}  # fmt: skip
                    status, body = api.request("PUT", cms(ns, name), body_in)
                    if status == 200:
                        return Expected("MODIFIED", name, int(body["metadata"]["resourceVersion"]),
                                        data)  # fmt: skip
                    if status == 409 and attempts > 1:
                        cur = api.expect(200, "GET", cms(ns, name))
                        if cur.get("data") == data:
                            return Expected("MODIFIED", name,
                                            int(cur["metadata"]["resourceVersion"]), data)  # fmt: skip
                elif op == "delete":
                    status, body = api.request("DELETE", cms(ns, name))
                    if status == 200 or (status == 404 and attempts > 1):
                        return Expected("DELETED", name, None, None)
                else:
                    raise ValueError(op)
                problem = f"HTTP {status}: {brief(body)}"
                if status < 500 and status != 429:
                    raise CheckFailed(f"{op} {ns}/{name}: {problem}")
            except (OSError, http.client.HTTPException) as exc:
                problem = str(exc)
            if time.monotonic() > deadline:
                raise CheckFailed(f"{op} {ns}/{name} still failing after {timeout:.0f}s: {problem}")
            time.sleep(0.5)

    def changes(self, ns: str, prefix: str, count: int) -> list[Expected]:
        """create `count` configmaps, update each twice, delete every third one."""
        out: list[Expected] = []
        rvs: dict[str, int] = {}
        for i in range(count):
            e = self.write("create", ns, f"{prefix}-{i}", {"v": "0"}, None)
            rvs[e.name] = e.rv or 0
            out.append(e)
        for round_ in (1, 2):
            for i in range(count):
                name = f"{prefix}-{i}"
                e = self.write("update", ns, name, {"v": str(round_)}, rvs[name])
                rvs[name] = e.rv or 0
                out.append(e)
        for i in range(0, count, 3):
            out.append(self.write("delete", ns, f"{prefix}-{i}", None, None))
        return out

    def restart_kine_same_port(self) -> None:
        """Start kine-server again on its port; it must come up at once, as etcd does.

        If it refuses with "Address already in use" (connections of the previous process in
        TIME_WAIT on that port), that is reported as a failure of its own, and the start is
        retried until it works so that the remaining checks still run."""
        kine = self.kine
        assert kine is not None
        name = f"{self.db}/kine-restart-same-port"
        t0 = time.monotonic()
        try:
            kine.start_and_wait()
            RESULTS.ok(name)
            return
        except CheckFailed as exc:
            if "already in use" not in str(exc).lower():
                raise
            first_error = str(exc).strip().splitlines()[-1]
        time_wait = subprocess.run(["ss", "-Htan", "state", "time-wait", f"( sport = :{kine.port} )"],
                                   capture_output=True, text=True, check=False).stdout  # fmt: skip
        while True:
            time.sleep(1)
            try:
                kine.start_and_wait()
                break
            except CheckFailed as exc:
                if "already in use" not in str(exc).lower() or time.monotonic() - t0 > 120:
                    raise
        RESULTS.fail(name, f"{first_error!r} right after the previous kine-server exited "
                           f"(with {len(time_wait.splitlines())} connections in TIME_WAIT on port "
                           f"{kine.port}); it could listen again only "
                           f"{time.monotonic() - t0:.0f}s later")  # fmt: skip

    def watch_across_restart(self, note: list[str]) -> None:
        api, kine, apiserver = self.api, self.kine, self.apiserver
        assert api is not None and kine is not None and apiserver is not None
        ns = "e2e-watch"
        api.expect(201, "POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
        start_rv = int(api.expect(200, "GET", cms(ns))["metadata"]["resourceVersion"])
        watcher = Watcher(api, ns, start_rv)
        watcher.start()
        try:
            expected = self.changes(ns, "before", 10)
            if not watcher.wait_for(len(expected), 30):
                raise CheckFailed(f"before the restart: {len(watcher.events)} of {len(expected)} "
                                  f"events within 30s; {watcher.fatal}")  # fmt: skip

            # Restart kine-server mid-watch, on the same port and database.
            log_start = apiserver.log_path.stat().st_size
            t0 = time.monotonic()
            code = kine.stop()
            stop_took = time.monotonic() - t0
            if code != 0:
                raise CheckFailed(f"kine-server exited {code} on SIGTERM")
            time.sleep(2)  # long enough for the apiserver to notice
            self.restart_kine_same_port()
            restarted = time.monotonic() - t0

            # The first change after the restart waits (with retries) for the apiserver to be
            # back; the window of expected connection errors in its log ends there.
            first = self.write("create", ns, "after-first", {"v": "0"}, None)
            self.recovered_at = time.monotonic()
            recovered = self.recovered_at - t0
            self.restart_window = (log_start, apiserver.log_path.stat().st_size)
            expected.append(first)
            expected += self.changes(ns, "after", 10)
            if not watcher.wait_for(len(expected), 90):
                raise CheckFailed(f"{len(watcher.events)} of {len(expected)} events within 90s "
                                  f"after the restart; {watcher.fatal or 'no error'}; re-watches: "
                                  f"{watcher.reconnects[-3:]}")  # fmt: skip
            time.sleep(1)  # anything extra (a duplicate) would arrive now
        finally:
            watcher.stop()
        if watcher.fatal:
            raise CheckFailed(watcher.fatal)
        got = watcher.events
        problems: list[str] = []
        if len(got) != len(expected):
            problems.append(f"{len(got)} events for {len(expected)} changes")
        for i, (g, e) in enumerate(zip(got, expected, strict=False)):
            if (
                (g.type, g.name) != (e.type, e.name)
                or (e.rv is not None and g.rv != e.rv)
                or (e.data is not None and g.data != e.data)
            ):
                problems.append(f"event {i}: got {g.type} {g.name} rv {g.rv}, "
                                f"want {e.type} {e.name} rv {e.rv}")  # fmt: skip
                break
        rv_list = [g.rv for g in got]
        if any(b <= a for a, b in itertools.pairwise(rv_list)):
            problems.append("resourceVersions not strictly increasing")
        if problems:
            raise CheckFailed("; ".join(problems))
        note.append(f"{len(got)} events in order, none missing or repeated; kine-server "
                    f"exited {stop_took:.1f}s after SIGTERM, restarted after {restarted:.1f}s, "
                    f"apiserver writing again after {recovered:.1f}s; watch re-established "
                    f"{len(watcher.reconnects)}x")  # fmt: skip
        for r in watcher.reconnects:
            info(f"re-watch {r}")

    # -- compaction ------------------------------------------------------------------

    def compaction(self, note: list[str]) -> None:
        api, apiserver = self.api, self.apiserver
        assert api is not None and apiserver is not None
        if not self.early_rv:
            raise CheckFailed("no early resourceVersion recorded")

        # The apiserver's compactor first runs one interval after start (recording the
        # revision), and compacts up to that revision one interval later.
        def compacted_revs() -> list[str]:
            log = apiserver.log_path.read_text(errors="replace")
            return re.findall(r"etcd: compacted rev \((\d+)\)", log)

        path = (f"/api/v1/namespaces?resourceVersion={self.early_rv}"
                "&resourceVersionMatch=Exact")  # fmt: skip
        # An outage (the kine-server restart) delays it: its ticks fail until the apiserver is
        # back, and then it needs up to two more intervals.
        deadline = max(self.apiserver_started + 4 * COMPACTION_INTERVAL_S + 30,
                       self.recovered_at + 3 * COMPACTION_INTERVAL_S + 15)  # fmt: skip
        while True:
            status, body = api.request("GET", path)
            if status == 410:
                break
            if status != 200:
                raise CheckFailed(f"LIST Exact at {self.early_rv}: HTTP {status} {brief(body)}")
            if time.monotonic() > deadline:
                raise CheckFailed(f"LIST Exact at old rv {self.early_rv} still answers 200 "
                                  f"{time.monotonic() - self.apiserver_started:.0f}s after start; "
                                  f"apiserver compactions logged: {compacted_revs()}")  # fmt: skip
            time.sleep(1)
        compacted = compacted_revs()
        if not compacted:
            raise CheckFailed("410 without an 'etcd: compacted rev' line in the apiserver log")
        # Reads at and after the compacted revision keep working.
        current = api.expect(200, "GET", "/api/v1/namespaces")
        rv_now = int(current["metadata"]["resourceVersion"])
        api.expect(200, "GET", f"/api/v1/namespaces?resourceVersion={rv_now}"
                               "&resourceVersionMatch=Exact")  # fmt: skip
        # (A watch from an old resourceVersion is answered by the apiserver's watch cache,
        # not by kine-server, so it proves nothing here.)
        reason = body.get("message", "") if isinstance(body, dict) else ""
        note.append(f"{self.early_exact_ok} before; 410 Gone after the apiserver compacted "
                    f"(compacted revs {', '.join(compacted)}): {reason[:80]}")  # fmt: skip

    # -- logs and shutdown ------------------------------------------------------------

    STORAGE_ERROR = re.compile(
        r"etcd|storage|grpc|transport|clientv3|kine|127\.0\.0\.1:\d+", re.IGNORECASE
    )
    ERRORISH = re.compile(r"error|fail|refused|unavailable|timeout|timed out|panic",
                          re.IGNORECASE)  # fmt: skip

    @staticmethod
    def severity(line: str) -> str:
        """klog's I/W/E/F, or the level of a JSON line (the etcd client logs through zap)."""
        if re.match(r"[IWEF]\d{4} ", line):
            return line[0]
        if line.startswith("{"):
            try:
                level = str(json.loads(line).get("level", ""))
            except ValueError:
                return ""
            return {"warn": "W", "error": "E", "fatal": "F", "panic": "F"}.get(level, "I")
        return ""

    def log_checks(self) -> None:
        apiserver, kine = self.apiserver, self.kine
        assert apiserver is not None and kine is not None
        with self.check("apiserver-log-no-storage-errors") as note:
            raw = apiserver.log_path.read_bytes()
            window = self.restart_window or (len(raw), len(raw))
            outside: list[str] = []
            during: list[str] = []
            offset = 0
            for line in raw.split(b"\n"):
                text = line.decode(errors="replace")
                start = offset
                offset += len(line) + 1
                severity = self.severity(text)
                storage = self.STORAGE_ERROR.search(text) and self.ERRORISH.search(text)
                if not (severity in ("E", "F") or (severity == "W" and storage)):
                    continue
                (during if window[0] <= start < window[1] else outside).append(text)
            note.append(f"{len(during)} warning/error lines during the kine-server restart "
                        "(expected), none outside it")  # fmt: skip
            if during:
                info(f"apiserver log during the restart ({len(during)} lines), e.g.:")
                for text in during[:6]:
                    info("  " + text[:230])
            if outside:
                for text in outside[:15]:
                    info("  " + text[:300])
                raise CheckFailed(f"{len(outside)} error lines outside the restart window "
                                  "(shown above)")  # fmt: skip

        with self.check("kine-log-no-errors") as note:
            kine_lines = kine.log_path.read_text(errors="replace").splitlines()
            bad = [t for t in kine_lines if re.search(r" (ERROR|CRITICAL) |Traceback", t)]
            warnings = [t for t in kine_lines if " WARNING " in t]
            for t in warnings[:5]:
                info("kine warning: " + t[:230])
            if bad:
                for t in bad[:15]:
                    info("  " + t[:300])
                raise CheckFailed(f"{len(bad)} ERROR lines in kine-server's log (shown above)")
            note.append(f"{len(warnings)} warnings")

    def shutdown_checks(self) -> None:
        apiserver, kine = self.apiserver, self.kine
        assert apiserver is not None and kine is not None
        apiserver.stop(30)
        with self.check("kine-clean-shutdown"):
            code = kine.stop()
            if code != 0:
                raise CheckFailed(f"kine-server exited {code} on SIGTERM")
        self.log_checks()


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument(
        "--kube-apiserver", help="binary to use (default: scripts/kube-apiserver.sh)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and logs")
    parser.add_argument("--no-watch-cache", action="store_true",
                        help="run kube-apiserver with --watch-cache=false, so that every client "
                        "watch is a kine-server watch")  # fmt: skip
    args = parser.parse_args()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    base = Path(tempfile.mkdtemp(prefix="kine-e2e-"))
    interrupted = False
    try:
        binary = kube_apiserver_binary(args.kube_apiserver)
        version = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                 check=False).stdout.strip()  # fmt: skip
        print(f"-- {version} ({binary}); work dir {base}", flush=True)
        for db in ["sqlite", "postgres"] if args.db == "both" else [args.db]:
            extra = ["--watch-cache=false"] if args.no_watch_cache else []
            Suite(db, binary, base, extra).run()
    except KeyboardInterrupt:
        interrupted = True
        print("e2e: interrupted; stopping everything", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"-- logs kept in {base}", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(f"{RESULTS.passed} passed, {RESULTS.failed} failed", flush=True)
    return 0 if RESULTS.failed == 0 and not interrupted else 1


if __name__ == "__main__":
    sys.exit(main())
