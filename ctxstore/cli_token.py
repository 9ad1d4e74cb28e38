"""``ctxstore token issue``: mint an HS256 client token with the node's configured secret
(docs/auth.md).  The secret comes from ``--config``/``CTXSTORE_AUTH_JWT_SECRET`` as a node
reads it (``--kid`` picks one of several; default: the first), ``aud``/``iss`` likewise; the
token alone is printed on stdout.

``ctxstore token bench``: what verifying one token costs a node (``Verifier.verify``, as a
Hello does), by algorithm: distinct fresh tokens, each verified once; one JSON line per
algorithm with the mean and percentiles in microseconds (docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from typing import Any

from .cli_common import EXIT_USAGE
from .config import ConfigError, load

TTL = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
TTL_MAX_S = 366 * 86_400


def ttl_s(text: str) -> float:
    m = TTL.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 90s, 15m, 1h, 7d: {text!r}")
    seconds = float(m.group(1)) * UNIT_S[m.group(2)]
    if not 1 <= seconds <= TTL_MAX_S:
        raise argparse.ArgumentTypeError(f"from 1 s to 366 d: {text!r}")
    return seconds


def add_token(sub: Any) -> None:
    p = sub.add_parser(
        "token",
        help="mint a client token (docs/auth.md)",
        description="Mint an HS256 client token signed with the configured auth_jwt_secret.",
    )
    tsub = p.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    i = tsub.add_parser("issue", help="print a new token on stdout")
    i.add_argument(
        "--sub", required=True, help="the principal: a user or agent id, a service (required)"
    )
    i.add_argument("--role", required=True, choices=("user", "agent", "service"),
                   help="its own sessions (user, agent) or all (service)")  # fmt: skip
    i.add_argument("--ttl", type=ttl_s, default=3600.0, help="lifetime: 90s, 15m, 1h, 7d "
                   "(default: 1h)")  # fmt: skip
    i.add_argument("--sessions", default=None, metavar="ID,...",
                   help="narrow the token to these session ids (default: all)")  # fmt: skip
    i.add_argument("--kid", default=None, help="sign with the secret of this key id "
                   "(default: the first configured)")  # fmt: skip
    b = tsub.add_parser("bench", help="measure the cost of verifying a token")
    b.add_argument("--tokens", type=int, default=20_000, metavar="N",
                   help="tokens verified per algorithm (default: 20000)")  # fmt: skip
    i.add_argument("--config", metavar="FILE", help="the node's TOML settings (default: none; "
                   "CTXSTORE_* variables are read too)")  # fmt: skip


def run_token(args: argparse.Namespace) -> int:
    if args.token_command == "bench":
        for line in bench(max(100, args.tokens)):
            print(json.dumps(line), flush=True)
        return 0
    from .auth import issue, secret_key  # (PyJWT and cryptography: only for this command)

    try:
        settings = load(args.config)
        secrets = settings.auth_jwt_secret
        if not secrets:
            raise ConfigError("config: auth_jwt_secret: no secret configured to sign with")
        chosen = secrets[0]
        if args.kid is not None:
            named = [s for s in secrets if secret_key(s).kid == args.kid]
            if not named:
                raise ConfigError(f"config: auth_jwt_secret: no secret named {args.kid!r}")
            chosen = named[0]
        sessions = None if args.sessions is None else [s for s in args.sessions.split(",") if s]
        token = issue(
            chosen, args.sub, args.role, args.ttl, sessions=sessions,
            audience=settings.auth_jwt_audience, issuer=settings.auth_jwt_issuer,
        )  # fmt: skip
    except ConfigError as e:
        print(f"ctxstore token issue: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(token)
    return 0


def bench(n: int) -> list[dict[str, Any]]:
    """Verify ``n`` distinct tokens per algorithm; the cost of each, in microseconds.  Also
    the floor: the signature check alone (PyJWT's algorithm ``verify`` of the signing input,
    which is ``cryptography``'s, as ``Verifier.verify`` runs it), ``signature_p50_us``, timed
    token by token after each whole verification (so that a busy moment of the machine weighs
    on both alike)."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from jwt.utils import base64url_decode

    from .auth import CACHE_MAX, Key, Verifier

    secret = b"s" * 32
    ed = ed25519.Ed25519PrivateKey.generate()
    p256 = ec.generate_private_key(ec.SECP256R1())
    signers: list[tuple[str, Any, Any]] = [
        ("HS256", secret, secret), ("EdDSA", ed, ed.public_key()),
        ("ES256", p256, p256.public_key()),
    ]  # fmt: skip
    out = []
    for algorithm, private, public in signers:
        verifier = Verifier("jwt", keys=[Key("k", algorithm, public)])
        exp = int(time.time()) + 3600
        tokens = [
            jwt.encode({"sub": f"user-{i}", "role": "user", "exp": exp, "sessions": [f"s{i}"]},
                       private, algorithm=algorithm, headers={"kid": "k"})
            for i in range(n)
        ]  # fmt: skip
        check = jwt.get_algorithm_by_name(algorithm)
        key = check.prepare_key(public)
        costs = []
        signature = []  # the signature check alone, on the same tokens
        clock = time.perf_counter
        for i, token in enumerate(tokens):
            started = clock()
            verifier.verify(token)
            costs.append(clock() - started)
            if i < 2000:  # interleaved with the whole: both see the machine as it was
                signed, _, mac = token.rpartition(".")
                raw = base64url_decode(mac)
                started = clock()
                ok = check.verify(signed.encode(), key, raw)
                signature.append(clock() - started)
                assert ok
        again = []  # the same tokens again: from the verifier's cache (the last CACHE_MAX)
        for token in tokens[-CACHE_MAX:]:
            started = clock()
            verifier.verify(token)
            again.append(clock() - started)
        costs.sort()
        micro = [c * 1e6 for c in costs]
        out.append({
            "algorithm": algorithm, "tokens": n, "mean_us": round(statistics.fmean(micro), 1),
            "p50_us": round(micro[n // 2], 1), "p99_us": round(micro[n * 99 // 100], 1),
            "max_us": round(micro[-1], 1), "token_bytes": len(tokens[0]),
            "cached_p50_us": round(sorted(again)[len(again) // 2] * 1e6, 2),
            "signature_p50_us": round(sorted(signature)[len(signature) // 2] * 1e6, 1),
        })  # fmt: skip
    return out


__all__ = ["add_token", "bench", "run_token"]
