"""Server settings: one dataclass, filled from flags and KINE_* environment variables by cli.py."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kine_server import addresses
from kine_server.addresses import Address
from kine_server.drivers import DEFAULT_ENDPOINT

#: etcd's default --max-request-bytes (1.5 MiB).
DEFAULT_MAX_REQUEST_BYTES = 1536 * 1024
#: etcd allows this much on top of --max-request-bytes at the gRPC layer before refusing a message.
GRPC_OVERHEAD_BYTES = 512 * 1024
#: A 3.5 release new enough that kube-apiserver may rely on watch progress requests.
DEFAULT_ETCD_VERSION = "3.5.16"


@dataclass
class Config:
    endpoint: str = DEFAULT_ENDPOINT
    #: --listen-address, or etcd's --listen-client-urls: comma-separated, one gRPC port each.
    listen_address: str = "127.0.0.1:2379"
    #: etcd's flag: the URLs MemberList reports; empty: the listen URLs (see advertise_urls).
    advertise_client_urls: str = ""
    #: The member name (etcd's --name); empty: this host's name.
    name: str = ""
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_txn_ops: int = 128
    #: etcd's default quota: 2 GiB.
    quota_backend_bytes: int = 2 * 1024**3
    emulated_etcd_version: str = DEFAULT_ETCD_VERSION
    watch_progress_notify_interval: float = 5.0
    server_cert_file: str = ""
    server_key_file: str = ""
    trusted_ca_file: str = ""
    #: etcd's --auth-token: "simple", or "jwt,pub-key=F,priv-key=F,sign-method=M[,ttl=D]".
    auth_token: str = "simple"
    #: etcd's --auth-token-ttl: how long a simple token lives after its last use.
    auth_token_ttl: float = 300.0
    #: etcd's --bcrypt-cost for the password hashes.
    bcrypt_cost: int = 10
    metrics_bind_address: str = "127.0.0.1:8080"
    #: etcd's HTTP/JSON gateway: http://HOST:PORT (https:// with TLS); empty: not served.
    listen_gateway_urls: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    skip_verify: bool = False
    poll_interval: float = 1.0
    poll_batch_size: int = 500
    compact_interval: float = 300.0
    compact_interval_jitter: int = 0
    compact_min_retain: int = 1000
    compact_batch_size: int = 1000
    compact_timeout: float = 5.0
    shutdown_grace: float = 10.0
    #: PostgreSQL: connecting, waiting for a pooled connection and each statement give up after
    #: this long (kine_server.drivers.postgres.DEFAULT_TIMEOUT says why 10 s).
    datastore_timeout: float = 10.0
    #: How long start-up keeps trying to reach an unreachable database (a database started at
    #: the same time as the server, by compose or a pod, needs a moment).
    datastore_connect_timeout: float = 30.0
    debug: bool = False
    log_format: str = "plain"
    slow_sql_threshold: float = 1.0
    #: Processes serving gRPC (--workers); 0: one per core this process may run on. With more
    #: than one, a writer process owns the database's writes and N front-ends serve clients.
    workers: int = 0

    def worker_count(self) -> int:
        """How many front-end processes to run: 1 means everything in this one process.

        A unix socket cannot be shared between processes as a TCP port is (SO_REUSEPORT), so
        it is always served by one.
        """
        if any(address.is_unix for address in self.listen_addresses()):
            return 1
        return self.workers or available_cores()

    def listen_addresses(self) -> list[Address]:
        """The gRPC listeners (ValueError naming the flag if malformed)."""
        return _parsed("--listen-address", self.listen_address, parse_urls)

    def metrics_address(self) -> Address | None:
        """The metrics listener's address; None when disabled ("0" or empty)."""
        if self.metrics_bind_address.strip() in ("", "0"):
            return None
        return _parsed("--metrics-bind-address", self.metrics_bind_address, _parse_tcp)

    def advertise_urls(self, listening: list[Address]) -> list[str]:
        """What MemberList reports: --advertise-client-urls, or else each listener's URL (with
        its bound port) where every-interface hosts become this host's outward address."""
        tls = bool(self.server_cert_file)
        if self.advertise_client_urls:
            given = _parsed("--advertise-client-urls", self.advertise_client_urls, parse_urls)
            return [address.url(tls) for address in given]
        return [addresses.advertised(address, tls) for address in listening]

    def member_name(self) -> str:
        return self.name or socket.gethostname()


def _parse_tcp(text: str) -> Address:
    return addresses.parse(text, unix=False)


def parse_urls(text: str) -> list[Address]:
    return addresses.parse_list(text, unix=True)


T = TypeVar("T")


def _parsed(flag: str, text: str, parse: Callable[[str], T]) -> T:
    try:
        return parse(text)
    except ValueError as exc:
        raise ValueError(f"invalid {flag} {text!r}: {exc}") from None


def available_cores(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The cores this process may use: its CPU affinity (taskset, cpusets), further limited by
    a cgroup v2 CPU quota (a container run with `--cpus 2` on a 16-core host gets 2)."""
    cores = max(1, len(os.sched_getaffinity(0)))
    try:
        with open(cpu_max) as file:
            quota, period = file.read().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, -(-int(quota) // int(period))))
