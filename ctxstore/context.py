"""Serving context windows: the ``Context`` answer of ``get_context``, and the commands of
``set_context_config`` and ``compact`` with their token counts (design §5.8; docs/context.md).

The window (ctxstore/window.py) holds seqs, counts and a compaction's replacement messages;
the messages of the history it stands for are read here, from the hot tail when it holds
them (no await: the common case), else through ``History`` (the archive, off the loop).  A
message the history can no longer give (deleted by retention) is left out of the answer.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import msgspec

from wire.framing import SENDER_ROLES
from wire.parts import matches
from wire.protocol import Context, GetContext, Message, NewMessage, Segment, SetContextConfig

from . import commands
from .history import History, message_bytes
from .records import (
    StoredMessage,
    WindowConfig,
    config_to_wire,
    decode_parts,
    encode_parts,
    message_to_wire,
    policy_from_wire,
)
from .state import ConversationState
from .tokens import TokenCounter, TokenCounters
from .window import Record, Window

_encoder = msgspec.msgpack.Encoder()  # as the client protocol's (wire/framing.py)
REPLY_CACHE_BYTES_MAX = 32 * 1024 * 1024  # encoded get_context answers (within the node's cache)
REPLY_OVERHEAD_BYTES = 512  # what an answer costs the reply cache besides its encoded messages
_ROLE_SENDER = {"user": "user", "assistant": "agent", "tool": "agent", "system": "system"}
assert all(role in SENDER_ROLES[sender] for role, sender in _ROLE_SENDER.items())


class Plan:
    """What one ``get_context`` answers, taken from the window at once (the window may change
    while the archive is read): its segments and the history seqs to fetch."""

    __slots__ = ("config", "last_seq", "needs_compaction", "segments", "session_id", "skip",
                 "tokens", "version", "window")  # fmt: skip

    def __init__(self, session_id: str, window: Window | None, last_seq: int) -> None:
        """``window`` None: never configured (an empty window at version 0)."""
        self.session_id = session_id
        self.window = window
        self.last_seq = last_seq
        self.segments = [] if window is None else window.segments()
        self.config = None if window is None else window.config
        self.version = 0 if window is None else window.version
        self.tokens = 0 if window is None else window.tokens
        self.needs_compaction = window is not None and window.needs_compaction
        policy = self.config.policy if self.config is not None else None
        self.skip: list[str] = list(getattr(policy, "types", []) or [])

    def runs(self) -> list[tuple[int, int]]:
        """The history ranges to read: one per history segment."""
        return [(first, last) for first, last, _, compacted in self.segments if not compacted]

    @property
    def first_seq(self) -> int:
        return self.segments[0][0] if self.segments else self.last_seq + 1


class WindowCache:
    """This node's copies of the messages of context windows that left the hot tail (the
    group's tail budget trims the tails of quiet sessions), so that ``get_context`` seldom
    reads the archive.  Not replicated state: a cache, least recently used out first, at most
    ``bytes_max`` (``history.message_bytes`` each)."""

    def __init__(self, bytes_max: int) -> None:
        self.bytes_max = bytes_max
        self.bytes = 0
        self._messages: OrderedDict[tuple[str, int], StoredMessage] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._messages)

    def offer(self, state: ConversationState, m: StoredMessage) -> None:
        """Keep ``m`` (leaving the hot tail) if its session's window holds it."""
        view = state.window(m.session_id)
        if view is None or view[0] is None:
            return
        first = view[0].first_seq
        if first is None or m.seq < first:
            return
        self.put(m)

    def put(self, m: StoredMessage) -> None:
        key = (m.session_id, m.seq)
        if key in self._messages:
            self._messages.move_to_end(key)
            return
        size = message_bytes(m)
        if size > self.bytes_max:
            return
        self._messages[key] = m
        self.bytes += size
        while self.bytes > self.bytes_max:
            _, old = self._messages.popitem(last=False)
            self.bytes -= message_bytes(old)

    def get(self, session_id: str, seq: int) -> StoredMessage | None:
        m = self._messages.get((session_id, seq))
        if m is not None:
            self._messages.move_to_end((session_id, seq))
        return m


