"""The real etcdctl binary against a started kine-server, compared with the same commands on etcd."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.etcd import RealEtcd, etcdctl_binary
from tests.support.process import KineProcess

# Each line is one etcdctl invocation; "<<" introduces the standard input of `txn -i`.
SESSION = [
    "put /a 1",
    "put /a 2 --prev-kv",
    "put /b hello",
    "put /c/d x",
    "get /a",
    "get --prefix /",
    "get --prefix / --keys-only",
    "get --prefix / --limit 2 -w json",
    "get / --from-key --sort-by=MODIFY --order=DESCEND",
    "get /a --rev 2",
    "get --prefix / --count-only -w json",
    "del /b --prev-kv",
    "del /nothing",
    "del --prefix /c",
    'txn -i <<mod("/a") > "0"\n\nput /t ok\nget /a\n\nput /t failed\n\n',
    'txn -i -w json <<value("/a") = "nope"\n\nput /t no\n\nget /t\ndel /a\n\n',
    "get --prefix / -w json",
    "compaction 3",
    "get /a --rev 2",
    "get /a --rev 3",
    "compaction 99",
    "put '' x",
]


def etcdctl(endpoint: str, command: str) -> str:
    binary = etcdctl_binary()
    assert binary is not None, "etcdctl not installed (make deps installs it)"
    command, _, stdin = command.partition("<<")
    args = [a.strip("'") for a in command.split()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL")}
    env["ETCDCTL_API"] = "3"
    result = subprocess.run(
        [binary, "--endpoints", endpoint, "--dial-timeout=3s", "--command-timeout=10s", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    out = result.stdout
    if "-w" in args and "json" in args and "{" in out:
        # Drop the ids that legitimately differ between two clusters (txn -i prompts come first).
        prompts, brace, document = out.partition("{")
        doc, end = json.JSONDecoder().raw_decode(brace + document)
        for key in ("cluster_id", "member_id", "raft_term"):
            doc.get("header", {}).pop(key, None)
        out = prompts + json.dumps(doc, sort_keys=True) + (brace + document)[end:]
    # stderr without clientv3's JSON log lines, which carry random client ids and timings.
    errors = [line for line in result.stderr.splitlines() if not line.startswith('{"level"')]
    return f"$ etcdctl {command.strip()} [exit {result.returncode}]\n{out}{chr(10).join(errors)}"


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_etcdctl_session_matches_etcd(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "sqlite":
        endpoint = f"sqlite://{tmp_path}/db/state.db"
    else:
        from tests.conftest import fresh_dsn

        endpoint = fresh_dsn("postgres", tmp_path, request)
    with RealEtcd() as etcd, KineProcess(endpoint, tmp_path) as kine:
        theirs = [etcdctl(etcd.endpoint, c) for c in SESSION]
        ours = [etcdctl(kine.address, c) for c in SESSION]
    assert ours == theirs
    assert "Traceback" not in kine.log()


def test_endpoint_status_health_and_member_list(tmp_path: Path) -> None:
    with KineProcess(f"sqlite://{tmp_path}/s.db", tmp_path) as kine:
        etcdctl(kine.address, "put /x y")
        health = etcdctl(kine.address, "endpoint health")
        status = json.loads(etcdctl(kine.address, "endpoint status -w json").split("\n", 1)[1])
        members = json.loads(etcdctl(kine.address, "member list -w json").split("\n", 1)[1])
        alarms = etcdctl(kine.address, "alarm list")
    assert "[exit 0]" in health
    assert f"{kine.address} is healthy: successfully committed proposal" in health
    (entry,) = status
    assert entry["Endpoint"] == kine.address
    reply = entry["Status"]
    assert reply["version"].startswith("3.5.")
    assert reply["header"]["revision"] == 2
    assert reply["leader"] == reply["header"]["member_id"]
    assert reply["raftIndex"] == reply["raftAppliedIndex"] == 2
    assert reply["dbSize"] > 0
    (member,) = members["members"]
    assert member["ID"] == reply["header"]["member_id"]
    assert member["clientURLs"] == [f"http://{kine.address}"]
    assert alarms.endswith("[exit 0]\n")


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    endpoint = f"sqlite://{tmp_path}/db/state.db"
    kine = KineProcess(endpoint, tmp_path)
    kine.start()
    for i in range(20):
        assert "[exit 0]" in etcdctl(kine.address, f"put /durable/{i} v{i}")
    kine.kill()
    with KineProcess(endpoint, tmp_path) as again:
        listing = etcdctl(again.address, "get --prefix /durable/ --keys-only -w json")
    doc = json.loads(listing.split("\n", 1)[1])
    assert doc["count"] == 20
    assert doc["header"]["revision"] == 21


def test_unimplemented_calls_name_themselves(tmp_path: Path) -> None:
    with KineProcess(f"sqlite://{tmp_path}/s.db", tmp_path) as kine:
        out = etcdctl(kine.address, "member add n1 --peer-urls=http://127.0.0.1:1")
    assert "etcdserverpb.Cluster/MemberAdd is not supported" in out
