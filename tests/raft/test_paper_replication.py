"""Paper tests for log replication and commitment (Raft paper §5.3, §5.4.2, Figures 7 and 8)."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

from raft import Entry, Role
from raft.messages import AppendEntries, AppendResponse, Heartbeat, Message

from .helpers import Cluster, Hold, drain, entries_of, lone_node, of_type, persist

# -- §5.3 ------------------------------------------------------------------------------------


def test_leader_appends_a_no_op_entry_of_its_term_on_election() -> None:
    """Raft paper §5.3 / §8 (and thesis §6.4): a new leader appends a blank no-op entry of its
    own term at the start of its term, replicates it and so commits it."""
    c = Cluster()
    c.elect(1)
    c.propose(1, b"a")
    c.isolate(1)
    c.tick_all(3 * 10)  # 2 or 3 takes over in a new term
    new = c.leader()
    assert new in (2, 3)
    noop = c.log(new)[-1]
    assert (noop.term, noop.index, noop.data) == (c.raft(new).term, 3, b"")
    assert c.raft(new).log.committed == 3
    assert [e.term for e in c.log(5 - new)] == [1, 1, 2]


def test_follower_commit_from_append_entries_is_min_of_leader_commit_and_last_new() -> None:
    """Raft paper §5.3 (Figure 2, AppendEntries rule 5): a follower sets commitIndex to
    min(leaderCommit, index of last new entry), never past what this message proved matches."""
    node, _ = lone_node(terms=(1, 1, 1), term=1)
    node.step(AppendEntries(2, 1, 1, 1, 1, [Entry(1, 2)], 3))
    assert node.raft.log.committed == 2  # entry 3 was not covered by this append
    node.step(AppendEntries(2, 1, 1, 3, 1, [], 3))
    assert node.raft.log.committed == 3
    rd = node.ready()
    assert [e.index for e in rd.committed_entries] == [1, 2, 3]


def test_followers_apply_what_the_leader_commits() -> None:
    """Raft paper §5.3: once the leader commits an entry, the followers learn the commit index
    from later AppendEntries and apply the entry in log order."""
    c = Cluster()
    c.elect(1)
    for data in (b"a", b"b", b"c"):
        c.propose(1, data)
    assert c.applied == {1: [b"a", b"b", b"c"], 2: [b"a", b"b", b"c"], 3: [b"a", b"b", b"c"]}


def test_follower_commit_from_heartbeat_is_capped_by_its_match() -> None:
    """Raft paper §5.3 via heartbeats (etcd/thesis): a heartbeat carries min(follower's match,
    leader commit), so a lagging follower never commits an index it may not hold yet."""
    c = Cluster()
    c.elect(1)
    c.isolate(3)
    for data in (b"a", b"b"):
        c.propose(1, data)
    c.heal()
    c.filter = lambda m: not (isinstance(m, AppendEntries) and m.to == 3)
    c.tick(1)
    hb = {m.to: m.commit for m in of_type(c.delivered, Heartbeat)}
    assert hb == {2: 3, 3: 1}  # 3 matched only the no-op at index 1
    assert (c.raft(2).log.committed, c.raft(3).log.committed) == (3, 1)


def test_heartbeat_advances_follower_commit() -> None:
    """Raft paper §5.3: a follower takes the commit index a heartbeat carries."""
    node, _ = lone_node(terms=(1, 1, 1), term=1)
    node.step(Heartbeat(2, 1, 1, 2))
    assert node.raft.log.committed == 2 and node.raft.lead == 2


def test_conflicting_suffix_is_truncated() -> None:
    """Raft paper §5.3 (Figure 2, AppendEntries rule 3): if an existing entry conflicts with a
    new one (same index, different term), the follower deletes it and all that follow it."""
    node, storage = lone_node(terms=(1, 1, 2, 2), term=3)
    drain(node, storage)
    node.step(AppendEntries(2, 1, 3, 2, 1, [Entry(3, 3)], 0))
    rd = node.ready()
    assert rd.entries == [Entry(3, 3)]
    persist(storage, rd)
    node.advance(rd)
    assert [e.term for e in storage.ents[1:]] == [1, 1, 3]


def test_matching_entries_are_not_truncated() -> None:
    """Raft paper §5.3 (Figure 2, AppendEntries rule 4): entries already in the log are kept;
    an old or duplicated AppendEntries must not cut off entries that follow them."""
    node, storage = lone_node(terms=(1, 1, 2, 2), term=2)
    drain(node, storage)
    node.step(AppendEntries(2, 1, 2, 1, 1, [Entry(1, 2), Entry(2, 3)], 0))
    [ack] = of_type(drain(node, storage), AppendResponse)
    assert (ack.reject, ack.index) == (False, 3)
    assert [e.term for e in storage.ents[1:]] == [1, 1, 2, 2]


def test_mismatched_prev_entry_is_rejected() -> None:
    """Raft paper §5.3 (consistency check): the follower refuses an AppendEntries whose
    (prevLogIndex, prevLogTerm) it does not hold, and keeps its log."""
    node, storage = lone_node(terms=(1, 1, 2), term=3)
    drain(node, storage)
    node.step(AppendEntries(2, 1, 3, 3, 3, [Entry(3, 4)], 0))
    [nack] = of_type(drain(node, storage), AppendResponse)
    assert nack.reject and nack.index == 3
    assert (nack.reject_hint, nack.log_term) == (3, 2)  # our last entry with term <= 3
    assert node.raft.log.last_index() == 3


# -- Figure 7 ---------------------------------------------------------------------------------

FIG7_LEADER = (1, 1, 1, 4, 4, 5, 5, 6, 6, 6)
FIG7_FOLLOWERS = {
    "a": (1, 1, 1, 4, 4, 5, 5, 6, 6),
    "b": (1, 1, 1, 4),
    "c": (1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6),
    "d": (1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7),
    "e": (1, 1, 1, 4, 4, 4, 4),
    "f": (1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3),
}


def figure7(case: str) -> Cluster:
    """Node 1 holds the leader's log of Figure 7 and will lead term 8; node 2 holds follower
    log (a)-(f); node 3 holds the leader's log too (its vote lets 1 win against (c)/(d))."""
    c = Cluster()
    c.set_log(1, entries_of(FIG7_LEADER), term=7)
    c.set_log(3, entries_of(FIG7_LEADER), term=7)
    terms = FIG7_FOLLOWERS[case]
    c.set_log(2, entries_of(terms), term=terms[-1])
    return c


