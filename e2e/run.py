#!/usr/bin/env python3
"""End to end: Kubernetes' kube-apiserver running on kine-server, on SQLite and PostgreSQL.

    .venv/bin/python e2e/run.py [--db sqlite|postgres|both] [--kube-apiserver PATH] [--keep]
                                [--no-watch-cache]

The entry point only: it puts the repository and this directory on the import path, then runs
`kubee2e.cli` (the checks are the `e2e/kubee2e` package; see its docstring for the modules).
"""

from __future__ import annotations

import sys
from pathlib import Path

E2E = Path(__file__).resolve().parent
ROOT = E2E.parent
for path in (E2E, ROOT):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from kubee2e.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
