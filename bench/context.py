"""Context windows in the bench (issue 19): structured messages, a window on every session, and
``get_context`` under the append load.

- ``--parts N`` makes every append a structured message of the AI SDK UI-message shape
  (wire/parts.py) sent by the agent with role ``assistant``: 1 is one text part; 3 is a
  reasoning part, a ``tool-search`` part (input and output, state ``output-available``) and a
  text part.  Their texts together are ``--payload-bytes`` characters (the short form's
  content, cut in three), so plain and structured runs carry the same text.
- ``--payload-text`` chooses that text: ``letters`` (random letters and digits with no space,
  the default and what every earlier figure used: one long word to the tokenizer, its dearest
  input at ~1.5 characters a token) or ``prose`` (English-like words, ~4.4 characters a token,
  what a conversation holds).  Only counting depends on it: a plain append without a window
  is not counted.
- ``--context-policy`` configures a context window on every session of the load before it
  starts (``set_context_config``: ``--context-budget`` tokens, ``--context-ratio``, the policy;
  ``--context-limit`` for ``last_n`` and ``skip_parts``, which skips ``reasoning`` and ``tool-``
  parts).
- The ``context`` scenario fills ``--context-sessions`` sessions, each configured with the
  ``token_budget`` policy at ``--context-tokens`` (ratio 1), with ``--context-message-bytes``
  messages of English-like text until the policy trims them: each window then holds just under
  ``--context-tokens`` tokens.  During the load, one more client process issues ``get_context``
  on them in turn at ``--context-rate`` per second (open loop: latency from the intended time),
  reported apart from the appends and gated by ``--context-p99-target-ms``.

Only the public client (wire.client, wire.protocol) is used: a token count is what the node
says (``Context.token_count``), never computed here.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import string
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

from wire.client import Client
from wire.protocol import Appended, Context, LastN, Manual, Policy, SkipParts, TokenBudget

PART_COUNTS: Final = (0, 1, 3)
PAYLOAD_TEXTS: Final = ("letters", "prose")
POLICIES: Final = ("last_n", "skip_parts", "token_budget", "manual")
SKIPPED_PARTS: Final = ["reasoning", "tool-"]
AGENT: Final = "bench-agent"
TOOL: Final = "search"
FILL_BATCH: Final = 32  # appends in flight per filled session
FILL_APPENDS_MAX: Final = 100_000  # per session: a window that never fills is an error
CONTEXT_OUTSTANDING_MAX: Final = 64  # get_context requests in flight at most (then: overload)

# Common English words: the fill's text tokenizes like prose (about 4-5 characters a token),
# unlike the load's random letters and digits (about 1.5).
_WORD_LIST: Final = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which "
    "she do how their if will up other about out many then them these so some her would make "
    "like him into time has look two more write go see number no way could people my than "
    "first water been call who oil its now find long down day did get come made may part "
    "result query search function return value context window message tool call agent model "
    "user assistant answer reason because should first second error file line code test"
)
WORDS: Final = tuple(_WORD_LIST.split(" "))


def add_options(p: argparse.ArgumentParser) -> None:
    """The options of structured messages and context windows (every scenario's load)."""
    g = p.add_argument_group("structured messages and context windows (--via native)")
    g.add_argument(
        "--parts", type=int, choices=PART_COUNTS, default=0,
        help="0: the short form (content); 1: one text part; 3: reasoning, tool-search (input "
        "and output) and text parts, --payload-bytes characters in all",
    )  # fmt: skip
    g.add_argument(
        "--payload-text", choices=PAYLOAD_TEXTS, default="letters",
        help="the payload's characters: letters (random letters and digits, no space: one word "
        "of the tokenizer, its dearest input, ~1.5 characters a token) or prose (English-like "
        "words, ~4.4 characters a token, as conversations are)",
    )  # fmt: skip
    g.add_argument(
        "--context-policy", choices=POLICIES, default=None,
        help="configure a context window with this policy on every session before the load",
    )  # fmt: skip
    g.add_argument("--context-budget", type=int, default=4000, help="tokens (default 4 000)")
    g.add_argument("--context-ratio", type=float, default=0.7, help="trigger ratio, (0, 1]")
    g.add_argument("--context-limit", type=int, default=100, help="messages (last_n, skip_parts)")


def add_scenario_options(p: argparse.ArgumentParser) -> None:
    """The ``context`` scenario's own options."""
    g = p.add_argument_group("get_context under load")
    g.add_argument("--context-sessions", type=int, default=4, help="filled windows")
    g.add_argument("--context-tokens", type=int, default=100_000, help="tokens per window")
    g.add_argument("--context-message-bytes", type=int, default=2000, help="fill messages' size")
    g.add_argument("--context-rate", type=float, default=20.0, help="get_context per second")
    g.add_argument("--context-p99-target-ms", type=float, default=20.0)


def check_options(args: argparse.Namespace, error: Callable[[str], Any]) -> None:
    """Usage errors of the options above (``error`` exits)."""
    structured = args.parts or args.context_policy or args.scenario == "context"
    if structured and args.via != "native":
        error("--parts, --context-policy and the context scenario speak --via native")
    if not (1 <= args.context_budget <= 100_000_000 and 0 < args.context_ratio <= 1):
        error("--context-budget: 1 to 100 000 000 tokens; --context-ratio in (0, 1]")
    if not 1 <= args.context_limit <= 100_000:
        error("--context-limit: 1 to 100 000")
    if args.parts == 3 and args.payload_bytes < 3:
        error("--parts 3: --payload-bytes 3 or more (one text per part)")
    if args.scenario == "context" and not (
        1 <= args.context_sessions <= 64
        and 1 <= args.context_tokens <= 10_000_000
        and 1 <= args.context_message_bytes <= 256 * 1024
        and args.context_rate > 0
        and args.context_p99_target_ms > 0
    ):
        error(
            "--context-sessions 1..64, --context-tokens 1..10 000 000, --context-message-bytes "
            "1..262 144, --context-rate and --context-p99-target-ms positive"
        )


def message_parts(count: int, text: str) -> list[dict[str, Any]] | None:
    """The parts of a structured message carrying ``text`` (None: the short form)."""
    if count == 0:
        return None
    if count == 1:
        return [{"type": "text", "text": text}]
    third = len(text) // 3
    reasoning, tool, answer = text[:third], text[third : 2 * third], text[2 * third :]
    half = len(tool) // 2
    return [
        {"type": "reasoning", "text": reasoning},
        {
            "type": f"tool-{TOOL}",
            "toolCallId": "call-1",
            "state": "output-available",
            "input": {"query": tool[:half]},
            "output": {"result": tool[half:]},
        },
        {"type": "text", "text": answer},
    ]


def append_structured(
    client: Any, session_id: str, parts: list[dict[str, Any]], client_msg_id: str
) -> Awaitable[Appended]:
    """Append a structured message (the agent's, role assistant) through the native client."""
    return cast(Client, client).append(
        session_id, "", "agent", AGENT, client_msg_id=client_msg_id, role="assistant", parts=parts
    )


def append_structured_nowait(
    client: Any, session_id: str, parts: list[dict[str, Any]], client_msg_id: str
) -> asyncio.Future[Any] | None:
    return cast(Client, client).append_nowait(
        session_id, "", "agent", AGENT, client_msg_id=client_msg_id, role="assistant", parts=parts
    )


def get_context(client: Any, session_id: str) -> Awaitable[Context]:
    return cast(Client, client).get_context(session_id)


def policy(args: argparse.Namespace) -> Policy:
    name = args.context_policy
    if name == "last_n":
        return LastN(args.context_limit)
    if name == "skip_parts":
        return SkipParts(list(SKIPPED_PARTS), args.context_limit)
    if name == "token_budget":
        return TokenBudget()
    assert name == "manual", name
    return Manual()


def payload(rng: random.Random, chars: int, kind: str) -> str:
    """The bench's message text: ``chars`` characters of ``kind`` (``PAYLOAD_TEXTS``)."""
    if kind == "prose":
        return prose(rng, chars)
    assert kind == "letters", kind
    alphabet = string.ascii_letters + string.digits
    return "".join(rng.choice(alphabet) for _ in range(chars))


def prose(rng: random.Random, chars: int) -> str:
    """About ``chars`` characters of English-like text (whole words)."""
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:chars]


