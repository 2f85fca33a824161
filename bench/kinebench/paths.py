"""Where the benchmark lives and where it writes, and its one error type."""

from __future__ import annotations

from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent
ROOT = BENCH.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
RESULTS = BENCH / "results"


class BenchError(Exception):
    """A run cannot go on (a server did not start, a client job failed): reported, then stopped."""
