"""A session's context window: the part of its history an LLM is given, kept by a policy.

Pure and deterministic (it is replicated state: ``ConversationState`` applies it on every
replica), so no clock, no I/O, no tokenizer: token counts arrive inside the commands.

Rules of this file:
- The window is a run of **records**, oldest first.  A record is one message of the history
  (``seq``, with ``first_seq == last_seq``) or one message of a compaction's replacement,
  standing with its siblings for the history range ``first_seq..last_seq`` (``compacted``).
  Records never overlap in seqs and ascend; the history itself is never changed here.
- A **segment** is what ``compact`` addresses: one compaction's replacement (all its records),
  or a run of consecutive history messages.  ``compact(a, b)`` needs ``a`` to start and ``b``
  to end a record-boundary of the window (a compaction's replacement goes or stays whole).
- Every change bumps ``version``: an append, a trim, a compaction, a configuration.
- Trimming drops **units** from the front: a record with the ``tool`` records that follow it
  (a tool call leaves with its results, never one without the other).  The policy decides
  how many: ``last_n``/``skip_parts`` keep at most ``limit`` records, ``token_budget`` drops
  while the window is over ``token_budget x trigger_ratio`` (the newest unit always stays).
  Besides, whatever the policy, the window holds at most ``limits.records_max`` records and
  ``limits.bytes_max`` payload bytes (the oldest units go first).
- ``skip_parts`` leaves parts out of the view and of the count (a message whose every part
  is left out stays, empty); a record's count without skipped parts is the sum of its kept
  parts, with none skipped it is the message's own count (a client-given count wins).
- ``needs_compaction``: a budget is set and ``tokens > token_budget x trigger_ratio``.
- ``identity``: a number no other window of the process has (``context.ReplyCache`` tells a
  session's window from the one that replaced it by it).  Compiled with mypyc (setup.py),
  whose classes cannot be weakly referenced: hold no weak reference to a window.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass
from typing import Final

from raft.errors import InvariantViolation, check
from wire.parts import matches
from wire.protocol import ContextReason

from .records import LastN, SkipParts, StoredMessage, TokenBudget, WindowConfig


@dataclass(frozen=True)
class WindowLimits:
    """Bounds of one window, whatever its policy (identical on every replica)."""

    records_max: int = 10_000
    bytes_max: int = 4 * 1024 * 1024  # payload (content, parts, metadata) of its records
    replacement_bytes_max: int = 1024 * 1024  # payload of one compaction's replacement


class Record:
    """One message of the window (see the module docstring)."""

    __slots__ = ("compacted", "first_seq", "last_seq", "message", "part_tokens", "role",
                 "size", "tokens", "view_tokens")  # fmt: skip

    def __init__(
        self,
        first_seq: int,
        last_seq: int,
        role: str,
        tokens: int,
        part_tokens: list[tuple[str, int]] | None,
        size: int,
        message: StoredMessage | None = None,
    ) -> None:
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.role = role
        self.tokens = tokens
        self.part_tokens = part_tokens  # (type, tokens) of each part; None: short form
        self.size = size
        self.message = message  # a compaction's replacement message; None: from the history
        self.compacted = message is not None
        self.view_tokens = tokens  # under the policy (skip_parts)


_identities: Final = itertools.count(1)


class Window:
    def __init__(self, limits: WindowLimits | None = None) -> None:
        self.identity: int = next(_identities)
        self.limits = limits or WindowLimits()
        self.config: WindowConfig | None = None
        self.records: deque[Record] = deque()
        self.version = 0
        self.tokens = 0  # sum of view_tokens
        self.size = 0  # sum of sizes
        self.needs_compaction = False
        self._skip: list[str] = []
        # From the configuration (``configure``), so that a trim asks no isinstance:
        self._limit: int | None = None  # records kept at most (last_n, skip_parts)
        self._trim_above: float | None = None  # tokens above which token_budget trims
        self._needs_above: float | None = None  # tokens above which compaction is needed

    # -- changes (each returns the events it causes, for subscribers) ---------------------------
    def append(self, record: Record) -> list[ContextReason]:
        records = self.records
        if records and record.first_seq <= records[-1].last_seq:
            raise InvariantViolation(
                f"context window: seq {record.first_seq} appended out of order"
            )
        self._push(record)
        self.version += 1
        trimmed = self._trim()
        return self._events(["trimmed"] if trimmed else [])

    def restore(self, record: Record) -> None:
        """Put back a record of a snapshot, in order: no policy runs, the version stays."""
        check(
            not self.records or record.first_seq >= self.records[-1].last_seq,
            f"context window: snapshot record of seq {record.first_seq} out of order",
        )
        self._push(record)

    def recount(self, counts: dict[int, tuple[int, list[int]]]) -> None:
        """New counts ``(tokens, tokens per part)`` for the history records of these seqs (a new
        tokenizer); ``configure`` follows, which recomputes the view."""
        for r in self.records:
            new = counts.get(r.first_seq) if not r.compacted else None
            if new is None:
                continue
            r.tokens = new[0]
            if r.part_tokens is not None and len(new[1]) == len(r.part_tokens):
                r.part_tokens = [(t, n) for (t, _), n in zip(r.part_tokens, new[1], strict=True)]

    def configure(self, config: WindowConfig) -> list[ContextReason]:
        self.config = config
        policy = config.policy
        self._skip = list(policy.types) if isinstance(policy, SkipParts) else []
        self._limit = policy.limit if isinstance(policy, LastN | SkipParts) else None
        self._needs_above = config.token_budget * config.trigger_ratio
        self._trim_above = self._needs_above if isinstance(policy, TokenBudget) else None
        self.tokens = 0
        for r in self.records:
            r.view_tokens = self._view_tokens(r)
            self.tokens += r.view_tokens
        self.version += 1
        reasons: list[ContextReason] = ["configured"]
        if self._trim():
            reasons.append("trimmed")
        return self._events(reasons)

    def compact(
        self, first_seq: int, last_seq: int, replacement: list[Record]
    ) -> list[ContextReason] | str:
        """Replace the records of ``first_seq..last_seq`` by ``replacement`` (each standing for
        that range); a refusal's reason (str) if the range is not a run of whole segments."""
        if first_seq > last_seq:
            return f"from_seq {first_seq} is after to_seq {last_seq}"
        records = self.records
        start = next((i for i, r in enumerate(records) if r.last_seq >= first_seq), None)
        if start is None or records[start].first_seq != first_seq:
            return f"from_seq {first_seq} does not start a message or segment of the window"
        stop = start  # records[start:stop] go: every record ending by last_seq
        while stop < len(records) and records[stop].last_seq <= last_seq:
            stop += 1
        if stop == start or records[stop - 1].last_seq != last_seq:
            return f"to_seq {last_seq} does not end a message or segment of the window"
        kept = list(records)
        for r in kept[start:stop]:
            self.tokens -= r.view_tokens
            self.size -= r.size
        for r in replacement:
            r.first_seq, r.last_seq = first_seq, last_seq
            r.view_tokens = self._view_tokens(r)
            self.tokens += r.view_tokens
            self.size += r.size
        kept[start:stop] = replacement
        self.records = deque(kept)
        self.version += 1
        reasons: list[ContextReason] = ["compacted"]
        if self._trim():
            reasons.append("trimmed")
        return self._events(reasons)

    # -- views ------------------------------------------------------------------------------------
    @property
    def first_seq(self) -> int | None:
        return self.records[0].first_seq if self.records else None

    def skipped(self, part_type: str) -> bool:
        """Whether the policy leaves parts of this type out of the view."""
        return bool(self._skip) and matches(part_type, self._skip)

    def segments(self) -> list[tuple[int, int, list[Record], bool]]:
        """``(first_seq, last_seq, records, compacted)`` per segment, oldest first; consecutive
        history messages form one segment (a gap in their seqs starts another)."""
        out: list[tuple[int, int, list[Record], bool]] = []
        for r in self.records:
            if out:
                first, last, recs, compacted = out[-1]
                same_compaction = compacted and r.compacted and r.first_seq == first
                history_run = not compacted and not r.compacted and r.first_seq == last + 1
                if same_compaction or history_run:
                    out[-1] = (first, r.last_seq, recs, compacted)
                    recs.append(r)
                    continue
            out.append((r.first_seq, r.last_seq, [r], r.compacted))
        return out

    # -- internals --------------------------------------------------------------------------------
    def _push(self, r: Record) -> None:
        r.view_tokens = self._view_tokens(r)
        self.records.append(r)
        self.tokens += r.view_tokens
        self.size += r.size

    def _view_tokens(self, r: Record) -> int:
        if not self._skip or r.part_tokens is None:
            return r.tokens
        kept = [n for t, n in r.part_tokens if not matches(t, self._skip)]
        return r.tokens if len(kept) == len(r.part_tokens) else sum(kept)

    def _over(self) -> bool:
        """Whether the front unit must go (the newest unit always stays)."""
        n = len(self.records)
        if n > self.limits.records_max or self.size > self.limits.bytes_max:
            return True
        limit = self._limit
        if limit is not None and n > limit:
            return True
        above = self._trim_above
        return above is not None and self.tokens > above

    def _trim(self) -> bool:
        trimmed = False
        records = self.records
        while records and self._over():
            unit = 1
            while unit < len(records) and records[unit].role == "tool":
                unit += 1
            if unit == len(records) and not self._hard_over():
                break  # the newest unit stays
            for _ in range(unit):
                r = records.popleft()
                self.tokens -= r.view_tokens
                self.size -= r.size
            trimmed = True
        return trimmed

    def _hard_over(self) -> bool:
        return len(self.records) > self.limits.records_max or self.size > self.limits.bytes_max

    def _events(self, reasons: list[ContextReason]) -> list[ContextReason]:
        above = self._needs_above
        needs = above is not None and self.tokens > above
        if needs and not self.needs_compaction:
            reasons.append("needs_compaction")
        self.needs_compaction = needs
        return reasons


__all__ = ["Record", "Window", "WindowLimits"]
