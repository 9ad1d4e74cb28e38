"""Paper tests for the Ready contract: what may leave before the persist, and what only after.

Raft paper §5.1 ("servers persist currentTerm and votedFor before responding to RPCs") and
thesis §10.2.1 (the leader may write its log in parallel with replication, counting itself
toward commit only once its own write is durable).  See docs/raft.md §5-§6.
"""

from __future__ import annotations

import pytest

from raft import Entry, HardState, InvariantViolation
from raft.messages import (
    AppendEntries,
    AppendResponse,
    Heartbeat,
    RequestVote,
    VoteResponse,
)

from .helpers import Cluster, lone_node, of_type, persist


def test_vote_response_leaves_only_after_the_vote_is_persisted() -> None:
    """Raft paper §5.1/§5.2: the vote (and the term) must be on stable storage before the
    VoteResponse granting it is sent, and that write must be synced."""
    node, _ = lone_node(3)
    node.step(RequestVote(1, 3, 1, 0, 0))
    rd = node.ready()
    assert rd.hard_state == HardState(1, 1, 0) and rd.must_sync
    assert not of_type(rd.messages, VoteResponse)
    [grant] = of_type(rd.persisted_messages, VoteResponse)
    assert not grant.reject


def test_pre_vote_answer_leaves_at_once() -> None:
    """Thesis §9.6: a pre-vote changes no durable state, so its answer need not wait."""
    node, _ = lone_node(3)
    node.step(RequestVote(1, 3, 1, 0, 0, pre_vote=True))
    rd = node.ready()
    assert rd.hard_state is None and not rd.must_sync
    [grant] = of_type(rd.messages, VoteResponse)
    assert grant.pre_vote and not grant.reject


def test_candidate_requests_votes_only_after_persisting_its_term_and_vote() -> None:
    """Raft paper §5.1/§5.2: a candidate's new term and self-vote are durable (synced) before
    its RequestVotes leave."""
    node, _ = lone_node(1, pre_vote=False)
    node.campaign()
    rd = node.ready()
    assert rd.hard_state == HardState(1, 1, 0) and rd.must_sync
    assert rd.messages == []
    assert {m.to for m in of_type(rd.persisted_messages, RequestVote)} == {2, 3}


@pytest.mark.parametrize("matching", [True, False])
def test_append_response_leaves_only_after_the_entries_are_persisted(matching: bool) -> None:
    """Raft paper §5.3: a follower acknowledges (or refuses) entries only once its log write
    is durable: an acknowledged entry counts toward commit and must survive a crash."""
    node, storage = lone_node(1)
    prev_term = 0 if matching else 1
    node.step(AppendEntries(2, 1, 1, 0, prev_term, [Entry(1, 1, data=b"x")], 0))
    rd = node.ready()
    assert rd.must_sync  # the term changed (and, when matching, there are entries)
    assert rd.entries == ([Entry(1, 1, data=b"x")] if matching else [])
    assert not of_type(rd.messages, AppendResponse)
    [resp] = of_type(rd.persisted_messages, AppendResponse)
    assert resp.reject is not matching
    persist(storage, rd)
    node.advance(rd)
    # Same again in a term that is already durable: still after the persist.
    node.step(AppendEntries(2, 1, 1, 1, 1, [Entry(1, 2, data=b"y")], 0))
    rd = node.ready()
    if matching:
        assert rd.must_sync and rd.hard_state is None and rd.entries
    assert not of_type(rd.messages, AppendResponse)
    assert of_type(rd.persisted_messages, AppendResponse)


def test_leader_sends_append_entries_before_its_own_persist() -> None:
    """Thesis §10.2.1: once its term is durable, the leader sends AppendEntries for new entries
    at once, in parallel with writing them to its own disk."""
    c = Cluster()
    c.elect(1)
    node = c.nodes[1]
    index = node.propose(b"x")
    rd = node.ready()
    assert [e.index for e in rd.entries] == [index] and rd.must_sync
    assert rd.hard_state is None
    sent = of_type(rd.messages, AppendEntries)
    assert {m.to for m in sent} == {2, 3}
    assert all(m.entries[-1].index == index for m in sent)
    assert not of_type(rd.persisted_messages, AppendEntries)


def test_commit_only_change_needs_no_sync() -> None:
    """Raft paper §5.3 / etcd MustSync: the commit index may be recovered after a crash, so a
    Ready whose only durable change is the commit index does not need an fsync."""
    node, storage = lone_node(1)
    node.step(AppendEntries(2, 1, 1, 0, 0, [Entry(1, 1)], 0))
    rd = node.ready()
    persist(storage, rd)
    node.advance(rd)
    node.step(Heartbeat(2, 1, 1, 1))
    rd = node.ready()
    assert rd.hard_state == HardState(1, 0, 1)
    assert rd.entries == [] and not rd.must_sync
    assert [e.index for e in rd.committed_entries] == [1]


def test_leader_counts_itself_toward_commit_only_after_its_persist() -> None:
    """Thesis §10.2.1: the leader counts its own log toward a majority only once its own write
    is durable: with one follower's ack the entry commits only when the leader's Ready is
    advanced."""
    c = Cluster()
    c.elect(1)
    leader = c.nodes[1]
    index = leader.propose(b"x")
    rd = leader.ready()
    [to_2] = of_type(rd.messages, AppendEntries, to=2)
    c.nodes[2].step(to_2)
    [ack] = of_type(c.process(2), AppendResponse)
    assert ack.index == index and not ack.reject
    leader.step(ack)  # a majority of *acks*, but the leader's own copy is not durable yet
    assert leader.raft.log.committed == index - 1
    persist(c.storage[1], rd)
    leader.advance(rd)
    assert leader.raft.log.committed == index
    assert [e.data for e in leader.ready().committed_entries] == [b"x"]


def test_single_voter_commits_only_after_advance() -> None:
    """Thesis §10.2.1: a single-voter group's leader is its own majority, so it commits an
    entry only after the Ready that carries it has been persisted and advanced."""
    c = Cluster(ids=[1])
    c.elect(1)
    node = c.nodes[1]
    index = node.propose(b"x")
    rd = node.ready()
    assert rd.entries[-1].index == index and rd.committed_entries == []
    assert node.raft.log.committed == index - 1
    persist(c.storage[1], rd)
    node.advance(rd)
    assert node.raft.log.committed == index
    assert [e.data for e in node.ready().committed_entries] == [b"x"]


def test_leader_without_followers_never_commits() -> None:
    """Raft paper §5.3: an entry is committed only once a majority stores it; a 3-node leader
    cut off from both followers never commits, however long it runs."""
    c = Cluster(check_quorum=False)
    c.elect(1)
    c.isolate(1)
    before = c.raft(1).log.committed
    index = c.propose(1, b"x")
    c.tick(1, 50)
    assert c.raft(1).log.committed == before < index
    assert c.applied[1] == []


def test_only_one_ready_is_outstanding() -> None:
    """Ready contract: a second ready() before advance() is a broken invariant, raised (not
    asserted); so is advancing a Ready that is not the outstanding one."""
    node, _ = lone_node(1, pre_vote=False)
    node.campaign()
    rd = node.ready()
    assert not node.has_ready()
    with pytest.raises(InvariantViolation):
        node.ready()
    node.advance(rd)
    with pytest.raises(InvariantViolation):
        node.advance(rd)
