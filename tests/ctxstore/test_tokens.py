"""Token counts (ctxstore/tokens.py) against known vectors of the two vocabularies."""

from __future__ import annotations

import random
import subprocess
import sys

import msgspec
import pytest

from ctxstore.tokens import PIECE_CHARS, TokenCounter, TokenCounters, offload

# Known vectors: tiktoken's own (cl100k_base "tiktoken is great!" is its README's example:
# [83, 1609, 5963, 374, 2294, 0]) and the o200k_base encodings of the same strings.
VECTORS = [
    ("cl100k_base", "tiktoken is great!", 6),
    ("cl100k_base", "hello world", 2),  # [15339, 1917]
    ("cl100k_base", "こんにちは世界", 4),
    ("o200k_base", "tiktoken is great!", 6),  # [83, 8251, 2488, 382, 2212, 0]
    ("o200k_base", "hello world", 2),  # [24912, 2375]
    ("o200k_base", "こんにちは世界", 2),
    ("o200k_base", "", 0),
]


@pytest.mark.parametrize(("name", "text", "count"), VECTORS)
def test_known_vectors(name: str, text: str, count: int) -> None:
    assert TokenCounter(name).text(text) == count


def test_special_token_text_is_ordinary_text() -> None:
    # "<|endoftext|>" is one special token when allowed; as text it is several
    assert TokenCounter("cl100k_base").text("<|endoftext|> hi") == 8


def test_the_package_init_is_not_imported() -> None:
    """Its __init__ decodes every vocabulary into Python dicts (66 MiB): never loaded here (in
    a fresh process: another test of this one may import the package itself)."""
    code = (
        "import sys\n"
        "from ctxstore.tokens import TokenCounter\n"
        "assert TokenCounter('o200k_base').text('hello world') == 2\n"
        "print(sorted(m for m in sys.modules if m.startswith('bpe_openai')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['bpe_openai._bindings']"


def test_a_long_text_is_counted_in_pieces_as_if_whole() -> None:
    counter = TokenCounter()
    rng = random.Random(3)
    words = ["hello", "world", "über", "日本語", "  ", "\n", "1234", "the", "end."]
    text = " ".join(rng.choice(words) for _ in range(60_000))
    assert len(text) > 4 * PIECE_CHARS
    whole = counter._count(text)
    pieces = counter.text(text)
    assert abs(pieces - whole) <= len(text) // PIECE_CHARS  # a token at most per cut
    assert counter.text("x" * 3_000_000) > 0  # past the library's 1 000 000-character guard


def test_a_lone_surrogate_is_counted_as_a_replacement_character() -> None:
    assert TokenCounter().text("\ud800 hi") == TokenCounter().text("\ufffd hi")


def test_parts_count_their_text_or_their_json() -> None:
    counter = TokenCounter("o200k_base")
    tool = {"type": "tool-search", "toolCallId": "c1", "state": "input-available",
            "input": {"q": "paris"}}  # fmt: skip
    parts = [{"type": "text", "text": "hello world"}, {"type": "reasoning", "text": "hmm"}, tool]
    total, each = counter.message("", parts)
    assert each == [2, counter.text("hmm"), counter.text(msgspec.json.encode(tool).decode())]
    assert total == sum(each)
    assert counter.message("hello world", None) == (2, [])


def test_counters_load_each_vocabulary_once_and_refuse_unknown_ones() -> None:
    counters = TokenCounters("cl100k_base")
    assert counters.get() is counters.get("cl100k_base")
    assert counters.get("o200k_base").name == "o200k_base"
    with pytest.raises(ValueError, match="unknown tokenizer"):
        TokenCounters("p50k_base")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        TokenCounter("gpt2")


def test_offload_is_for_long_messages_only() -> None:
    assert not offload("short", None)
    assert offload("x" * 20_000, None)
    assert offload("", [{"type": "text", "text": "y" * 20_000}])
    assert offload("", [{"type": "data-x", "data": "z" * 20_000}])
    assert not offload("", [{"type": "text", "text": "hi"}] * 10)