@pytest.mark.parametrize("case", sorted(FIG7_FOLLOWERS))
def test_figure_7_leader_repairs_each_follower_log(case: str) -> None:
    """Raft paper §5.3, Figure 7: whatever the follower's log ((a) missing entries, (c)/(d)
    extra uncommitted entries, (e)/(f) both), the leader of term 8 makes it equal to its own."""
    c = figure7(case)
    c.elect(1)
    assert c.raft(1).term == 8
    expected = [*FIG7_LEADER, 8]
    assert c.terms(1) == c.terms(2) == c.terms(3) == expected
    assert [e.term for e in c.storage[2].ents[1:]] == expected  # on the follower's disk too
    assert all(c.raft(i).log.committed == 11 for i in (1, 2, 3))


def _no_hints(m: Message) -> Message:
    """Strip a rejection's hint so the leader can only step back one entry at a time."""
    if isinstance(m, AppendResponse) and m.reject:
        return msgspec.structs.replace(m, reject_hint=m.index - 1, log_term=0)
    return m


# Rejections from the follower with the hint, and with one-by-one backtracking.
FIG7_REJECTIONS = {"a": (1, 1), "b": (1, 6), "c": (0, 0), "d": (0, 0), "e": (1, 5), "f": (1, 7)}


@pytest.mark.parametrize("case", sorted(FIG7_FOLLOWERS))
def test_rejection_hint_skips_a_whole_term_per_round_trip(case: str) -> None:
    """Raft paper §5.3 (the optimisation after Figure 7) / thesis §4.2.1: a rejecting follower
    names its last entry with a term <= the leader's prevLogTerm (reject_hint, log_term), so the
    leader skips all conflicting entries of a term in one round trip instead of one per entry."""
    hinted, one_by_one = FIG7_REJECTIONS[case]
    counts = []
    for rewrite in (None, _no_hints):
        c = figure7(case)
        c.rewrite = rewrite
        c.elect(1)
        assert c.terms(2) == [*FIG7_LEADER, 8]
        rejections = [m for m in of_type(c.delivered, AppendResponse, to=1) if m.reject]
        appends = of_type(c.delivered, AppendEntries, to=2)
        counts.append((len(rejections), len(appends)))
    (rej_hint, app_hint), (rej_plain, app_plain) = counts
    assert (rej_hint, rej_plain) == (hinted, one_by_one)
    assert app_plain - app_hint == one_by_one - hinted


