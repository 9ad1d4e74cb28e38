"""Paper tests for the thesis' extensions: pre-vote and leader stickiness (§9.6), check-quorum
(§6.2), leadership transfer (§3.10) and ReadIndex (§6.4)."""

from __future__ import annotations

import pytest

from raft import NONE, ConfigInvalid, NotLeader, ProposalDropped, ReadState, Role
from raft.messages import (
    AppendEntries,
    ConfChange,
    ConfChangeType,
    Heartbeat,
    HeartbeatResponse,
    ReadIndex,
    ReadIndexResponse,
    RequestVote,
    TimeoutNow,
    VoteResponse,
)

from .helpers import Cluster, of_type

ET = 10


# -- pre-vote (thesis §9.6) ---------------------------------------------------------------------


def _partition_3_and_let_it_time_out(c: Cluster) -> int:
    c.elect(1)
    term = c.raft(1).term
    c.isolate(3)
    c.propose(1, b"while 3 is away")
    c.tick(3, 5 * ET)  # several election timeouts for the partitioned node
    return term


def test_pre_vote_keeps_a_partitioned_node_from_bumping_the_term() -> None:
    """Thesis §9.6 pre-vote: a partitioned node times out again and again, but its pre-votes
    fail, so it never increments its term and rejoins without disrupting the leader."""
    c = Cluster()
    term = _partition_3_and_let_it_time_out(c)
    assert c.raft(3).term == term
    assert c.raft(3).role is Role.PRE_CANDIDATE
    assert not [m for m in of_type(c.sent, RequestVote) if m.frm == 3 and not m.pre_vote]
    c.heal()
    c.tick_all(3 * ET)
    assert c.leader() == 1
    assert [c.raft(i).term for i in (1, 2, 3)] == [term] * 3
    assert c.log(3) == c.log(1)


def test_without_pre_vote_a_rejoining_node_disrupts_the_leader() -> None:
    """Thesis §9.6 (why pre-vote): without it the partitioned node increments its term on each
    timeout; when it rejoins, its RequestVote makes the leader step down, although the node
    cannot win (its log is behind)."""
    c = Cluster(pre_vote=False, check_quorum=False)
    term = _partition_3_and_let_it_time_out(c)
    assert c.raft(3).term > term + 1
    c.heal()
    for _ in range(2 * ET):
        c.tick(3)
        if c.raft(1).role is not Role.LEADER:
            break
    assert c.raft(1).role is Role.FOLLOWER and c.raft(1).term > term
    assert c.raft(3).role is not Role.LEADER


def test_pre_vote_request_does_not_change_the_voters_term() -> None:
    """Thesis §9.6: a pre-vote asks "would you vote for me in term+1?"; answering it changes
    neither the voter's term nor its vote, even when granted."""
    c = Cluster()
    c.nodes[2].step(RequestVote(1, 2, 5, 0, 0, pre_vote=True))
    r = c.raft(2)
    assert (r.term, r.vote) == (0, NONE)
    [answer] = of_type(c.process(2), VoteResponse)
    assert answer.pre_vote and not answer.reject and answer.term == 5


def test_pre_candidate_that_wins_runs_a_real_election() -> None:
    """Thesis §9.6: only a pre-candidate that hears "yes" from a majority increments its term
    and runs a real election."""
    c = Cluster()
    c.campaign(1)
    pre = [m for m in of_type(c.sent, RequestVote) if m.pre_vote]
    real = [m for m in of_type(c.sent, RequestVote) if not m.pre_vote]
    assert {m.term for m in pre} == {m.term for m in real} == {1}
    assert c.sent.index(pre[0]) < c.sent.index(real[0])
    assert c.leader() == 1


# -- check-quorum and leader stickiness ---------------------------------------------------------


@pytest.mark.parametrize("check_quorum", [True, False])
def test_leader_without_a_quorum_steps_down(check_quorum: bool) -> None:
    """Thesis §6.2 check-quorum: a leader that has not heard from a majority during an election
    timeout steps down (so clients retry elsewhere); without the option it stays leader."""
    c = Cluster(check_quorum=check_quorum)
    c.elect(1)
    term = c.raft(1).term
    c.isolate(1)
    c.tick(1, ET - 1)
    assert c.raft(1).role is Role.LEADER
    c.tick(1, 2 * ET)
    r = c.raft(1)
    if check_quorum:
        assert (r.role, r.lead, r.term) == (Role.FOLLOWER, NONE, term)
    else:
        assert r.role is Role.LEADER


def test_leader_with_a_quorum_stays() -> None:
    """Thesis §6.2: a leader that hears from a majority (itself and one of two followers) every
    election timeout keeps leading."""
    c = Cluster()
    c.elect(1)
    c.isolate(3)
    c.tick_all(10 * ET)
    assert c.leader() == 1 and c.raft(1).term == 1


