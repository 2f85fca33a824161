#!/usr/bin/env python3
"""The floor: an etcd v3 gRPC server that stores nothing, to measure what Python's gRPC alone
allows on this machine.

    .venv/bin/python bench/floor.py --listen 127.0.0.1:23790 [--procs 2]

Put, Txn, Range, DeleteRange and Compact are answered with a canned response (a Txn always
takes its Then branch with one Put's answer, a Range finds nothing); nothing is validated or
kept. Maintenance.Status and Cluster.MemberList answer enough for etcdctl and clients to
connect; everything else is UNIMPLEMENTED. With `--procs N`, N processes serve the same port
(SO_REUSEPORT: the kernel spreads connections over them, as kine-server's --workers
front-ends).

It is a fair floor for kine-server because it pays what kine-server's gRPC layer pays and
nothing more: the same grpcio asyncio server with the same server options, the generated
servicers registered the same way (kine-server's `_Services`: one generic handler per service,
not grpcio's registered-method path, which waits on a future per method for every call), each
request deserialized and each response built and serialized with a header.

The one thing it keeps is a count of the writes (Put, Txn) of all its processes, in shared
memory; every header's revision is 1 + that count, so a client sees a revision grow by one per
write as on etcd, and the benchmark counts a Go client's Puts from it as it does on etcd.

It prints `floor: serving ...` once every process listens, and exits 0 on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

import grpc  # noqa: E402

from kine_server.pb import rpc_pb2, rpc_pb2_grpc  # noqa: E402

CLUSTER_ID = 0x1D1E5
MEMBER_ID = 0xF100F
MEMBER_NAME = "floor"
RAFT_TERM = 1

#: kine-server's --max-request-bytes default (etcd's 1.5 MiB) plus the gRPC overhead etcd allows.
MAX_RECEIVE = 1536 * 1024 + 512 * 1024

SERVER_OPTIONS: list[tuple[str, int]] = [
    # kine-server's grpc.aio.server options (server.py), with the port always shared.
    ("grpc.so_reuseport", 1),
    ("grpc.max_receive_message_length", MAX_RECEIVE),
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ("grpc.server.max_pending_requests", 2**31 - 1),
    ("grpc.server.max_pending_requests_hard_limit", 2**31 - 1),
]

Counters = Any
"""A multiprocessing RawArray of int64, one slot per process (each writes only its own)."""


class Revision:
    """1 + the writes of all processes: this process bumps its slot, reads every slot."""

    def __init__(self, counters: Counters, index: int) -> None:
        self.counters = counters
        self.index = index

    def write(self) -> int:
        self.counters[self.index] += 1
        return self.now()

    def now(self) -> int:
        return 1 + sum(self.counters)


def header(revision: int) -> rpc_pb2.ResponseHeader:
    return rpc_pb2.ResponseHeader(
        cluster_id=CLUSTER_ID, member_id=MEMBER_ID, revision=revision, raft_term=RAFT_TERM
    )


class FloorKV(rpc_pb2_grpc.KVServicer):
    """Canned answers: every write succeeds, every read finds nothing."""

    def __init__(self, revision: Revision) -> None:
        self.revision = revision

    async def Range(self, request: Any, context: Any) -> rpc_pb2.RangeResponse:
        return rpc_pb2.RangeResponse(header=header(self.revision.now()))

    async def Put(self, request: Any, context: Any) -> rpc_pb2.PutResponse:
        return rpc_pb2.PutResponse(header=header(self.revision.write()))

    async def DeleteRange(self, request: Any, context: Any) -> rpc_pb2.DeleteRangeResponse:
        return rpc_pb2.DeleteRangeResponse(header=header(self.revision.now()))

    async def Txn(self, request: Any, context: Any) -> rpc_pb2.TxnResponse:
        head = header(self.revision.write())
        put = rpc_pb2.ResponseOp(response_put=rpc_pb2.PutResponse(header=head))
        return rpc_pb2.TxnResponse(header=head, succeeded=True, responses=[put])

    async def Compact(self, request: Any, context: Any) -> rpc_pb2.CompactionResponse:
        return rpc_pb2.CompactionResponse(header=header(self.revision.now()))


class FloorMaintenance(rpc_pb2_grpc.MaintenanceServicer):
    """Status only (`etcdctl endpoint status`, clients that check the member)."""

    def __init__(self, revision: Revision) -> None:
        self.revision = revision

    async def Status(self, request: Any, context: Any) -> rpc_pb2.StatusResponse:
        revision = self.revision.now()
        return rpc_pb2.StatusResponse(
            header=header(revision),
            version="3.5.0",
            dbSize=4096,
            leader=MEMBER_ID,
            raftIndex=revision,
            raftTerm=RAFT_TERM,
            raftAppliedIndex=revision,
            dbSizeInUse=4096,
        )


class FloorCluster(rpc_pb2_grpc.ClusterServicer):
    """One member, this server, at the URL it listens on."""

    def __init__(self, revision: Revision, url: str) -> None:
        self.revision = revision
        self.url = url

    async def MemberList(self, request: Any, context: Any) -> rpc_pb2.MemberListResponse:
        member = rpc_pb2.Member(
            ID=MEMBER_ID, name=MEMBER_NAME, peerURLs=[self.url], clientURLs=[self.url]
        )
        return rpc_pb2.MemberListResponse(header=header(self.revision.now()), members=[member])


#: The generated registration functions carry no annotations: typed once here.
REGISTER: dict[str, Callable[[Any, Any], None]] = {
    "KV": rpc_pb2_grpc.add_KVServicer_to_server,
    "Maintenance": rpc_pb2_grpc.add_MaintenanceServicer_to_server,
    "Cluster": rpc_pb2_grpc.add_ClusterServicer_to_server,
}


class GenericOnly:
    """Stands in for the server while the generated code registers a service, and keeps each
    service's methods in one generic handler, as kine-server's `_Services` does (grpcio's aio
    server otherwise waits on one future per registered method for every incoming call)."""

    def __init__(self) -> None:
        self.handlers: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        pass  # the same methods come to add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers.append(grpc.method_handlers_generic_handler(service, handlers))


async def serve(address: str, revision: Revision, ready: Callable[[], None]) -> None:
    """One process's server, until SIGTERM or SIGINT."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"floor: cannot listen on {address}")
    services = GenericOnly()
    url = f"http://{address}"
    REGISTER["KV"](FloorKV(revision), services)
    REGISTER["Maintenance"](FloorMaintenance(revision), services)
    REGISTER["Cluster"](FloorCluster(revision, url), services)
    server.add_generic_rpc_handlers(services.handlers)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    ready()
    await stop.wait()
    await server.stop(0)