# -- Figure 8 ---------------------------------------------------------------------------------


def figure8() -> Cluster:
    """Figure 8 (b): S1 led term 2 and put index 2 on S1, S2; S5 led term 3 and put index 2 (in
    term 3) on S5 only, elected by S3, S4, S5.  Index 1 is committed everywhere."""
    c = Cluster(ids=range(1, 6), pre_vote=False, check_quorum=False)
    c.set_log(1, entries_of((1, 2)), term=2, vote=1, commit=1)
    c.set_log(2, entries_of((1, 2)), term=2, vote=1, commit=1)
    c.set_log(3, entries_of((1,)), term=3, vote=5, commit=1)
    c.set_log(4, entries_of((1,)), term=3, vote=5, commit=1)
    c.set_log(5, entries_of((1, 3)), term=3, vote=5, commit=1)
    return c


def _s1_reaches_s2_s3(strip_own_term: bool) -> Callable[[Message], Message | None]:
    def rewrite(m: Message) -> Message | None:
        if not isinstance(m, AppendEntries) or m.frm != 1:
            return m
        if m.to == 4:
            return None
        if strip_own_term:  # S1 gets only its older entries across before it crashes
            kept = [e for e in m.entries if e.term < m.term]
            return msgspec.structs.replace(m, entries=kept)
        return m

    return rewrite


def _s1_restarts_and_leads_term_4(c: Cluster) -> None:
    c.isolate(5)  # S5 crashed
    c.campaign(1)  # term 3: S3 and S4 already voted for S5
    c.campaign(1)  # term 4: S2, S3, S4 vote for S1
    assert c.raft(1).role is Role.LEADER and c.raft(1).term == 4


def test_figure_8_old_term_entry_on_a_majority_is_not_committed() -> None:
    """Raft paper §5.4.2, Figure 8 (c)-(d): S1, leader of term 4, puts its term-2 entry at
    index 2 on a majority (S1, S2, S3) but must not commit it by counting replicas: S5 can still
    be elected (by S2, S3, S4) and overwrite it with its term-3 entry."""
    c = figure8()
    c.rewrite = _s1_reaches_s2_s3(strip_own_term=True)
    _s1_restarts_and_leads_term_4(c)
    # (c): index 2 (term 2) is on S1, S2 and S3, a majority of five...
    assert [c.terms(i)[:2] for i in (1, 2, 3)] == [[1, 2]] * 3
    progress = c.nodes[1].status().progress
    assert progress[2][1] == progress[3][1] == 2
    # ...and yet nobody commits it: it is not of the leader's term.
    assert [c.raft(i).log.committed for i in range(1, 6)] == [1] * 5
    # (d): S1 crashes, S5 comes back and wins term 5 with S2, S3 and S4.
    c.rewrite = None
    c.heal()
    c.isolate(1)
    c.campaign(5)  # term 4: refused by those who voted for S1
    c.campaign(5)  # term 5
    assert c.raft(5).role is Role.LEADER
    assert [c.terms(i) for i in (2, 3, 4, 5)] == [[1, 3, 5]] * 4  # index 2 replaced
    assert c.raft(2).log.committed == 3


