"""The same KV call sequences against kine-server (SQLite and PostgreSQL) and a real etcd.

Each scenario runs through a Recorder on both servers; the transcripts (every response with its
revisions, or the gRPC code and message of every error) must be identical, line for line.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc
import pytest

from kine_server.pb import rpc_pb2 as pb
from tests.support.client import Client, Recorder

Scenario = Callable[[Recorder], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}

C = pb.Compare
R = pb.RangeRequest


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


def put(key: bytes, value: bytes = b"", **options: object) -> pb.PutRequest:
    return pb.PutRequest(key=key, value=value, **options)  # type: ignore[arg-type]


def get(key: bytes, end: bytes = b"", **options: object) -> pb.RangeRequest:
    return pb.RangeRequest(key=key, range_end=end, **options)  # type: ignore[arg-type]


def delete(key: bytes, end: bytes = b"", **options: object) -> pb.DeleteRangeRequest:
    return pb.DeleteRangeRequest(key=key, range_end=end, **options)  # type: ignore[arg-type]


def op(
    request: pb.PutRequest | pb.RangeRequest | pb.DeleteRangeRequest | pb.TxnRequest,
) -> pb.RequestOp:
    if isinstance(request, pb.PutRequest):
        return pb.RequestOp(request_put=request)
    if isinstance(request, pb.RangeRequest):
        return pb.RequestOp(request_range=request)
    if isinstance(request, pb.DeleteRangeRequest):
        return pb.RequestOp(request_delete_range=request)
    return pb.RequestOp(request_txn=request)


def txn(
    compare: list[pb.Compare],
    success: list[pb.RequestOp] | None = None,
    failure: list[pb.RequestOp] | None = None,
) -> pb.TxnRequest:
    return pb.TxnRequest(compare=compare, success=success or [], failure=failure or [])


def prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


@scenario
async def fresh_store(call: Recorder) -> None:
    await call("kv.Range", get(b"a"))
    await call("kv.Range", get(b"\x00", b"\x00"))
    await call("kv.Range", get(b"a", revision=1))
    await call("kv.Range", get(b"a", revision=2))


@scenario
async def versions_and_history(call: Recorder) -> None:
    await call("kv.Put", put(b"a", b"1"))
    await call("kv.Put", put(b"a", b"2"))
    await call("kv.Put", put(b"b", b"x"))
    await call("kv.Range", get(b"a"))
    await call("kv.Range", get(b"a", revision=2))
    await call("kv.Range", get(b"a", b"c"))
    await call("kv.DeleteRange", delete(b"a"))
    await call("kv.Range", get(b"a"))
    await call("kv.Put", put(b"a", b"3"))
    await call("kv.Range", get(b"a"))
    for revision in range(1, 8):
        await call("kv.Range", get(b"a", b"z", revision=revision))


@scenario
async def put_options(call: Recorder) -> None:
    await call("kv.Put", put(b"k", b"v1", prev_kv=True))
    await call("kv.Put", put(b"k", b"v2", prev_kv=True))
    await call("kv.Put", put(b"k", ignore_value=True, prev_kv=True))
    await call("kv.Put", put(b"k", ignore_lease=True))
    await call("kv.Range", get(b"k"))
    await call("kv.Put", put(b"missing", ignore_value=True))
    await call("kv.Put", put(b"missing", ignore_lease=True))
    await call("kv.Put", put(b"k", b"x", ignore_value=True))
    await call("kv.Put", put(b"k", b"x", ignore_lease=True, lease=5))
    await call("kv.Put", put(b"k", b"x", lease=123456))
    await call("kv.Put", put(b"", b"x"))
    await call("kv.Put", put(b"empty-value"))
    await call("kv.Range", get(b"empty-value"))
    await call("kv.Range", get(b"k"))


async def _populate(call: Recorder) -> None:
    # Distinct values, versions, create and mod revisions, so every sort order is total.
    for i in range(10):
        key = b"/reg/%02d" % i
        for v in range(1 + (i * 7) % 10):
            await call("kv.Put", put(key, b"val-%02d-%d" % ((i * 3) % 10, v)))
    await call("kv.Put", put(b"/other", b"o"))
    await call("kv.Put", put(b"/reg", b"the prefix itself"))


@scenario
async def range_options(call: Recorder) -> None:
    await _populate(call)
    end = prefix_end(b"/reg/")
    await call("kv.Range", get(b"/reg/", end))
    await call("kv.Range", get(b"/reg/", end, limit=3))
    await call("kv.Range", get(b"/reg/", end, limit=10))
    await call("kv.Range", get(b"/reg/", end, limit=11))
    await call("kv.Range", get(b"/reg/", end, count_only=True))
    await call("kv.Range", get(b"/reg/", end, count_only=True, limit=2))
    await call("kv.Range", get(b"/reg/", end, keys_only=True, limit=4))
    await call("kv.Range", get(b"/reg/05", b"\x00"))
    await call("kv.Range", get(b"/reg/05", b"\x00", limit=2, keys_only=True))
    await call("kv.Range", get(b"\x00", b"\x00", count_only=True))
    await call("kv.Range", get(b"/reg/", end, serializable=True, limit=1))
    await call("kv.Range", get(b"/reg/", end, revision=20, limit=5))
    await call("kv.Range", get(b"/reg/", end, min_mod_revision=30))
    await call("kv.Range", get(b"/reg/", end, max_mod_revision=30, limit=2))
    await call("kv.Range", get(b"/reg/", end, min_create_revision=10, max_create_revision=40))
    await call("kv.Range", get(b"/reg/", end, max_create_revision=5, keys_only=True))
    await call("kv.Range", get(b"/reg/", b"/reg/"))
    await call("kv.Range", get(b"/reg/09", b"/reg/00"))


@scenario
async def paginated_lists(call: Recorder) -> None:
    """kube-apiserver's LIST: pages pinned to the first page's revision while the keys change
    under them, each with the whole range's count (which kine-server carries from page to page:
    mvcc/range_counts.py) and the store's revision in its header; a page asked again, or with
    another limit; pages at the newest revision with a write between them; a pinned page at and
    past the compacted revision."""
    await _populate(call)
    end = prefix_end(b"/reg/")
    first = await call("kv.Range", get(b"/reg/", end, limit=3))
    pinned = first.header.revision
    await call("kv.Put", put(b"/reg/05a", b"created after the first page"))
    await call("kv.DeleteRange", delete(b"/reg/07"))
    await call("kv.Put", put(b"/reg/08", b"changed after the first page"))
    page = first
    while page.more:
        start = page.kvs[-1].key + b"\x00"
        page = await call("kv.Range", get(start, end, limit=3, revision=pinned))
        await call("kv.Range", get(start, end, limit=3, revision=pinned))
        await call("kv.Range", get(start, end, limit=2, revision=pinned, keys_only=True))
    page = await call("kv.Range", get(b"/reg/", end, limit=4))
    await call("kv.Put", put(b"/reg/09a", b"between two pages at the newest revision"))
    while page.more:
        page = await call("kv.Range", get(page.kvs[-1].key + b"\x00", end, limit=4))
    # Pinned pages, each the one after the page before: still answered at the compacted
    # revision, refused once compaction passed it.
    page = await call("kv.Range", get(b"/reg/", end, limit=4, revision=pinned))
    await call("kv.Compact", pb.CompactionRequest(revision=pinned))
    page = await call("kv.Range", get(page.kvs[-1].key + b"\x00", end, limit=4, revision=pinned))
    await call("kv.Compact", pb.CompactionRequest(revision=pinned + 1))
    await call("kv.Range", get(page.kvs[-1].key + b"\x00", end, limit=4, revision=pinned))


@scenario
async def range_sorting(call: Recorder) -> None:
    await _populate(call)
    end = prefix_end(b"/reg/")
    for target in (R.KEY, R.VERSION, R.CREATE, R.MOD, R.VALUE):
        for order in (R.NONE, R.ASCEND, R.DESCEND):
            await call("kv.Range", get(b"/reg/", end, sort_target=target, sort_order=order))
            await call(
                "kv.Range", get(b"/reg/", end, sort_target=target, sort_order=order, limit=3)
            )
    await call("kv.Range", get(b""))


@scenario
async def delete_ranges(call: Recorder) -> None:
    await call("kv.DeleteRange", delete(b"nothing"))
    await call("kv.DeleteRange", delete(b"a", b"z", prev_kv=True))
    for key in (b"a", b"b", b"c", b"d", b"e", b"f"):
        await call("kv.Put", put(key, key * 3))
    await call("kv.DeleteRange", delete(b"b", prev_kv=True))
    await call("kv.DeleteRange", delete(b"b", prev_kv=True))
    await call("kv.DeleteRange", delete(b"c", b"e", prev_kv=True))
    await call("kv.DeleteRange", delete(b"e", b"\x00"))
    await call("kv.Range", get(b"\x00", b"\x00"))
    await call("kv.DeleteRange", delete(b""))
    await call("kv.Put", put(b"c", b"again"))
    await call("kv.Range", get(b"c"))
    await call("kv.Range", get(b"\x00", b"\x00", revision=8))


@scenario
async def deletes_of_many_keys(call: Recorder) -> None:
    """More keys than the applier deletes a statement per key (applier.FEW): the set-based
    statements, also after a Put of the same Txn (both changes in one revision)."""
    for i in range(20):
        await call("kv.Put", put(b"/m/%02d" % i, b"v%d" % i))
    await call("kv.DeleteRange", delete(b"/m/00", b"/m/12", prev_kv=True))
    ops = [
        op(put(b"/m/15", b"updated")),
        op(put(b"/m/99", b"new")),
        op(delete(b"/m/", b"\x00", prev_kv=True)),
    ]
    await call("kv.Txn", txn([], ops))
    await call("kv.Range", get(b"\x00", b"\x00"))
    await call("kv.Range", get(b"/m/", b"/m0", revision=21))
    await call("kv.Range", get(b"/m/", b"/m0", revision=22))
    await call("kv.Put", put(b"/m/05", b"again"))
    await call("kv.Range", get(b"/m/05"))


@scenario
async def revision_errors(call: Recorder) -> None:
    for i in range(6):
        await call("kv.Put", put(b"k", b"%d" % i))
    await call("kv.Range", get(b"k", revision=8))
    await call("kv.Range", get(b"k", revision=100))
    await call("kv.Compact", pb.CompactionRequest(revision=100))
    await call("kv.Compact", pb.CompactionRequest(revision=4, physical=True))
    await call("kv.Range", get(b"k", revision=3))
    await call("kv.Range", get(b"k", revision=4))
    await call("kv.Range", get(b"k", revision=5))
    await call("kv.Compact", pb.CompactionRequest(revision=4))
    await call("kv.Compact", pb.CompactionRequest(revision=2))
    await call("kv.Txn", txn([], [op(get(b"k", revision=3))]))
    await call("kv.Txn", txn([], [op(put(b"x", b"1")), op(get(b"k", revision=99))]))
    await call("kv.Range", get(b"x"))
    await call("kv.Compact", pb.CompactionRequest(revision=7))
    await call("kv.Range", get(b"k", revision=6))
    await call("kv.Range", get(b"k", revision=7))


@scenario
async def txn_compares(call: Recorder) -> None:
    await call("kv.Put", put(b"c/1", b"m"))
    await call("kv.Put", put(b"c/1", b"n"))
    await call("kv.Put", put(b"c/2", b"n"))
    targets = {
        C.VERSION: {"version": 2},
        C.CREATE: {"create_revision": 2},
        C.MOD: {"mod_revision": 3},
        C.VALUE: {"value": b"n"},
        C.LEASE: {"lease": 0},
    }
    for target, value in targets.items():
        for result in (C.EQUAL, C.NOT_EQUAL, C.GREATER, C.LESS):
            for key, end in ((b"c/1", b""), (b"nope", b""), (b"c/", b"c0"), (b"d", b"e")):
                compare = C(key=key, range_end=end, target=target, result=result, **value)  # type: ignore[arg-type]
                await call("kv.Txn", txn([compare], [op(get(b"c/1"))], [op(get(b"c/2"))]))


@scenario
async def txn_branches(call: Recorder) -> None:
    await call("kv.Put", put(b"a", b"1"))
    await call("kv.Put", put(b"b", b"2"))
    mod_a = C(key=b"a", target=C.MOD, result=C.EQUAL, mod_revision=2)
    await call(
        "kv.Txn",
        txn(
            [mod_a],
            [
                op(get(b"a")),
                op(put(b"c", b"3", prev_kv=True)),
                op(get(b"a", b"z")),
                op(delete(b"b", prev_kv=True)),
                op(delete(b"nothing")),
                op(get(b"a", b"z", revision=3)),
            ],
        ),
    )
    await call("kv.Txn", txn([mod_a], [op(put(b"a", b"x"))], [op(get(b"a")), op(delete(b"zz"))]))
    await call("kv.Txn", txn([mod_a], [], []))
    await call("kv.Txn", txn([], [op(get(b"a"))]))
    await call("kv.Txn", txn([], [op(delete(b"none")), op(get(b"a"))]))
    nested = txn(
        [C(key=b"c", target=C.VERSION, result=C.EQUAL, version=1)],
        [op(put(b"n1", b"yes")), op(get(b"c"))],
        [op(put(b"n1", b"no"))],
    )
    await call("kv.Txn", txn([], [op(put(b"d", b"4")), op(nested), op(get(b"n1"))]))
    # The nested compare sees the store as it was before the outer put of "c".
    later = txn([C(key=b"c", target=C.VERSION, result=C.EQUAL, version=2)], [op(put(b"n2", b"2"))])
    await call("kv.Txn", txn([], [op(put(b"c", b"again")), op(later)]))
    await call("kv.Range", get(b"\x00", b"\x00"))


@scenario
async def txn_errors(call: Recorder) -> None:
    await call("kv.Put", put(b"k", b"v"))
    many = [op(get(b"k%d" % i)) for i in range(129)]
    await call("kv.Txn", txn([], many))
    await call("kv.Txn", txn([], many[:128]))
    await call("kv.Txn", txn([], [op(put(b"d", b"1")), op(put(b"d", b"2"))]))
    await call("kv.Txn", txn([], [op(put(b"d", b"1")), op(delete(b"a", b"z"))]))
    await call("kv.Txn", txn([], [op(delete(b"d")), op(put(b"d", b"1"))]))
    await call("kv.Txn", txn([], [op(delete(b"a", b"z")), op(delete(b"d"))]))
    branches = txn([], [op(put(b"e", b"then"))], [op(put(b"e", b"else"))])
    await call("kv.Txn", txn([], [op(branches)]))
    await call("kv.Txn", txn([], [op(branches), op(put(b"e", b"outer"))]))
    await call(
        "kv.Txn", txn([], [op(txn([], [op(put(b"f", b"1"))])), op(txn([], [op(put(b"f", b"2"))]))])
    )
    await call("kv.Txn", txn([], [pb.RequestOp()]))
    await call("kv.Txn", txn([C(key=b"", target=C.VERSION)], []))
    await call("kv.Txn", txn([], [op(put(b""))]))
    await call("kv.Txn", txn([], [op(put(b"missing", ignore_value=True))]))
    await call("kv.Txn", txn([], [op(put(b"k", b"x", lease=77))]))
    await call("kv.Txn", txn([], [op(put(b"k", b"y")), op(put(b"gone", ignore_lease=True))]))
    await call("kv.Range", get(b"\x00", b"\x00"))


@scenario
async def kube_apiserver_txns(call: Recorder) -> None:
    """The shapes kube-apiserver 1.20+ sends: create, update, delete, get-or-fail, compaction."""
    key = b"/registry/configmaps/default/cm"
    create = txn(
        [C(key=key, target=C.MOD, result=C.EQUAL, mod_revision=0)],
        [op(put(key, b"v1"))],
        [op(get(key))],
    )
    await call("kv.Txn", create)
    await call("kv.Txn", create)
    for mod, value in ((2, b"v2"), (2, b"stale"), (3, b"v3")):
        await call(
            "kv.Txn",
            txn(
                [C(key=key, target=C.MOD, result=C.EQUAL, mod_revision=mod)],
                [op(put(key, value))],
                [op(get(key))],
            ),
        )
    await call(
        "kv.Txn",
        txn(
            [C(key=key, target=C.MOD, result=C.EQUAL, mod_revision=4)],
            [op(delete(key, prev_kv=True))],
            [op(get(key))],
        ),
    )
    compact_key = b"compact_rev_key"
    for version in (0, 0, 1):
        await call(
            "kv.Txn",
            txn(
                [C(key=compact_key, target=C.VERSION, result=C.EQUAL, version=version)],
                [op(put(compact_key, b"%d" % version))],
                [op(get(compact_key))],
            ),
        )
    await call("kv.Compact", pb.CompactionRequest(revision=5))
    await call("kv.Range", get(b"/registry/", b"/registry0", revision=4))
    await call("kv.Range", get(b"/registry/", b"/registry0", revision=5))


@scenario
async def request_size(call: Recorder) -> None:
    await call("kv.Put", put(b"big", b"x" * (1536 * 1024 + 1024)))
    await call("kv.Put", put(b"fits", b"x" * (1024 * 1024)))
    await call("kv.Range", get(b"fits", keys_only=True))
    await call("kv.Txn", txn([], [op(put(b"big", b"y" * (1536 * 1024 + 1024)))]))
    await call("kv.Range", get(b"big"))


@scenario
async def one_key_twice_in_one_revision(call: Recorder) -> None:
    """etcd's duplicate-key check lets a Txn put a key and then delete it (a from-key range
    whose end "\0" its interval check misses, or nested Txns), and delete then put it: both
    changes land in one revision."""
    await call("kv.Put", put(b"/v/a", b"1"))
    await call(
        "kv.Txn", txn([], [op(put(b"/v/z", b"new")), op(delete(b"/v/", b"\x00", prev_kv=True))])
    )
    await call("kv.Range", get(b"/v/", b"\x00"))
    await call(
        "kv.Txn",
        txn(
            [], [op(txn([], [op(put(b"k", b"1"))])), op(txn([], [op(delete(b"k", prev_kv=True))]))]
        ),
    )
    await call("kv.Range", get(b"k"))
    await call("kv.Txn", txn([], [op(delete(b"/v/", b"\x00")), op(put(b"/v/z", b"again"))]))
    await call("kv.Range", get(b"/v/z"))
    await call("kv.Put", put(b"/v/z", b"later", prev_kv=True))
    await call("kv.Range", get(b"/v/z", revision=3))
    await call("kv.Range", get(b"k", revision=4))
    await call("kv.Range", get(b"\x00", b"\x00", count_only=True))


@scenario
async def largest_limit(call: Recorder) -> None:
    for key in (b"a", b"b", b"c"):
        await call("kv.Put", put(key))
    await call("kv.Range", get(b"\x00", b"\x00", limit=2**63 - 1))
    await call("kv.Range", get(b"\x00", b"\x00", limit=2**63 - 1, keys_only=True))
    await call("kv.Txn", txn([], [op(get(b"\x00", b"\x00", limit=2**63 - 1)), op(put(b"d"))]))
    await call("kv.Range", get(b"\x00", b"\x00", limit=-1))


@scenario
async def txn_checks_puts_before_ranges(call: Recorder) -> None:
    await call("kv.Put", put(b"a", b"1"))
    await call("kv.Txn", txn([], [op(get(b"a", revision=99)), op(put(b"z", lease=12345))]))
    await call(
        "kv.Txn",
        txn([], [op(get(b"a", revision=99)), op(txn([], [op(put(b"z", ignore_value=True))]))]),
    )
    await call(
        "kv.Txn", txn([], [op(txn([], [op(get(b"a", revision=99))])), op(put(b"z", lease=7))])
    )
    await call("kv.Txn", txn([], [op(get(b"a", revision=99)), op(put(b"z"))]))


@scenario
async def negative_and_first_revisions(call: Recorder) -> None:
    """Before the first compaction etcd's compact revision is -1: Compact(0) succeeds once,
    a Txn may read at -1 but not at -2; after one, every negative Txn revision is compacted,
    while a plain Range at a negative revision reads the current one."""
    await call("kv.Txn", txn([], [op(get(b"a", revision=-1))]))
    await call("kv.Txn", txn([], [op(get(b"a", revision=-2))]))
    await call("kv.Txn", txn([], [op(get(b"a", revision=-1)), op(put(b"w"))]))
    await call("kv.Compact", pb.CompactionRequest(revision=0))
    await call("kv.Compact", pb.CompactionRequest(revision=0))
    await call("kv.Compact", pb.CompactionRequest(revision=-3))
    for i in range(6):
        await call("kv.Put", put(b"a", b"%d" % i))
    await call("kv.Compact", pb.CompactionRequest(revision=4))
    await call("kv.Range", get(b"a", revision=-1))
    await call("kv.Txn", txn([], [op(get(b"a", revision=-1))]))
    await call("kv.Txn", txn([], [op(get(b"a", revision=-1)), op(put(b"w"))]))
    await call("kv.Txn", txn([], [op(get(b"a", revision=3)), op(put(b"w"))]))
    await call("kv.Txn", txn([], [op(get(b"a", revision=4)), op(put(b"w"))]))


async def hash_kv(call: Recorder, revision: int) -> None:
    """HashKV's answer without the hash (etcd hashes its bbolt pages, this server its rows)."""
    try:
        response = await call.client.maintenance.HashKV(pb.HashKVRequest(revision=revision))
    except grpc.aio.AioRpcError as exc:
        call.note(f"maintenance.HashKV({revision}) -> {exc.code().name}: {exc.details()}")
        return
    call.note(
        f"maintenance.HashKV({revision}) -> revision {response.header.revision} "
        f"compact_revision {response.compact_revision}"
    )


