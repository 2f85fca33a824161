"""Random call sequences against kine-server (SQLite and PostgreSQL) and a real etcd, compared.

Design
------
A sequence is made by `Sequence(seed)`, a generator driven by `random.Random(seed)`: Put, Range,
DeleteRange, Txn (random compares, both branches, nested Txns up to depth 3), LeaseGrant,
LeaseRevoke, LeaseTimeToLive, LeaseLeases, LeaseKeepAlive, Compact and HashKV, with every option
etcd has, extreme values included (limits of 0, -1 and 2**63-1; revisions that are negative, 0,
past, current, future or compacted).

Revisions are global to a store, so the numbers a sequence uses (Range and HashKV revisions,
compare and filter revisions, Compact revisions) cannot be fixed in advance: the generator draws
them relative to the store revision and compact revision it has been told about, which the runner
takes from etcd's answers (the oracle). Both servers get every call in lockstep, so as long as
their answers agree the generator sees the same state on both, and a seed always makes the same
calls. Nothing depends on time: leases are granted with TTLs of a minute or more and revoked when
their sequence ends, and kine-server's periodic compaction is off, as etcd has none by default.

Starting two servers for every sequence would cost more than the sequence, so one test (a
"round") runs several seeds on the same two fresh servers, one after another, each on its own key
prefix `/fNNNNN/` with its own lease ids (`seed * 1000 + n`). Prefixes grow with the seed, so a
from-key range ("\\0" as end) inside a prefix sees only that prefix: the later ones are still
empty. Compactions and whole-keyspace reads do see earlier sequences; that is fine, since both
servers see the same calls.

Keys come from a small alphabet (3 to 6 names per prefix, bytes 0x00 and 0xff included) so that
operations collide. Overlapping writes within one Txn are rare on purpose (`OVERLAP_CHANCE`): most
are etcd's "duplicate key" error; a few shapes etcd lets through write a key twice in one
revision (a put and a delete with "\\0" as range end; a nested Txn's put, then a later nested
Txn's delete), and `TWICE_CHANCE` makes those now and then on purpose. Sort options are always
valid ones: the oracle is Debian's etcd 3.4, which accepts invalid ones that kine-server,
emulating 3.5, refuses (see test_kv_differential); for the same reason no HashKV asks for exactly
the compact revision (3.5 answers its hash, 3.4 "compacted"; see test_maintenance).

Every answer is a Recorder line (cluster and member id and raft term blanked), compared at once;
the first difference fails the round with the seed, the op's index, the request and both lines,
followed by the sequence so far. What legitimately differs is normalized narrowly, in `SETTLE`:
a lease's remaining TTL (it counts down on two clocks; it must be -1 on both, or within
`TTL_SLACK` seconds of the granted TTL on both), the order of a lease's keys and of the lease list
(etcd keeps them in maps), and the HashKV hash (etcd hashes its bolt database's encoding,
kine-server its own rows; the header and compact revision still must agree).

Hypothesis is not used: its examples cannot each have fresh function-scoped servers under
pytest-asyncio, and shrinking would need a fresh store per replay. The seeds are fixed, so
`make test` is reproducible (4 rounds of 6 seeds, 50 calls each); `make soak` runs the slow
variant, 25 rounds of 20 other seeds, 60 calls each. A failure names its round in the test id
(`[sqlite-2]`): rerun just that one with `pytest 'tests/test_fuzz_differential.py::...[sqlite-2]'`.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import text_format

from kine_server.pb import rpc_pb2 as pb
from kine_server.process.single import SingleProcess
from tests.conftest import WORKERS, test_config
from tests.support.client import Client, Recorder, connect, normalized
from tests.support.process import KineProcess
from tests.test_kv_differential import op

C = pb.Compare
R = pb.RangeRequest

FAST_ROUNDS, FAST_SEEDS_PER_ROUND, FAST_OPS = 4, 6, 50
#: `make soak`: 25 rounds of 20 seeds; KINE_FUZZ_ROUNDS fewer (CI's bounded soak).
SOAK_ROUNDS = int(os.environ.get("KINE_FUZZ_ROUNDS", "25"))
SOAK_SEEDS_PER_ROUND, SOAK_OPS = 20, 60

#: How often the generator keeps a write that overlaps an earlier write of the same Txn.
OVERLAP_CHANCE = 0.1
#: How often a Txn puts and deletes one key in the same revision, in a way etcd allows.
TWICE_CHANCE = 0.04
#: How often a Range asks for a limit of 2**63-1 (etcd adds one to it, and wraps).
HUGE_LIMIT_CHANCE = 0.01
#: How often a key is empty (etcd's "key is not provided").
EMPTY_KEY_CHANCE = 0.003

#: Key names under a sequence's prefix: the prefix itself, bytes that sort before "/" or are not
#: UTF-8, names that are prefixes of others.
NAMES = [b"", b"a", b"a\x00", b"a/x", b"ab", b"b", b"c", b"z", b"\xff", b"\xff\xff"]
VALUES = [b"", b"0", b"1", b"2", b"v", b"\xff\x00"]
TTLS = [60, 60, 120, 600, 3600, 9_000_000_000]
TOO_LARGE_TTL = 9_000_000_001
#: How far below the granted TTL a lease's remaining TTL may be and still count as the same.
TTL_SLACK = 30
MAX_INT64 = 2**63 - 1


def prefix_end(prefix: bytes) -> bytes:
    """The range end of every key starting with `prefix`, as clientv3 computes it."""
    for i in range(len(prefix) - 1, -1, -1):
        if prefix[i] < 0xFF:
            return prefix[:i] + bytes([prefix[i] + 1])
    return b"\x00"  # all 0xff: every key from the prefix on


def line(call: Call) -> str:
    text = text_format.MessageToString(call.request, as_one_line=True)
    return f"{call.method} {text}".rstrip()


@dataclass(frozen=True)
class Call:
    method: str  # service.Method, as Recorder takes it
    request: Any


@dataclass
class State:
    """What the generator knows of the store, as of etcd's last answer."""

    revision: int = 1
    compacted: int | None = None  # the last revision a Compact succeeded at; None: never
    base: int = 1  # the store revision when the current sequence began