@pytest.mark.parametrize("pre_vote", [True, False])
def test_leader_stickiness_ignores_vote_requests_within_the_lease(pre_vote: bool) -> None:
    """Thesis §9.6 (check-quorum stickiness): a follower that heard from its leader within the
    election timeout ignores a RequestVote with a higher term: no answer, no term change."""
    c = Cluster()
    c.elect(1)
    c.nodes[2].step(RequestVote(3, 2, 2, 10, 2, pre_vote=pre_vote))
    r = c.raft(2)
    assert (r.term, r.vote, r.lead) == (1, 1, 1)
    assert not of_type(c.process(2), VoteResponse)


def test_transfer_flag_bypasses_leader_stickiness() -> None:
    """Thesis §3.10 / §9.6: a RequestVote sent on TimeoutNow (transfer=True) is not a disruption:
    it is handled even within the leader lease."""
    c = Cluster()
    c.elect(1)
    c.nodes[2].step(RequestVote(3, 2, 2, 10, 2, transfer=True))
    r = c.raft(2)
    assert (r.term, r.vote) == (2, 3)
    [grant] = of_type(c.process(2), VoteResponse)
    assert not grant.reject


def test_vote_request_handled_once_the_lease_has_expired() -> None:
    """Thesis §9.6: stickiness lasts one election timeout; a follower that has not heard from
    the leader for that long considers a higher-term RequestVote again."""
    c = Cluster()
    c.elect(1)
    c.isolate(1)
    c.isolate(2)
    for _ in range(ET):
        c.nodes[2].tick()
    c.nodes[2].step(RequestVote(3, 2, 2, 10, 2))
    assert (c.raft(2).term, c.raft(2).vote) == (2, 3)


# -- leadership transfer (thesis §3.10) ---------------------------------------------------------


def test_transfer_to_an_up_to_date_follower() -> None:
    """Thesis §3.10: the leader sends TimeoutNow to an up-to-date target, which starts an
    election at once (no pre-vote, no waiting for its timeout) and wins it."""
    c = Cluster()
    c.elect(1)
    term = c.raft(1).term
    start = len(c.sent)
    c.nodes[1].transfer_leader(2)
    c.stabilize()
    sent = c.sent[start:]
    assert [m.to for m in of_type(sent, TimeoutNow)] == [2]
    votes = [m for m in of_type(sent, RequestVote) if m.frm == 2]
    assert votes and all(m.transfer and not m.pre_vote for m in votes)
    assert c.leader() == 2 and c.raft(2).term == term + 1
    assert c.raft(1).role is Role.FOLLOWER and c.raft(1).lead == 2


def test_transfer_to_a_lagging_follower_catches_it_up_first() -> None:
    """Thesis §3.10: if the target's log is behind, the leader first replicates the missing
    entries and sends TimeoutNow only once the target matches its last index."""
    c = Cluster()
    c.elect(1)
    c.isolate(3)
    for data in (b"a", b"b"):
        c.propose(1, data)
    c.heal()
    last = c.raft(1).log.last_index()
    start = len(c.delivered)
    c.nodes[1].transfer_leader(3)
    c.stabilize()
    delivered = c.delivered[start:]
    [timeout_now] = of_type(delivered, TimeoutNow)
    catch_up = [m for m in of_type(delivered, AppendEntries, to=3) if m.entries]
    assert catch_up and catch_up[-1].entries[-1].index == last
    assert delivered.index(catch_up[-1]) < delivered.index(timeout_now)
    assert c.leader() == 3 and c.applied[3] == [b"a", b"b"]


def test_proposals_are_dropped_while_transferring() -> None:
    """Thesis §3.10: during a transfer the leader stops accepting client requests (they would
    be lost or delay the transfer)."""
    c = Cluster()
    c.elect(1)
    c.isolate(3)
    c.propose(1, b"a")
    c.nodes[1].transfer_leader(3)
    c.stabilize()
    with pytest.raises(ProposalDropped):
        c.nodes[1].propose(b"b")
    with pytest.raises(ProposalDropped):
        c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))


def test_transfer_aborts_after_an_election_timeout() -> None:
    """Thesis §3.10: if the transfer does not complete within an election timeout, the leader
    aborts it and resumes accepting client requests."""
    c = Cluster()
    c.elect(1)
    c.isolate(3)
    c.propose(1, b"a")
    c.nodes[1].transfer_leader(3)
    c.tick(1, ET - 1)
    with pytest.raises(ProposalDropped):
        c.nodes[1].propose(b"b")
    c.tick(1)
    c.propose(1, b"b")
    assert c.leader() == 1 and c.applied[2] == [b"a", b"b"]


