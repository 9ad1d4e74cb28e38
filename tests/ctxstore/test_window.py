"""The context window (ctxstore/window.py) against a naive model, on random appends, policies
and compactions (ranges at the edges, inside segments, overlapping; stale versions), and
through the state machine: snapshots, restores, refusals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxstore import commands
from ctxstore.records import LastN, Manual, SkipParts, StoredMessage, TokenBudget, encode_parts
from ctxstore.records import WindowConfig as ContextConfig
from ctxstore.state import ConversationState, StateLimits, fingerprint
from ctxstore.window import Record, Window, WindowLimits
from raft.messages import Entry
from wire.parts import matches

PART_TYPES = ["text", "reasoning", "tool-search", "tool-weather", "data-x", "file"]


# -- the naive model ------------------------------------------------------------------------------
@dataclass
class Rec:
    first: int
    last: int
    role: str
    tokens: int
    parts: list[tuple[str, int]] | None
    size: int
    compacted: bool


@dataclass
class Model:
    limits: WindowLimits
    config: ContextConfig | None = None
    recs: list[Rec] = field(default_factory=list)
    version: int = 0
    needs: bool = False

    def view(self, r: Rec) -> int:
        policy = self.config.policy if self.config else None
        if not isinstance(policy, SkipParts) or r.parts is None:
            return r.tokens
        kept = [n for t, n in r.parts if not matches(t, policy.types)]
        return r.tokens if len(kept) == len(r.parts) else sum(kept)

    def tokens(self) -> int:
        return sum(self.view(r) for r in self.recs)

    def must_trim(self) -> bool:
        if len(self.recs) > self.limits.records_max:
            return True
        if sum(r.size for r in self.recs) > self.limits.bytes_max:
            return True
        if self.config is None:
            return False
        policy = self.config.policy
        limit = getattr(policy, "limit", None)
        if limit is not None and len(self.recs) > limit:
            return True
        budget = self.config.token_budget * self.config.trigger_ratio
        return isinstance(policy, TokenBudget) and self.tokens() > budget

    def hard(self) -> bool:
        size = sum(r.size for r in self.recs)
        return len(self.recs) > self.limits.records_max or size > self.limits.bytes_max

    def trim(self) -> bool:
        trimmed = False
        while self.recs and self.must_trim():
            unit = 1
            while unit < len(self.recs) and self.recs[unit].role == "tool":
                unit += 1
            if unit == len(self.recs) and not self.hard():
                break
            del self.recs[:unit]
            trimmed = True
        return trimmed

    def events(self, reasons: list[str]) -> list[str]:
        c = self.config
        needs = c is not None and self.tokens() > c.token_budget * c.trigger_ratio
        if needs and not self.needs:
            reasons.append("needs_compaction")
        self.needs = needs
        return reasons

    def append(self, r: Rec) -> list[str]:
        self.recs.append(r)
        self.version += 1
        return self.events(["trimmed"] if self.trim() else [])

    def configure(self, config: ContextConfig) -> list[str]:
        self.config = config
        self.version += 1
        reasons = ["configured"]
        if self.trim():
            reasons.append("trimmed")
        return self.events(reasons)

    def compact(self, first: int, last: int, new: list[Rec]) -> list[str] | None:
        # the records fully inside [first, last] go; the range must start and end on
        # record boundaries and leave no record cut
        inside = [i for i, r in enumerate(self.recs) if first <= r.first and r.last <= last]
        cut = [r for r in self.recs if r.first < first <= r.last or r.first <= last < r.last]
        if first > last or not inside or cut:
            return None
        if self.recs[inside[0]].first != first or self.recs[inside[-1]].last != last:
            return None
        for r in new:
            r.first, r.last = first, last
        self.recs[inside[0] : inside[-1] + 1] = new
        self.version += 1
        reasons = ["compacted"]
        if self.trim():
            reasons.append("trimmed")
        return self.events(reasons)


# -- strategies ----------------------------------------------------------------------------------
policies = st.one_of(
    st.builds(LastN, st.integers(1, 8)),
    st.builds(
        SkipParts,
        st.lists(st.sampled_from(["tool-", "reasoning", "data-", "text"]), min_size=1, max_size=2),
        st.none() | st.integers(1, 8),
    ),
    st.just(TokenBudget()),
    st.just(Manual()),
)
configs = st.builds(
    ContextConfig,
    st.integers(1, 400),
    st.sampled_from([0.1, 0.5, 0.7, 1.0]),
    policies,
    st.just("o200k_base"),
)
parts = st.none() | st.lists(
    st.tuples(st.sampled_from(PART_TYPES), st.integers(0, 40)), min_size=0, max_size=4
)
message = st.tuples(
    st.sampled_from(["user", "assistant", "tool", "system"]),
    parts,
    st.integers(0, 60),  # extra tokens beyond the parts (a client-given count)
    st.integers(1, 300),  # size
)
operation = st.one_of(
    st.tuples(st.just("append"), message),
    st.tuples(st.just("configure"), configs),
    st.tuples(
        st.just("compact"),
        st.tuples(st.integers(-2, 30), st.integers(0, 6), st.lists(message, max_size=3)),
    ),
)


def records(seq: int, m: tuple[Any, ...]) -> tuple[Record, Rec]:
    role, part_list, extra, size = m
    tokens = (sum(n for _, n in part_list) if part_list is not None else 0) + extra
    plist = list(part_list) if part_list is not None else None
    return (
        Record(seq, seq, role, tokens, plist, size),
        Rec(seq, seq, role, tokens, plist, size, False),
    )


def assert_same(w: Window, m: Model) -> None:
    got = [(r.first_seq, r.last_seq, r.role, r.tokens, r.compacted) for r in w.records]
    want = [(r.first, r.last, r.role, r.tokens, r.compacted) for r in m.recs]
    assert got == want
    assert w.tokens == m.tokens()
    assert w.size == sum(r.size for r in m.recs)
    assert (w.version, w.needs_compaction) == (m.version, m.needs)


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=40), st.integers(3, 12), st.integers(200, 3000))
def test_the_window_behaves_as_the_naive_model(
    ops: list[tuple[str, Any]], records_max: int, bytes_max: int
) -> None:
    limits = WindowLimits(records_max, bytes_max, 10_000)
    w, m = Window(limits), Model(limits)
    seq = 0
    for kind, arg in ops:
        if kind == "append":
            seq += 1
            rec, rec_m = records(seq, arg)
            assert w.append(rec) == m.append(rec_m)
        elif kind == "configure":
            assert w.configure(arg) == m.configure(arg)
        else:
            offset, span, new = arg
            # ranges around the window's own boundaries, and beyond them
            bounds = sorted({r.first_seq for r in w.records} | {r.last_seq for r in w.records})
            first = bounds[offset % len(bounds)] if bounds and offset >= 0 else seq + offset
            last = first + span
            pairs = [records(0, x) for x in new]
            for rec, _ in pairs:
                rec.message = StoredMessage("s", 0, "system", "", "k", "x", {}, None, 0, rec.tokens)
                rec.compacted = True
            got = w.compact(first, last, [p[0] for p in pairs])
            want = m.compact(first, last, [p[1] for p in pairs])
            for _, rec_m in pairs:
                rec_m.compacted = True
            if want is None:
                assert isinstance(got, str), (first, last)
            else:
                assert got == want
        assert_same(w, m)
        # the invariants of the file's rules
        firsts = [r.first_seq for r in w.records]
        assert firsts == sorted(firsts)
        for a, b in zip(w.records, list(w.records)[1:], strict=False):
            assert a.last_seq < b.first_seq or (a.compacted and b.compacted and a.first_seq ==
                                                b.first_seq)  # fmt: skip
        assert len(w.records) <= records_max or len(w.records) == 0


def test_a_tool_call_leaves_with_its_results_and_the_newest_unit_stays() -> None:
    w = Window()
    w.configure(ContextConfig(100, 0.5, TokenBudget(), "o200k_base"))
    w.append(Record(1, 1, "user", 10, None, 1))
    w.append(Record(2, 2, "assistant", 10, [("tool-x", 10)], 1))
    w.append(Record(3, 3, "tool", 10, [("tool-x", 10)], 1))
    w.append(Record(4, 4, "tool", 10, [("tool-x", 10)], 1))
    assert [r.first_seq for r in w.records] == [1, 2, 3, 4]  # 40 <= 50
    w.append(Record(5, 5, "assistant", 15, None, 1))  # 55 > 50: the user message goes
    assert [r.first_seq for r in w.records] == [2, 3, 4, 5]
    w.append(Record(6, 6, "user", 30, None, 1))  # 2..4 leave together
    assert [r.first_seq for r in w.records] == [5, 6]
    w.append(Record(7, 7, "user", 80, None, 1))  # alone over budget: still kept
    assert [r.first_seq for r in w.records] == [7] and w.needs_compaction


# -- through the state machine -------------------------------------------------------------------
def _apply(state: ConversationState, index: int, cmd: commands.Command) -> Any:
    return state.apply(0, [Entry(1, index, data=commands.encode_command(cmd))])[0]


def _append(sid: str, text: str, tokens: int, inserted_at: int, **kw: Any) -> commands.Append:
    if "parts" in kw:
        kw["parts"] = encode_parts(kw["parts"])
    return commands.Append(sid, "user", "u", "text", text, {}, None, None, tokens, inserted_at,
                           "user", **kw)  # fmt: skip


def test_the_window_survives_a_snapshot_and_both_replicas_go_on_alike() -> None:
    a = ConversationState(StateLimits(), groups=None)
    _apply(a, 1, commands.CreateSession("s", "u", "a", {}, 0))
    for i in range(2, 12):
        _apply(a, i, _append("s", f"m{i}", i, i))
    config = ContextConfig(60, 0.9, SkipParts(["tool-"], 6), "cl100k_base")
    assert isinstance(
        _apply(a, 12, commands.SetContextConfig("s", config)), commands.ContextChanged
    )
    summary = StoredMessage("s", 0, "system", "", "summary", "sum", {}, None, 13, 3, "system")
    done = _apply(a, 13, commands.Compact("s", 6, 8, [summary], [[]], None))
    assert isinstance(done, commands.ContextChanged), done
    b = ConversationState(StateLimits(), groups=None)
    b.restore(0, a.snapshot(0))
    part = {"type": "tool-x", "toolCallId": "c", "state": "input-available", "input": {}}
    for state in (a, b):
        _apply(state, 14, _append("s", "after", 5, 14, parts=[part], part_tokens=[5]))
    wa, wb = a.window("s"), b.window("s")
    assert wa is not None and wb is not None and wa[0] is not None and wb[0] is not None
    ra = [(r.first_seq, r.last_seq, r.tokens, r.view_tokens, r.message) for r in wa[0].records]
    rb = [(r.first_seq, r.last_seq, r.tokens, r.view_tokens, r.message) for r in wb[0].records]
    assert ra == rb and [r[:2] for r in ra] == [(5, 5), (6, 8), (9, 9), (10, 10), (11, 11)]
    assert (wa[0].version, wa[0].tokens, wa[0].config) == (wb[0].version, wb[0].tokens, config)
    assert ra[-1][3] == 0  # the tool part is skipped: nothing of it counts


def test_refusals_change_nothing() -> None:
    s = ConversationState(StateLimits(replacement_bytes_max=200), groups=None)
    _apply(s, 1, commands.CreateSession("s", "u", "a", {}, 0))
    _apply(s, 2, _append("s", "one", 1, 2))
    no_window = _apply(s, 3, commands.Compact("s", 1, 1, [], [], None))
    assert (no_window.code, no_window.details) == ("bad_request", {"version": 0})
    _apply(s, 3, commands.SetContextConfig("s", ContextConfig(10, 1.0, Manual(), "o200k_base")))
    _apply(s, 3, _append("s", "two", 1, 3))
    view = s.window("s")
    assert view is not None and view[0] is not None
    version = view[0].version
    stale = _apply(s, 4, _append("s", "x", 1, 4, if_version=version - 1))
    assert (stale.code, stale.details) == ("conflict", {"version": version})
    big = StoredMessage("s", 0, "system", "", "summary", "x" * 500, {}, None, 4, 1, "system")
    too_big = _apply(s, 5, commands.Compact("s", 1, 2, [big], [[]], None))
    assert too_big.code == "too_large"
    for first, last in [(2, 1), (0, 1), (1, 3), (3, 3)]:
        bad = _apply(s, 6, commands.Compact("s", first, last, [], [], None))
        assert bad.code == "bad_request", (first, last, bad)
    config = ContextConfig(1, 1.0, Manual(), "o200k_base")
    missing = _apply(s, 7, commands.SetContextConfig("nope", config))
    assert missing.code == "not_found"
    assert view[0].version == version and s.last_seq("s") == 2


def test_a_window_opens_with_the_hot_tail_and_shares_counts_among_unknown_parts() -> None:
    s = ConversationState(StateLimits(tail_messages_max=3), groups=None)
    _apply(s, 1, commands.CreateSession("s", "u", "a", {}, 0))
    parts = [{"type": "reasoning", "text": "r" * 30}, {"type": "text", "text": "t" * 10}]
    for i in range(2, 6):
        _apply(s, i, _append("s", "", 10, i, parts=parts))  # no counts per part: an old entry
    config = ContextConfig(100, 1.0, SkipParts(["reasoning"], None), "o200k_base")
    _apply(s, 6, commands.SetContextConfig("s", config))
    view = s.window("s")
    assert view is not None and view[0] is not None
    window = view[0]
    assert [r.first_seq for r in window.records] == [2, 3, 4]  # the tail held the last 3
    # 10 tokens shared by encoded size: the reasoning part is the bigger share, skipped
    assert all(0 < r.view_tokens < 5 for r in window.records)
    assert window.tokens == sum(r.view_tokens for r in window.records)


def test_a_retry_must_repeat_a_structured_messages_parts_and_role() -> None:
    s = ConversationState(StateLimits(), groups=None)
    _apply(s, 1, commands.CreateSession("s", "u", "a", {}, 0))

    def structured(text: str, role: str = "assistant") -> commands.Append:
        return commands.Append("s", "agent", "a", "text", "", {}, "m-1", None, 3, 2, role,
                               encode_parts([{"type": "text", "text": text}]))  # fmt: skip

    assert _apply(s, 2, structured("yes")) == commands.Appended(1, 2, False)
    assert _apply(s, 3, structured("yes")) == commands.Appended(1, 2, True)  # a retry
    other = _apply(s, 4, structured("no"))  # the same id for other parts
    assert (other.code, other.details) == ("conflict", {"seq": 1})
    role = _apply(s, 5, structured("yes", "tool"))
    assert role.code == "conflict"
    # a short message hashes as before roles existed (its default role adds nothing)
    short = commands.Append("s", "user", "u", "text", "hi", {}, "m-2", None, 1, 6)
    assert _apply(s, 6, short) == commands.Appended(2, 6, False)
    again = commands.Append("s", "user", "u", "text", "hi", {}, "m-2", None, 1, 6, "user")
    assert _apply(s, 7, again) == commands.Appended(2, 6, True)


def _carried(cmd: commands.Append) -> commands.Append:
    """``cmd`` as a node proposes it: with the fingerprint of its own fields."""
    printed = fingerprint(cmd.sender, cmd.sender_id, cmd.kind, cmd.content, cmd.metadata,
                          cmd.role, cmd.parts)  # fmt: skip
    return msgspec.structs.replace(cmd, fingerprint=printed)


TOOL = {"type": "tool-search", "toolCallId": "c-1", "state": "output-available",
        "input": {"q": "x", "n": 2}, "output": {"hits": [{"b": 1, "a": 2}]}}  # fmt: skip
TOOL_REORDERED = {"output": {"hits": [{"a": 2, "b": 1}]}, "state": "output-available",
                  "toolCallId": "c-1", "input": {"n": 2, "q": "x"},
                  "type": "tool-search"}  # fmt: skip
BUDGET = ContextConfig(4000, 0.7, TokenBudget(), "o200k_base")


@pytest.mark.parametrize("first_carried", [True, False], ids=["first+fp", "first-fp"])
@pytest.mark.parametrize("retry_carried", [True, False], ids=["retry+fp", "retry-fp"])
def test_a_retry_is_the_same_append_with_or_without_the_carried_fingerprint(
    first_carried: bool, retry_carried: bool
) -> None:
    """A node carries the fingerprint in its command; an entry written before that (or by an
    older node) has none and apply hashes it: a retry matches across the two, for structured
    messages (whose parts' keys it may send in another order) and short ones alike."""
    s = ConversationState(StateLimits(), groups=None)
    _apply(s, 1, commands.CreateSession("s", "u", "a", {}, 0))
    _apply(s, 2, commands.SetContextConfig("s", BUDGET))

    def structured(tool: dict[str, Any], text: str = "done", at: int = 3) -> commands.Append:
        reasoning, answer = {"type": "reasoning", "text": "r"}, {"type": "text", "text": text}
        parts = encode_parts([reasoning, tool, answer])
        return commands.Append("s", "agent", "a", "text", "", {"k": {"y": 1, "x": 2}}, "m-1",
                               None, 9, at, "assistant", parts, [1, 6, 2])  # fmt: skip

    def short(metadata: dict[str, Any], content: str = "hi", at: int = 4) -> commands.Append:
        return commands.Append("s", "user", "u", "text", content, metadata, "m-2", None, 1, at)

    def first(cmd: commands.Append) -> commands.Append:
        return _carried(cmd) if first_carried else cmd

    def retry(cmd: commands.Append) -> commands.Append:
        return _carried(cmd) if retry_carried else cmd

    assert _apply(s, 3, first(structured(TOOL))) == commands.Appended(1, 3, False)
    assert _apply(s, 4, first(short({"a": 1, "b": 2}))) == commands.Appended(2, 4, False)
    again = structured(TOOL_REORDERED, at=5)
    again = msgspec.structs.replace(again, metadata={"k": {"x": 2, "y": 1}})
    assert _apply(s, 5, retry(again)) == commands.Appended(1, 3, True)
    assert _apply(s, 6, retry(short({"b": 2, "a": 1}, at=6))) == commands.Appended(2, 4, True)
    others = [(1, structured(TOOL, "other")), (2, short({"a": 1}))]  # the same ids, other content
    for index, (seq, other) in enumerate(others, start=7):
        refused = _apply(s, index, retry(other))
        assert (refused.code, refused.details) == ("conflict", {"seq": seq})
    view = s.window("s")
    assert view is not None and view[0] is not None and len(view[0].records) == 2


def test_commands_with_and_without_the_carried_fingerprint_reach_the_same_state() -> None:
    """The replica that applies proposers' fingerprints and the one that hashes every append
    itself (entries written before it) store the same: same snapshot, byte for byte."""
    tool = {"type": "tool-x", "toolCallId": "c", "state": "input-available", "input": {"q": 1}}
    cmds: list[commands.Command] = [
        commands.CreateSession("s", "u", "a", {}, 0),
        msgspec.structs.replace(_append("s", "plain", 3, 2), client_msg_id="p-1"),
        commands.SetContextConfig("s", ContextConfig(60, 0.9, SkipParts(["tool-"]), "o200k_base")),
    ]
    for i in range(3, 20):
        parts = [{"type": "text", "text": f"t{i}"}, tool] if i % 3 else None
        cmd = _append("s", "" if parts else f"m{i}", i, i,
                      **({"parts": parts, "part_tokens": [i - 1, 1]} if parts else {}))  # fmt: skip
        cmds.append(msgspec.structs.replace(cmd, client_msg_id=f"m-{i}"))
    cmds += [msgspec.structs.replace(c, inserted_at=99) for c in cmds[-3:]]  # retries
    cmds.append(msgspec.structs.replace(cmds[-1], content="other", inserted_at=99))  # reused
    cmds.append(msgspec.structs.replace(cmds[4], inserted_at=99))  # forgotten: appended anew
    a = ConversationState(StateLimits(dedupe_ids_max=4), groups=None)
    b = ConversationState(StateLimits(dedupe_ids_max=4), groups=None)
    results_a, results_b = [], []
    for index, cmd in enumerate(cmds, start=1):
        carried = _carried(cmd) if isinstance(cmd, commands.Append) else cmd
        assert carried == cmd or (isinstance(carried, commands.Append) and carried.fingerprint)
        results_a.append(_apply(a, index, carried))
        results_b.append(_apply(b, index, cmd))
    assert results_a == results_b
    assert sum(getattr(r, "deduped", False) for r in results_a) == 3
    assert any(isinstance(r, commands.Rejected) for r in results_a)  # reused for other content
    assert a.snapshot(0) == b.snapshot(0)