class ReplyCache:
    """This node's ``get_context`` answers with their messages encoded, one per session, each
    served again as long as the session's window is the same object at the same version and
    the session's last seq has not moved: a window read often is built and encoded once per
    change instead of once per read.  Only an answer found whole in memory (``from_memory``,
    every message of the window present) is kept, so a hit answers what building it again
    would.  Not replicated state: least recently used out first, at most ``bytes_max`` of
    encoded messages and ``REPLY_OVERHEAD_BYTES`` per answer (a larger answer is not kept)."""

    def __init__(self, bytes_max: int) -> None:
        self.bytes_max = bytes_max
        self.bytes = 0
        self.hits = 0
        # session -> (its window's identity: a replaced one is not kept alive; version; last
        # seq; the answer with its messages encoded; its charge)
        self._entries: OrderedDict[str, tuple[int, int, int, Context, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, state: ConversationState, rid: int, session_id: str) -> Context | None:
        """The kept answer of ``session_id`` for request ``rid`` if it still holds, else None."""
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        identity, version, last_seq, reply, size = entry
        view = state.window(session_id)
        window = view[0] if view is not None else None
        if (
            window is None
            or window.identity != identity
            or window.version != version
            or view is None
            or view[1] != last_seq
        ):
            del self._entries[session_id]  # stale: the window moved on
            self.bytes -= size
            return None
        self._entries.move_to_end(session_id)
        self.hits += 1
        return msgspec.structs.replace(reply, rid=rid)

    def keep(self, plan: Plan, reply: Context) -> Context:
        """``reply`` (built by ``answer`` from the memory of ``plan``), with its messages encoded,
        kept if it shows every message of the window; answer with what this returns."""
        window = plan.window
        if window is None or len(reply.messages) != sum(len(s[2]) for s in plan.segments):
            return reply
        messages = msgspec.Raw(_encoder.encode(reply.messages))
        size = len(messages) + REPLY_OVERHEAD_BYTES
        if size > self.bytes_max:
            return reply
        old = self._entries.pop(plan.session_id, None)
        if old is not None:
            self.bytes -= old[4]
        encoded = msgspec.structs.replace(reply, messages=messages)
        entry = (window.identity, plan.version, plan.last_seq, encoded, size)
        self._entries[plan.session_id] = entry
        self.bytes += size
        while self.bytes > self.bytes_max:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped[4]
        return encoded


def from_memory(
    state: ConversationState, cache: WindowCache, plan: Plan
) -> dict[int, StoredMessage] | None:
    """The history messages of the plan from the hot tail and the cache, None if they lack
    some (then ``from_history``)."""
    found: dict[int, StoredMessage] = {}
    sid = plan.session_id
    for first, last in plan.runs():
        r = state.read(sid, first - 1, last - first + 1)
        if r is None:
            return None
        for seq in range(first, min(r.first_seq, last + 1)):  # older than the tail
            m = cache.get(sid, seq)
            if m is None:
                cache.misses += 1
                return None
            found[seq] = m
        for m in r.messages:
            found[m.seq] = m
    cache.hits += 1
    return found


async def from_history(
    history: History, cache: WindowCache, plan: Plan, bytes_max: int
) -> dict[int, StoredMessage]:
    """The history messages of the plan, wherever they are held (tail or archive); those of
    the archive are kept in the cache for the next ``get_context``."""
    found: dict[int, StoredMessage] = {}
    for first, last in plan.runs():
        after = first - 1
        while after < last:
            page = await history.read(plan.session_id, after, min(1000, last - after), bytes_max)
            if page is None or not page.messages:
                break
            for m in page.messages:
                if m.seq > last:
                    break
                found[m.seq] = m
                cache.put(m)
            after = page.messages[-1].seq
    return found


def answer(rid: int, plan: Plan, found: dict[int, StoredMessage]) -> Context:
    messages: list[Message] = []
    segments: list[Segment] = []
    for first, last, records, compacted in plan.segments:
        count = 0
        for r in records:
            m = r.message if r.message is not None else found.get(r.first_seq)
            if m is None:
                continue  # gone from the history (retention)
            messages.append(_view(m, r, plan.skip))
            count += 1
        segments.append(Segment(first, last, count, compacted))
    config = None if plan.config is None else config_to_wire(plan.config)
    return Context(
        rid, plan.session_id, messages, segments, plan.tokens, plan.version,
        plan.needs_compaction, plan.first_seq, plan.last_seq, config,
    )  # fmt: skip


def _view(m: StoredMessage, r: Record, skip: list[str]) -> Message:
    """The message as the window shows it: without the parts the policy skips, and with the
    window's count of it."""
    wire = message_to_wire(m)
    parts = wire.parts
    if skip and parts is not None:
        kept = [p for p in parts if not matches(p["type"], skip)]
        if len(kept) != len(parts):
            return msgspec.structs.replace(wire, parts=kept, token_count=r.view_tokens)
    if wire.token_count != r.view_tokens:  # appended before the window: counted when it opened
        return msgspec.structs.replace(wire, token_count=r.view_tokens)
    return wire


# -- commands -----------------------------------------------------------------------------------
def configure(
    r: SetContextConfig, counters: TokenCounters, counts: list[tuple[int, int, list[int]]]
) -> commands.SetContextConfig:
    tokenizer = r.tokenizer or counters.default
    config = WindowConfig(r.token_budget, r.trigger_ratio, policy_from_wire(r.policy), tokenizer)
    return commands.SetContextConfig(r.session_id, config, counts)


def tail_to_count(
    state: ConversationState, session_id: str, tokenizer: str, records_max: int
) -> tuple[list[StoredMessage], bool]:
    """The hot tail's messages (the newest ``records_max``) a configuration must count: all of
    them when it opens the window or changes its tokenizer, none otherwise; and whether it
    opens the window."""
    view = state.window(session_id)
    if view is None:
        return [], False
    window, last_seq = view
    if window is not None and window.config is not None and window.config.tokenizer == tokenizer:
        return [], False
    r = state.read(session_id, max(0, last_seq - records_max), records_max)
    return ([] if r is None else r.messages), window is None


def tail_chars(messages: list[StoredMessage]) -> int:
    return sum(len(m.content) + len(m.parts) for m in messages)  # raw parts: bytes ~ chars


def count_tail(
    counter: TokenCounter, messages: list[StoredMessage], opening: bool
) -> list[tuple[int, int, list[int]]]:
    """``(seq, tokens, tokens of each part)`` of each message.  ``opening`` a window, a stored
    count (the client's: nothing else counted them) wins; for a new tokenizer, every message
    is counted again (a stored count may be the old tokenizer's)."""
    out = []
    for m in messages:
        parts = decode_parts(m.parts)
        tokens, per_part = counter.message(m.content, parts)
        if opening and m.token_count is not None and parts is None:
            tokens = m.token_count
        out.append((m.seq, tokens, per_part))
    return out


def replacement(
    messages: list[NewMessage], session_id: str, now_ms: int, tokenizer: str | None,
    counters: TokenCounters,
) -> tuple[list[StoredMessage], list[list[int]]]:  # fmt: skip
    """A compaction's replacement as stored messages (seq 0) and their counts per part (a
    session without a window: by the node's default tokenizer; the state refuses it)."""
    counter = counters.get(tokenizer)
    out: list[StoredMessage] = []
    per_part: list[list[int]] = []
    for n in messages:
        tokens, parts = counter.message(n.content, n.parts)
        count = n.token_count if n.token_count is not None else tokens
        sender: Any = _ROLE_SENDER[n.role]
        out.append(StoredMessage(
            session_id, 0, sender, "", n.kind, n.content, n.metadata, None, now_ms, count,
            n.role, encode_parts(n.parts),
        ))  # fmt: skip
        per_part.append(parts)
    return out, per_part


def window_tokenizer(state: ConversationState, session_id: str) -> str | None:
    """The tokenizer of the session's context window as this node knows it; None when the
    session has none (its appends are not counted)."""
    view = state.window(session_id)
    if view is None or view[0] is None or view[0].config is None:
        return None
    return view[0].config.tokenizer


def plan(state: ConversationState, r: GetContext) -> Plan | None:
    view = state.window(r.session_id)
    return None if view is None else Plan(r.session_id, view[0], view[1])


__all__ = [
    "REPLY_CACHE_BYTES_MAX",
    "Plan",
    "ReplyCache",
    "WindowCache",
    "answer",
    "configure",
    "from_history",
    "from_memory",
    "plan",
    "replacement",
]
