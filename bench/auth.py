"""What auth costs: Puts from a Go client with auth off and on, kine-server beside a real etcd.

.venv/bin/python bench/auth.py [--load s|m|l] [--workers N] [--roles N]

Each server runs four times on a fresh store: auth off, then auth on with a user that is not
root (so every Put is checked against its roles, not waved through as root's are) and `--roles`
roles of 5 permissions each granted to it, the one that matters last. The load is etcd's own
`etcdctl check perf` (Debian's etcdctl 3.4, a Go client), which signs in once per connection and
sends its token with every Put. Printed: Puts/s, server CPU per Put, and each server's
auth-on/auth-off ratio; then the time of one permission check in-process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src"), str(ROOT / "bench")]

from kinebench.procs import tree_cpu  # noqa: E402

from kine_server.auth.permissions import AuthState, Identity  # noqa: E402
from kine_server.pb import auth_pb2, rpc_pb2  # noqa: E402
from tests.support.etcd import RealEtcd, etcdctl_binary  # noqa: E402
from tests.support.process import KineProcess  # noqa: E402

PREFIX = "/etcdctl-check-perf/"
THROUGHPUT = re.compile(r"Throughput (?:is|too low:) (\d+) writes/s")


def ctl(endpoint: str, *args: str) -> str:
    binary = etcdctl_binary()
    assert binary is not None, "etcdctl not installed (make deps)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    done = subprocess.run(
        [binary, "--endpoints", endpoint, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"etcdctl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def enable_auth(endpoint: str, roles: int) -> list[str]:
    """root, and user `bench` with `roles` roles (the last one the check-perf prefix's)."""
    ctl(endpoint, "user", "add", "root:rootpw")
    ctl(endpoint, "user", "add", "bench:benchpw")
    for number in range(roles):
        role = f"role{number}"
        ctl(endpoint, "role", "add", role)
        if number == roles - 1:
            ctl(endpoint, "role", "grant-permission", role, "readwrite", "--prefix", PREFIX)
        else:
            for perm in range(5):
                key = f"/other/{number}/{perm}/"
                ctl(endpoint, "role", "grant-permission", role, "readwrite", "--prefix", key)
        ctl(endpoint, "user", "grant-role", "bench", role)
    ctl(endpoint, "auth", "enable")
    return ["--user", "bench:benchpw"]


def check_perf(endpoint: str, load: str, user: list[str], tree: int) -> tuple[int, float]:
    """(Puts/s that check perf reached, server CPU ms per Put)."""
    before_cpu = tree_cpu(tree)
    before = revision(endpoint, user)
    out = ctl(endpoint, *user, "check", "perf", f"--load={load}")
    puts = revision(endpoint, user) - before
    cpu = tree_cpu(tree) - before_cpu
    match = THROUGHPUT.search(out)
    return (int(match.group(1)) if match else 0), 1000 * cpu / max(1, puts)


def revision(endpoint: str, user: list[str]) -> int:
    """The store's revision (one per Put), from a Get's header."""
    out = ctl(endpoint, *user, "get", PREFIX, "-w", "json")
    return int(json.loads(out)["header"]["revision"])


def permission_check_time(roles: int) -> float:
    """Microseconds for one check of a non-root user with `roles` roles of 5 prefixes."""
    state = AuthState(enabled=True, revision=1)
    user = auth_pb2.User(name=b"bench", roles=[f"role{n}" for n in range(roles)])
    state.users["bench"] = user
    for number in range(roles):
        role = auth_pb2.Role(name=f"role{number}".encode())
        for perm in range(5):
            key = f"/other/{number}/{perm}/".encode()
            end = key[:-1] + b"0"
            role.keyPermission.add(permType=auth_pb2.Permission.READWRITE, key=key, range_end=end)
        state.roles[f"role{number}"] = role
    who = Identity("bench", 1)
    request = rpc_pb2.PutRequest(key=f"/other/{roles - 1}/4/key".encode())
    state.check(who, request.key, b"", write=True)  # builds the user's ranges once
    runs = 100_000
    seconds = timeit.timeit(lambda: state.check(who, request.key, b"", write=True), number=runs)
    return 1e6 * seconds / runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", default="m", choices=["s", "m", "l"])
    parser.add_argument("--workers", default="0", help="kine-server --workers (0: one per core)")
    parser.add_argument("--roles", type=int, default=20)
    args = parser.parse_args()
    rows: list[tuple[str, str, int, float]] = []
    for server in ("etcd", "kine-server"):
        for auth in (False, True):
            with tempfile.TemporaryDirectory(prefix="bench-auth-") as directory:
                path = Path(directory)
                if server == "etcd":
                    context: RealEtcd | KineProcess = RealEtcd()
                else:
                    dsn = f"sqlite://{path}/db/state.db"
                    context = KineProcess(dsn, path, "--workers", args.workers)
                with context as running:
                    if isinstance(running, RealEtcd):
                        endpoint, tree = running.endpoint, running.pid
                    else:
                        assert running.proc is not None
                        endpoint, tree = running.address, running.proc.pid
                    user = enable_auth(endpoint, args.roles) if auth else []
                    time.sleep(1)
                    ops, cpu = check_perf(endpoint, args.load, user, tree)
            rows.append((server, "on" if auth else "off", ops, cpu))
            print(f"{server:12} auth {rows[-1][1]:3}  {ops:6d} Puts/s  {cpu:.3f} ms CPU/Put")
    print()
    print(f"{'server':12} {'Puts/s off':>10} {'on':>8} {'on/off':>7} {'CPU/Put off':>12} {'on':>8}")
    for server in ("etcd", "kine-server"):
        off, on = (r for r in rows if r[0] == server)
        ratio = on[2] / off[2] if off[2] else float("nan")
        print(f"{server:12} {off[2]:10d} {on[2]:8d} {ratio:7.2f} {off[3]:10.3f}ms {on[3]:6.3f}ms")
    print()
    micros = permission_check_time(args.roles)
    print(f"one permission check, {args.roles} roles of 5 prefixes: {micros:.2f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
