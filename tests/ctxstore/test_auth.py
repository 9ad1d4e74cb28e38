"""Token verification (ctxstore/auth.py): every kind of bad token, key rotation, the public-key
algorithms, a fuzz of random tokens; and the table (ctxstore/authz.py) as data."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ctxstore import authz
from ctxstore.auth import SERVICE, Key, Unauthorized, Verifier, issue, public_key, secret_key
from ctxstore.cli_token import bench
from ctxstore.config import ConfigError

from .test_cli import ctxstore

SECRET = "k" * 32
OTHER = "o" * 32


def hs(claims: dict[str, Any], key: str = SECRET, **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm="HS256", headers=headers or None)


def claims(**kw: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "role": "user", "exp": now + 60, "nbf": now - 1, **kw}


def verifier(*keys: str, **kw: Any) -> Verifier:
    return Verifier("jwt", keys=[secret_key(k) for k in keys or (SECRET,)], **kw)


def refusal(v: Verifier, token: str | None) -> str:
    with pytest.raises(Unauthorized) as e:
        v.verify(token)
    assert not token or token not in e.value.message
    return e.value.reason


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_good_token_names_its_principal() -> None:
    v = verifier()
    p = v.verify(hs(claims(sessions=["s1", "s2"])))
    assert (p.sub, p.role, p.sessions) == ("alice", "user", frozenset({"s1", "s2"}))
    assert p.expires_at is not None and p.restricted
    assert v.verify(issue(SECRET, "svc", "service", 60)).restricted is False


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: None, "missing"),
        (lambda: "", "missing"),
        (lambda: "garbage", "malformed"),
        (lambda: "a.b.c", "malformed"),
        (lambda: hs(claims(exp=int(time.time()) - 60)), "expired"),
        (lambda: hs(claims(nbf=int(time.time()) + 60)), "not_yet_valid"),
        (lambda: hs(claims(), OTHER), "bad_signature"),
        (lambda: jwt.encode(claims(), None, algorithm="none"), "bad_algorithm"),
        (lambda: hs(claims(aud="elsewhere")), "bad_audience"),
        (lambda: hs(claims(iss="mallory")), "bad_issuer"),
        (lambda: hs({"sub": "alice", "role": "user"}), "bad_claims"),  # no exp
        (lambda: hs(claims(role="admin")), "bad_claims"),
        (lambda: hs(claims(sub="")), "bad_claims"),
        (lambda: hs(claims(sessions="s1")), "bad_claims"),
        (lambda: hs(claims(), kid="nobody"), "unknown_key"),
    ],
)
def test_bad_tokens_are_refused_with_their_reason(
    make: Callable[[], str | None], reason: str
) -> None:
    token = make()  # made now: a token made at collection could expire before its turn
    v = verifier(audience="ctxstore", issuer="us") if "aud" in reason or "iss" in reason else None
    if v is None:
        v = verifier()
    if reason in ("bad_audience", "bad_issuer"):
        token = hs(claims(aud="elsewhere" if reason == "bad_audience" else "ctxstore",
                          iss="mallory" if reason == "bad_issuer" else "us"))  # fmt: skip
    assert refusal(v, token) == reason
    assert v.refusals[reason] == 1


def test_audience_and_issuer_are_required_when_configured() -> None:
    v = verifier(audience="ctxstore", issuer="us")
    assert refusal(v, hs(claims())) == "bad_claims"  # neither
    assert v.verify(hs(claims(aud="ctxstore", iss="us"))).sub == "alice"


def test_a_signature_over_a_changed_payload_fails() -> None:
    head, _, sig = hs(claims()).split(".")
    forged = b64(json.dumps(claims(role="service")).encode())
    assert refusal(verifier(), f"{head}.{forged}.{sig}") == "bad_signature"


def forged_hs256(payload: dict[str, Any], key: bytes) -> str:
    """A token HMAC-signed with ``key`` (PyJWT refuses to sign with a PEM key: an attacker
    would not)."""
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing = f"{header}.{b64(json.dumps(payload).encode())}"
    mac = hmac.new(key, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(mac)}"


def pem(tmp_path: Path, name: str, key: Any) -> str:
    path = tmp_path / name
    path.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return str(path)


def test_eddsa_and_es256_tokens_verify_with_their_public_keys(tmp_path: Path) -> None:
    ed = ed25519.Ed25519PrivateKey.generate()
    p256 = ec.generate_private_key(ec.SECP256R1())
    keys = [
        public_key(f"ed={pem(tmp_path, 'ed.pem', ed)}"),
        public_key(pem(tmp_path, "p.pem", p256)),
    ]
    v = Verifier("jwt", keys=keys)
    assert v.verify(jwt.encode(claims(), ed, algorithm="EdDSA", headers={"kid": "ed"})).sub
    assert v.verify(jwt.encode(claims(sub="bob"), p256, algorithm="ES256")).sub == "bob"
    # HS/RS confusion: a token "signed" HS256 with the public key's PEM as the secret.
    public = (tmp_path / "ed.pem").read_bytes()
    confused = forged_hs256(claims(role="service"), public)
    assert refusal(v, confused) == "bad_algorithm"
    rs = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refusal(v, jwt.encode(claims(), rs, algorithm="RS256")) == "bad_algorithm"
    with pytest.raises(ConfigError, match="Ed25519"):  # an RSA key is not accepted
        public_key(pem(tmp_path, "rsa.pem", rs))
    with pytest.raises(ConfigError, match="cannot read"):
        public_key(str(tmp_path / "missing.pem"))


def test_key_rotation_by_kid() -> None:
    old, new = f"old={SECRET}", f"new={OTHER}"
    both = verifier(old, new)
    token_old = issue(old, "alice", "user", 60)
    token_new = issue(new, "alice", "user", 60)
    assert jwt.get_unverified_header(token_new)["kid"] == "new"
    assert both.verify(token_old).sub == both.verify(token_new).sub == "alice"
    after = verifier(new)  # the old key retired
    assert refusal(after, token_old) == "unknown_key"
    assert after.verify(token_new).sub == "alice"
    # A kid names one key: a token of the old secret under the new kid fails.
    assert refusal(after, hs(claims(), SECRET, kid="new")) == "bad_signature"


def test_short_secrets_and_static_tokens() -> None:
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        secret_key("short")
    v = Verifier("static", static_tokens=["t-1", "t-2"])
    assert v.verify("t-2") is SERVICE
    assert refusal(v, "t-3") == "malformed"
    assert Verifier("off").verify(None) is SERVICE


@pytest.mark.parametrize("keys", ["one", "rotation", "public"])
def test_a_fuzz_of_random_tokens_only_ever_refuses(keys: str) -> None:
    """10 000 random tokens, against one key (no header read first), two (the header chooses
    the key: a rotation) and two public keys; each is refused with a reason or verified."""
    rng = random.Random(23)
    if keys == "public":
        ed, p256 = ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())
        v = Verifier("jwt", keys=[Key("k1", "EdDSA", ed.public_key()),
                                  Key("k2", "ES256", p256.public_key())])  # fmt: skip
        good = jwt.encode(claims(), ed, algorithm="EdDSA", headers={"kid": "k1"}).split(".")
    else:
        v = verifier(f"k1={SECRET}", *([f"k2={OTHER}"] if keys == "rotation" else []))
        good = issue(f"k1={SECRET}", "alice", "user", 60).split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ \x00é"
    for i in range(10_000):
        match i % 4:
            case 0:  # random characters
                token = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 200)))
            case 1:  # random base64url segments
                token = ".".join(b64(rng.randbytes(rng.randrange(0, 80))) for _ in range(3))
            case 2:  # random JSON header/payload, the good signature
                header = rng.choice([{"alg": "HS256"}, {"alg": "none"}, {"kid": 1}, [], 7,
                                     {"alg": "HS256", "kid": "k1"}, {"alg": "EdDSA"},
                                     {"alg": ["HS256"]}, {"alg": {"a": 1}}, {"alg": None},
                                     {"alg": "HS256", "kid": ["k1"]},
                                     {"alg": 7, "kid": "k2"}])  # fmt: skip
                payload = rng.choice([claims(), {}, [], "x", claims(exp="soon"), None])
                parts = [json.dumps(header).encode(), json.dumps(payload).encode()]
                token = ".".join([*map(b64, parts), good[2]])
            case _:  # one character of the good token changed
                text = list(".".join(good))
                text[rng.randrange(len(text))] = rng.choice(alphabet)
                token = "".join(text)
        try:
            v.verify(token)
        except Unauthorized as e:
            assert e.reason in v.refusals
    assert sum(v.refusals.values()) + v.verified == 10_000
    assert v.verified < 100  # (a changed character in the padding-free tail may still verify)


def test_the_table_gives_services_everything_and_others_only_what_it_lists() -> None:
    for operation in [*authz.TABLE, "register_agent", "delete_agent", "anything"]:
        assert authz.access("service", operation) == authz.ANY
    for role in ("user", "agent"):
        assert authz.access(role, "register_agent") == authz.NONE
        assert authz.access(role, "ping") == authz.ANY
    assert authz.access("agent", "subscribe_inbox") == authz.NONE
    assert authz.owns("user", "alice", "alice", "bot") and not authz.owns("user", "bot", "a", "bot")
    assert authz.owns("agent", "bot", "alice", "bot") and not authz.owns("agent", "x", "a", "b")
    # A sessions claim narrows a token, even a service's, and forbids listings.
    narrowed = frozenset({"s1"})
    assert authz.admit("service", "svc", narrowed, "read", "s1", None)
    assert not authz.admit("service", "svc", narrowed, "read", "s2", None)
    assert not authz.admit("user", "alice", narrowed, "list_sessions", None, "alice")
    assert not authz.admit("user", "alice", narrowed, "create_session", None, "alice")


def test_token_issue_mints_what_the_node_accepts(tmp_path: Path) -> None:
    env = {**os.environ, "CTXSTORE_AUTH": "jwt", "CTXSTORE_SECRET": "our-own-secret",
           "CTXSTORE_AUTH_JWT_SECRET": f"k1={OTHER},k2={SECRET}",
           "CTXSTORE_AUTH_JWT_AUDIENCE": "chat"}  # fmt: skip
    args = ["token", "issue", "--sub", "alice", "--role", "user", "--ttl", "15m",
            "--sessions", "s1,s2", "--kid", "k2"]  # fmt: skip
    done = ctxstore(*args, env=env)
    assert done.returncode == 0, done.stderr
    minted = done.stdout.strip()
    v = verifier(f"k1={OTHER}", f"k2={SECRET}", audience="chat")
    p = v.verify(minted)
    assert (p.sub, p.role, p.sessions) == ("alice", "user", frozenset({"s1", "s2"}))
    assert p.expires_at is not None and 890 < p.expires_at - time.time() < 910
    assert jwt.get_unverified_header(minted)["kid"] == "k2"
    bad = ctxstore(*args[:-2], "--ttl", "soon", env=env)
    assert bad.returncode == 2 and "duration" in bad.stderr
    unset = ctxstore(*args[:-2], env={**os.environ, "CTXSTORE_AUTH_JWT_SECRET": ""})
    assert unset.returncode == 2 and "no secret configured" in unset.stderr


def test_a_cached_token_is_checked_for_expiry_again() -> None:
    v = verifier(leeway_s=0)
    token = hs(claims(exp=int(time.time()) + 1))
    first = v.verify(token)
    assert v.verify(token) is first  # from the cache
    time.sleep(max(0.0, (first.expires_at or 0) - time.time()) + 0.05)
    assert refusal(v, token) == "expired"
    assert refusal(v, token) == "expired"  # (and no longer cached: PyJWT says so too)


def test_the_verification_bench_measures_every_algorithm() -> None:
    lines = bench(200)
    assert [line["algorithm"] for line in lines] == ["HS256", "EdDSA", "ES256"]
    for line in lines:
        assert line["tokens"] == 200 and 0 < line["p50_us"] <= line["p99_us"] <= line["max_us"]
        assert line["cached_p50_us"] < line["p50_us"]
        assert 0 < line["signature_p50_us"] < line["p50_us"]  # the floor, under the whole
