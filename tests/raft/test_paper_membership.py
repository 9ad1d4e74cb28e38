"""Paper tests for membership changes (thesis §4.1 single-server changes, §4.2.1 learners).

A change takes effect when RawNode.advance hands out the committed CONF_CHANGE entry.
"""

from __future__ import annotations

import pytest

from raft import ConfigInvalid, ProposalDropped, Role
from raft.messages import AppendEntries, ConfChange, ConfChangeType, RequestVote, VoteResponse

from .helpers import Cluster, of_type

ET = 10
ADD, LEARNER, REMOVE = (
    ConfChangeType.ADD_NODE,
    ConfChangeType.ADD_LEARNER,
    ConfChangeType.REMOVE_NODE,
)


def change(c: Cluster, leader: int, kind: ConfChangeType, node: int) -> int:
    index = c.nodes[leader].propose_conf_change(ConfChange(kind, node))
    c.stabilize()
    return index


def membership(c: Cluster, id_: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    st = c.nodes[id_].status()
    return st.voters, st.learners


def test_learner_replicates_and_applies_but_never_campaigns() -> None:
    """Thesis §4.2.1: a learner (non-voting member) receives and applies the log, but never
    starts an election, however long it hears nothing from a leader."""
    c = Cluster(ids=[1, 2, 3], learners=[4])
    c.elect(1)
    c.propose(1, b"a")
    assert c.applied[4] == [b"a"] and c.log(4) == c.log(1)
    c.isolate(4)
    c.tick(4, 20 * ET)
    r = c.raft(4)
    assert (r.role, r.term) == (Role.FOLLOWER, 1)
    c.isolate(1)  # the voters lose their leader too, and elect another; 4 still waits
    c.tick_all(10 * ET)
    assert c.raft(4).role is Role.FOLLOWER and c.leader() in (2, 3)
    assert not [m for m in of_type(c.sent, RequestVote) if m.frm == 4]


def test_learner_vote_is_not_counted() -> None:
    """Thesis §4.2.1: a learner's vote does not count toward a candidate's majority."""
    c = Cluster(ids=[1, 2, 3], learners=[4], pre_vote=False)
    c.isolate(1)
    c.campaign(1)
    term = c.raft(1).term
    c.nodes[1].step(VoteResponse(4, 1, term, False))
    assert c.raft(1).role is Role.CANDIDATE
    c.nodes[1].step(VoteResponse(2, 1, term, False))
    assert c.raft(1).role is Role.LEADER


def test_learner_ack_does_not_count_toward_commit() -> None:
    """Thesis §4.2.1: an entry stored only by the leader and a learner is not committed."""
    c = Cluster(ids=[1, 2, 3], learners=[4])
    c.elect(1)
    c.cut(1, 2)
    c.cut(1, 3)
    index = c.propose(1, b"a")
    assert c.log(4)[-1].index == index
    assert c.raft(1).log.committed < index


def test_add_node_promotes_a_learner_to_voter() -> None:
    """Thesis §4.2.1: once caught up, a learner is promoted with ADD_NODE; it then votes, counts
    toward commit and may lead."""
    c = Cluster(ids=[1, 2, 3], learners=[4])
    c.elect(1)
    change(c, 1, ADD, 4)
    assert all(membership(c, i) == ((1, 2, 3, 4), ()) for i in (1, 2, 3, 4))
    c.cut(1, 2)
    c.cut(1, 3)
    index = c.propose(1, b"a")
    assert c.raft(1).log.committed < index  # now 3 of 4 are needed
    c.heal()
    c.nodes[1].transfer_leader(4)
    c.stabilize()
    assert c.leader() == 4


def test_conf_change_takes_effect_when_applied() -> None:
    """Thesis §4.1 (as etcd): a server uses a new configuration once the change is committed
    and applied (here, by RawNode.advance), not while the entry is merely in its log."""
    c = Cluster()
    c.elect(1)
    c.cut(1, 2)
    c.cut(1, 3)
    change(c, 1, LEARNER, 4)
    assert membership(c, 1) == ((1, 2, 3), ())
    c.heal()
    c.tick(1)
    assert all(membership(c, i) == ((1, 2, 3), (4,)) for i in (1, 2, 3))


def test_one_conf_change_at_a_time() -> None:
    """Thesis §4.1: a leader does not start a membership change until the previous one has been
    committed (and applied); a second proposal in the meantime is dropped."""
    c = Cluster()
    c.elect(1)
    c.nodes[1].propose_conf_change(ConfChange(LEARNER, 4))
    with pytest.raises(ProposalDropped):
        c.nodes[1].propose_conf_change(ConfChange(LEARNER, 5))
    c.isolate(1)
    c.stabilize()  # appended but cannot commit
    with pytest.raises(ProposalDropped):
        c.nodes[1].propose_conf_change(ConfChange(LEARNER, 5))
    c.heal()
    c.tick(1)
    change(c, 1, LEARNER, 5)
    assert membership(c, 2) == ((1, 2, 3), (4, 5))


def test_new_leader_changes_membership_only_after_its_no_op_is_applied() -> None:
    """Thesis §4.1 (the bug fix of 2015): a new leader must commit an entry of its term before
    it may start a membership change, or a change left uncommitted by a previous leader could
    be overlooked."""
    c = Cluster()
    c.filter = lambda m: not isinstance(m, AppendEntries)
    c.elect(1)
    with pytest.raises(ProposalDropped):
        c.nodes[1].propose_conf_change(ConfChange(LEARNER, 4))
    c.filter = None
    c.tick(1)
    assert c.raft(1).log.applied == c.raft(1).log.last_index()
    change(c, 1, LEARNER, 4)
    assert membership(c, 3) == ((1, 2, 3), (4,))


@pytest.mark.parametrize("remove_4", [True, False])
def test_removing_a_voter_shrinks_the_quorum(remove_4: bool) -> None:
    """Thesis §4.1: after a voter is removed the majority is counted over the remaining voters:
    with 4 removed, leader 1 and voter 2 commit without 3; with 4 voters they cannot."""
    c = Cluster(ids=[1, 2, 3, 4])
    c.elect(1)
    if remove_4:
        change(c, 1, REMOVE, 4)
        assert all(membership(c, i) == ((1, 2, 3), ()) for i in (1, 2, 3))
    c.isolate(3)
    c.isolate(4)
    index = c.propose(1, b"a")
    assert (c.raft(1).log.committed >= index) is remove_4
    assert c.applied[2] == ([b"a"] if remove_4 else [])


def test_removing_the_leader_makes_it_step_down() -> None:
    """Thesis §4.2.2: a leader removed from the configuration steps down once the change is
    committed (and applied), and the remaining voters elect a leader among themselves."""
    c = Cluster()
    c.elect(1)
    change(c, 1, REMOVE, 1)
    assert c.raft(1).role is Role.FOLLOWER
    assert membership(c, 2) == membership(c, 3) == ((2, 3), ())
    start = len(c.sent)
    c.tick_all(5 * ET)
    assert c.leader() in (2, 3)
    assert not [m for m in of_type(c.sent[start:], RequestVote) if m.frm == 1]
    new = c.leader()
    assert new is not None
    c.propose(new, b"after")
    assert c.applied[5 - new] == [b"after"]


@pytest.mark.parametrize(
    ("ids", "kind", "node"),
    [
        ((1, 2, 3), REMOVE, 9),  # not a member
        ((1,), REMOVE, 1),  # the last voter
        ((1, 2, 3), ADD, 2),  # already a voter
        ((1, 2, 3), LEARNER, 2),  # already a member
        ((1, 2, 3), ADD, 0),  # not a node id
    ],
)
def test_invalid_conf_change_is_refused(
    ids: tuple[int, ...], kind: ConfChangeType, node: int
) -> None:
    """Thesis §4.1: a change must add or remove exactly one real server and leave at least one
    voter; anything else raises ConfigInvalid and appends nothing."""
    c = Cluster(ids=ids)
    c.elect(1)
    last = c.raft(1).log.last_index()
    with pytest.raises(ConfigInvalid):
        c.nodes[1].propose_conf_change(ConfChange(kind, node))
    assert c.raft(1).log.last_index() == last
    change(c, 1, LEARNER, 7)  # and it does not block a valid change
    assert 7 in membership(c, 1)[1]
