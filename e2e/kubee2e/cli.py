"""End to end: Kubernetes' kube-apiserver running on kine-server, on SQLite, PostgreSQL and MariaDB.

    .venv/bin/python e2e/run.py [--db sqlite|postgres|mysql|both|all] [--kube-apiserver PATH]
                                [--keep] [--no-watch-cache]

For each database this starts kine-server (and, for PostgreSQL and MariaDB, a throwaway server),
then a kube-apiserver 1.20 on loopback pointed at it (the binary comes from
scripts/kube-apiserver.sh, which builds it once from Debian's source package), and drives the
apiserver's REST API over HTTPS with a static bearer token: namespaces, 1000 configmaps, CRUD with
optimistic concurrency, paginated LIST, WATCH from a resourceVersion across a kine-server restart,
events expiring through leases, the apiserver's own compaction, and clean logs. Every check prints
`PASS name` or `FAIL name: reason`; the last line is `N passed, M failed`, and the exit code is 0
only if nothing failed. Every process started is stopped and the temporary directory removed, also
on failure or Ctrl-C (--keep keeps the directory with the logs).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from .apiserver import ApiserverUnavailable, binary_version, kube_apiserver_binary
from .outcome import Results
from .suite import Suite

DATABASES = ["sqlite", "postgres", "mysql"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--db",
        choices=[*DATABASES, "both", "all"],
        default="all",
        help="one database; both: sqlite and postgres; all: every one (default)",
    )
    parser.add_argument(
        "--kube-apiserver", help="binary to use (default: scripts/kube-apiserver.sh)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and logs")
    parser.add_argument(
        "--no-watch-cache",
        action="store_true",
        help="run kube-apiserver with --watch-cache=false, so that every client watch is a "
        "kine-server watch",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    results = Results()
    base = Path(tempfile.mkdtemp(prefix="kine-e2e-"))
    interrupted = False
    try:
        try:
            binary = kube_apiserver_binary(args.kube_apiserver)
        except ApiserverUnavailable as exc:
            sys.stderr.write(str(exc))
            raise SystemExit("e2e: scripts/kube-apiserver.sh failed") from None
        print(f"-- {binary_version(binary)} ({binary}); work dir {base}", flush=True)
        chosen = {"both": ["sqlite", "postgres"], "all": DATABASES}.get(args.db, [args.db])
        for db in chosen:
            extra = ["--watch-cache=false"] if args.no_watch_cache else []
            Suite(db, binary, base, extra, results).run()
    except KeyboardInterrupt:
        interrupted = True
        print("e2e: interrupted; stopping everything", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"-- logs kept in {base}", flush=True)
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(f"{results.passed} passed, {results.failed} failed", flush=True)
    return 0 if results.failed == 0 and not interrupted else 1
