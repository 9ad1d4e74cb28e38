"""``ctxstore admin``: the cluster's nodes (design §5.6, docs/ctxstore.md "Placement").

    ctxstore admin nodes      --http HOST:PORT
    ctxstore admin drain NODE --http HOST:PORT [--config FILE]
    ctxstore admin remove NODE --http HOST:PORT [--config FILE]
    ctxstore admin rebalance  --http HOST:PORT [--config FILE]

Each asks one node's HTTP port (``cluster_admin``).  ``nodes`` prints the view as that node
applied it: one JSON object (every node's id, addresses, state, the groups the view places on
it and those it leads as far as that node knows, the meta group's leader, and the node's own
hosted and led groups).  The others are signed with the cluster's secret and id, taken as for
``serve`` (``--config``, ``CTXSTORE_SECRET``, ``CTXSTORE_CLUSTER_ID``); they print the node's
answer.  ``drain`` marks the node ``leaving``: the leaders move its groups away (``admin
nodes`` shows ``groups`` 0 for it, then none of the hosted groups' members names it), then
the node proposes its own removal and stops (``remove`` is not needed).  ``remove`` of a
dead node retires it at once: its groups are given their new replicas, and its id never comes
back.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import h11

from .cli_common import EXIT_ANSWER, EXIT_CONNECT, EXIT_STATUSES, EXIT_USAGE, HelpFormatter, emit
from .cli_db import http_call
from .cluster_admin import signed_target
from .config import ConfigError, load, parse_address

CALL_TIMEOUT_S = 10.0


def add_admin(sub: Any) -> None:
    p = sub.add_parser(
        "admin",
        help="the cluster's nodes: list, drain, remove, rebalance",
        description="The cluster's nodes, through one node's HTTP port (docs/ctxstore.md "
        "Placement). Changes are signed with the cluster's secret (--config, CTXSTORE_SECRET).",
        epilog=EXIT_STATUSES,
        formatter_class=HelpFormatter,
    )
    c = p.add_subparsers(dest="admin_command", required=True, metavar="COMMAND")
    for name, text, node in (
        ("nodes", "print the cluster view: nodes, states, groups placed and led", False),
        ("drain", "move every group of NODE away, then it is removed (leaving, removed)", True),
        ("remove", "retire NODE (a dead node replaced, or a drained one): for good", True),
        ("rebalance", "a leader-balancing round on the node asked, now", False),
    ):
        cmd = c.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        if node:
            cmd.add_argument("node", type=int, metavar="NODE", help="the node's id")
        cmd.add_argument(
            "--http", required=True, metavar="HOST:PORT", help="a node's HTTP port (required)"
        )
        cmd.add_argument(
            "--config", metavar="FILE", default=None, help="a TOML file of settings (default: none)"
        )


def _error(code: str, message: str, status: int) -> int:
    emit({"error": code, "message": message}, sys.stderr)
    return status


async def run_admin(args: argparse.Namespace) -> int:
    try:
        address = parse_address(args.http, "http")
        settings = load(args.config, {})
    except ConfigError as e:
        return _error("bad_request", str(e), EXIT_USAGE)
    if args.admin_command == "nodes":
        method, target = "GET", "/admin/nodes"
    else:
        params = {} if args.admin_command == "rebalance" else {"node": str(args.node)}
        path = f"/admin/nodes/{args.admin_command}"
        method = "POST"
        target = signed_target(settings.secret, settings.cluster_id, path, params)
    try:
        status, body = await asyncio.wait_for(http_call(address, method, target), CALL_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError, h11.ProtocolError) as e:
        return _error("unavailable", f"cannot reach {args.http}: {e}", EXIT_CONNECT)
    if status in (200, 202):
        emit(body)
        return 0
    if isinstance(body, dict) and "error" in body:
        return _error(str(body["error"]), str(body.get("message", status)), EXIT_ANSWER)
    return _error("internal", f"{args.http}: answered {status}: {body}", EXIT_ANSWER)


__all__ = ["add_admin", "run_admin"]