def test_transfer_target_must_be_a_voter() -> None:
    """Thesis §3.10 / §4.2.1: only a voter can become leader, so a transfer to a learner (or a
    non-member) is refused with ConfigInvalid; only a leader can transfer (NotLeader)."""
    c = Cluster(ids=[1, 2, 3], learners=[4])
    c.elect(1)
    for target in (4, 9):
        with pytest.raises(ConfigInvalid):
            c.nodes[1].transfer_leader(target)
    with pytest.raises(NotLeader):
        c.nodes[2].transfer_leader(3)


# -- ReadIndex (thesis §6.4) --------------------------------------------------------------------


def test_leader_read_waits_for_a_heartbeat_quorum() -> None:
    """Thesis §6.4: the leader records its commit index as the read index, then confirms it is
    still leader with a round of heartbeats; only after a majority (itself included: 3 of 5)
    acknowledges does the read return ReadState(index=commit, context)."""
    c = Cluster(ids=range(1, 6))
    c.elect(1)
    c.propose(1, b"a")
    commit = c.raft(1).log.committed
    c.capture_types = (HeartbeatResponse,)
    c.nodes[1].read_index(b"r1")
    c.stabilize()
    [round_] = {m.round for m in of_type(c.delivered, Heartbeat)}
    assert round_ == c.raft(1).read_only.round
    assert c.read_states[1] == []
    acks = [m for m in c.captured if m.round == round_]
    assert len(acks) == 4
    c.capture_types = ()
    c.send(acks[:1])  # the leader and one follower: 2 of 5
    assert c.read_states[1] == []
    c.send(acks[1:2])  # 3 of 5
    assert c.read_states[1] == [ReadState(commit, b"r1")]
    c.send(acks[2:])
    assert c.read_states[1] == [ReadState(commit, b"r1")]


def test_follower_read_index_through_the_leader() -> None:
    """Thesis §6.4: a follower asks the leader for the read index (ReadIndex) and gets it back
    (ReadIndexResponse) after the leader's heartbeat round."""
    c = Cluster()
    c.elect(1)
    c.propose(1, b"a")
    commit = c.raft(1).log.committed
    c.nodes[2].read_index(b"f")
    c.stabilize()
    assert [m.to for m in of_type(c.delivered, ReadIndex)] == [1]
    assert [m.to for m in of_type(c.delivered, ReadIndexResponse)] == [2]
    assert c.read_states[2] == [ReadState(commit, b"f")]
    assert c.read_states[1] == []


def test_new_leader_answers_reads_only_after_committing_in_its_term() -> None:
    """Thesis §6.4: a new leader does not know the latest commit index until it commits an
    entry of its own term (its no-op); reads wait until then and get an index >= the no-op's."""
    c = Cluster()
    c.elect(1)
    c.propose(1, b"a")
    c.filter = lambda m: not (isinstance(m, AppendEntries) and m.frm == 2)
    c.nodes[1].transfer_leader(2)
    c.stabilize()
    assert c.leader() == 2
    noop = c.raft(2).log.last_index()
    assert c.raft(2).log.committed < noop
    c.nodes[2].read_index(b"r")
    c.tick(2, 2)
    assert c.read_states[2] == []
    c.filter = None
    c.tick(2)
    assert c.raft(2).log.committed >= noop
    [rs] = c.read_states[2]
    assert rs.context == b"r" and rs.index >= noop


def test_leader_without_quorum_never_answers_reads() -> None:
    """Thesis §6.4: a leader cut off from the majority cannot confirm it is still leader, so it
    never answers a read (a newer leader may have committed writes it does not know)."""
    c = Cluster()
    c.elect(1)
    c.isolate(1)
    c.nodes[1].read_index(b"r")
    c.tick(1, ET - 1)  # heartbeat rounds started after the read go out, and are lost
    rounds = {m.round for m in of_type(c.sent, Heartbeat) if m.frm == 1}
    assert max(rounds) >= c.raft(1).read_only.queue[0].round
    assert c.raft(1).role is Role.LEADER and c.read_states[1] == []
    c.tick(1, 2 * ET)
    assert c.read_states[1] == []
    c.heal()
    c.tick_all(3 * ET)
    assert c.read_states[1] == []


def test_single_voter_answers_reads_at_once() -> None:
    """Thesis §6.4: a single-voter leader is its own quorum and answers reads at once."""
    c = Cluster(ids=[1])
    c.elect(1)
    c.nodes[1].read_index(b"r")
    c.stabilize()
    assert c.read_states[1] == [ReadState(c.raft(1).log.committed, b"r")]
