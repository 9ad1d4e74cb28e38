"""ctxstore.state (and the codecs of ctxstore.commands): the replicated conversation state.

``Node`` feeds commands to a ``ConversationState`` as Raft would (one entry each, in the
session's group, numbered per group).  The hypothesis test at the end checks the optimised
state against a naive model and snapshot + suffix against a straight replay.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxstore import commands as c
from ctxstore.placement import GROUPS, group_of
from ctxstore.records import StoredMessage, encode_parts
from ctxstore.state import (
    SNAPSHOT_VERSION,
    ConversationState,
    ReadResult,
    StateLimits,
    fingerprint,
)
from raft.errors import InvariantViolation
from raft.messages import ConfChange, ConfChangeType, Entry, EntryType


class Node:
    """A ConversationState fed one command per entry, in the session's group by default."""

    def __init__(self, limits: StateLimits | None = None, groups: int | None = GROUPS) -> None:
        self.state = ConversationState(limits, groups)
        self.last_index: dict[int, int] = defaultdict(int)
        self.clock = 1_000

    def group(self, session_id: str) -> int:
        return group_of(session_id, self.state.group_count or GROUPS)

    def entry(self, group: int, data: bytes, type: EntryType = EntryType.NORMAL) -> Entry:
        self.last_index[group] += 1
        return Entry(1, self.last_index[group], type, data)

    def run(self, cmd: c.Command, group: int | None = None) -> object:
        g = self.group(cmd.session_id) if group is None else group
        return self.state.apply(g, [self.entry(g, c.encode_command(cmd))])[0]

    def create(self, sid: str, user: str = "u1", agent: str = "a1", **kw: Any) -> object:
        return self.run(c.CreateSession(sid, user, agent, kw.pop("metadata", {}), 1), **kw)

    def append(
        self,
        sid: str,
        content: str = "hi",
        *,
        cmid: str | None = None,
        expected_seq: int | None = None,
        metadata: dict[str, Any] | None = None,
        sender: Any = "user",
        group: int | None = None,
    ) -> object:
        self.clock += 1
        cmd = c.Append(
            sid, sender, "u1", "text", content, metadata or {}, cmid, expected_seq, 7, self.clock
        )
        return self.run(cmd, group)

    def mark(self, sid: str, user: str, seq: int) -> object:
        return self.run(c.MarkRead(sid, user, seq))

    def read(self, sid: str, after_seq: int = 0, limit: int = 1000) -> ReadResult:
        result = self.state.read(sid, after_seq, limit)
        assert result is not None
        return result

    def seqs(self, sid: str, after_seq: int = 0, limit: int = 1000) -> list[int]:
        return [m.seq for m in self.read(sid, after_seq, limit).messages]


def snapshots(state: ConversationState) -> dict[int, bytes]:
    return {g: state.snapshot(g) for g in state.hosted_groups}


# -- commands and results codecs -------------------------------------------------------------------
def test_commands_and_results_round_trip() -> None:
    cmds: list[c.Command] = [
        c.CreateSession("s", "u", "a", {"k": [1, "x"]}, 5),
        c.Append("s", "agent", "a", "text", "héllo", {}, "m1", 3, 12, 99),
        c.Append("s", "user", "u", "text", "", {}, None, None, None, 1),
        c.MarkRead("s", "u", 4),
    ]
    for cmd in cmds:
        assert c.decode_command(c.encode_command(cmd)) == cmd
    node = Node()
    created = node.create("s")
    results = [created, node.append("s"), node.mark("s", "u1", 1), node.append("nope")]
    for result in results:
        assert c.decode_result(c.encode_result(result)) == result  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [b"", b"\x01", b"\x93\x09\xa1s\xa1u", b"\xc1"])
