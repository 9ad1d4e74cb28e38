"""Client authentication: a token in, a ``Principal`` out (docs/auth.md).

``Verifier.verify(token)`` checks a client's token by the node's mode (``--auth``):

- ``off``: every client is the ``SERVICE`` principal (no token needed; ``make run``);
- ``static``: the token must be one of ``--token`` (compared in constant time): a service;
- ``jwt``: a JWT (RFC 7519) verified by PyJWT, never parsed by hand.  Keys: HS256 shared
  secrets (``--auth-jwt-secret [KID=]SECRET``) and EdDSA/ES256 public keys
  (``--auth-jwt-public-key [KID=]FILE``, PEM), several of each for rotation: a token whose
  header names a ``kid`` is checked with that key only; one without is tried on the keys
  without a kid.  The algorithm is the key's, never the header's choice (so ``none`` and
  HS/RS confusion fail).  ``exp`` is required, ``nbf`` honoured, both with
  ``--auth-jwt-leeway-s``; ``aud``/``iss`` are required when configured.  Claims: ``sub``
  (the principal, 1..128 chars), ``role`` (``user``, ``agent`` or ``service``), optional
  ``sessions`` (the session ids the token is narrowed to, at most ``SESSIONS_MAX``).

A refusal raises ``Unauthorized`` with a ``reason`` (a short stable word, the label of the
refusals metric) and a message for the client; neither ever holds the token.  ``issue`` mints
an HS256 token (``ctxstore token issue``).
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from msgspec import Meta

from .authz import Role
from .config import ConfigError, Settings

SESSIONS_MAX: Final = 256
SECRET_BYTES_MIN: Final = 32  # RFC 7518 §3.2: an HS256 key at least as long as the hash
TOKEN_CHARS_MAX: Final = 4096
CACHE_MAX: Final = 1024
"""Tokens verified recently, kept with their principal: a client that connects again (every
HTTP API request does) with the same token costs a lookup, and its expiry is checked again."""
ALGORITHMS: Final = frozenset({"HS256", "EdDSA", "ES256"})

REASONS: Final = (
    "missing",  # no token
    "malformed",  # not a JWT (or not one of the static tokens)
    "bad_algorithm",  # an algorithm no key of this node has (none, RS256, HS with a public key)
    "unknown_key",  # a kid this node has no key for
    "bad_signature",
    "expired",
    "not_yet_valid",
    "bad_audience",
    "bad_issuer",
    "bad_claims",  # sub, role, exp or sessions missing or invalid
    "forbidden",  # a valid token, a request it may not make (counted by the service)
)
"""Why a client was refused: the ``reason`` label of ``ctxstore_auth_refusals_total``."""


class Unauthorized(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        assert reason in REASONS
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection speaks for: ``sub`` with ``role``; ``sessions``: the ids its token is
    narrowed to (None: not narrowed); ``expires_at``: its token's ``exp`` plus the leeway
    (Unix seconds; None: never)."""

    sub: str
    role: Role
    sessions: frozenset[str] | None = None
    expires_at: float | None = None

    @property
    def restricted(self) -> bool:
        """Whether requests need checking at all (not an unnarrowed service)."""
        return self.role != "service" or self.sessions is not None


SERVICE: Final = Principal("", "service")


def same_principal(now: Principal, new: Principal) -> bool:
    """Whether ``new`` (a refreshed token's) may replace ``now`` on an open connection: the
    same ``sub`` and ``role``, and narrowed to no fewer sessions (what the connection was
    allowed, its subscriptions among it, it still is).  Its expiry may be anything."""
    if (new.sub, new.role) != (now.sub, now.role):
        return False
    if new.sessions is None:
        return True
    return now.sessions is not None and new.sessions >= now.sessions


SessionId = Annotated[str, Meta(min_length=1, max_length=128)]


class Claims(msgspec.Struct):
    """The claims we read (others are ignored; PyJWT checked ``exp``/``nbf``/``aud``/``iss``)."""

    sub: Annotated[str, Meta(min_length=1, max_length=128)]
    role: Role
    exp: int | float
    sessions: Annotated[list[SessionId], Meta(max_length=SESSIONS_MAX)] | None = None


@dataclass(frozen=True, slots=True)
class Key:
    kid: str | None
    algorithm: str
    key: Any  # bytes (HS256) or a cryptography public key object


