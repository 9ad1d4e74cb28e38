"""Optimised logic checked against naive versions on random inputs (etcd quorum/quick_test.go).

Each test builds the same state in the real structure and in an obviously-correct model (a list,
a brute-force enumeration) and compares every observable answer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raft.errors import Compacted, InvariantViolation, SnapshotOutOfDate, Unavailable
from raft.log import RaftLog
from raft.messages import ConfState, Entry
from raft.progress import Inflights
from raft.quorum import VoteResult, committed_index, vote_result
from raft.storage import MemoryStorage, limit_size

FAST = settings(max_examples=150, deadline=None)

ids = st.integers(1, 7)


# -- quorum --------------------------------------------------------------------------------------


def naive_committed_index(voters: set[int], match: Mapping[int, int]) -> int:
    """The largest index that more than half of the voters hold (0 without voters)."""
    if not voters:
        return 0
    top = max([match.get(v, 0) for v in voters])
    held_by_majority = [
        i
        for i in range(top + 1)
        if sum(1 for v in voters if match.get(v, 0) >= i) * 2 > len(voters)
    ]
    return max(held_by_majority)


@FAST
@given(st.sets(ids, max_size=7), st.dictionaries(ids, st.integers(0, 12), max_size=7))
def test_committed_index_matches_brute_force(voters: set[int], match: dict[int, int]) -> None:
    assert committed_index(voters, match) == naive_committed_index(voters, match)


def naive_vote_result(voters: set[int], votes: Mapping[int, bool]) -> VoteResult:
    """Try every way the voters yet to answer could vote: decided if all ways agree."""
    known = {v: votes[v] for v in voters if v in votes}
    missing = sorted(voters - known.keys())
    outcomes = set()
    for answers in itertools.product((True, False), repeat=len(missing)):
        ballot = {**known, **dict(zip(missing, answers, strict=True))}
        outcomes.add(sum(ballot.values()) * 2 > len(voters))
    if outcomes == {True}:
        return VoteResult.WON
    if outcomes == {False}:
        return VoteResult.LOST
    return VoteResult.PENDING


@FAST
@given(st.sets(ids, min_size=1, max_size=7), st.dictionaries(ids, st.booleans(), max_size=7))
def test_vote_result_matches_brute_force(voters: set[int], votes: dict[int, bool]) -> None:
    assert vote_result(voters, votes) == naive_vote_result(voters, votes)


# -- Inflights ---------------------------------------------------------------------------------

inflight_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 3), st.integers(0, 6)),  # index step, bytes
        st.tuples(st.just("free_le"), st.integers(-1, 4), st.just(0)),  # offset from first
        st.tuples(st.just("free_first"), st.just(0), st.just(0)),
        st.tuples(st.just("reset"), st.just(0), st.just(0)),
    ),
    max_size=40,
)


@FAST
@given(st.integers(1, 5), st.integers(1, 12), inflight_ops)
def test_inflights_match_a_list_model(
    max_msgs: int, max_bytes: int, ops: list[tuple[str, int, int]]
) -> None:
    infl = Inflights(max_msgs, max_bytes)
    model: list[tuple[int, int]] = []  # (last index, bytes)
    last = 0
    for op, a, b in ops:
        full = len(model) >= max_msgs or sum(s for _, s in model) >= max_bytes
        if op == "add":
            last += a
            if full:
                with pytest.raises(InvariantViolation):
                    infl.add(last, b)
            else:
                infl.add(last, b)
                model.append((last, b))
        elif op == "free_le":
            to = (model[0][0] if model else last) + a
            infl.free_le(to)
            model = [(i, s) for i, s in model if i > to]
        elif op == "free_first":
            infl.free_first_one()
            model = model[1:]
        else:
            infl.reset()
            model = []
        assert infl.count() == len(model)
        assert infl.bytes == sum(s for _, s in model)
        assert infl.full() == (len(model) >= max_msgs or infl.bytes >= max_bytes)


# -- MemoryStorage -----------------------------------------------------------------------------


class StorageModel:
    """A log as a dict index -> (term, payload bytes) above a snapshot at ``offset``."""

    def __init__(self) -> None:
        self.offset = 0
        self.snap_term = 0
        self.snap_index = 0  # of the latest create_snapshot (compact does not move it)
        self.ents: dict[int, tuple[int, int]] = {}

    @property
    def first(self) -> int:
        return self.offset + 1

    @property
    def last(self) -> int:
        return max(self.ents, default=self.offset)

    def term(self, i: int) -> int:
        return self.snap_term if i == self.offset else self.ents[i][0]

    def append(self, entries: list[Entry]) -> None:
        kept = [e for e in entries if e.index >= self.first]
        if kept:
            self.ents = {i: v for i, v in self.ents.items() if i < kept[0].index}
            self.ents.update({e.index: (e.term, len(e.data)) for e in kept})

    def compact(self, i: int) -> None:
        self.snap_term = self.term(i)
        self.offset = i
        self.ents = {j: v for j, v in self.ents.items() if j > i}

    def compact_error(self, i: int) -> type[Exception] | None:
        if i <= self.offset:
            return Compacted
        return InvariantViolation if i > self.last else None

    def snapshot_error(self, i: int) -> type[Exception] | None:
        if i <= self.snap_index:
            return SnapshotOutOfDate
        if i > self.last:
            return InvariantViolation
        return Compacted if i < self.offset else None

    def slice(self, lo: int, hi: int, max_bytes: int | None) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        size = 0
        for i in range(lo, hi):
            term, n = self.ents[i]
            if out and max_bytes is not None and size + n > max_bytes:
                break
            out.append((i, term))
            size += n
        return out


def attempt(error: type[Exception] | None, call: Callable[..., object], *args: object) -> bool:
    """Run ``call(*args)`` expecting ``error`` (None: success); True if it succeeded."""
    if error is None:
        call(*args)
        return True
    with pytest.raises(error):
        call(*args)
    return False


@FAST
@given(st.lists(st.integers(0, 4), max_size=6), st.one_of(st.none(), st.integers(0, 12)))
def test_limit_size_matches_a_prefix_scan(sizes: list[int], max_bytes: int | None) -> None:
    """At least one entry, then as many as fit in ``max_bytes`` of payload in total."""
    entries = [Entry(1, i, data=b"x" * n) for i, n in enumerate(sizes, 1)]
    fits = [
        k
        for k in range(1, len(sizes) + 1)
        if k == 1 or max_bytes is None or sum(sizes[:k]) <= max_bytes
    ]
    assert limit_size(entries, max_bytes) == entries[: max(fits, default=0)]


storage_ops = st.lists(
    st.tuples(
        st.sampled_from(["append", "compact", "snapshot"]),
        st.integers(-3, 2),  # position relative to first (append) or within the log
        st.lists(st.tuples(st.integers(1, 5), st.integers(0, 4)), min_size=1, max_size=5),
    ),
    max_size=25,
)


@FAST
@given(storage_ops, st.data())
def test_memory_storage_matches_a_dict_model(
    ops: list[tuple[str, int, list[tuple[int, int]]]], data: st.DataObject
) -> None:
    s = MemoryStorage(ConfState((1,)))
    m = StorageModel()
    for op, rel, spec in ops:
        if op == "append":
            start = max(1, min(m.first + rel, m.last + 1))
            entries = [Entry(t, start + k, data=b"x" * n) for k, (t, n) in enumerate(spec)]
            s.append(entries)
            m.append(entries)
        else:
            i = data.draw(st.integers(m.offset - 1, m.last + 1), label="index")
            if op == "compact":
                if attempt(m.compact_error(i), s.compact, i):
                    m.compact(i)
            elif attempt(m.snapshot_error(i), s.create_snapshot, i, ConfState((1,)), b""):
                assert (s.snapshot().meta.index, s.snapshot().meta.term) == (i, m.term(i))
                m.snap_index = i
        assert (s.first_index(), s.last_index()) == (m.first, m.last)
        for i in range(max(0, m.offset - 2), m.last + 3):
            if i < m.offset:
                with pytest.raises(Compacted):
                    s.term(i)
            elif i > m.last:
                with pytest.raises(Unavailable):
                    s.term(i)
            else:
                assert s.term(i) == m.term(i)
        lo = data.draw(st.integers(max(0, m.offset - 1), m.last + 1), label="lo")
        hi = data.draw(st.integers(lo, m.last + 1), label="hi")
        max_bytes = data.draw(st.one_of(st.none(), st.integers(0, 10)), label="max_bytes")
        if lo <= m.offset:
            with pytest.raises(Compacted):
                s.entries(lo, hi, max_bytes)
        else:
            got = [(e.index, e.term) for e in s.entries(lo, hi, max_bytes)]
            assert got == m.slice(lo, hi, max_bytes)


# -- RaftLog -----------------------------------------------------------------------------------

terms_strategy = st.lists(st.integers(1, 4), max_size=12).map(sorted)


def raft_log(terms: list[int], persisted: int, compacted: int = 0) -> RaftLog:
    """A RaftLog holding ``terms`` (indexes 1..), the first ``persisted`` in storage (compacted
    up to ``compacted``) and the rest unstable."""
    storage = MemoryStorage(ConfState((1,)))
    storage.append([Entry(t, i) for i, t in enumerate(terms[:persisted], 1)])
    if compacted:
        storage.compact(compacted)
    log = RaftLog(storage, 1 << 20)
    log.append([Entry(t, i) for i, t in enumerate(terms, 1)][persisted:])
    return log


@FAST
@given(terms_strategy, st.data())
def test_find_conflict_by_term_matches_a_scan(terms: list[int], data: st.DataObject) -> None:
    """The largest index <= min(index, last) whose term is <= term (with that term); inside the
    compacted prefix the term is unknown: (that index, 0)."""
    persisted = data.draw(st.integers(0, len(terms)), label="persisted")
    compacted = data.draw(st.integers(0, persisted), label="compacted")
    log = raft_log(terms, persisted, compacted)
    index = data.draw(st.integers(0, len(terms) + 3), label="index")
    term = data.draw(st.integers(0, 5), label="term")

    def term_at(i: int) -> int:
        return 0 if i == 0 else terms[i - 1]

    hi = min(index, len(terms))
    fits = [i for i in range(compacted, hi + 1) if term_at(i) <= term]
    if fits:
        expected = (max(fits), term_at(max(fits)))
    elif hi < compacted:
        expected = (hi, 0)
    else:
        expected = (compacted - 1, 0)
    assert log.find_conflict_by_term(index, term) == expected


@FAST
@given(terms_strategy, st.data())
def test_maybe_append_matches_a_list_model(follower: list[int], data: st.DataObject) -> None:
    """AppendEntries at a follower (§5.3): reject unless (prev_index, prev_term) matches; skip
    entries already held; on the first conflict cut the log there and append the rest; commit
    min(leader commit, last new index), never going backwards."""
    n = len(follower)
    committed = data.draw(st.integers(0, n), label="committed")
    persisted = data.draw(st.integers(0, n), label="persisted")
    log = raft_log(follower, persisted)
    log.commit_to(committed)
    # The leader agrees with the follower up to some k >= committed, then has newer terms.
    k = data.draw(st.integers(committed, n), label="k")
    top = max(follower, default=0)
    suffix = sorted(data.draw(st.lists(st.integers(top + 1, top + 3), max_size=6), label="new"))
    leader = follower[:k] + suffix
    prev_index = data.draw(st.integers(0, len(leader)), label="prev_index")
    true_prev_term = leader[prev_index - 1] if prev_index else 0
    prev_term = data.draw(st.sampled_from([true_prev_term, true_prev_term + 1]), label="prev_t")
    count = data.draw(st.integers(0, len(leader) - prev_index), label="count")
    entries = [Entry(leader[i], i + 1) for i in range(prev_index, prev_index + count)]
    leader_commit = data.draw(st.integers(0, len(leader)), label="leader_commit")

    result = log.maybe_append(prev_index, prev_term, leader_commit, entries)

    model = list(follower)
    held_prev = model[prev_index - 1] if 0 < prev_index <= n else (0 if prev_index == 0 else None)
    if held_prev != prev_term:
        assert result is None
        expected_commit = committed
    else:
        for j, e in enumerate(entries):
            if e.index <= len(model) and model[e.index - 1] == e.term:
                continue
            model = model[: e.index - 1] + [x.term for x in entries[j:]]
            break
        last_new = prev_index + len(entries)
        assert result == last_new
        expected_commit = max(committed, min(leader_commit, last_new))
    assert [e.term for e in log.all_entries()] == model
    assert log.committed == expected_commit