def test_decode_command_rejects_bad_data(data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        c.decode_command(data)


# -- apply -----------------------------------------------------------------------------------------
def test_seqs_are_1_to_n_per_session() -> None:
    node = Node()
    node.create("s1")
    node.create("s2")
    got = [node.append(sid) for sid in ["s1", "s2", "s1", "s1", "s2"]]
    assert [r.seq for r in got] == [1, 1, 2, 3, 2]  # type: ignore[attr-defined]
    assert got[2] == c.Appended(2, 1_003, False)
    assert node.seqs("s1") == [1, 2, 3]
    assert node.read("s2").last_seq == 2
    message = node.read("s2").messages[0]
    assert (message.session_id, message.sender, message.inserted_at) == ("s2", "user", 1_002)
    assert (message.content, message.token_count, message.client_msg_id) == ("hi", 7, None)


def test_retry_with_same_content_returns_the_original() -> None:
    node = Node()
    node.create("s")
    first = node.append("s", "hello", cmid="m1", metadata={"a": 1, "b": 2})
    node.append("s", "other")
    again = node.append("s", "hello", cmid="m1", metadata={"b": 2, "a": 1})  # key order: same
    assert first == c.Appended(1, 1_001, False)
    assert again == c.Appended(1, 1_001, True)
    assert node.seqs("s") == [1, 2]


def test_maps_with_keys_other_than_strings_are_fingerprinted_without_failing() -> None:
    """The native protocol's msgpack lets a nested map have int keys, which cannot be sorted:
    such an append is hashed in the order written (by the proposer or, for an entry without
    the carried fingerprint, on apply), never raising on apply."""
    node = Node()
    node.create("s")
    odd = {"m": {1: "one", "b": 2}}
    assert node.append("s", "x", cmid="m1", metadata=odd) == c.Appended(1, 1_001, False)
    assert node.append("s", "x", cmid="m1", metadata=odd) == c.Appended(1, 1_001, True)
    other = node.append("s", "x", cmid="m1", metadata={"m": {1: "two", "b": 2}})
    assert isinstance(other, c.Rejected) and other.code == "conflict"
    parts = encode_parts([{"type": "data-x", "data": {2: [1], "k": None}}])
    printed = fingerprint("agent", "a", "text", "", odd, "assistant", parts)
    structured = c.Append("s", "agent", "a", "text", "", odd, "m2", None, 1, 5, "assistant", parts)
    assert node.run(structured) == c.Appended(2, 5, False)
    carried = msgspec.structs.replace(structured, inserted_at=6, fingerprint=printed)
    assert node.run(carried) == c.Appended(2, 5, True)


def test_reused_client_msg_id_with_other_content_is_a_conflict() -> None:
    node = Node()
    node.create("s")
    node.append("s", "hello", cmid="m1")
    for kw in ({"content": "bye"}, {"metadata": {"x": 1}}, {"sender": "agent"}):
        result = node.append("s", cmid="m1", **({"content": "hello"} | kw))
        assert isinstance(result, c.Rejected)
        assert (result.code, result.details) == ("conflict", {"seq": 1})
    assert node.read("s").last_seq == 1


def test_an_id_evicted_from_the_dedupe_window_appends_anew() -> None:
    # The documented limit: only the last dedupe_ids_max client_msg_ids are recognised.
    node = Node(StateLimits(dedupe_ids_max=3))
    node.create("s")
    for i in range(4):
        node.append("s", f"c{i}", cmid=f"m{i}")
    node.append("s", "no id")  # appends without an id do not use the window
    assert node.append("s", "c1", cmid="m1") == c.Appended(2, 1_002, True)
    assert node.append("s", "c0", cmid="m0") == c.Appended(6, 1_007, False)  # m0 was evicted
    assert node.append("s", "c1", cmid="m1") == c.Appended(7, 1_008, False)  # and now m1


def test_the_dedupe_window_evicts_in_order_through_snapshots() -> None:
    """Its eviction order (kept beside the dict) stays the dict's own order: over many
    evictions, and once restored from a snapshot."""
    node = Node(StateLimits(dedupe_ids_max=5))
    node.create("s")
    for i in range(40):
        node.append("s", f"c{i}", cmid=f"m{i}")
        node.append("s", "no id")
    s = node.state._lookup("s")
    assert s is not None and s.dedupe_order is not None
    assert list(s.dedupe) == list(s.dedupe_order) == [f"m{i}" for i in range(35, 40)]
    copy = ConversationState(StateLimits(dedupe_ids_max=5), GROUPS)
    for g, data in snapshots(node.state).items():
        copy.restore(g, data)
    r = copy._lookup("s")
    assert r is not None and r.dedupe_order is not None
    assert list(r.dedupe) == list(r.dedupe_order) == list(s.dedupe)
    assert node.append("s", "c35", cmid="m35") == c.Appended(71, 1_071, True)
    assert node.append("s", "c34", cmid="m34") == c.Appended(81, 1_082, False)  # evicted


def test_expected_seq() -> None:
    node = Node()
    node.create("s")
    assert node.append("s", expected_seq=0) == c.Appended(1, 1_001, False)
    assert node.append("s", expected_seq=1) == c.Appended(2, 1_002, False)
    stale = node.append("s", expected_seq=1)
    assert isinstance(stale, c.Rejected)
    assert (stale.code, stale.details) == ("conflict", {"last_seq": 2})
    assert node.read("s").last_seq == 2


def test_a_retry_is_deduped_before_expected_seq_is_checked() -> None:
    node = Node()
    node.create("s")
    node.append("s", cmid="m1", expected_seq=0)
    assert node.append("s", cmid="m1", expected_seq=0) == c.Appended(1, 1_001, True)


def test_unknown_session() -> None:
    node = Node()
    for result in (node.append("nope"), node.mark("nope", "u1", 0)):
        assert isinstance(result, c.Rejected)
        assert result.code == "not_found"
    state = node.state
    assert state.get_session("nope") is None
    assert state.read("nope", 0, 10) is None
    assert state.read_cursor("nope", "u1") is None
    assert state.unread("nope", "u1") is None
    assert state.list_sessions("u1", None, 10) == ([], None)


def test_create_is_idempotent_for_the_same_user_and_agent() -> None:
    node = Node()
    first = node.create("s", "u1", "a1", metadata={"title": "x"})
    assert isinstance(first, c.SessionCreated)
    assert first.created
    assert first.session == node.state.get_session("s")
    assert (first.session.user_id, first.session.metadata, first.session.last_seq) == (
        "u1",
        {"title": "x"},
        0,
    )
    node.append("s")
    again = node.create("s", "u1", "a1", metadata={"title": "other"})
    assert isinstance(again, c.SessionCreated)
    assert not again.created
    assert again.session.last_seq == 1
    assert again.session.metadata == {"title": "x"}  # the existing session, unchanged
    for user, agent in [("u2", "a1"), ("u1", "a2")]:
        taken = node.create("s", user, agent)
        assert isinstance(taken, c.Rejected)
        assert taken.code == "conflict"


def test_create_in_another_group_than_placement_is_refused() -> None:
    node = Node(groups=4)
    home = node.group("s")
    wrong = (home + 1) % 4
    refused = node.create("s", group=wrong)
    message = f"session 's' belongs to group {home}, not {wrong}"
    assert refused == c.Rejected("bad_request", message, {"group": home})
    assert node.state.get_session("s") is None
    assert node.state.snapshot(wrong) == ConversationState().snapshot(0)  # still empty


def test_without_a_group_count_any_group_may_hold_a_session_but_only_one() -> None:
    node = Node(groups=None)
    assert isinstance(node.create("s", group=7), c.SessionCreated)
    node.append("s", group=7)
    assert node.read("s").last_seq == 1
    assert node.state.hosted_groups == [7]
    with pytest.raises(InvariantViolation, match="misrouted"):
        node.create("s", group=8)


def test_mark_read_moves_forward_only_and_counts_unread() -> None:
    node = Node()
    node.create("s")  # owned by u1
    for _ in range(5):
        node.append("s", sender="agent")
    state = node.state
    assert (state.read_cursor("s", "u1"), state.unread("s", "u1")) == (0, 5)
    assert node.mark("s", "u1", 3) == c.ReadMarked(3)
    assert node.mark("s", "u1", 2) == c.ReadMarked(3)  # never back
    assert (state.read_cursor("s", "u1"), state.unread("s", "u1")) == (3, 2)
    beyond = node.mark("s", "u1", 6)
    assert isinstance(beyond, c.Rejected)
    assert (beyond.code, beyond.details) == ("bad_request", {"last_seq": 5})
    node.append("s", sender="system")
    assert state.unread("s", "u1") == 3


def test_mark_read_is_the_owners_only() -> None:
    node = Node()
    node.create("s")  # owned by u1
    node.append("s", sender="agent")
    for user in ("u2", "U1", ""):
        refused = node.mark("s", user, 1)
        assert isinstance(refused, c.Rejected)
        assert (refused.code, refused.details) == ("forbidden", {})
        assert node.state.read_cursor("s", user) == 0
    assert node.state.read_cursor("s", "u1") == 0  # nothing moved
    unknown = node.mark("nope", "u2", 0)  # an unknown session is not_found, whoever asks
    assert isinstance(unknown, c.Rejected) and unknown.code == "not_found"
    assert node.mark("s", "u1", 1) == c.ReadMarked(1)


def test_the_users_own_messages_are_never_unread() -> None:
    """An append as ``user`` moves the owner's cursor to its seq (a chat app's rule: writing
    reads what came before); the agent's and the system's messages count."""
    node = Node()
    node.create("s")
    state = node.state
    assert node.append("s") == c.Appended(1, 1_001, False)
    assert (state.read_cursor("s", "u1"), state.unread("s", "u1")) == (1, 0)
    node.append("s", sender="agent")
    assert (state.read_cursor("s", "u1"), state.unread("s", "u1")) == (1, 1)
    node.append("s", sender="system")
    node.append("s", sender="agent")
    assert state.unread("s", "u1") == 3
    node.append("s", cmid="m1")  # the user answers: all read
    assert (state.read_cursor("s", "u1"), state.unread("s", "u1")) == (5, 0)
    node.append("s", sender="agent")
    assert node.append("s", cmid="m1") == c.Appended(5, 1_005, True)  # a retry moves nothing
    assert node.append("s", expected_seq=0) == c.Rejected(
        "conflict", "expected_seq 0 but last_seq is 6", {"last_seq": 6}
    )  # nor does a refused append
    assert (state.read_cursor("s", "u1"), state.unread("s", "u1")) == (5, 1)
    assert node.mark("s", "u1", 2) == c.ReadMarked(5)  # never back
    copy = reborn(state)  # the cursor is in the snapshot
    assert (copy.read_cursor("s", "u1"), copy.unread("s", "u1")) == (5, 1)


def test_read_cursors_beyond_the_limit_evict_the_lowest() -> None:
    """Since mark_read is the owner's a session holds one cursor; a snapshot of an older
    version may hold more, and restoring it keeps at most ``cursors_max``."""
    node = Node(StateLimits(cursors_max=3))
    node.create("s", user="d")
    for _ in range(9):
        node.append("s", sender="agent")
    g = node.group("s")
    snap = msgspec.msgpack.decode(node.state.snapshot(g))
    snap[1][0][8] = {"c": 2, "b": 5, "a": 2}  # SessionSnap.cursors, in insertion order
    node.state.restore(g, msgspec.msgpack.encode(snap))
    assert [node.state.read_cursor("s", u) for u in "abcd"] == [2, 5, 2, 0]
    node.mark("s", "d", 1)  # evicts the lowest cursor: seq 2, lowest id among a and c -> a
    assert [node.state.read_cursor("s", u) for u in "abcd"] == [0, 5, 2, 1]
    node.mark("s", "d", 9)  # an existing user never evicts
    assert [node.state.read_cursor("s", u) for u in "abcd"] == [0, 5, 2, 9]
    small = ConversationState(StateLimits(cursors_max=1), node.state.group_count)
    small.restore(g, node.state.snapshot(g))  # keeps the last one inserted that fits: d
    assert [small.read_cursor("s", u) for u in "abcd"] == [0, 0, 0, 9]


def test_non_command_entries_return_none() -> None:
    node = Node()
    node.create("s")
    g = node.group("s")
    conf = msgspec.msgpack.encode(ConfChange(ConfChangeType.ADD_NODE, 4))
    entries = [
        node.entry(g, b""),
        node.entry(g, conf, EntryType.CONF_CHANGE),
        node.entry(g, c.encode_command(c.MarkRead("s", "u1", 0))),
    ]
    assert node.state.apply(g, entries) == [None, None, c.ReadMarked(0)]
    assert node.state.apply(g, []) == []


def test_an_undecodable_entry_is_an_invariant_violation() -> None:
    node = Node()
    with pytest.raises(InvariantViolation, match="entry 1"):
        node.state.apply(3, [node.entry(3, b"\x93\x63\x01\x02")])


# -- the hot tail ----------------------------------------------------------------------------------
def test_hot_tail_is_bounded_by_count() -> None:
    node = Node(StateLimits(tail_messages_max=3))
    node.create("s")
    for _ in range(5):
        node.append("s")
    result = node.read("s")
    assert ([m.seq for m in result.messages], result.first_seq, result.last_seq) == (
        [3, 4, 5],
        3,
        5,
    )
    assert node.seqs("s", after_seq=4) == [5]
    assert node.seqs("s", after_seq=5) == []
    assert node.seqs("s", after_seq=9) == []


def test_hot_tail_is_bounded_by_bytes() -> None:
    # payload = UTF-8 content + msgpack metadata (1 for an empty map)
    node = Node(StateLimits(tail_bytes_max=10))
    node.create("s")
    node.append("s", "abcd")  # 5
    node.append("s", "é")  # 3
    assert node.read("s").first_seq == 1
    node.append("s", "xy", metadata={"k": 1})  # 2 + 4: evicts seq 1
    assert (node.read("s").first_seq, node.seqs("s")) == (2, [2, 3])
    node.append("s", "z" * 50)  # alone above the budget: the newest message always stays
    assert (node.read("s").first_seq, node.seqs("s")) == (4, [4])
    node.append("s", "")
    assert node.seqs("s") == [5]


def test_empty_hot_tail_and_read_paging() -> None:
    node = Node()
    node.create("s")
    assert node.read("s") == ReadResult([], 0, 1)
    for i in range(100):
        node.append("s", str(i))
    assert node.seqs("s", after_seq=0, limit=3) == [1, 2, 3]
    assert node.seqs("s", after_seq=90, limit=3) == [91, 92, 93]  # read from the right end
    assert node.seqs("s", after_seq=97, limit=10) == [98, 99, 100]
    assert [m.content for m in node.read("s", 40, 2).messages] == ["40", "41"]
    with pytest.raises(ValueError):
        node.state.read("s", 0, 0)


# -- list_sessions ---------------------------------------------------------------------------------
def test_list_sessions_pages_by_id_across_groups() -> None:
    node = Node(groups=8)
    ids = [f"s{i:02d}" for i in range(20)]
    for sid in reversed(ids):
        node.create(sid, "u1" if sid != "s05" else "u2")
    mine = [sid for sid in ids if sid != "s05"]
    assert len({node.group(sid) for sid in mine}) > 4
    pages, cursor = [], None
    while True:
        page, cursor = node.state.list_sessions("u1", cursor, 7)
        pages.append([s.id for s in page])
        if cursor is None:
            break
        assert cursor == pages[-1][-1]
    assert pages == [mine[0:7], mine[7:14], mine[14:19]]
    assert node.state.list_sessions("u1", "s18", 1) == ([node.state.get_session("s19")], None)
    assert node.state.list_sessions("u1", "s19", 5) == ([], None)
    assert [s.id for s in node.state.list_sessions("u2", None, 5)[0]] == ["s05"]
    node.append("s00")
    assert node.state.list_sessions("u1", None, 1)[0][0].last_seq == 1


# -- snapshots -------------------------------------------------------------------------------------
def busy_node(groups: int = 4) -> Node:
    node = Node(StateLimits(dedupe_ids_max=4, tail_messages_max=6, cursors_max=2), groups)
    for i in range(12):
        node.create(f"s{i}", f"u{i % 3}", "a1", metadata={"i": i})
    for j in range(60):
        i = j % 7
        sender = "user" if j % 5 == 0 else "agent"
        node.append(f"s{i}", f"m{j}", cmid=f"c{j % 9}" if j % 2 else None, sender=sender)
        node.mark(f"s{i}", f"u{i % 3}", j // 7)  # the owner's
    return node


def observe(
    state: ConversationState, sessions: list[str], users: tuple[str, ...] = ("u0", "u1", "u2")
) -> list[object]:
    """Everything the queries tell about ``sessions`` and ``users``."""
    out: list[object] = []
    for sid in sessions:
        out += [state.get_session(sid), state.read(sid, 0, 1000)]
        out += [(state.read_cursor(sid, r), state.unread(sid, r)) for r in ("u0", "u1", "u2")]
    return out + [state.list_sessions(u, None, 100) for u in users]


def test_snapshot_restore_round_trip() -> None:
    node = busy_node()
    sids = [f"s{i}" for i in range(12)]
    copy = ConversationState(node.state.limits, 4)
    copy.restore(2, b"")
    for g, data in snapshots(node.state).items():
        copy.restore(g, data)
    assert snapshots(copy) == snapshots(node.state)
    assert observe(copy, sids) == observe(node.state, sids)
    assert msgspec.msgpack.decode(node.state.snapshot(0))[0] == SNAPSHOT_VERSION  # version first


def test_restore_replaces_the_group_and_its_index_entries() -> None:
    node = busy_node()
    g = node.group("s0")
    in_g = [f"s{i}" for i in range(12) if node.group(f"s{i}") == g]
    others = [f"s{i}" for i in range(12) if node.group(f"s{i}") != g]
    before = observe(node.state, others, users=())
    node.state.restore(g, b"")
    assert all(node.state.get_session(sid) is None for sid in in_g)
    listed = {s.id for u in ("u0", "u1", "u2") for s in node.state.list_sessions(u, None, 100)[0]}
    assert listed == set(others)
    assert observe(node.state, others, users=()) == before
    again = node.create("s0")  # the group works on
    assert isinstance(again, c.SessionCreated)
    assert again.created


def test_snapshot_then_suffix_equals_replay() -> None:
    full, half = Node(groups=2), Node(groups=2)
    for node in (full, half):
        node.create("a")
        node.create("b")
        for i in range(5):
            node.append("a", cmid=f"m{i}")
    restored = Node(groups=2)
    restored.last_index, restored.clock = half.last_index.copy(), half.clock
    for g, data in snapshots(half.state).items():
        restored.state.restore(g, data)
    for node in (full, restored):
        assert node.append("a", cmid="m2") == c.Appended(3, 1_003, True)
        assert node.mark("a", "u1", 4) == c.ReadMarked(5)  # the user's appends read up to 5
        assert node.append("b", "x", expected_seq=0) == c.Appended(1, 1_007, False)
    assert snapshots(restored.state) == snapshots(full.state)


def test_restore_rejects_a_foreign_snapshot() -> None:
    state = ConversationState(groups=4)
    with pytest.raises(InvariantViolation, match="undecodable"):
        state.restore(1, b"\x01")
    with pytest.raises(InvariantViolation, match="version"):
        state.restore(1, msgspec.msgpack.encode([SNAPSHOT_VERSION + 1, []]))
    node = Node(groups=4)
    node.create("s")
    with pytest.raises(InvariantViolation, match="another group"):
        state.restore((node.group("s") + 1) % 4, node.state.snapshot(node.group("s")))


def test_restore_enforces_smaller_limits() -> None:
    node = busy_node()
    small = ConversationState(StateLimits(dedupe_ids_max=1, tail_messages_max=2, cursors_max=1), 4)
    for g, data in snapshots(node.state).items():
        small.restore(g, data)
    result = small.read("s0", 0, 100)
    assert result is not None
    assert [m.seq for m in result.messages] == [result.last_seq - 1, result.last_seq]


def test_two_replicas_agree() -> None:
    a, b = busy_node(), busy_node()
    assert snapshots(a.state) == snapshots(b.state)
    assert a.append("s1", "x", cmid="c1") == b.append("s1", "x", cmid="c1")


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="tail_bytes_max"):
        StateLimits(tail_bytes_max=0)


# -- against a naive model -------------------------------------------------------------------------
class Model:
    """The semantics written the obvious way: whole histories in plain lists, windows computed
    from them at each step."""

    def __init__(self, limits: StateLimits, groups: int) -> None:
        self.limits, self.groups = limits, groups
        self.owners: dict[str, tuple[str, str]] = {}  # session id -> (user, agent)
        self.history: dict[str, list[StoredMessage]] = {}
        self.cursors: dict[str, dict[str, int]] = {}

    def apply(self, group: int, cmd: c.Command) -> tuple[object, ...]:
        sid = cmd.session_id
        home = group_of(sid, self.groups)
        if isinstance(cmd, c.CreateSession):
            if home != group:
                return ("rejected", "bad_request", {"group": home})
            if sid not in self.owners:
                self.owners[sid] = (cmd.user_id, cmd.agent_id)
                self.history[sid], self.cursors[sid] = [], {}
                return ("created", sid, cmd.user_id, cmd.agent_id, 0, True)
            if self.owners[sid] != (cmd.user_id, cmd.agent_id):
                return ("rejected", "conflict", {})
            return ("created", sid, cmd.user_id, cmd.agent_id, len(self.history[sid]), False)
        if home != group or sid not in self.owners:
            return ("rejected", "not_found", {})
        history = self.history[sid]
        if isinstance(cmd, c.MarkRead):
            return self.mark_read(sid, cmd)
        if cmd.client_msg_id is not None:
            window = [m for m in history if m.client_msg_id is not None]
            for m in window[-self.limits.dedupe_ids_max :]:
                if m.client_msg_id == cmd.client_msg_id:
                    same = (m.sender, m.sender_id, m.kind, m.content, m.metadata) == (
                        cmd.sender, cmd.sender_id, cmd.kind, cmd.content, cmd.metadata
                    )  # fmt: skip
                    if same:
                        return ("appended", m.seq, m.inserted_at, True)
                    return ("rejected", "conflict", {"seq": m.seq})
        if cmd.expected_seq is not None and cmd.expected_seq != len(history):
            return ("rejected", "conflict", {"last_seq": len(history)})
        seq = len(history) + 1
        history.append(
            StoredMessage(sid, seq, cmd.sender, cmd.sender_id, cmd.kind, cmd.content, cmd.metadata,
                    cmd.client_msg_id, cmd.inserted_at, cmd.token_count)
        )  # fmt: skip
        if cmd.sender == "user":
            self.cursors[sid][self.owners[sid][0]] = seq
        return ("appended", seq, cmd.inserted_at, False)

    def mark_read(self, sid: str, cmd: c.MarkRead) -> tuple[object, ...]:
        if cmd.user_id != self.owners[sid][0]:
            return ("rejected", "forbidden", {})
        if cmd.seq > len(self.history[sid]):
            return ("rejected", "bad_request", {"last_seq": len(self.history[sid])})
        cursors = self.cursors[sid]
        current = cursors.get(cmd.user_id, 0)
        if cmd.seq <= current:
            return ("marked", current)
        cursors[cmd.user_id] = cmd.seq
        return ("marked", cmd.seq)

    def unread(self, sid: str, user: str) -> int:
        """Written the obvious way: the messages after the cursor not sent by the owner ...
        which, as an append as ``user`` moves the owner's cursor, are all of them."""
        cursor = self.cursors[sid].get(user, 0)
        after = self.history[sid][cursor:]
        if user == self.owners[sid][0]:
            assert all(m.sender != "user" for m in after)
        return len(after)

    def tail(self, sid: str) -> list[StoredMessage]:
        out: list[StoredMessage] = []
        size = 0
        for m in reversed(self.history[sid]):
            payload = len(m.content.encode()) + len(msgspec.msgpack.encode(m.metadata))
            if len(out) == self.limits.tail_messages_max or (
                out and size + payload > self.limits.tail_bytes_max
            ):
                break
            out.append(m)
            size += payload
        return out[::-1]


def outcome(result: object) -> tuple[object, ...] | None:
    match result:
        case c.SessionCreated(session=s, created=created):
            return ("created", s.id, s.user_id, s.agent_id, s.last_seq, created)
        case c.Appended(seq=seq, inserted_at=at, deduped=deduped):
            return ("appended", seq, at, deduped)
        case c.ReadMarked(seq=seq):
            return ("marked", seq)
        case c.Rejected(code=code, details=details):
            return ("rejected", code, details)
    assert result is None
    return None


SMALL = StateLimits(dedupe_ids_max=3, tail_messages_max=4, tail_bytes_max=12, cursors_max=2)
GROUPS_SMALL = 3
SIDS = ["s0", "s1", "s2", "s3"]
USERS = ["u0", "u1"]
READERS = [*USERS, "r0"]  # the owners, and one who owns nothing

creates = st.builds(
    c.CreateSession,
    st.sampled_from(SIDS),
    st.sampled_from(USERS),
    st.sampled_from(["a0", "a1"]),
    st.sampled_from([{}, {"t": "x"}]),
    st.integers(0, 9),
)
appends = st.builds(
    c.Append,
    st.sampled_from(SIDS),
    st.sampled_from(["user", "agent"]),
    st.sampled_from(["u0", "bot"]),
    st.just("text"),
    st.sampled_from(["", "a", "héé", "a longer content"]),
    st.sampled_from([{}, {"k": 1}, {"k": 2, "j": "v"}]),
    st.sampled_from([None, "m0", "m1", "m2", "m3", "m4"]),
    st.sampled_from([None] * 6 + [0, 1, 2, 3, 4]),
    st.sampled_from([None, 3]),
    st.integers(0, 1_000),
)
marks = st.builds(c.MarkRead, st.sampled_from(SIDS), st.sampled_from(READERS), st.integers(0, 6))
retries = st.integers(0, 8)  # resend the n-th latest Append (a client retry)
# (step, misrouted to another group?); a step None is a non-command entry
Step = tuple[c.Command | int | None, bool]
step_kinds = [appends] * 10 + [retries] * 4 + [marks] * 4 + [creates, st.none()]
steps = st.lists(
    st.tuples(
        st.sampled_from(step_kinds).flatmap(lambda kind: kind),
        st.integers(0, 15).map(lambda n: n == 0),
    ),
    min_size=20,
    max_size=200,
)


def resolve_retries(raw: list[Step]) -> list[tuple[c.Command | None, bool]]:
    out: list[tuple[c.Command | None, bool]] = []
    sent: list[c.Append] = []
    for step, misrouted in raw:
        if isinstance(step, int):
            if not sent:
                continue
            original = sent[-1 - step % len(sent)]
            step = msgspec.structs.replace(original, inserted_at=original.inserted_at + 1)
        if isinstance(step, c.Append):
            sent.append(step)
        out.append((step, misrouted))
    return out


def to_entries(
    raw: list[tuple[c.Command | None, bool]], pick: st.DataObject
) -> list[tuple[int, Entry]]:
    last_index: dict[int, int] = defaultdict(int)
    out = []
    for cmd, misrouted in raw:
        if cmd is None:
            group = pick.draw(st.integers(0, GROUPS_SMALL - 1))
            data, type = pick.draw(
                st.sampled_from(
                    [(b"", EntryType.NORMAL), (b"\x93\x00\x04\xc4\x00", EntryType.CONF_CHANGE)]
                )
            )
        else:
            group = group_of(cmd.session_id, GROUPS_SMALL)
            if misrouted:
                group = (group + 1) % GROUPS_SMALL
            data, type = c.encode_command(cmd), EntryType.NORMAL
        last_index[group] += 1
        out.append((group, Entry(1, last_index[group], type, data)))
    return out


def apply_chunk(state: ConversationState, chunk: list[tuple[int, Entry]]) -> list[object]:
    """Apply a chunk as one ``apply`` call per group (groups are independent: order across
    groups may change), returning the results in the chunk's order."""
    by_group: dict[int, list[int]] = defaultdict(list)
    for i, (group, _) in enumerate(chunk):
        by_group[group].append(i)
    results: list[object] = [None] * len(chunk)
    for group, positions in sorted(by_group.items(), reverse=True):
        for i, result in zip(
            positions, state.apply(group, [chunk[i][1] for i in positions]), strict=True
        ):
            results[i] = result
    return results


def reborn(state: ConversationState) -> ConversationState:
    """A new state restored from ``state``'s snapshots (all groups)."""
    restored = ConversationState(state.limits, state.group_count)
    for g in state.hosted_groups:
        restored.restore(g, state.snapshot(g))
    return restored


@settings(max_examples=300, deadline=None)
@given(generated=steps, pick=st.data())
def test_matches_a_naive_model_and_survives_snapshots_anywhere(
    generated: list[Step], pick: st.DataObject
) -> None:
    # Most sessions exist from the start, so that most commands act on one.
    n = len(SIDS)
    owners = pick.draw(st.lists(st.sampled_from([*USERS, None]), min_size=n, max_size=n))
    owned = zip(SIDS, owners, strict=True)
    creates = [c.CreateSession(sid, u, "a0", {}, 0) for sid, u in owned if u]
    raw = [(cmd, False) for cmd in creates] + resolve_retries(generated)
    entries = to_entries(raw, pick)
    model = Model(SMALL, GROUPS_SMALL)
    expected = [
        None if cmd is None else model.apply(g, cmd)
        for (cmd, _), (g, _) in zip(raw, entries, strict=True)
    ]

    straight = ConversationState(SMALL, GROUPS_SMALL)
    assert [outcome(straight.apply(g, [e])[0]) for g, e in entries] == expected

    cut_at = pick.draw(st.integers(0, len(entries)), label="snapshot after")
    chunk_ends = pick.draw(st.sets(st.integers(0, len(entries))), label="chunk bounds")
    bounds = sorted(chunk_ends | {0, cut_at, len(entries)})
    state = ConversationState(SMALL, GROUPS_SMALL)
    results: list[object] = []
    for lo, hi in itertools.pairwise(bounds):
        if lo == cut_at:
            state = reborn(state)
        results += apply_chunk(state, entries[lo:hi])
    if cut_at == len(entries):
        state = reborn(state)
    assert [outcome(r) for r in results] == expected

    for g in range(GROUPS_SMALL):
        assert state.snapshot(g) == straight.snapshot(g)
    for sid in SIDS:
        session = state.get_session(sid)
        if sid not in model.owners:
            assert session is None
            continue
        assert session is not None
        assert (session.user_id, session.agent_id, session.last_seq) == (
            *model.owners[sid],
            len(model.history[sid]),
        )
        tail = model.tail(sid)
        last_seq = len(model.history[sid])
        assert state.read(sid, 0, 100) == ReadResult(tail, last_seq, last_seq - len(tail) + 1)
        for reader in READERS:
            assert state.read_cursor(sid, reader) == model.cursors[sid].get(reader, 0)
            assert state.unread(sid, reader) == model.unread(sid, reader)
    for user in USERS:
        mine = sorted(sid for sid, (owner, _) in model.owners.items() if owner == user)
        listed, cursor = [], None
        while True:
            page, cursor = state.list_sessions(user, cursor, 2)
            listed += [s.id for s in page]
            if cursor is None:
                break
        assert listed == mine


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_message(self, group: int, index: int, user_id: str, message: StoredMessage) -> None:
        self.events.append(("message", group, index, user_id, message.seq))

    def on_session(self, group: int, index: int, session: Any) -> None:
        self.events.append(("session", group, index, session.id))

    def on_cursor(self, session_id: str, owner_id: str, user_id: str, seq: int) -> None:
        self.events.append(("cursor", session_id, owner_id, user_id, seq))

    def on_evict(self, group: int, index: int, message: StoredMessage) -> None:
        self.events.append(("evict", group, index, message.seq))

    def on_applied(self, group: int, index: int) -> None:
        self.events.append(("applied", group, index))

    def on_agent(self, agent_id: str) -> None:
        self.events.append(("agent", agent_id))


def test_the_observer_hears_every_change_in_apply_order() -> None:
    node = Node()
    rec = Recorder()
    node.state.observer = rec
    g = node.group("s")
    node.create("s", user="owner")
    node.create("s", user="owner")  # idempotent: no second session event
    node.append("s", sender="agent")
    node.append("nope")  # refused: nothing to hear but the applied index
    node.mark("s", "reader", 1)  # forbidden: not the owner
    node.mark("s", "owner", 1)
    node.mark("s", "owner", 1)  # no move
    gn = node.group("nope")
    assert rec.events == [
        ("session", g, 1, "s"),
        ("applied", g, 1),
        ("applied", g, 2),
        ("message", g, 3, "owner", 1),
        ("applied", g, 3),
        ("applied", gn, node.last_index[gn]),
        ("applied", g, 4),
        ("cursor", "s", "owner", "owner", 1),
        ("applied", g, 5),
        ("applied", g, 6),
    ]
    assert node.state.last_message("s") is not None
    assert node.state.last_seq("s") == 1
    sessions, tail = node.state.group_tails(g)
    assert sessions == [("s", 1, 1)] and [m.seq for m in tail] == [1]
    assert node.state.user_session_ids("owner") == ["s"]


def test_a_groups_tails_share_a_budget_and_the_coldest_session_is_trimmed_first() -> None:
    from ctxstore.state import MESSAGE_OVERHEAD_BYTES

    limits = StateLimits(group_tail_bytes_max=22_000)
    node = Node(limits, groups=1)  # one group: every session shares the budget
    for sid in ("a", "b", "c"):
        node.create(sid)
    body = "x" * 1000
    for sid in ("a", "b", "c"):
        for _ in range(5):
            node.append(sid, body)
    each = 1001 + MESSAGE_OVERHEAD_BYTES  # payload (content + empty metadata) + overhead
    assert node.state.tail_charge(0) == 15 * each <= 22_000
    node.append("c", body)  # over budget: "a" (appended longest ago) keeps its newest only
    assert node.read("a").first_seq == 5
    assert node.read("b").first_seq == 1 and node.read("c").first_seq == 1
    assert node.state.tail_charge(0) == 12 * each
    node.append("a", body)  # "a" is the most recent now; "b" goes next
    for _ in range(3):
        node.append("c", body)
    assert node.read("b").first_seq == 5
    assert node.read("a").first_seq == 5 and node.read("c").first_seq == 1
    assert node.state.tail_charge(0) <= 22_000
    # A snapshot keeps the order: a restored replica trims the same sessions afterwards.
    copy = ConversationState(limits, 1)
    copy.restore(0, node.state.snapshot(0))
    assert copy.tail_charge(0) == node.state.tail_charge(0)
    twin = Node(limits, groups=1)
    twin.state = copy
    twin.last_index, twin.clock = defaultdict(int, node.last_index), node.clock
    for n in (node, twin):
        for _ in range(4):
            n.append("a", body)
    assert node.state.snapshot(0) == twin.state.snapshot(0)
    assert [n.read("c").first_seq for n in (node, twin)] == [9, 9]


def test_one_session_alone_over_the_group_budget_keeps_its_newest_message() -> None:
    node = Node(StateLimits(group_tail_bytes_max=5_000), groups=1)
    node.create("big")
    for _ in range(10):
        node.append("big", "y" * 3000)
    r = node.read("big")
    assert [m.seq for m in r.messages] == [10] and r.last_seq == 10


def test_every_message_leaving_the_tail_is_reported_once_with_its_cause() -> None:
    node = Node(StateLimits(tail_messages_max=3, group_tail_bytes_max=8_000), groups=1)
    rec = Recorder()
    node.state.observer = rec
    node.create("a")
    node.create("b")
    for _ in range(5):
        node.append("a", "x" * 10)  # seqs 4, 5 push out 1, 2
    evicts = [e for e in rec.events if e[0] == "evict"]
    assert evicts == [("evict", 0, 6, 1), ("evict", 0, 7, 2)]
    rec.events.clear()
    for _ in range(12):
        node.append("b", "y" * 2000)  # over the group budget: "a" is trimmed, then "b"'s own
    evicted = [e for e in rec.events if e[0] == "evict"]
    assert node.read("a").first_seq == 5  # "a" kept its newest only: 3 and 4 left
    assert len(evicted) == 2 + 12 - len(node.read("b").messages)  # each message once
    # A replica restored under smaller limits reports what its snapshot's tails lose (index 0).
    small = ConversationState(StateLimits(tail_messages_max=1, group_tail_bytes_max=20_000), 1)
    small.observer = rec2 = Recorder()
    small.restore(0, node.state.snapshot(0))
    assert rec2.events and all(e[0] == "evict" and e[2] == 0 for e in rec2.events)
    kept = small.read("b", 0, 10)
    assert kept is not None and len(kept.messages) == 1


# -- appends batched in one entry (the router's AppendBatch) --------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_an_append_batch_applies_as_its_appends_one_by_one(seed: int) -> None:
    """Random appends (retried ids, other content under a used id, expected_seq right and
    wrong, an unknown session) applied one per entry, and in random batches on a second
    replica: the same result per append, in order, and the same messages and cursors."""
    rng = random.Random(seed)
    sids = ["s0", "s1", "s2"]
    g = group_of("s0", GROUPS)
    one, batched = Node(groups=None), Node(groups=None)
    for n in (one, batched):
        for sid in sids:
            n.create(sid, group=g)
    cmds: list[c.Append] = []
    last = dict.fromkeys(sids, 0)
    for i in range(60):
        sid = rng.choice([*sids, "nope"])
        cmid = rng.choice([None, f"m{rng.randrange(12)}"])
        expected = rng.choice([None, None, last.get(sid, 0), 999])
        content = rng.choice(["a", "b"])
        sender = rng.choice(["user", "agent"])
        cmds.append(c.Append(sid, sender, "u1", "text", content, {}, cmid, expected, 1, 10 + i))
        last[sid] = last.get(sid, 0) + 1  # a guess: expected_seq is right only sometimes
    want = [one.run(cmd, g) for cmd in cmds]
    got: list[object] = []
    start = 0
    while start < len(cmds):
        end = min(len(cmds), start + rng.randrange(1, 9))
        batch = c.AppendBatch(cmds[start:end])
        result = batched.run(batch, g) if end - start > 1 else batched.run(cmds[start], g)
        got.extend(result if isinstance(result, list) else [result])
        start = end
    assert got == want
    assert {type(r) for r in want} == {c.Appended, c.Rejected}
    for sid in sids:
        assert one.read(sid).messages == batched.read(sid).messages
        assert one.state.cursors(sid) == batched.state.cursors(sid)
        assert one.state.last_seq(sid) == batched.state.last_seq(sid)