_FAILURES: Final[tuple[tuple[type[Exception], str], ...]] = (
    # most specific first: InvalidSignatureError is a DecodeError
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "bad_audience"),
    (jwt.InvalidIssuerError, "bad_issuer"),
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.InvalidAlgorithmError, "bad_algorithm"),
    (jwt.MissingRequiredClaimError, "bad_claims"),
    (jwt.DecodeError, "malformed"),
)


class Verifier:
    """Checks tokens by a node's mode and keys; counts refusals by reason (``refusals``)."""

    def __init__(
        self,
        mode: Literal["off", "static", "jwt"],
        *,
        static_tokens: Sequence[str] = (),
        keys: Sequence[Key] = (),
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 5.0,
    ) -> None:
        if mode == "static" and not static_tokens:
            raise ValueError("static mode needs tokens")
        if mode == "jwt" and not keys:
            raise ValueError("jwt mode needs keys")
        self.mode = mode
        self._static = [t.encode() for t in static_tokens]
        self._by_kid = {k.kid: k for k in keys if k.kid is not None}
        self._unnamed = [k for k in keys if k.kid is None]
        self.audience = audience
        self.issuer = issuer
        self.leeway_s = leeway_s
        required = ["exp", "sub"] + (["aud"] if audience else []) + (["iss"] if issuer else [])
        self._jwt = jwt.PyJWT({"require": required})
        self._only = keys[0] if len(keys) == 1 else None
        self._cache: dict[str, Principal] = {}  # verified tokens, oldest first (CACHE_MAX)
        self.refusals: Counter[str] = Counter()
        self.verified = 0
        self.refreshed = 0  # connections whose token a second Hello replaced (the service's)

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def verify(self, token: str | None) -> Principal:
        """The principal of ``token``, or ``Unauthorized`` (counted)."""
        try:
            principal = self._verify(token)
        except Unauthorized as e:
            self.refusals[e.reason] += 1
            raise
        self.verified += 1
        return principal

    def refuse(self, reason: str) -> None:
        """Count a refusal decided elsewhere (``forbidden``)."""
        self.refusals[reason] += 1

    def _verify(self, token: str | None) -> Principal:
        if self.mode == "off":
            return SERVICE
        if not token:
            raise Unauthorized("missing", "a token is required (hello's token)")
        if self.mode == "static":
            given = token.encode()
            if any(hmac.compare_digest(given, t) for t in self._static):
                return SERVICE
            raise Unauthorized("malformed", "invalid token")
        if len(token) > TOKEN_CHARS_MAX:
            raise Unauthorized("malformed", f"the token is over {TOKEN_CHARS_MAX} characters")
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at is not None and time.time() > cached.expires_at:
                del self._cache[token]
                raise Unauthorized("expired", _MESSAGES["expired"])
            return cached
        principal = self._decode(token)
        cache = self._cache
        if len(cache) >= CACHE_MAX:
            del cache[next(iter(cache))]  # the oldest
        cache[token] = principal
        return principal

    def _decode(self, token: str) -> Principal:
        only = self._only
        if only is not None:  # one key: no need to read the header first
            key = only
        else:
            try:
                key = self._key_for(jwt.get_unverified_header(token))
            except jwt.PyJWTError:
                raise Unauthorized("malformed", "the token is not a JWT") from None
        try:
            complete = self._jwt.decode_complete(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
            )
        except jwt.PyJWTError as e:
            if only is not None and isinstance(e, jwt.InvalidSignatureError):
                self._check_kid(jwt.get_unverified_header(token), only)  # another key's?
            for kind, reason in _FAILURES:
                if isinstance(e, kind):
                    raise Unauthorized(reason, _MESSAGES[reason]) from None
            raise Unauthorized("bad_claims", "the token's claims are invalid") from None
        if only is not None:
            self._check_kid(complete["header"], only)
        payload = complete["payload"]
        try:
            claims = msgspec.convert(payload, Claims)
        except msgspec.ValidationError as e:
            raise Unauthorized("bad_claims", f"the token's claims: {e}") from None
        sessions = None if claims.sessions is None else frozenset(claims.sessions)
        return Principal(claims.sub, claims.role, sessions, float(claims.exp) + self.leeway_s)

    @staticmethod
    def _check_kid(header: dict[str, Any], key: Key) -> None:
        """The one key verified the token: was it the key the header names?"""
        kid = header.get("kid")
        if kid is not None and kid != key.kid:
            raise Unauthorized("unknown_key", "the token's key id (kid) is unknown")
        if kid is None and key.kid is not None:
            raise Unauthorized("bad_algorithm", "no key of this node signs with that algorithm")

    def _key_for(self, header: dict[str, Any]) -> Key:
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:  # (a list: unhashable)
            raise Unauthorized("bad_algorithm", "the token's algorithm is not accepted")
        kid = header.get("kid")
        if kid is not None:
            key = self._by_kid.get(kid) if isinstance(kid, str) else None
            if key is None:
                raise Unauthorized("unknown_key", "the token's key id (kid) is unknown")
            if key.algorithm != algorithm:
                raise Unauthorized("bad_algorithm", "the token's algorithm is not its key's")
            return key
        for key in self._unnamed:
            if key.algorithm == algorithm:
                return key
        raise Unauthorized("bad_algorithm", "no key of this node signs with that algorithm")


