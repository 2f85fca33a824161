"""Database servers started by the tests as root (CI) run as an unprivileged user instead:
PostgreSQL and MariaDB refuse to run as root."""

from __future__ import annotations

import os
import pwd


def run_as(user: str) -> tuple[list[str], tuple[int, int] | None]:
    """As root: the command prefix that runs a program as `user`, and the (uid, gid) that must
    own its data directory. Otherwise nothing to prefix and nothing to change."""
    if os.geteuid() != 0:
        return [], None
    entry = pwd.getpwnam(user)
    return ["runuser", "-u", user, "--"], (entry.pw_uid, entry.pw_gid)
