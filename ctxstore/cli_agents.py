"""``ctxstore client agent ACTION``: the agent registry from a terminal (docs/agents.md)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from .cli_common import UsageError, emit, int_in, json_object

if TYPE_CHECKING:
    from wire.client import Client

DEFAULTS: dict[str, Any] = {
    "headers": {}, "timeout_ms": 120_000, "idle_timeout_ms": 30_000, "debounce_ms": 500,
    "history": "all", "max_attempts": 5, "status": "active", "protocol": "auto",
}  # fmt: skip
"""What ``agent create`` fills in (``agent update`` keeps the agent's values instead)."""


def add_agent(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    p = command("agent", "register, change, show, list or disable agents")
    actions = p.add_subparsers(dest="agent_action", required=True, metavar="ACTION")
    for name, text in (
        ("create", "register an agent; print it"),
        ("update", "change a registered agent's fields (others keep their values); print it"),
    ):
        a = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        a.add_argument("id", help="the agent's id")
        a.add_argument(
            "--url",
            required=name == "create",
            help="the webhook, http(s)://... ("
            + ("required)" if name == "create" else "default: the agent's)"),
        )
        a.add_argument("--headers", type=json_object, metavar="JSON",
                       help="request headers, a JSON object of strings (default: "
                       + ("{})" if name == "create" else "the agent's)"))  # fmt: skip
        for flag, lo, hi in (("timeout-ms", 100, 3_600_000), ("idle-timeout-ms", 100, 600_000),
                             ("debounce-ms", 0, 60_000), ("max-attempts", 1, 20)):  # fmt: skip
            default = DEFAULTS[flag.replace("-", "_")] if name == "create" else "the agent's"
            a.add_argument(f"--{flag}", type=int_in(lo, hi), metavar="N",
                           help=f"{lo} to {hi} (default: {default})")  # fmt: skip
        keep = name == "update"
        a.add_argument("--history", metavar="MODE", help="all, window or 'tail N' (default: "
                       + ("the agent's)" if keep else "all)"))  # fmt: skip
        a.add_argument("--protocol", choices=("auto", "h1", "h2"),
                       help="h2 on http://: HTTP/2, prior knowledge (default: "
                       + ("the agent's)" if keep else "auto)"))  # fmt: skip
        a.add_argument("--status", choices=("active", "disabled"), help="whether calls are made "
                       + ("(default: the agent's)" if keep else "(default: active)"))  # fmt: skip
    for name, text in (("get", "print an agent"), ("disable", "stop dispatching to an agent")):
        a = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        a.add_argument("id", help="the agent's id")
    actions.add_parser("list", help="print every agent, one per line")


def _fields(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    fields = dict(base)
    for name in ("url", *DEFAULTS):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    return fields


async def run_agent(client: Client, args: argparse.Namespace) -> None:
    from wire.protocol import Agent

    match args.agent_action:
        case "create" | "update":
            if args.agent_action == "create":
                base = {"id": args.id, **DEFAULTS}
            else:
                base = msgspec.structs.asdict((await client.get_agent(args.id)).agent)
            fields = _fields(args, base)
            try:
                agent = msgspec.convert(fields, Agent)
            except msgspec.ValidationError as e:
                raise UsageError(f"agent: {e}") from None
            call = client.create_agent if args.agent_action == "create" else client.update_agent
            emit((await call(agent)).agent)
        case "get":
            emit((await client.get_agent(args.id)).agent)
        case "disable":
            emit((await client.disable_agent(args.id)).agent)
        case "list":
            cursor = None
            while True:
                page = await client.list_agents(cursor, 100)
                for a in page.agents:
                    emit(a)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor


__all__ = ["add_agent", "run_agent"]