_MESSAGES: Final = {
    "expired": "the token expired",
    "not_yet_valid": "the token is not valid yet (nbf)",
    "bad_audience": "the token is for another audience (aud)",
    "bad_issuer": "the token is from another issuer (iss)",
    "bad_signature": "the token's signature is invalid",
    "bad_algorithm": "the token's algorithm is not accepted",
    "bad_claims": "the token lacks a required claim",
    "malformed": "the token is not a valid JWT",
}


# -- keys and settings -----------------------------------------------------------------------------
def _split_kid(text: str) -> tuple[str | None, str]:
    """``KID=VALUE`` or ``VALUE`` (a kid is 1..64 characters of [A-Za-z0-9._-])."""
    kid, sep, value = text.partition("=")
    if sep and kid and len(kid) <= 64 and all(c.isalnum() or c in "._-" for c in kid):
        return kid, value
    return None, text


def secret_key(text: str) -> Key:
    kid, secret = _split_kid(text)
    if len(secret.encode()) < SECRET_BYTES_MIN:
        raise ConfigError(
            f"config: auth_jwt_secret: a secret must be at least {SECRET_BYTES_MIN} bytes"
        )
    return Key(kid, "HS256", secret.encode())


def public_key(text: str) -> Key:
    kid, path = _split_kid(text)
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ConfigError(
            f"config: auth_jwt_public_key: cannot read {path}: {e.strerror}"
        ) from None
    try:
        key = load_pem_public_key(pem)
    except ValueError as e:
        raise ConfigError(
            f"config: auth_jwt_public_key: {path}: not a PEM public key ({e})"
        ) from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return Key(kid, "EdDSA", key)
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return Key(kid, "ES256", key)
    raise ConfigError(
        f"config: auth_jwt_public_key: {path}: an Ed25519 (EdDSA) or P-256 (ES256) key is needed"
    )


def verifier_of(settings: Settings) -> Verifier:
    """The node's verifier (``ConfigError`` for a key that cannot be used)."""
    mode = settings.auth_mode
    keys: list[Key] = []
    if mode == "jwt":
        keys = [secret_key(s) for s in settings.auth_jwt_secret]
        keys += [public_key(p) for p in settings.auth_jwt_public_key]
        kids = [k.kid for k in keys if k.kid is not None]
        if len(set(kids)) != len(kids):
            raise ConfigError("config: auth_jwt_*: a kid names two keys")
    return Verifier(
        mode,
        static_tokens=settings.tokens if mode == "static" else (),
        keys=keys,
        audience=settings.auth_jwt_audience,
        issuer=settings.auth_jwt_issuer,
        leeway_s=settings.auth_jwt_leeway_s,
    )


def issue(
    secret: str,
    sub: str,
    role: Role,
    ttl_s: float,
    *,
    sessions: Sequence[str] | None = None,
    audience: str | None = None,
    issuer: str | None = None,
    now: float | None = None,
) -> str:
    """An HS256 token for ``sub`` with ``role``, valid ``ttl_s`` seconds (``secret``: as
    configured, ``[KID=]SECRET``; its kid goes in the header)."""
    key = secret_key(secret)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "sub": sub, "role": role, "iat": issued, "nbf": issued,
        "exp": issued + max(1, int(ttl_s)), "jti": uuid.uuid4().hex,
    }  # fmt: skip
    if sessions is not None:
        claims["sessions"] = list(sessions)
    if audience is not None:
        claims["aud"] = audience
    if issuer is not None:
        claims["iss"] = issuer
    headers = {"kid": key.kid} if key.kid is not None else None
    return jwt.encode(claims, key.key, algorithm="HS256", headers=headers)


__all__ = [
    "REASONS",
    "SERVICE",
    "Claims",
    "Key",
    "Principal",
    "Unauthorized",
    "Verifier",
    "issue",
    "public_key",
    "same_principal",
    "secret_key",
    "verifier_of",
]
