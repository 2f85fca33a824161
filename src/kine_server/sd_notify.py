"""systemd's readiness protocol (sd_notify(3)), for a `Type=notify` unit.

With `Type=notify`, systemd counts the service as started only when it says READY=1, so units
ordered after it (K3s pointed at this server) start once clients are served, not once the process
exists; STOPPING=1 shows the shutdown in `systemctl status` while the grace runs.

The protocol is one datagram of newline-separated `KEY=VALUE` lines sent to the unix socket that
$NOTIFY_SOCKET names (a path, or an abstract name written with a leading "@"): a few lines here
rather than a dependency. Without $NOTIFY_SOCKET (not started by systemd, or not `Type=notify`)
nothing is sent. The variable is left in the environment: the --workers front-ends inherit it but
never send, and the unit's NotifyAccess=main would ignore them if they did.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: A datagram to a systemd that reads its socket is delivered at once; this only bounds a stuck one.
SEND_TIMEOUT = 1.0


def socket_address(environ: Mapping[str, str]) -> str | None:
    """The address $NOTIFY_SOCKET names, in the form `socket.sendto` takes; None when unset or
    of a kind this does not speak (systemd also knows vsock, for virtual machines)."""
    name = environ.get("NOTIFY_SOCKET", "")
    if name.startswith("@"):
        return "\0" + name[1:]  # Linux's abstract namespace
    if name.startswith("/"):
        return name
    if name:
        log.warning("NOTIFY_SOCKET=%s is not a unix socket: systemd is not notified", name)
    return None


def notify(environ: Mapping[str, str], *assignments: str) -> bool:
    """Send `assignments` ("READY=1", "STATUS=...") as one message; whether it was sent. A
    failure is logged, not raised: the server serves all the same, and systemd, not hearing
    READY=1, fails the start after its TimeoutStartSec."""
    address = socket_address(environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto("\n".join(assignments).encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", environ["NOTIFY_SOCKET"], exc)
        return False
    return True


async def serving_until(stop: asyncio.Event, environ: Mapping[str, str]) -> None:
    """READY=1, wait for `stop`, STOPPING=1. Awaited once the server's start() has returned,
    when a client that connects is served: the port listens and the store is open, and with
    --workers at least one front-end process serves it."""
    notify(environ, "READY=1", "STATUS=serving")
    await stop.wait()
    notify(environ, "STOPPING=1", "STATUS=shutting down")
