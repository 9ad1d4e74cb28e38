"""``ctxstore db``: the PostgreSQL database of the write-behind (docs/postgres.md).

    ctxstore db migrate [--postgres-dsn DSN] [--config FILE]
    ctxstore db status  [--postgres-dsn DSN] [--config FILE]

The DSN comes as for ``serve``: the flag < ``CTXSTORE_POSTGRES_DSN`` < the ``postgres_dsn``
of a TOML file, reversed (flag wins).  Each command prints one JSON object on stdout; a failure
prints one line ``{"error": code, "message": ...}`` on stderr and exits with the status of its
class (``cli_common``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .cli_common import EXIT_ANSWER, EXIT_CONNECT, EXIT_STATUSES, EXIT_USAGE, HelpFormatter, emit
from .config import ConfigError, load

CONNECT_TIMEOUT_S = 10.0


def add_db(sub: Any) -> None:
    p = sub.add_parser(
        "db",
        help="the PostgreSQL database of the write-behind: migrate, status",
        description="Manage the PostgreSQL database ctxstore copies its history into "
        "(docs/postgres.md). The DSN comes from --postgres-dsn, CTXSTORE_POSTGRES_DSN or the "
        "postgres_dsn of --config, in that order.",
        epilog=EXIT_STATUSES,
        formatter_class=HelpFormatter,
    )
    c = p.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    for name, text in (
        ("migrate", "apply the schema migrations the database lacks (under an advisory lock: "
         "safe while nodes start)"),
        ("status", "the schema version of the database, its applied and pending migrations"),
    ):  # fmt: skip
        cmd = c.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        cmd.add_argument(
            "--postgres-dsn",
            metavar="DSN",
            default=None,
            help="postgresql://... (default: CTXSTORE_POSTGRES_DSN, else postgres_dsn of --config)",
        )
        cmd.add_argument(
            "--config", metavar="FILE", default=None, help="a TOML file of settings (default: none)"
        )


def _error(code: str, message: str, status: int) -> int:
    emit({"error": code, "message": message}, sys.stderr)
    return status


async def run_db(args: argparse.Namespace) -> int:
    import asyncpg

    from .pg import schema

    try:
        settings = load(args.config, {"postgres_dsn": args.postgres_dsn})
    except ConfigError as e:
        return _error("bad_request", str(e), EXIT_USAGE)
    if settings.postgres_dsn is None:
        return _error("bad_request", "no DSN: give --postgres-dsn", EXIT_USAGE)
    try:
        conn = await asyncpg.connect(settings.postgres_dsn, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        return _error("unavailable", f"cannot connect to Postgres: {e}", EXIT_CONNECT)
    try:
        if args.db_command == "migrate":
            applied = await schema.migrate(conn)
            status = await schema.status(conn)
            emit({"migrated": applied, "version": status.version, "latest": schema.LATEST})
            return 0
        status = await schema.status(conn)
        emit(
            {
                "version": status.version,
                "latest": schema.LATEST,
                "applied": [
                    {"version": a.version, "name": a.name, "applied_at": a.applied_at.isoformat()}
                    for a in status.applied
                ],
                "pending": [{"version": m.version, "name": m.name} for m in status.pending],
            }
        )
        return 0
    except schema.SchemaTooNew as e:
        return _error("conflict", str(e), EXIT_ANSWER)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        return _error("unavailable", f"Postgres: {type(e).__name__}: {e}", EXIT_ANSWER)
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT_S)
