"""The `kine-server` command: parse the flags, set up logging, and run what was asked for.

`kine-server [FLAGS]` serves (kine_server/process/), `kine-server restore` and `kine-server
import` load data into an empty store (migrate.py), and `kine-server frontend` is a `--workers`
front-end process, started by the writer process only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from kine_server import migrate
from kine_server.config import Config
from kine_server.flags import load_config
from kine_server.process.allocator import keep_freed_memory
from kine_server.process.run import serve, serve_frontend
from kine_server.process.startup import StartupError


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the fields log collectors expect."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler()
    if config.log_format == "json":
        handler.setFormatter(JsonFormatter())
        logging.Formatter.converter = time.gmtime
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if config.debug else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    keep_freed_memory(os.environ)
    if argv and argv[0] == "restore":
        return migrate.restore_command(argv[1:], dict(os.environ))
    if argv and argv[0] == "import":
        return migrate.import_command(argv[1:], dict(os.environ))
    if argv and argv[0] == "frontend":
        return frontend(argv[1:], dict(os.environ))
    try:
        config = load_config(argv, dict(os.environ))
    except ValueError as exc:
        print(f"kine-server: error: {exc}", file=sys.stderr)
        return 1
    setup_logging(config)
    try:
        asyncio.run(serve(config, argv))
    except StartupError as exc:
        print(f"kine-server: error: {exc}", file=sys.stderr)
        return 1
    return 0


def frontend(argv: Sequence[str], environ: dict[str, str]) -> int:
    """`kine-server frontend SOCKET N FLAGS...`: front-end process N of `--workers`, started
    by the writer process (not a command for operators)."""
    if len(argv) < 2 or not argv[1].isdigit():
        print("kine-server frontend: started by kine-server --workers only", file=sys.stderr)
        return 2
    socket_path, worker = argv[0], int(argv[1])
    try:
        config = load_config(argv[2:], environ)
    except ValueError as exc:
        print(f"kine-server: error: {exc}", file=sys.stderr)
        return 1
    setup_logging(config)
    try:
        asyncio.run(serve_frontend(config, socket_path, worker))
    except StartupError as exc:
        print(f"kine-server: error: {exc}", file=sys.stderr)
        return 1
    return 0
