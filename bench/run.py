#!/usr/bin/env python3
"""kine-server against a real etcd: the same workloads on both, one table (see bench/README.md).

    .venv/bin/python bench/run.py              # kine-server on SQLite vs etcd
    .venv/bin/python bench/run.py --pg         # and kine-server on PostgreSQL
    .venv/bin/python bench/run.py --compare bench/results/OLD.json

The entry point only: it finds the project's venv and the import paths, then runs
`kinebench.cli` (the benchmark itself is the `bench/kinebench` package).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"

if __name__ == "__main__" and VENV_PYTHON.exists() and Path(sys.prefix) != ROOT / ".venv":
    # grpcio and the stubs live in the project's venv; the client processes must use it too.
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])

# bench/ for kinebench and loadgen, e2e/ for kubee2e (the kube-apiserver launcher and client).
for path in (BENCH, ROOT / "e2e", ROOT, ROOT / "src"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from kinebench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
