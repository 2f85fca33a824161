"""`python -m kine_server.healthcheck [PATH]`: ask this container's kine-server whether it is healthy.

The container image has no curl, and Kubernetes' HTTP probes cannot present a client certificate,
which the metrics listener asks for when the server runs with --trusted-ca-file. This probe reads
the same KINE_* environment as the server, so it finds the listener and its TLS settings by
itself: GET PATH (/health by default, or /readyz) on --metrics-bind-address, over loopback, with
the server's own certificate as the client certificate (so that certificate must allow client
authentication too: extendedKeyUsage serverAuth and clientAuth, as kubeadm issues etcd's).

Exit status 0 when the server answers 200, 1 otherwise, with one line saying why: what Docker's
HEALTHCHECK and a Kubernetes exec probe expect. Only the standard library is imported, so a probe
every few seconds costs an interpreter start and no more.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

#: The server's default --metrics-bind-address (kine_server.config.Config), not imported from
#: there: that would load the server's dependencies into every probe.
DEFAULT_METRICS_ADDRESS = "127.0.0.1:8080"
PATHS = ("/health", "/readyz")
TIMEOUT_SECONDS = 5.0
#: Addresses that mean "every interface": the probe reaches them over loopback.
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def probe_url(address: str, tls: bool, path: str) -> str:
    """The URL that reaches a listener bound to `address` (HOST:PORT, :PORT, PORT, [V6]:PORT,
    or an http:// or https:// URL) from inside its own container."""
    scheme = "https" if tls else "http"
    rest = address
    if "://" in address:
        _, _, rest = address.partition("://")
    rest = rest.rstrip("/")
    host, colon, port = rest.rpartition(":")
    if not colon:
        host, port = "", rest
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"KINE_METRICS_BIND_ADDRESS {address!r} has no port to probe")
    if host in WILDCARDS:
        host = "[::1]" if host in ("::", "[::]") else "127.0.0.1"
    return f"{scheme}://{host}:{port}{path}"


def client_context(environ: Mapping[str, str]) -> ssl.SSLContext | None:
    """TLS as the metrics listener serves it: none without KINE_SERVER_CERT_FILE; otherwise the
    server's own pair, presented in case the listener requires client certificates. The server
    is not authenticated: this process asks its own container over loopback."""
    cert = environ.get("KINE_SERVER_CERT_FILE", "")
    if not cert:
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(cert, environ.get("KINE_SERVER_KEY_FILE") or None)
    return context


def check(environ: Mapping[str, str], path: str) -> tuple[bool, str]:
    """Whether the server answers `path` with 200, and a line for the operator."""
    address = environ.get("KINE_METRICS_BIND_ADDRESS", DEFAULT_METRICS_ADDRESS)
    if address in ("", "0"):
        return False, "the metrics listener is disabled (KINE_METRICS_BIND_ADDRESS=0)"
    try:
        context = client_context(environ)
        url = probe_url(address, context is not None, path)
    except (ValueError, OSError) as exc:
        return False, str(exc)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS, context=context) as response:
            return True, f"{url}: {response.status} {response.read().decode(errors='replace')}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code} {exc.read().decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return False, f"{url}: {reason}"


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    path = argv[0] if argv else "/health"
    if len(argv) > 1 or path not in PATHS:
        print(f"usage: python -m kine_server.healthcheck [{'|'.join(PATHS)}]", file=sys.stderr)
        return 2
    healthy, line = check(environ, path)
    print(line, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], os.environ))