def covers(key: bytes, end: bytes, other: bytes) -> bool:
    """Whether the span etcd means by (key, end) holds `other`."""
    if not end:
        return other == key
    if end == b"\x00":
        return other >= key
    return key <= other < end


def crashes_etcd(request: Any) -> bool:
    """A Put with ignore_value or ignore_lease that overlaps an earlier delete of its Txn (one
    etcd's duplicate check lets through, e.g. a "\0" range end) passes etcd's checks, made on
    the state before the Txn, and then panics etcd 3.4 when applied: the key is gone. kine-server
    refuses the whole Txn with "key not found". Never generated, or the oracle dies."""
    return isinstance(request, pb.PutRequest) and (request.ignore_value or request.ignore_lease)


@dataclass
class Writes:
    """Keys a Txn under construction puts and spans it deletes, at every depth, both branches."""

    puts: set[bytes] = field(default_factory=set)
    deletes: list[tuple[bytes, bytes]] = field(default_factory=list)

    def copy(self) -> Writes:
        return Writes(set(self.puts), list(self.deletes))

    def merge(self, other: Writes) -> None:
        self.puts |= other.puts
        self.deletes += [span for span in other.deletes if span not in self.deletes]

    def overlaps(self, request: Any) -> bool:
        if isinstance(request, pb.PutRequest):
            key = request.key
            return key in self.puts or any(covers(k, e, key) for k, e in self.deletes)
        if isinstance(request, pb.DeleteRangeRequest):
            return any(covers(request.key, request.range_end, key) for key in self.puts)
        return False

    def add(self, request: Any) -> None:
        if isinstance(request, pb.PutRequest):
            self.puts.add(request.key)
        elif isinstance(request, pb.DeleteRangeRequest):
            self.deletes.append((request.key, request.range_end))