def process_main(address: str, counters: Counters, index: int, ready: Any) -> None:
    """A server process (spawned: grpcio must not be forked once it runs)."""
    asyncio.run(serve(address, Revision(counters, index), ready.set))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="host:port (the port is shared)")
    parser.add_argument("--procs", type=int, default=1, help="server processes (default 1)")
    args = parser.parse_args(argv)
    ctx = multiprocessing.get_context("spawn")
    counters: Counters = ctx.RawArray("q", args.procs)
    readies = [ctx.Event() for _ in range(args.procs)]
    procs = [
        ctx.Process(
            target=process_main,
            args=(args.listen, counters, i, readies[i]),
            name=f"floor-{i}",
            daemon=True,
        )
        for i in range(args.procs)
    ]
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for proc in procs:
        proc.start()
    code = 0
    try:
        while not stopping:
            if all(r.is_set() for r in readies):
                print(
                    f"floor: serving etcd v3 (no storage) on {args.listen} with "
                    f"{args.procs} process{'es' if args.procs != 1 else ''}",
                    flush=True,
                )
                break
            if any(not p.is_alive() for p in procs):
                code = 1
                break
            readies[0].wait(0.05)
        while not stopping and code == 0:
            if any(not p.is_alive() for p in procs):
                print("floor: a server process died", file=sys.stderr, flush=True)
                code = 1
                break
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
