"""``python -m ctxstore.apply_bench`` (or ``python -m bench apply``): what applying an append
costs each replica's state machine (docs/benchmarks.md).

Applies ``--appends`` encoded ``Append`` commands, one entry each, to a fresh
``ConversationState`` as every replica does after commit, in two kinds: the short form
(``--payload-bytes`` characters of content from the user, the session without a context window)
and a structured message (the same characters cut in three over a ``reasoning``, a
``tool-search`` and a ``text`` part, as ``ctxstore-bench append --parts 3`` sends, with counts
per part) on a session whose ``token_budget`` window (4 000 x 0.7 tokens) trims at every
append once full.  Every append has a ``client_msg_id`` (dedupe) and, as a node proposes it,
the fingerprint of its content (``--no-fingerprint``: as entries written before
``Append.fingerprint``, which ``apply`` hashes itself).  Prints, per kind, the median over
``--repeat`` rounds of this process's CPU time per applied append.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
from collections.abc import Sequence
from statistics import median

import msgspec

from raft.messages import Entry

from . import commands
from .records import TokenBudget, WindowConfig, encode_parts
from .state import ConversationState, StateLimits, fingerprint


def _parts(text: str) -> list[dict[str, object]]:
    third = len(text) // 3
    a, b, c = text[:third], text[third : 2 * third], text[2 * third :]
    return [
        {"type": "reasoning", "text": a},
        {"type": "tool-search", "toolCallId": "call-1", "state": "output-available",
         "input": {"query": b}, "output": {"result": b}},
        {"type": "text", "text": c},
    ]  # fmt: skip


def _entries(
    structured: bool, appends: int, payload: int, seed: int, carry: bool = True
) -> list[bytes]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits
    out = []
    for i in range(appends):
        text = "".join(rng.choices(alphabet, k=payload))
        if structured:
            cmd = commands.Append(
                "s", "agent", "a", "text", "", {}, f"m-{i}", None, payload // 3 * 2, i,
                "assistant", encode_parts(_parts(text)), [payload // 6, payload // 3, payload // 6],
            )  # fmt: skip
        else:
            cmd = commands.Append("s", "user", "u", "text", text, {}, f"m-{i}", None, None, i)
        if carry:
            printed = fingerprint(cmd.sender, cmd.sender_id, cmd.kind, cmd.content,
                                  cmd.metadata, cmd.role, cmd.parts)  # fmt: skip
            cmd = msgspec.structs.replace(cmd, fingerprint=printed)
        out.append(commands.encode_command(cmd))
    return out


def _round(structured: bool, entries: list[bytes]) -> float:
    state = ConversationState(StateLimits(), groups=None)
    setup: list[commands.Command] = [commands.CreateSession("s", "u", "a", {}, 0)]
    if structured:
        config = WindowConfig(4000, 0.7, TokenBudget(), "o200k_base")
        setup.append(commands.SetContextConfig("s", config))
    for index, cmd in enumerate(setup, start=1):
        state.apply(0, [Entry(1, index, data=commands.encode_command(cmd))])
    first = len(setup) + 1
    batch = [Entry(1, first + i, data=data) for i, data in enumerate(entries)]
    started = time.process_time()
    for entry in batch:
        state.apply(0, [entry])
    return (time.process_time() - started) / len(entries)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m ctxstore.apply_bench", description=__doc__)
    p.add_argument("--appends", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--payload-bytes", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument(
        "--no-fingerprint",
        action="store_true",
        help="entries without the proposer's fingerprint (as written before it): apply hashes",
    )
    args = p.parse_args(argv)
    result: dict[str, float] = {}
    for kind, structured in (("plain", False), ("structured_window", True)):
        entries = _entries(
            structured, args.appends, args.payload_bytes, args.seed, not args.no_fingerprint
        )
        rounds = [_round(structured, entries) for _ in range(args.repeat)]
        result[f"{kind}_cpu_us_per_append"] = median(rounds) * 1e6
    if args.json:
        print(json.dumps(result))
    else:
        plain = result["plain_cpu_us_per_append"]
        window = result["structured_window_cpu_us_per_append"]
        print(
            f"apply per replica, median of {args.repeat} x {args.appends:,} appends: "
            f"plain {plain:.2f} µs, structured (3 parts) with a window {window:.2f} µs "
            f"(+{window / plain * 100 - 100:.0f} %)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
