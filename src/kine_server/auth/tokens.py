"""Auth tokens, as etcd's --auth-token offers them: `simple` (opaque, valid for --auth-token-ttl
from their last use) and `jwt` (signed claims a client can read; `ttl` from issue).

etcd keeps simple tokens in each member's memory, replicated through raft. Here a simple token
carries its user and issue time and is signed (HMAC-SHA256) with a key kept in the auth store,
so every process and instance sharing the database accepts it without asking anyone, and the
key changes when auth is enabled or disabled (every token issued is then void, as in etcd).
The signature also covers the user's password hash: changing the password, or deleting the user
(and adding it again), voids their tokens, as etcd's invalidateUser does. Use keeps a token
alive past its TTL in the process that sees it used (etcd's TTL refresh); another process honours
it for the TTL from issue, and clients take a new one when told the old one is invalid.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import hmac
import json
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kine_server import errors
from kine_server.auth.permissions import AuthState, Identity
from kine_server.durations import parse_duration

#: etcd's --auth-token-ttl default.
DEFAULT_TTL = 300.0
#: How many tokens a process remembers the last use of; past it, the oldest uses are forgotten
#: (those tokens then count from their issue time).
MAX_REMEMBERED = 100_000


class TokenOptionsError(ValueError):
    """--auth-token that etcd would refuse too; the message names what is wrong."""


class Tokens(abc.ABC):
    """What a token provider does."""

    @abc.abstractmethod
    def assign(self, state: AuthState, user: str) -> str:
        """A new token for `user` (who has just given the right password)."""

    @abc.abstractmethod
    def identify(self, state: AuthState, token: str) -> Identity | None:
        """Who the token is for, or None if it is not valid (any more)."""


class SimpleTokens(Tokens):
    """`simple`: a random part, the user, the issue time, and a signature (see the module)."""

    def __init__(self, ttl: float = DEFAULT_TTL, clock: Callable[[], float] = time.time) -> None:
        self._ttl = ttl
        self._clock = clock
        #: Tokens this process accepted: (last use or issue, auth generation verified at, user),
        #: in order of use. Checked again (the signature) once the auth store has changed.
        self._seen: dict[str, tuple[float, int, str]] = {}

    def assign(self, state: AuthState, user: str) -> str:
        nonce = "".join(secrets.choice(string.ascii_letters) for _ in range(16))
        issued = str(int(self._clock()))
        name = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
        body = f"{nonce}.{name}.{issued}"
        return f"{body}.{self._sign(state, user, body)}"

    def identify(self, state: AuthState, token: str) -> Identity | None:
        seen = self._seen.get(token)
        if seen is not None and seen[1] == state.generation:
            last, user = seen[0], seen[2]
        else:
            verified = self._verify(state, token)
            if verified is None:
                return None
            user, issued = verified
            last = max(issued, seen[0]) if seen is not None else issued
        now = self._clock()
        if now - last > self._ttl:
            self._seen.pop(token, None)
            return None
        self._remember(token, (now, state.generation, user))
        return Identity(user, state.revision)

    def _verify(self, state: AuthState, token: str) -> tuple[str, float] | None:
        """(user, issue time) of a token signed with the store's key for a user it has now."""
        parts = token.split(".")
        if len(parts) != 4 or not state.secret:
            return None
        _nonce, name, issued, signature = parts
        try:
            user = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
            issued_at = float(int(issued))
        except ValueError:
            return None
        if user not in state.users:
            return None
        if not hmac.compare_digest(signature, self._sign(state, user, ".".join(parts[:3]))):
            return None
        return user, issued_at

    def _remember(self, token: str, seen: tuple[float, int, str]) -> None:
        self._seen.pop(token, None)  # re-inserted last: the dict is in order of use
        self._seen[token] = seen
        if len(self._seen) > MAX_REMEMBERED:
            for stale in list(self._seen)[: MAX_REMEMBERED // 10]:
                del self._seen[stale]

    @staticmethod
    def _sign(state: AuthState, user: str, body: str) -> str:
        password = state.users[user].password
        mac = hmac.new(state.secret, body.encode() + b"\0" + password, hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")


@dataclass(frozen=True)
class JwtOptions:
    sign_method: str
    private_key: bytes | None
    public_key: bytes | None
    ttl: float


#: etcd's sign methods: RSA (PKCS #1 v1.5 and PSS), ECDSA, EdDSA and HMAC.
_RSA = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
_ECDSA = {"ES256": 32, "ES384": 48, "ES512": 66}
_HMAC = {"HS256", "HS384", "HS512"}
SIGN_METHODS = _RSA | set(_ECDSA) | _HMAC | {"EdDSA"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class JwtTokens(Tokens):
    """`jwt`: claims {username, revision, exp}, signed as --auth-token's sign-method says.

    A token's `revision` is the auth revision when it was issued: after any change to users or
    roles, requests with it fail with etcd's "revision of auth store is old", and clients
    authenticate again (etcd behaves so)."""

    def __init__(self, options: JwtOptions, clock: Callable[[], float] = time.time) -> None:
        from cryptography.hazmat.primitives import serialization

        self._options = options
        self._clock = clock
        # cryptography's key classes, one per algorithm family: typed loosely on purpose.
        self._private: Any = None
        self._public: Any = None
        method = options.sign_method
        if method in _HMAC:
            key = options.private_key or options.public_key
            if not key:
                raise TokenOptionsError("jwt: an HS sign-method needs priv-key (the shared secret)")
            self._secret = key
            return
        if options.private_key:
            self._private = serialization.load_pem_private_key(options.private_key, None)
            self._public = self._private.public_key()
        if options.public_key:
            self._public = serialization.load_pem_public_key(options.public_key)
        if self._public is None:
            raise TokenOptionsError("jwt: pub-key or priv-key is needed")

    def assign(self, state: AuthState, user: str) -> str:
        header = {"alg": self._options.sign_method, "typ": "JWT"}
        claims = {
            "exp": int(self._clock() + self._options.ttl),
            "revision": state.revision,
            "username": user,
        }
        body = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
        return body + "." + _b64(self._sign(body.encode()))

    def identify(self, state: AuthState, token: str) -> Identity | None:
        parts = token.split(".")
        if len(parts) != 3:
            return None
        try:
            header = json.loads(_unb64(parts[0]))
            claims = json.loads(_unb64(parts[1]))
            signature = _unb64(parts[2])
        except ValueError:
            return None
        if not isinstance(header, dict) or header.get("alg") != self._options.sign_method:
            return None
        if not self._verify(f"{parts[0]}.{parts[1]}".encode(), signature):
            return None
        if not isinstance(claims, dict):
            return None
        user, revision, expires = claims.get("username"), claims.get("revision"), claims.get("exp")
        if not isinstance(user, str) or not isinstance(revision, int):
            return None
        if isinstance(expires, (int, float)) and expires < self._clock():
            return None
        return Identity(user, revision)

    def _hash(self) -> Any:
        from cryptography.hazmat.primitives import hashes

        bits = self._options.sign_method[-3:]
        return {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}[bits]

    def _sign(self, data: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

        method = self._options.sign_method
        if method in _HMAC:
            return hmac.new(self._secret, data, "sha" + method[2:]).digest()
        key = self._private
        if key is None:
            raise errors.VerifyOnly()
        if method == "EdDSA":
            return bytes(key.sign(data))
        if method in _ECDSA:
            der = key.sign(data, ec.ECDSA(self._hash()))
            r, s = utils.decode_dss_signature(der)
            size = _ECDSA[method]
            return r.to_bytes(size, "big") + s.to_bytes(size, "big")
        pad = (
            padding.PSS(padding.MGF1(self._hash()), padding.PSS.DIGEST_LENGTH)
            if method.startswith("PS")
            else padding.PKCS1v15()
        )
        return bytes(key.sign(data, pad, self._hash()))

    def _verify(self, data: bytes, signature: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

        method = self._options.sign_method
        if method in _HMAC:
            return hmac.compare_digest(signature, self._sign(data))
        key = self._public
        try:
            if method == "EdDSA":
                key.verify(signature, data)
            elif method in _ECDSA:
                size = _ECDSA[method]
                if len(signature) != 2 * size:
                    return False
                r = int.from_bytes(signature[:size], "big")
                s = int.from_bytes(signature[size:], "big")
                der = utils.encode_dss_signature(r, s)
                key.verify(der, data, ec.ECDSA(self._hash()))
            else:
                pad = (
                    padding.PSS(padding.MGF1(self._hash()), padding.PSS.AUTO)
                    if method.startswith("PS")
                    else padding.PKCS1v15()
                )
                key.verify(signature, data, pad, self._hash())
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True


def make_tokens(option: str, ttl: float = DEFAULT_TTL) -> Tokens:
    """The provider --auth-token names: `simple`, or `jwt,pub-key=F,priv-key=F,sign-method=M
    [,ttl=D]` as etcd parses it (comma-separated key=value pairs, each at most once)."""
    kind, *pairs = option.split(",")
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "=" in value or key in settings:
            raise TokenOptionsError(
                "invalid auth options (comma-separated key=value pairs, each once)"
            )
        settings[key] = value
    if kind == "simple":
        return SimpleTokens(ttl)
    if kind != "jwt":
        raise TokenOptionsError(f"unknown token type {kind!r} (simple or jwt)")
    method = settings.get("sign-method", "")
    if method not in SIGN_METHODS:
        raise TokenOptionsError(f"sign-method must be one of {', '.join(sorted(SIGN_METHODS))}")

    def read(name: str) -> bytes | None:
        path = settings.get(name)
        if not path:
            return None
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as exc:
            raise TokenOptionsError(f"{name}={path}: {exc.strerror}") from exc

    jwt_ttl = parse_duration(settings["ttl"]) if "ttl" in settings else DEFAULT_TTL
    try:
        return JwtTokens(JwtOptions(method, read("priv-key"), read("pub-key"), jwt_ttl))
    except (ValueError, TypeError) as exc:
        raise TokenOptionsError(f"jwt: {exc}") from exc
