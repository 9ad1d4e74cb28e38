"""``ctxstore token issue``: mint an HS256 client token with the node's configured secret
(docs/auth.md).  The secret comes from ``--config``/``CTXSTORE_AUTH_JWT_SECRET`` as a node
reads it (``--kid`` picks one of several; default: the first), ``aud``/``iss`` likewise; the
token alone is printed on stdout."""

from __future__ import annotations

import argparse
import re
import sys
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
    i.add_argument("--config", metavar="FILE", help="the node's TOML settings (default: none; "
                   "CTXSTORE_* variables are read too)")  # fmt: skip


def run_token(args: argparse.Namespace) -> int:
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


__all__ = ["add_token", "run_token"]
