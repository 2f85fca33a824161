"""Server settings: one dataclass, filled from flags and KINE_* environment variables by cli.py."""

from __future__ import annotations

import os
from dataclasses import dataclass

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
    listen_address: str = "127.0.0.1:2379"
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_txn_ops: int = 128
    #: etcd's default quota: 2 GiB.
    quota_backend_bytes: int = 2 * 1024**3
    emulated_etcd_version: str = DEFAULT_ETCD_VERSION
    watch_progress_notify_interval: float = 5.0
    server_cert_file: str = ""
    server_key_file: str = ""
    trusted_ca_file: str = ""
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
        if self.listen_address.startswith("unix://"):
            return 1
        return self.workers or available_cores()


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