class Sequence:
    """The calls of one seed; `next(state)` makes the next one."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.prefix = b"/f%05d/" % seed
        self.names = sorted(self.rng.sample(NAMES, self.rng.randint(3, 6)))
        self.granted: list[int] = []  # lease ids asked for, in order (granted or not)

    # -- small choices ---------------------------------------------------------------------------

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def pick(self, weighted: dict[Any, float]) -> Any:
        return self.rng.choices(list(weighted), weights=list(weighted.values()))[0]

    def key(self) -> bytes:
        if self.chance(EMPTY_KEY_CHANCE):
            return b""
        return self.prefix + self.rng.choice(self.names)

    def span(self, whole: bool = False) -> tuple[bytes, bytes]:
        """A key and range end: one key, a prefix, from a key on, between two keys."""
        shape = self.pick(
            {"one": 50, "seq": 12, "prefix": 8, "from": 12, "rest": 4, "between": 10, "all": 4}
        )
        if shape == "seq":
            return self.prefix, prefix_end(self.prefix)
        if shape == "prefix":
            key = self.prefix + self.rng.choice(self.names)
            return key, prefix_end(key)
        if shape == "from":
            return self.key(), b"\x00"
        if shape == "rest":
            return self.prefix, b"\x00"
        if shape == "between":
            return self.key(), self.prefix + self.rng.choice(self.names)
        if shape == "all" and whole:
            return b"\x00", b"\x00"
        return self.key(), b""

    def lease(self) -> int:
        """A lease id this sequence asked for, or one it never did."""
        if self.granted and self.chance(0.85):
            return self.rng.choice(self.granted)
        return self.seed * 1000 + 999

    def past(self, state: State) -> int:
        """A revision this sequence has seen (or one just before it began)."""
        return self.rng.randint(max(1, state.base - 1), state.revision)

    def revision(self, state: State) -> int:
        """A Range or HashKV revision: mostly 0, else anything from negative to future."""
        kind = self.pick(
            {
                "zero": 62,
                "current": 8,
                "past": 14,
                "future": 5,
                "one": 2,
                "compacted": 3 if state.compacted else 0,
                "below": 3 if state.compacted else 0,
                "negative": 1.5,
            }
        )
        if kind == "current":
            return state.revision
        if kind == "past":
            return self.past(state)
        if kind == "future":
            return state.revision + self.rng.randint(1, 3)
        if kind == "one":
            return 1
        if kind == "compacted" and state.compacted:
            return state.compacted
        if kind == "below" and state.compacted:
            return state.compacted - 1
        if kind == "negative":
            return -self.rng.choice([1, 1, 2, 5])
        return 0

    def filter_revision(self, state: State) -> int:
        return self.rng.choice([self.past(state), self.past(state), state.revision + 1, -1])

    # -- requests --------------------------------------------------------------------------------

    def range_request(self, state: State) -> pb.RangeRequest:
        key, end = self.span(whole=True)
        request = R(key=key, range_end=end)
        if self.chance(HUGE_LIMIT_CHANCE):
            request.limit = MAX_INT64
        else:
            request.limit = self.pick({0: 60, 1: 10, 2: 10, 3: 5, -1: 3, 1000: 2, 2**62: 1})
        request.revision = self.revision(state)
        request.count_only = self.chance(0.12)
        request.keys_only = self.chance(0.15)
        request.serializable = self.chance(0.1)
        if self.chance(0.3):
            request.sort_order = self.rng.choice([R.NONE, R.ASCEND, R.DESCEND])
            # etcd 3.4 sorts with Go's unstable sort.Sort, stable only up to 12 items (insertion
            # sort): ties in a whole-keyspace range could come in any order, so sort those by key.
            if end != b"\x00" or key != b"\x00":
                request.sort_target = self.rng.choice([R.KEY, R.VERSION, R.CREATE, R.MOD, R.VALUE])
        for name in (
            "min_mod_revision",
            "max_mod_revision",
            "min_create_revision",
            "max_create_revision",
        ):
            if self.chance(0.07):
                setattr(request, name, self.filter_revision(state))
        return request

    def put_request(self) -> pb.PutRequest:
        request = pb.PutRequest(key=self.key(), value=self.rng.choice(VALUES))
        request.prev_kv = self.chance(0.3)
        if self.chance(0.1):
            request.ignore_value = True
            if self.chance(0.85):
                request.value = b""  # else etcd's "value is provided"
        if self.chance(0.1):
            request.ignore_lease = True
            if self.chance(0.1):
                request.lease = self.lease()  # etcd's "lease is provided"
        elif self.chance(0.25):
            request.lease = self.lease()
        return request

    def delete_request(self) -> pb.DeleteRangeRequest:
        key, end = self.span()
        return pb.DeleteRangeRequest(key=key, range_end=end, prev_kv=self.chance(0.4))

    def compare(self, state: State) -> pb.Compare:
        key, end = self.span(whole=True) if self.chance(0.3) else (self.key(), b"")
        target: int = self.rng.choice([C.VERSION, C.CREATE, C.MOD, C.VALUE, C.LEASE])
        result: int = self.rng.choice([C.EQUAL, C.NOT_EQUAL, C.GREATER, C.LESS])
        if self.chance(0.02):
            # Out of the enums: etcd takes an unknown result as true, an unknown target as equal.
            target, result = self.rng.choice([(target, 4), (target, 9), (5, result), (9, result)])
        enums: dict[str, Any] = {"target": target, "result": result}
        compare = C(key=key, range_end=end, **enums)
        if self.chance(0.03):
            # The value for another target than the compare's: etcd then compares with 0 or "".
            target = self.rng.choice([C.VERSION, C.CREATE, C.MOD, C.VALUE, C.LEASE])
        if target == C.VERSION:
            compare.version = self.rng.randint(0, 3)
        elif target in (C.CREATE, C.MOD):
            revision = self.rng.choice([0, self.past(state), self.past(state), state.revision + 1])
            if target == C.CREATE:
                compare.create_revision = revision
            else:
                compare.mod_revision = revision
        elif target == C.VALUE:
            compare.value = self.rng.choice(VALUES)
        else:
            compare.lease = self.lease() if self.chance(0.6) else 0
        return compare

    def txn_request(self, state: State, depth: int, writes: Writes) -> pb.TxnRequest:
        then_writes, else_writes = writes.copy(), writes.copy()
        if depth == 1 and self.chance(TWICE_CHANCE):  # unconditional, so that it runs
            compares = []
            success = self.written_twice(then_writes)
            success += self.branch(state, depth, then_writes, self.rng.randint(0, 2))
        else:
            compares = [self.compare(state) for _ in range(self.rng.choice([0, 1, 1, 1, 2, 3]))]
            success = self.branch(state, depth, then_writes, self.rng.randint(0, 4))
        failure = self.branch(state, depth, else_writes, self.rng.randint(0, 3))
        writes.merge(then_writes)
        writes.merge(else_writes)
        return pb.TxnRequest(compare=compares, success=success, failure=failure)

    def written_twice(self, writes: Writes) -> list[pb.RequestOp]:
        """Ops that put a key and delete it in the same revision, which etcd's duplicate check
        lets through: it takes a "\\0" range end literally (a span that holds no key), and checks
        a nested Txn's puts only against the deletes of the Txns before it."""
        key = self.prefix + self.rng.choice(self.names)
        put = pb.PutRequest(key=key, value=self.rng.choice(VALUES))
        shape = self.rng.choice(["put, delete", "delete, put", "nested"])
        if shape == "nested":
            delete = pb.DeleteRangeRequest(key=key, prev_kv=self.chance(0.5))
            ops = [op(pb.TxnRequest(success=[op(put)])), op(pb.TxnRequest(success=[op(delete)]))]
        else:
            start = self.rng.choice([self.prefix, key])
            delete = pb.DeleteRangeRequest(key=start, range_end=b"\x00", prev_kv=self.chance(0.5))
            ops = [op(put), op(delete)] if shape == "put, delete" else [op(delete), op(put)]
        writes.add(put)
        writes.add(delete)
        return ops

    def branch(self, state: State, depth: int, writes: Writes, count: int) -> list[pb.RequestOp]:
        ops = []
        for _ in range(count):
            if self.chance(0.003):
                ops.append(pb.RequestOp())  # no request at all: etcd's "key not found"
                continue
            for _attempt in range(3):
                kind = self.pick({"range": 35, "put": 35, "delete": 15, "txn": 15 * (depth < 3)})
                request: Any
                if kind == "range":
                    request = self.range_request(state)
                elif kind == "put":
                    request = self.put_request()
                elif kind == "delete":
                    request = self.delete_request()
                else:
                    request = self.txn_request(state, depth + 1, writes)
                if writes.overlaps(request) and (
                    crashes_etcd(request) or not self.chance(OVERLAP_CHANCE)
                ):
                    continue
                writes.add(request)
                ops.append(op(request))
                break
        return ops

    def compact_request(self, state: State) -> pb.CompactionRequest:
        compacted = state.compacted
        kind = self.pick(
            {
                "current": 3,
                "past": 5,
                "again": 2 if compacted else 0,
                "zero": 1,
                "negative": 0.5,
                "future": 1,
            }
        )
        if kind == "current":
            revision = state.revision
        elif kind == "past":
            revision = self.rng.randint(
                min(max(1, (compacted or 0) + 1), state.revision), state.revision
            )
        elif kind == "again" and compacted:
            revision = self.rng.randint(max(1, compacted - 3), compacted)
        elif kind == "negative":
            revision = -1
        elif kind == "future":
            revision = state.revision + 1
        else:
            revision = 0
        return pb.CompactionRequest(revision=revision, physical=self.chance(0.3))

    def lease_grant(self) -> pb.LeaseGrantRequest:
        if self.granted and self.chance(0.1):
            lease_id = self.rng.choice(self.granted)  # etcd's "lease already exists"
        else:
            lease_id = self.seed * 1000 + len(self.granted) + 1
            if self.chance(0.03):
                lease_id = -lease_id  # etcd takes any id but 0
            self.granted.append(lease_id)
        ttl = TOO_LARGE_TTL if self.chance(0.03) else self.rng.choice(TTLS)
        return pb.LeaseGrantRequest(ID=lease_id, TTL=ttl)

    def next(self, state: State) -> Call:
        kind = self.pick(
            {
                "put": 25,
                "range": 22,
                "delete": 9,
                "txn": 22,
                "grant": 5,
                "revoke": 3,
                "ttl": 4,
                "leases": 1,
                "keepalive": 1,
                "compact": 4,
                "hash": 2,
            }
        )
        if kind == "put":
            return Call("kv.Put", self.put_request())
        if kind == "range":
            return Call("kv.Range", self.range_request(state))
        if kind == "delete":
            return Call("kv.DeleteRange", self.delete_request())
        if kind == "txn":
            return Call("kv.Txn", self.txn_request(state, 1, Writes()))
        if kind == "grant":
            return Call("lease.LeaseGrant", self.lease_grant())
        if kind == "revoke":
            return Call("lease.LeaseRevoke", pb.LeaseRevokeRequest(ID=self.lease()))
        if kind == "ttl":
            request = pb.LeaseTimeToLiveRequest(ID=self.lease(), keys=self.chance(0.7))
            return Call("lease.LeaseTimeToLive", request)
        if kind == "leases":
            return Call("lease.LeaseLeases", pb.LeaseLeasesRequest())
        if kind == "keepalive":
            return Call("lease.LeaseKeepAlive", pb.LeaseKeepAliveRequest(ID=self.lease()))
        if kind == "compact":
            return Call("kv.Compact", self.compact_request(state))
        revision = self.revision(state)
        if state.compacted and revision == state.compacted:
            # etcd 3.5 answers the compact revision's hash, 3.4 (the oracle) "compacted": the
            # one HashKV revision where they differ is checked in test_maintenance.py instead.
            revision -= 1
        return Call("maintenance.HashKV", pb.HashKVRequest(revision=revision))

    def calls(self, state: State, length: int) -> Iterator[Call]:
        """`length` random calls, then a LeaseRevoke of every lease asked for, so none outlives
        its sequence (and none can expire on one server before the other)."""
        for _ in range(length):
            yield self.next(state)
        for lease_id in self.granted:
            yield Call("lease.LeaseRevoke", pb.LeaseRevokeRequest(ID=lease_id))


