"""Allows `python -m kine_server`."""

from kine_server.cli import main

raise SystemExit(main())