def test_figure_8_old_term_entry_commits_with_an_entry_of_the_leaders_term() -> None:
    """Raft paper §5.4.2, Figure 8 (e): once S1 replicates an entry of its own term (4) on a
    majority, that entry and the term-2 entry before it are committed, and S5 can no longer be
    elected."""
    c = figure8()
    c.rewrite = _s1_reaches_s2_s3(strip_own_term=False)
    _s1_restarts_and_leads_term_4(c)
    assert [c.terms(i) for i in (1, 2, 3)] == [[1, 2, 4]] * 3
    assert c.raft(1).log.committed == 3
    c.rewrite = None
    c.heal()
    c.isolate(1)
    c.campaign(5)
    c.campaign(5)
    assert c.raft(5).role is not Role.LEADER
    assert [c.terms(i) for i in (2, 3)] == [[1, 2, 4]] * 2


@pytest.mark.parametrize("broadcast", [True, False])
def test_followers_learn_a_commit_at_once_or_with_the_next_heartbeat(broadcast: bool) -> None:
    """``commit_broadcast=False`` saves the commit-only appends; the next heartbeat carries the
    commit index instead (commitment itself is unchanged: the leader applies at once)."""
    c = Cluster(ids=(1, 2, 3), commit_broadcast=broadcast)
    c.elect(1)
    c.sent.clear()
    index = c.propose(1, b"x")
    c.stabilize()
    assert c.raft(1).log.committed == index
    appends = [m for m in c.sent if isinstance(m, AppendEntries)]
    assert len(appends) == (4 if broadcast else 2)  # the entry, then (or not) the commit
    followers_commit = {c.raft(i).log.committed for i in (2, 3)}
    assert followers_commit == ({index} if broadcast else {index - 1})
    c.tick(1, c.raft(1).cfg.heartbeat_ticks)
    c.stabilize()
    assert {c.raft(i).log.committed for i in (2, 3)} == {index}


@pytest.mark.parametrize("skip", [False, True])
def test_busy_followers_need_no_heartbeat(skip: bool) -> None:
    """``skip_busy_heartbeats``: a follower that was sent appends and acknowledged appends since
    the last round, and was sent the commit a heartbeat would carry, gets no heartbeat; a read
    still heartbeats everyone, and once the appends stop the heartbeats (and commits) resume."""
    c = Cluster(ids=(1, 2, 3), commit_broadcast=False, skip_busy_heartbeats=skip)
    hb = c.raft(1).cfg.heartbeat_ticks
    c.elect(1)
    c.tick(1, hb)
    first = c.propose(1, b"a")
    c.stabilize()
    hold = Hold(c, lambda m: isinstance(m, AppendResponse))  # the next append stays unanswered
    c.propose(1, b"b")
    c.stabilize()
    c.sent.clear()
    c.tick(1, hb)
    assert len(of_type(c.sent, Heartbeat)) == (0 if skip else 2)
    c.nodes[1].read_index(b"r")
    c.stabilize()
    read_round = c.raft(1).read_only.round
    assert {m.to for m in of_type(c.sent, Heartbeat) if m.round == read_round} == {2, 3}
    hold.release()
    second = c.raft(1).log.last_index()
    assert c.raft(1).log.committed == second
    assert {c.raft(i).log.committed for i in (2, 3)} == {first}
    c.sent.clear()
    c.tick(1, hb)  # nothing sent since the last round: everyone is heartbeaten
    assert {m.to for m in of_type(c.sent, Heartbeat)} == {2, 3}
    assert {c.raft(i).log.committed for i in (2, 3)} == {second}


def test_a_follower_that_missed_an_append_is_found_out_with_busy_heartbeats_skipped() -> None:
    """An append lost on the way (the transport drops appends under backpressure) leaves a
    follower in REPLICATE that acknowledges nothing: the next heartbeat answers show it, and it
    gets the entries again."""
    c = Cluster(ids=(1, 2, 3), commit_broadcast=False, skip_busy_heartbeats=True)
    hb = c.raft(1).cfg.heartbeat_ticks
    c.elect(1)
    c.tick(1, hb)
    c.cut(1, 3)
    index = c.propose(1, b"lost on the way to 3")
    c.stabilize()
    c.heal()
    assert c.raft(3).log.last_index() < index
    for _ in range(3):
        c.tick(1, hb)
    assert c.raft(3).log.last_index() == index
