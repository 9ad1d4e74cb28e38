"""Regression tests for membership bugs found in review, each fixed in the core.

Each test names the bug it pins down; docs/raft.md §7-8.5 describes the fixed behaviour.
"""

from __future__ import annotations

from raft import ConfChange, ConfChangeType, ConfState, MemoryStorage, ProposalDropped, RawNode
from raft.messages import AppendEntries, Heartbeat, InstallSnapshot, TimeoutNow
from raft.storage import bootstrap

from .helpers import Cluster, config, persist


def bootstrapped_cluster(ids: tuple[int, ...] = (1, 2, 3)) -> Cluster:
    c = Cluster(ids=())
    for i in ids:
        st = MemoryStorage()
        bootstrap(st, ConfState(ids))
        c.add_node(i, storage=st)
    c.stabilize()  # apply the bootstrap entries: no campaign before the membership is known
    return c


def test_bootstrap_membership_is_in_the_log() -> None:
    """Every initial member holds the same committed membership entries (term 1)."""
    c = bootstrapped_cluster()
    c.stabilize()
    for i in (1, 2, 3):
        assert c.raft(i).voters == (1, 2, 3)
        assert c.storage[i].last_index() == 3
        assert c.storage[i].term(3) == 1
    c.elect(1)
    c.propose(1, b"a")
    assert all(c.applied[i] == [b"a"] for i in (1, 2, 3))


def test_a_joining_node_learns_the_whole_membership_from_the_log() -> None:
    """Bug: a new empty node applied only the changes it saw and thought it was the sole voter;
    isolated, it elected itself while the real leader still led (split brain)."""
    c = bootstrapped_cluster()
    c.elect(1)
    c.propose(1, b"a")
    c.add_node(4)  # empty storage, not bootstrapped
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    c.stabilize()
    assert (c.raft(4).voters, c.raft(4).learners) == ((1, 2, 3), (4,))
    assert c.applied[4] == [b"a"]
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_NODE, 4))
    c.stabilize()
    assert c.raft(4).voters == (1, 2, 3, 4)
    c.isolate(4)
    c.tick(4, 200)
    assert c.raft(4).role.value != "leader"
    assert c.raft(1).role.value == "leader"


def test_stale_conf_change_is_not_applied_over_a_newer_snapshot() -> None:
    """Bug: a follower that restored a snapshot between ready() and advance() re-applied an
    older committed conf change of that Ready on top of the snapshot's membership."""
    c = Cluster((1, 2, 3))
    c.elect(1)
    c.cut(1, 3)
    c.cut(2, 3)
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    c.stabilize()
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 4))
    c.stabilize()
    for i in range(3):
        c.propose(1, b"x%d" % i)
    r1 = c.raft(1)
    assert r1.learners == ()
    st = c.storage[1]
    st.create_snapshot(r1.log.applied, r1.conf_state(), b"snap")
    st.compact(r1.log.applied)
    n3, r3 = c.nodes[3], c.raft(3)
    lo = r3.log.last_index() + 1
    add = c.storage[2].entries(lo, lo + 1, None)  # the ADD_LEARNER 4 entry, committed
    n3.step(AppendEntries(1, 3, r1.term, lo - 1, r3.log.term(lo - 1), add, lo))
    rd = n3.ready()
    assert [e.index for e in rd.committed_entries] == [lo]
    n3.step(InstallSnapshot(1, 3, r1.term, st.snapshot()))  # arrives during the persist
    persist(c.storage[3], rd)
    n3.advance(rd)
    while n3.has_ready():
        rd = n3.ready()
        persist(c.storage[3], rd)
        n3.advance(rd)
    assert (r3.voters, r3.learners) == ((1, 2, 3), ())


def test_restart_with_applied_past_the_snapshot_replays_membership() -> None:
    """Bug: a restart with Config.applied past the snapshot lost the conf changes in between."""
    c = Cluster((1, 2, 3))
    c.elect(1)
    c.propose(1, b"a")
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    c.stabilize()
    applied = c.raft(2).log.applied
    assert c.raft(2).learners == (4,)
    restarted = RawNode(config(2, applied=applied), c.storage[2])
    assert restarted.raft.learners == (4,)
    assert restarted.raft.log.applied == applied


def test_removed_leader_hands_over_and_stops_proposing() -> None:
    """Bug (liveness): a leader that applied its own removal stepped down while the remaining
    voter did not know the removal committed and needed the old leader's vote, which it could
    not get when the old leader's log was longer.  Now the removed leader refuses proposals
    while its removal is pending and hands over with TimeoutNow."""
    c = Cluster((1, 2, 3))
    c.elect(1)
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 2))
    c.stabilize()
    assert c.raft(1).voters == (1, 3)
    c.propose(1, b"a")
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 1))
    try:
        c.nodes[1].propose(b"b")
        raise AssertionError("a leader whose removal is pending accepted a proposal")
    except ProposalDropped:
        pass
    c.stabilize()
    assert any(isinstance(m, TimeoutNow) and m.to == 3 for m in c.delivered)
    assert c.leader() == 3
    assert c.raft(3).voters == (3,)
    c.propose(3, b"c")
    assert c.applied[3] == [b"a", b"c"]


