"""The Postgres watermarks of ctxstore.state: which sessions are not yet entirely in Postgres,
moved by ``PostgresFlushed`` (tag 20) and carried by snapshots."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from ctxstore import commands as c
from ctxstore.state import ConversationState
from ctxstore.state_schema import GroupSnap

from .test_state import Node


def pending(n: Node, sid: str) -> list[tuple[str, int, int, int]]:
    return [p for p in n.state.postgres_pending(n.group(sid)) if p[0] == sid]


def flushed(n: Node, sid: str, seq: int, index: int) -> object:
    return n.run(c.PostgresFlushed([(sid, seq, index)]), n.group(sid))


def test_a_change_makes_a_session_pending_until_flushed() -> None:
    n = Node()
    n.create("s1")
    g = n.group("s1")
    assert pending(n, "s1") == [("s1", 1, 0, 0)]
    n.append("s1")
    n.append("s1")
    assert pending(n, "s1") == [("s1", 3, 0, 2)]
    assert n.state.postgres_backlog(g) == 2
    assert n.state.postgres_flushed_seq("s1") == 0
    # messages up to 1, the row as of entry 2: still pending
    assert flushed(n, "s1", 1, 2) == c.PostgresMarked(0)
    assert pending(n, "s1") == [("s1", 3, 1, 2)]
    assert n.state.postgres_flushed_seq("s1") == 1
    assert flushed(n, "s1", 2, 3) == c.PostgresMarked(1)
    assert pending(n, "s1") == [] and n.state.postgres_backlog(g) == 0
    assert n.state.postgres_flushed_seq("s1") == 2  # clean: everything


def test_watermarks_never_move_back_and_stale_marks_are_ignored() -> None:
    n = Node()
    n.create("s1")
    for _ in range(3):
        n.append("s1")
    flushed(n, "s1", 3, 4)
    assert pending(n, "s1") == []
    n.append("s1")  # a clean session turns pending from its last seq
    assert pending(n, "s1") == [("s1", 6, 3, 4)]
    assert flushed(n, "s1", 1, 2) == c.PostgresMarked(0)  # an old leader's late mark
    assert pending(n, "s1") == [("s1", 6, 3, 4)]
    assert flushed(n, "nope", 9, 9) == c.PostgresMarked(0)


def test_a_cursor_move_alone_makes_the_session_pending() -> None:
    n = Node()
    n.create("s1")
    n.append("s1", sender="agent")
    flushed(n, "s1", 1, 2)
    assert pending(n, "s1") == []
    n.mark("s1", "u1", 1)
    assert pending(n, "s1") == [("s1", 4, 1, 1)]
    assert n.state.postgres_backlog(n.group("s1")) == 0  # no message waits, the cursor does
    flushed(n, "s1", 1, 4)
    assert pending(n, "s1") == []
    n.mark("s1", "u1", 1)  # no move: nothing to copy
    assert pending(n, "s1") == []


def test_snapshots_carry_the_watermarks() -> None:
    n = Node()
    for sid in ("a", "b", "c"):
        n.create(sid)
        n.append(sid)
    flushed(n, "b", 1, 99)
    groups = {n.group(s) for s in ("a", "b", "c")}
    other = ConversationState(groups=n.state.group_count)
    for g in groups:
        other.restore(g, n.state.snapshot(g))
        assert other.postgres_pending(g) == n.state.postgres_pending(g)
        assert other.snapshot(g) == n.state.snapshot(g)
    assert other.postgres_flushed_seq("b") == 1 and other.postgres_flushed_seq("a") == 0


def test_a_snapshot_of_an_older_version_has_no_watermarks() -> None:
    """Every session of a snapshot written before the field existed counts as in Postgres."""
    n = Node()
    n.create("s1")
    n.append("s1")
    g = n.group("s1")
    old = msgspec.msgpack.decode(n.state.snapshot(g))[:3]  # version, sessions, evictable
    other = ConversationState(groups=n.state.group_count)
    other.restore(g, msgspec.msgpack.encode(old))
    assert other.postgres_pending(g) == [] and other.postgres_flushed_seq("s1") == 1
    assert GroupSnap(1, []).postgres == []


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["append", "mark", "flush"]), st.integers(0, 12)),
        max_size=40,
    )
)
def test_pending_matches_a_model(ops: list[tuple[str, int]]) -> None:
    """A naive model: a session is pending iff a change came after the last mark that covered
    it; backlog = last_seq - flushed_seq."""
    n = Node()
    n.create("s")
    g = n.group("s")
    flushed_seq, flushed_index, changed = 0, 0, 1
    for op, k in ops:
        if op == "append":
            n.append("s", sender="agent")
            changed = n.last_index[g]
        elif op == "mark":
            last = n.state.last_seq("s") or 0
            before = n.state.read_cursor("s", "u1")
            n.mark("s", "u1", min(k, last))
            if min(k, last) > (before or 0):
                changed = n.last_index[g]
        else:
            last = n.state.last_seq("s") or 0
            seq, index = min(k, last), n.last_index[g] - (k % 3)
            flushed(n, "s", seq, index)
            flushed_seq, flushed_index = max(flushed_seq, seq), max(flushed_index, index)
        last = n.state.last_seq("s") or 0
        clean = flushed_seq >= last and flushed_index >= changed
        if clean:  # the state forgets a clean session; a later change starts from last_seq
            flushed_seq, flushed_index = last, changed
            assert pending(n, "s") == []
        else:
            assert pending(n, "s") == [("s", changed, flushed_seq, last)]
        assert n.state.postgres_backlog(g) == last - flushed_seq


def test_a_reset_makes_every_session_pending_and_ignores_older_marks() -> None:
    n = Node()
    n.create("s1")
    n.append("s1")
    n.append("s1")
    g = n.group("s1")
    epoch = n.state.postgres_epoch(g)
    n.run(c.PostgresFlushed([("s1", 2, 3)], epoch), g)
    assert pending(n, "s1") == []
    n.run(c.PostgresFlushed([], reset=True), g)
    reset_at = n.last_index[g]
    assert n.state.postgres_epoch(g) == reset_at
    assert pending(n, "s1") == [("s1", reset_at, 0, 2)]
    assert n.state.postgres_backlog(g) == 2 and n.state.postgres_backfill_rows(g) == 2
    n.append("s1")  # new messages are not part of the backfill
    assert n.state.postgres_backlog(g) == 3 and n.state.postgres_backfill_rows(g) == 2
    n.run(c.PostgresFlushed([("s1", 1, reset_at)], reset_at), g)
    assert n.state.postgres_backfill_rows(g) == 1
    # a flush read before the reset (its epoch is older) is ignored
    assert n.run(c.PostgresFlushed([("s1", 2, reset_at)], epoch), g) == c.PostgresMarked(0)
    assert pending(n, "s1") == [("s1", reset_at + 1, 1, 3)]
    assert n.run(c.PostgresFlushed([("s1", 3, reset_at + 1)], reset_at), g) == c.PostgresMarked(1)
    assert pending(n, "s1") == []
    other = ConversationState(groups=n.state.group_count)
    other.restore(g, n.state.snapshot(g))
    assert other.postgres_epoch(g) == reset_at
