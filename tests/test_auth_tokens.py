"""Simple tokens (auth/tokens.py): signed, alive for the TTL after their last use in the
process that sees them used (and for the TTL from their issue in one that never did, checked
with two real processes), void after a password change, the user's deletion or a new key."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from kine_server.auth.permissions import AuthState, Identity
from kine_server.auth.tokens import SimpleTokens
from kine_server.pb import auth_pb2, rpc_pb2
from tests.support.client import connect
from tests.support.process import KineProcess


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def state(generation: int, password: bytes = b"hash-1", secret: bytes = b"k" * 32) -> AuthState:
    made = AuthState(enabled=True, revision=5, generation=generation, secret=secret)
    made.users["u1"] = auth_pb2.User(name=b"u1", password=password)
    return made


def test_a_token_lives_for_the_ttl_after_its_last_use() -> None:
    clock = Clock()
    tokens = SimpleTokens(ttl=300, clock=clock)
    current = state(1)
    token = tokens.assign(current, "u1")
    for _ in range(5):  # used every 200 s: kept alive well past 300 s from issue
        clock.now += 200
        assert tokens.identify(current, token) == Identity("u1", 5)
    clock.now += 301
    assert tokens.identify(current, token) is None
    # Another process never saw it used: it counts from the issue time.
    fresh = SimpleTokens(ttl=300, clock=clock)
    assert fresh.identify(current, tokens.assign(current, "u1")) == Identity("u1", 5)


def test_what_voids_a_token() -> None:
    clock = Clock()
    tokens = SimpleTokens(ttl=300, clock=clock)
    token = tokens.assign(state(1), "u1")
    assert tokens.identify(state(1), token) is not None
    assert tokens.identify(state(2, password=b"hash-2"), token) is None  # a new password
    assert tokens.identify(state(3, secret=b"n" * 32), token) is None  # auth disabled, enabled
    deleted = state(4)
    del deleted.users["u1"]
    assert tokens.identify(deleted, token) is None
    # An unchanged store (another generation) still honours it, checked again.
    assert tokens.identify(state(5), token) == Identity("u1", 5)


def test_a_forged_or_garbled_token_is_refused() -> None:
    tokens = SimpleTokens()
    current = state(1)
    token = tokens.assign(current, "u1")
    nonce, name, issued, signature = token.split(".")
    assert tokens.identify(current, f"{nonce}.{name}.{int(issued) + 1000}.{signature}") is None
    other = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    assert tokens.identify(current, f"{nonce}.{name}.{issued}.{other}") is None
    for garbage in ["", "a.b", "a.b.c.d", "a.%%%.1.x", "made-up-token"]:
        assert tokens.identify(current, garbage) is None


async def test_a_process_that_never_saw_a_token_counts_its_ttl_from_its_issue(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two real processes on one PostgreSQL, `--auth-token-ttl 4`: a token used every half
    second in the process that issued it stays alive there past its TTL, while the other process,
    which never saw it used, refuses it once the TTL from its issue has passed (counting from the
    first time it sees it would let every old token live for ever). A token issued since is
    honoured there: the refusal is the TTL's, not the other process's."""
    from tests.conftest import fresh_dsn
    from tests.test_auth import as_user, refused, setup_users, token

    ttl = 4
    dsn = fresh_dsn("postgres", tmp_path, request)
    (tmp_path / "b").mkdir()
    flags = ["--auth-token-ttl", str(ttl)]
    with KineProcess(dsn, tmp_path, *flags) as a, KineProcess(dsn, tmp_path / "b", *flags) as b:
        issuer, other = connect(a.address), connect(b.address)
        try:
            old, _ = await setup_users(issuer)
            issued_by = time.time()  # the token carries its issue time, at or before this
            get = rpc_pb2.RangeRequest(key=b"a")
            while time.time() <= issued_by + ttl + 0.5:
                await issuer.kv.Range(get, metadata=as_user(old))  # used: alive in the issuer
                await asyncio.sleep(0.5)
            fresh = await token(issuer, "root", "rootpw")
            await other.kv.Range(get, metadata=as_user(fresh))
            await refused(
                other.kv.Range(get, metadata=as_user(old)),
                grpc.StatusCode.UNAUTHENTICATED,
                "etcdserver: invalid auth token",
            )
            await issuer.kv.Range(get, metadata=as_user(old))
        finally:
            await issuer.close()
            await other.close()