Retry = Callable[[Callable[[], Awaitable[Any]]], Awaitable[Any]]
Pipelined = Callable[[int, int, Callable[[int], Awaitable[None]]], Awaitable[None]]


async def configure_windows(
    client: Client, session_ids: list[str], args: argparse.Namespace,
    with_retry: Retry, pipelined: Pipelined,
) -> None:  # fmt: skip
    """``set_context_config`` on every session of the load (``--context-policy``)."""
    chosen = policy(args)

    async def one(i: int) -> None:
        sid = session_ids[i]
        await with_retry(lambda: client.set_context_config(
            sid, args.context_budget, chosen, args.context_ratio))  # fmt: skip

    await pipelined(len(session_ids), 64, one)


async def fill_windows(
    client: Client, run_id: str, args: argparse.Namespace, with_retry: Retry
) -> tuple[list[str], dict[str, list[tuple[str, int]]], dict[str, Any]]:
    """The ``context`` scenario's sessions, each with a window of just under
    ``--context-tokens`` tokens (the ``token_budget`` policy has trimmed it); their ids, the
    acks (client_msg_id, seq) of each for the read-back check, and what the windows hold."""
    rng = random.Random(args.seed)
    sids = [f"{run_id}-ctx{i}" for i in range(args.context_sessions)]
    acks: dict[str, list[tuple[str, int]]] = {sid: [] for sid in sids}
    windows: list[Context] = []

    async def fill(k: int, sid: str) -> None:
        await with_retry(lambda: client.create_session("bench-user", AGENT, None, sid))
        await with_retry(lambda: client.set_context_config(
            sid, args.context_tokens, TokenBudget(), 1.0))  # fmt: skip
        texts = [prose(rng, args.context_message_bytes) for _ in range(FILL_BATCH)]
        n = 0

        async def one(base: int, i: int) -> None:
            msg_id = f"{run_id}-ctx{k}-{base + i}"
            parts = message_parts(args.parts, texts[i])
            if parts is None:
                ack = await with_retry(lambda: client.append(
                    sid, texts[i], "agent", AGENT, client_msg_id=msg_id))  # fmt: skip
            else:
                ack = await with_retry(lambda: append_structured(client, sid, parts, msg_id))
            acks[sid].append((msg_id, ack.seq))

        while True:
            await asyncio.gather(*(one(n, i) for i in range(FILL_BATCH)))
            n += FILL_BATCH
            window: Context = await with_retry(lambda: client.get_context(sid))
            if window.window_first_seq > 1:  # the policy trimmed: the window is full
                windows.append(window)
                return
            if n >= FILL_APPENDS_MAX:
                raise RuntimeError(f"{sid}: {n} appends did not fill {args.context_tokens} tokens")

    await asyncio.gather(*(fill(k, sid) for k, sid in enumerate(sids)))
    held = {
        "sessions": len(windows),
        "tokens_min": min(w.token_count for w in windows),
        "tokens_max": max(w.token_count for w in windows),
        "messages_min": min(len(w.messages) for w in windows),
        "messages_max": max(len(w.messages) for w in windows),
        "message_bytes": args.context_message_bytes,
        "parts": args.parts,
    }
    return sids, acks, held


__all__ = [
    "CONTEXT_OUTSTANDING_MAX",
    "add_options",
    "add_scenario_options",
    "append_structured",
    "append_structured_nowait",
    "check_options",
    "configure_windows",
    "fill_windows",
    "get_context",
    "message_parts",
    "policy",
    "prose",
]
