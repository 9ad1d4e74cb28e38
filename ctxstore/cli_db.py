"""``ctxstore db``: the PostgreSQL database of the write-behind (docs/postgres.md).

    ctxstore db migrate [--postgres-dsn DSN] [--config FILE]
    ctxstore db status  [--postgres-dsn DSN] [--config FILE]
    ctxstore db backfill --http HOST:PORT [--http HOST:PORT ...] [--timeout SECONDS]

The DSN comes as for ``serve``: the flag < ``CTXSTORE_POSTGRES_DSN`` < the ``postgres_dsn``
of a TOML file, reversed (flag wins).  Each command prints one JSON object on stdout; a failure
prints one line ``{"error": code, "message": ...}`` on stderr and exits with the status of its
class (``cli_common``).

``backfill`` asks running nodes (their ops ports, ``pg/admin.py``) to have every group copy its
whole history to the nodes' database again (for a database that is new or was emptied), then
prints the rows left about once a second until every group has copied what it held.  A node
resets the groups it hosts: with more than three nodes (each group on 3 of them) give nodes
that host every group together (``--http`` again); otherwise nothing is reset.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import h11
import msgspec

from .cli_common import (
    EXIT_ANSWER,
    EXIT_CONNECT,
    EXIT_STATUSES,
    EXIT_USAGE,
    HelpFormatter,
    emit,
    seconds,
)
from .config import ConfigError, load, parse_address

CONNECT_TIMEOUT_S = 10.0


def add_db(sub: Any) -> None:
    p = sub.add_parser(
        "db",
        help="the PostgreSQL database of the write-behind: migrate, status, backfill",
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
    text = (
        "have a running cluster copy its whole history to its database again (a new or "
        "emptied database; rows it holds are skipped), and wait until it did"
    )
    cmd = c.add_parser("backfill", help=text, description=text, formatter_class=HelpFormatter)
    cmd.add_argument(
        "--http",
        required=True,
        action="append",
        metavar="HOST:PORT",
        help="the ops (HTTP) port of a node started with --postgres-dsn (required); again for "
        "more nodes, when one does not host every group (more than three nodes)",
    )
    cmd.add_argument(
        "--timeout",
        type=seconds,
        default=3600.0,
        metavar="SECONDS",
        help="give up waiting after this many seconds, > 0 (default: 3600)",
    )


def _error(code: str, message: str, status: int) -> int:
    emit({"error": code, "message": message}, sys.stderr)
    return status


async def http_call(address: tuple[str, int], method: str, path: str) -> tuple[int, Any]:
    """One HTTP/1.1 request on its own connection; the status and the JSON body."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        conn = h11.Connection(h11.CLIENT)
        host = f"{address[0]}:{address[1]}"
        head = h11.Request(method=method, target=path, headers=[("Host", host)])
        writer.write(conn.send(head) + conn.send(h11.EndOfMessage()))
        status, body = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > 1 << 20:
                    raise ValueError(f"{host}{path}: an answer over 1 MiB")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        return status, msgspec.json.decode(body) if body else None
    finally:
        writer.close()


class _Failed(Exception):
    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code, self.status = code, status


async def _call(address: tuple[str, int], name: str, method: str, path: str) -> Any:
    """The JSON answer of a 200 or 202 (``_Failed`` otherwise)."""
    try:
        status, body = await asyncio.wait_for(http_call(address, method, path), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError, h11.ProtocolError) as e:
        raise _Failed("unavailable", f"cannot reach {name}: {e}", EXIT_CONNECT) from e
    if status == 404:
        raise _Failed("bad_request", f"{name}: the node has no postgres_dsn", EXIT_ANSWER)
    if status not in (200, 202):
        raise _Failed("internal", f"{name}: answered {status}: {body}", EXIT_ANSWER)
    return body


async def _backfill(args: argparse.Namespace) -> int:
    try:
        return await _backfill_nodes(args)
    except _Failed as e:
        return _error(e.code, str(e), e.status)


async def _backfill_nodes(args: argparse.Namespace) -> int:
    nodes: dict[str, tuple[str, int]] = {}
    for name in args.http:
        try:
            nodes[name] = parse_address(name, "http")
        except ConfigError as e:
            return _error("bad_request", str(e), EXIT_USAGE)
    # Which groups each node hosts; as few nodes as cover every group, in the order given.
    total, chosen, covered = 0, [], set[str]()
    for name, address in nodes.items():
        now = await _call(address, name, "GET", "/admin/postgres")
        total = max(total, now["groups"])
        hosted = {str(g) for g in now["hosted"]}
        if hosted - covered:
            chosen.append(name)
            covered |= hosted
    missing = sorted(set(range(total)) - {int(g) for g in covered})
    if missing:
        return _error(
            "bad_request",
            f"groups {missing} are hosted on none of the nodes given: add the --http of nodes "
            "that host them (nothing was reset)",
            EXIT_USAGE,
        )
    before: dict[str, dict[str, int]] = {}  # node -> group -> its epoch before the reset
    ids = []
    for name in chosen:
        started = await _call(nodes[name], name, "POST", "/admin/postgres/backfill")
        before[name] = started["epochs"]
        ids.append(started["node"])
    emit({"started": True, "groups": total, "nodes": ids})
    deadline = time.monotonic() + args.timeout
    last_print = 0.0
    while True:
        reset, rows = set(), 0
        for name in chosen:
            now = await _call(nodes[name], name, "GET", "/admin/postgres")
            epochs = now["epochs"]
            reset |= {g for g, e in before[name].items() if epochs.get(g, 0) > e}
            rows += now["backfill_rows"]
        if len(reset) == total and rows == 0:
            emit({"done": True, "groups": total})
            return 0
        if time.monotonic() - last_print >= 1.0:
            last_print = time.monotonic()
            emit({"groups_reset": len(reset), "backfill_rows": rows})
        if time.monotonic() > deadline:
            return _error("timeout", f"not done after {args.timeout:g} s", EXIT_ANSWER)
        await asyncio.sleep(0.2)


async def run_db(args: argparse.Namespace) -> int:
    if args.db_command == "backfill":
        return await _backfill(args)
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