# -- normalizing what legitimately differs ---------------------------------------------------------


def settle_time_to_live(response: Any) -> None:
    # The remaining TTL counts down on each server's clock and rounds differently: a second or
    # two apart is no difference. A sequence lasts a few seconds and every TTL is at least 60 s,
    # so a remaining TTL further off than TTL_SLACK from the granted one is a real difference.
    if (
        response.TTL != -1
        and response.grantedTTL - TTL_SLACK <= response.TTL <= response.grantedTTL
    ):
        response.TTL = response.grantedTTL
    keys = sorted(response.keys)  # etcd keeps a lease's keys in a map
    del response.keys[:]
    response.keys.extend(keys)


def settle_leases(response: Any) -> None:
    ids = sorted(status.ID for status in response.leases)  # etcd keeps leases in a map
    del response.leases[:]
    response.leases.extend(pb.LeaseStatus(ID=i) for i in ids)


def settle_hash(response: Any) -> None:
    response.hash = 0  # etcd hashes its bolt encoding, kine-server its rows: never equal


SETTLE: dict[str, Callable[[Any], None]] = {
    "lease.LeaseTimeToLive": settle_time_to_live,
    "lease.LeaseLeases": settle_leases,
    "maintenance.HashKV": settle_hash,
}


class FuzzRecorder(Recorder):
    """A Recorder that also drives one keep-alive exchange and settles what may differ."""

    async def __call__(self, method: str, request: Any) -> Any:
        if method == "lease.LeaseKeepAlive":
            return await self.keep_alive(request)
        response = await super().__call__(method, request)
        if response is not None and method in SETTLE:
            SETTLE[method](response)
            self.transcript[-1] = f"{method} -> {normalized(response)}"
        return response

    async def keep_alive(self, request: pb.LeaseKeepAliveRequest) -> Any:
        call = self.client.lease.LeaseKeepAlive(timeout=30)
        try:
            await call.write(request)
            response = await call.read()
            await call.done_writing()
            await call.code()  # the server ends the stream once the client has
        except grpc.aio.AioRpcError as exc:
            self.note(f"lease.LeaseKeepAlive -> {exc.code().name}: {exc.details()}")
            return None
        self.note(f"lease.LeaseKeepAlive -> {normalized(response)}")
        return response