@scenario
async def hash_kv_revisions(call: Recorder) -> None:
    await hash_kv(call, 0)
    await hash_kv(call, -3)
    for i in range(6):
        await call("kv.Put", put(b"a", b"%d" % i))
    await call("kv.Compact", pb.CompactionRequest(revision=4))
    # Not 4 itself: etcd 3.5 answers the compact revision's hash where 3.4, the oracle here,
    # answers "compacted" (test_maintenance.py checks it as etcd 3.5's source has it).
    for revision in (3, 5, 7, 8, -1, 0):
        await hash_kv(call, revision)


@scenario
async def deeply_nested_txn(call: Recorder) -> None:
    """etcd takes Txns nested as deep as --max-txn-ops allows (128: every level but the last
    has an op). Built in place, and the answer taken as bytes: protobuf's Python parser cannot
    copy or parse a message nested past 100 levels, and this client is one."""
    raw = call.client.channel.unary_unary(
        "/etcdserverpb.KV/Txn",
        request_serializer=pb.TxnRequest.SerializeToString,
        response_deserializer=lambda data: data,
    )
    for depth in (50, 51, 100, 129, 130):
        outer = pb.TxnRequest()
        inner = outer
        for _ in range(depth - 1):
            inner = inner.success.add().request_txn
        if depth < 130:
            inner.success.add().request_put.key = b"deep%d" % depth
        else:  # 130 levels with an op each: one more than the ops the limit allows
            inner.success.add().request_range.key = b"deep"
        try:
            await raw(outer, timeout=30)
            call.note(f"Txn nested {depth} deep -> OK")
        except grpc.aio.AioRpcError as exc:
            call.note(f"Txn nested {depth} deep -> {exc.code().name}: {exc.details()}")
    await call("kv.Range", get(b"deep", b"deeq", keys_only=True))


@pytest.mark.mysql
@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_same_as_etcd(name: str, kine: Client, etcd: Client) -> None:
    ours, theirs = Recorder(kine), Recorder(etcd)
    await SCENARIOS[name](ours)
    await SCENARIOS[name](theirs)
    assert ours.transcript == theirs.transcript


@pytest.mark.one_process  # validation in api/, the same code in a front-end
async def test_invalid_sort_option_is_refused_as_etcd_35(kine: Client) -> None:
    """etcd 3.5 validates sort options (3.4, the Debian oracle, silently accepts them)."""
    recorder = Recorder(kine)
    await recorder("kv.Range", get(b"a", sort_order=7))
    await recorder("kv.Range", get(b"a", sort_target=9))
    assert recorder.transcript == [
        "kv.Range -> INVALID_ARGUMENT: etcdserver: invalid sort option",
        "kv.Range -> INVALID_ARGUMENT: etcdserver: invalid sort option",
    ]
