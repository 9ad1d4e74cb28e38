"""Token counts of messages, from a real BPE tokenizer (``bpe-openai``: the ``o200k_base`` and
``cl100k_base`` vocabularies ship inside the package, so counting works offline).

Its Rust tokenizer (``bpe_openai._bindings``, typed by the package's ``.pyi``) is loaded by
itself, without the package's ``__init__``: that one decodes every vocabulary it knows into
Python dicts at import (0.65 s and 66 MiB here) for its tiktoken-like wrapper, which counting
does not need.  The Rust tokenizer counts without building the token list; a vocabulary
costs its memory once first used (o200k_base about 67 MiB, cl100k_base about 30 MiB).

Rules of this file:
- A message is counted once, by the node that takes the append, before it is proposed: the
  count travels inside the command, so every replica stores the same number and ``apply``
  never tokenizes.  A client-given ``token_count`` wins over the count.
- What counts: the short form's ``content``; for a structured message, each part: the
  ``text`` of a text or reasoning part, the compact JSON of any other part (a tool call's
  input and output, a file's URL...).  No per-message framing tokens are added.
- Special-token text (``<|endoftext|>``) is counted as ordinary text, never as the special
  token.  Text is fed to the tokenizer in pieces of at most ``PIECE_CHARS`` characters, cut
  before a whitespace where there is one, so a piece cannot reach the library's limits.
- ``offload`` tells whether a message is big enough to be counted off the event loop.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from types import ModuleType
from typing import Any, Final

import msgspec.json

from wire.parts import TEXT_TYPES

TOKENIZERS: Final = ("o200k_base", "cl100k_base")
DEFAULT_TOKENIZER: Final = "o200k_base"
PIECE_CHARS: Final = 32 * 1024  # <= 4 bytes per char: far below the library's 200 000 tokens
OFFLOAD_CHARS: Final = 16 * 1024  # about half a millisecond of counting on this machine

_json = msgspec.json.Encoder()
_bindings: ModuleType | None = None


def _load_bindings() -> ModuleType:
    """``bpe_openai._bindings`` without running ``bpe_openai/__init__.py`` (module docstring)."""
    global _bindings
    if _bindings is not None:
        return _bindings
    name = "bpe_openai._bindings"
    package = importlib.util.find_spec("bpe_openai")  # found, not imported
    if package is None or not package.submodule_search_locations:
        raise ImportError("bpe-openai is not installed")
    where = package.submodule_search_locations[0]
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    files = [f for f in os.listdir(where) if f.startswith("_bindings.") and f.endswith(suffixes)]
    if not files:
        raise ImportError(f"no {name} extension in {where}")
    loader = importlib.machinery.ExtensionFileLoader(name, os.path.join(where, files[0]))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    _bindings = module
    return module


class TokenCounter:
    """Counts with one tokenizer (``TOKENIZERS``); loading a vocabulary takes ~0.1 s, once."""

    def __init__(self, name: str = DEFAULT_TOKENIZER) -> None:
        if name not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {name!r} (known: {', '.join(TOKENIZERS)})")
        self.name = name
        self._tokenizer = _load_bindings().tokenizer_for_encoding(name)

    def _count(self, text: str) -> int:
        try:
            return int(self._tokenizer.count(text))
        except UnicodeEncodeError:  # a lone surrogate (from a JSON escape): counted as U+FFFD
            fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return int(self._tokenizer.count(fixed))

    def text(self, text: str) -> int:
        if len(text) <= PIECE_CHARS:
            return self._count(text) if text else 0
        total = 0
        start = 0
        while start < len(text):
            end = min(start + PIECE_CHARS, len(text))
            if end < len(text):
                cut = text.rfind(" ", start + PIECE_CHARS // 2, end)
                end = cut if cut > start else end
            total += self._count(text[start:end])
            start = end
        return total

    def part(self, part: dict[str, Any]) -> int:
        if part["type"] in TEXT_TYPES:
            return self.text(part["text"])
        return self.text(_json.encode(part).decode())

    def message(self, content: str, parts: list[dict[str, Any]] | None) -> tuple[int, list[int]]:
        """``(tokens, tokens of each part)``; the short form (``parts`` None) has no parts."""
        if parts is None:
            return self.text(content), []
        counts = [self.part(p) for p in parts]
        return sum(counts), counts


class TokenCounters:
    """One ``TokenCounter`` per tokenizer, loaded when first used."""

    def __init__(self, default: str = DEFAULT_TOKENIZER) -> None:
        if default not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {default!r} (known: {', '.join(TOKENIZERS)})")
        self.default = default
        self._counters: dict[str, TokenCounter] = {}

    def get(self, name: str | None = None) -> TokenCounter:
        name = name or self.default
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = TokenCounter(name)
        return counter


def offload(content: str, parts: list[dict[str, Any]] | None) -> bool:
    """Whether counting this message could stall the loop (more than ``OFFLOAD_CHARS``)."""
    if parts is None:
        return len(content) > OFFLOAD_CHARS
    size = 0
    for p in parts:
        text = p.get("text") if p["type"] in TEXT_TYPES else None
        size += len(text) if isinstance(text, str) else len(_json.encode(p))
        if size > OFFLOAD_CHARS:
            return True
    return False


__all__ = ["DEFAULT_TOKENIZER", "TOKENIZERS", "TokenCounter", "TokenCounters", "offload"]