# -- running ---------------------------------------------------------------------------------------


@pytest.fixture
async def fuzz_kine(dsn: str, process_model: str, tmp_path: Path) -> AsyncIterator[Client]:
    """kine-server without periodic compaction: etcd has none by default, and a tick in the middle
    of a round would compact one store and not the other. In this process, or `--workers 2`."""
    if process_model == WORKERS:
        flags = ["--workers", "2", "--compact-interval", "0", "--shutdown-grace", "2s"]
        with KineProcess(dsn, tmp_path, *flags) as process:
            client = connect(process.address)
            yield client
            await client.close()
        return
    server = SingleProcess(test_config(dsn, compact_interval=0.0))
    await server.start()
    client = connect(f"127.0.0.1:{server.port}")
    yield client
    await client.close()
    await server.stop()


def ran_first(first: int, seed: int) -> str:
    if seed == first:
        return "on fresh servers"
    if seed == first + 1:
        return f"after seed {first} on the same servers"
    return f"after seeds {first}..{seed - 1} on the same servers"


async def run_round(kine: Client, etcd: Client, seeds: range, length: int) -> None:
    """Every seed's sequence in turn, on the same two fresh servers, compared call by call."""
    ours, theirs = FuzzRecorder(kine), FuzzRecorder(etcd)
    state = State()
    for seed in seeds:
        sequence = Sequence(seed)
        state.base = state.revision
        done: list[Call] = []
        for index, call in enumerate(sequence.calls(state, length)):
            done.append(call)
            _, response = await asyncio.gather(
                ours(call.method, call.request), theirs(call.method, call.request)
            )
            assert ours.transcript[-1] == theirs.transcript[-1], "\n".join(
                [
                    f"seed {seed}, op {index}: {line(call)}",
                    f"  kine: {ours.transcript[-1]}",
                    f"  etcd: {theirs.transcript[-1]}",
                    f"seed {seed} ran {ran_first(seeds.start, seed)} from revision {state.base}"
                    f" (now {state.revision}, compacted at {state.compacted}); its calls:",
                    *(f"  {i}: {line(c)}" for i, c in enumerate(done)),
                ]
            )
            if response is not None:
                if response.HasField("header"):
                    state.revision = max(state.revision, response.header.revision)
                if call.method == "kv.Compact":
                    state.compacted = call.request.revision


@pytest.mark.parametrize("round_", range(FAST_ROUNDS))
async def test_random_sequences_same_as_etcd(round_: int, fuzz_kine: Client, etcd: Client) -> None:
    first = round_ * FAST_SEEDS_PER_ROUND
    await run_round(fuzz_kine, etcd, range(first, first + FAST_SEEDS_PER_ROUND), FAST_OPS)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(SOAK_ROUNDS))
async def test_soak_random_sequences_same_as_etcd(
    round_: int, fuzz_kine: Client, etcd: Client
) -> None:
    """500 seeds of 60 calls each (seeds 1000 on, so none repeats the fast test's)."""
    first = 1000 + round_ * SOAK_SEEDS_PER_ROUND
    await run_round(fuzz_kine, etcd, range(first, first + SOAK_SEEDS_PER_ROUND), SOAK_OPS)
