"""``python -m bench tokens``: what counting a message's tokens costs the node that takes it.

A node counts every append once, before proposing it (ctxstore/tokens.py): bpe-openai's Rust
tokenizer counts the short form's content, or each part of a structured message (the text of
a text or reasoning part, the compact JSON of any other part).  This times the same Rust
function on the same inputs, in one process, for representative messages: the bench's plain
and 3-part appends (``--payload-bytes`` random letters and digits, as ``ctxstore-bench``
sends), and English-like messages of 2 000 and 16 000 characters (16 K is where a node moves
counting off its event loop).

bench/ uses no ctxstore internals, so the counting rule is written out here
(``count_message``); tests/bench/test_tokens.py checks it against ``ctxstore.tokens``.  The
package is imported whole (its ``__init__`` also builds a tiktoken-like wrapper the node skips:
a one-off import cost, not part of a count).  Each figure is the median over ``--repeat``
rounds of the CPU time of ``--count`` counts divided by ``--count``.  ``--cold``: between two
counts, copy ``EVICT_BYTES`` of memory (evicting the CPU's caches, as the rest of a busy
node's work and the other processes of the machine do) and time each count alone: a count
whose tables are no longer in the caches.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from functools import partial
from statistics import median
from typing import Any, Final

import msgspec.json

from .context import message_parts, payload, prose

TEXT_TYPES: Final = frozenset({"text", "reasoning"})
ENCODINGS: Final = ("o200k_base", "cl100k_base")
EVICT_BYTES: Final = 64 * 1024 * 1024  # more than this machine's last-level cache
_json = msgspec.json.Encoder()


def tokenizer(name: str) -> Any:
    """bpe-openai's Rust tokenizer of ``name`` (the function a node counts with)."""
    from bpe_openai import _bindings

    return _bindings.tokenizer_for_encoding(name)


def count_message(tok: Any, content: str, parts: list[dict[str, Any]] | None) -> int:
    """A message's tokens as a node counts them (ctxstore/tokens.py ``TokenCounter.message``,
    for messages under its 32 K-character pieces)."""
    if parts is None:
        return int(tok.count(content)) if content else 0
    total = 0
    for p in parts:
        text = p["text"] if p["type"] in TEXT_TYPES else _json.encode(p).decode()
        total += int(tok.count(text)) if text else 0
    return total


def samples(
    payload_bytes: int, seed: int = 1
) -> dict[str, tuple[str, list[dict[str, Any]] | None]]:
    """The messages timed: name -> (content, parts)."""
    rng = random.Random(seed)
    letters = payload(rng, payload_bytes, "letters")
    p2k, p16k = prose(rng, 2000), prose(rng, 16_000)
    return {
        f"plain {payload_bytes} B (bench append)": (letters, None),
        f"3 parts {payload_bytes} B (bench --parts 3)": ("", message_parts(3, letters)),
        "plain 2 000 B prose": (p2k, None),
        "3 parts 2 000 B prose": ("", message_parts(3, p2k)),
        "plain 16 000 B prose": (p16k, None),
    }


def _cpu() -> float:
    return time.process_time()


def time_per_call(call: Callable[[], object], count: int, repeat: int) -> float:
    """Median CPU seconds per call over ``repeat`` rounds of ``count`` calls."""
    rounds = []
    for _ in range(repeat):
        started = _cpu()
        for _ in range(count):
            call()
        rounds.append((_cpu() - started) / count)
    return median(rounds)


def time_per_cold_call(call: Callable[[], object], count: int, repeat: int) -> float:
    """Median CPU seconds per call, each call after evicting the caches (``--cold``)."""
    junk = bytearray(EVICT_BYTES)
    rounds = []
    for _ in range(repeat):
        spent = 0.0
        for _ in range(count):
            junk[:] = bytes(junk)  # reads and writes every cache line of 64 MiB
            started = _cpu()
            call()
            spent += _cpu() - started
        rounds.append(spent / count)
    return median(rounds)


def measure(
    encoding: str, payload_bytes: int, count: int, repeat: int, cold: bool = False
) -> dict[str, Any]:
    started = time.perf_counter()
    tok = tokenizer(encoding)
    tok.count("warm up")  # a vocabulary is built when first used
    load_s = time.perf_counter() - started
    rows = []
    for name, (content, parts) in samples(payload_bytes).items():
        tokens = count_message(tok, content, parts)
        chars = len(content) + sum(len(_json.encode(p)) for p in parts or [])
        timer = time_per_cold_call if cold else time_per_call
        per_call = timer(partial(count_message, tok, content, parts), count, repeat)
        rows.append(
            {"message": name, "chars": chars, "tokens": tokens, "us": round(per_call * 1e6, 2)}
        )
    return {"encoding": encoding, "cold": cold, "load_s": round(load_s, 3), "messages": rows}


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench tokens", description=__doc__)
    p.add_argument("--encoding", choices=ENCODINGS, action="append", default=None)
    p.add_argument("--payload-bytes", type=int, default=200, help="as ctxstore-bench's")
    p.add_argument("--count", type=int, default=2000, help="counts per round")
    p.add_argument("--repeat", type=int, default=5, help="rounds (the median is reported)")
    p.add_argument("--cold", action="store_true", help="evict the CPU caches before each count")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    if args.payload_bytes < 3 or args.count < 1 or args.repeat < 1:
        p.error("--payload-bytes 3 or more, --count and --repeat positive")
    results = [
        measure(e, args.payload_bytes, args.count, args.repeat, args.cold)
        for e in args.encoding or ["o200k_base"]
    ]
    if args.json:
        print(json.dumps(results))
        return 0
    for r in results:
        caches = ", caches evicted before each count" if r["cold"] else ""
        print(f"{r['encoding']} (first use {r['load_s']:.2f} s): CPU per count, median{caches}")
        for m in r["messages"]:
            print(
                f"  {m['message']:34s} {m['chars']:6,d} chars {m['tokens']:6,d} tokens "
                f"{m['us']:8.1f} µs  ({m['us'] / max(1, m['tokens']) * 1000:.0f} ns/token)"
            )
    return 0


__all__ = ["count_message", "main", "measure", "samples", "tokenizer"]