def test_removed_leader_without_handover_still_lets_the_others_elect() -> None:
    """As above with every TimeoutNow lost: the remaining voter wins an ordinary election."""
    c = Cluster((1, 2, 3))
    c.elect(1)
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 2))
    c.stabilize()
    c.filter = lambda m: not isinstance(m, TimeoutNow)
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 1))
    c.stabilize()
    assert c.raft(1).role.value == "follower"
    c.tick_all(60)
    assert c.leader() == 3


def _appended(msgs: list[object]) -> list[bytes]:
    return [e.data for m in msgs if isinstance(m, AppendEntries) for e in m.entries]


def test_small_groups_send_only_persisted_entries() -> None:
    """With fewer than three voters the leader does not write in parallel with replication:
    an entry leaves only once the leader persisted it.  With three it does (thesis §10.2.1)."""
    small = Cluster((1, 2))
    small.elect(1)
    small.nodes[1].propose(b"x")
    rd = small.nodes[1].ready()
    assert b"x" not in _appended(rd.messages + rd.persisted_messages)
    persist(small.storage[1], rd)
    small.nodes[1].advance(rd)
    rd = small.nodes[1].ready()
    assert b"x" in _appended(rd.messages)
    big = Cluster((1, 2, 3))
    big.elect(1)
    big.nodes[1].propose(b"x")
    assert b"x" in _appended(big.nodes[1].ready().messages)


def test_two_to_one_voter_removal_survives_a_leader_crash() -> None:
    """Bug (liveness, found by the simulation soak, seed 216): in {1, 2} the leader proposed
    the removal of 2, then an entry y that it sent to 2 before persisting it; 2 learned that
    its removal committed and applied it; 1 crashed before y and its commit index reached disk.
    Restarted, 1 still counted 2 as a voter and needed its vote; 2 never campaigns again (it
    is removed) and refused 1, whose log was now shorter than its own.  No leader, ever."""
    c = Cluster((1, 2))
    c.elect(1)
    n1, n2 = c.nodes[1], c.nodes[2]
    n1.propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 2))
    out = c.process(1)  # 1 persists the removal entry and sends it
    for m in out:
        n2.step(m)
    acks = c.process(2)  # 2 persisted the removal entry; its ack is still on the wire
    n1.propose(b"y")
    for m in acks:
        n1.step(m)  # the removal commits
    rd = n1.ready()  # 1 crashes before this Ready (y, the new commit index) reaches its disk
    for m in rd.messages:
        n2.step(m)
    c.process(2)
    assert c.raft(2).voters == (1,)  # 2 learned the commit and applied its removal
    c.nodes[1] = RawNode(config(1), c.storage[1])
    assert c.raft(1).voters == (1, 2)  # its commit index did not reach disk
    c.tick_all(60)
    assert c.leader() == 1
    c.propose(1, b"z")
    assert c.applied[1][-1] == b"z"


def test_single_voter_leads_only_once_its_term_and_vote_are_durable() -> None:
    """Bug (found by the simulation soak, seed 1866): a single voter became leader in the step
    that made it candidate, before its new term and vote reached disk.  Crashing then, it forgot
    the term; restarted, it granted its vote in that same term to a node that had not yet
    applied its removal, which then led the same term: two leaders in one term."""
    c = Cluster((1,))
    n = c.nodes[1]
    n.campaign()
    assert c.raft(1).role.value == "candidate"
    rd = n.ready()
    assert rd.hard_state is not None and (rd.hard_state.term, rd.hard_state.vote) == (1, 1)
    assert c.raft(1).role.value == "candidate"  # not before the vote is durable
    restarted = RawNode(config(1), c.storage[1])  # a crash here loses the term: no harm done
    assert restarted.raft.term == 0
    persist(c.storage[1], rd)
    n.advance(rd)
    assert c.raft(1).role.value == "leader"
    c.propose(1, b"a")
    assert c.applied[1] == [b"a"]


def test_a_read_pending_when_the_voters_shrink_to_the_leader_is_answered() -> None:
    """(found by the simulation, seeds 160 and 1028) The read's heartbeat round was lost, then
    the only other voter was removed: nobody would ever ack it again."""
    c = Cluster(ids=(1, 2))
    c.elect(1)
    c.propose(1, b"x")
    c.filter = lambda m: not isinstance(m, Heartbeat)
    c.nodes[1].read_index(b"r")
    c.stabilize()
    c.filter = None
    assert c.read_states[1] == []
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 2))
    c.stabilize()
    assert c.raft(1).voters == (1,)
    assert [rs.context for rs in c.read_states[1]] == [b"r"]
    assert not c.raft(1).read_only.queue
