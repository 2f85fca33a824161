"""Loopback port allocation for throwaway test servers."""

from __future__ import annotations

import socket


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The kernel picks the port, so parallel test runs do not collide on a fixed
    number.  There is an unavoidable window between closing this socket and the
    server binding the port; callers that need certainty must retry.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
