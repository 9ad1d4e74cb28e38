"""Paper tests for terms, roles and elections (Raft paper §5.1, §5.2, §5.4.1).

Each test checks one rule and names it in its docstring.  Unit-level tests step a lone RawNode
built over a hand-made MemoryStorage; scenario tests drive a ``Cluster``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from raft import NONE, ConfState, Entry, HardState, MemoryStorage, RawNode, Role
from raft.core import Config
from raft.messages import (
    AppendEntries,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    ReadIndex,
    ReadIndexResponse,
    RequestVote,
    Snapshot,
    TimeoutNow,
    VoteResponse,
)

from .helpers import Cluster, config, drain, lone_node, of_type

ET = 10  # election_ticks used by helpers.config


# -- §5.1 terms and roles ----------------------------------------------------------------------


def _node_1_as(role: Role) -> Cluster:
    """A 3-node cluster (no check-quorum, no pre-vote) where node 1 has ``role``."""
    c = Cluster(check_quorum=False, pre_vote=False)
    if role is Role.LEADER:
        c.elect(1)
    elif role is Role.FOLLOWER:
        c.elect(2)
    else:
        c.isolate(1)
        c.campaign(1)
    assert c.raft(1).role is role
    return c


# Every message kind from node 2 in term ``t``, with the leader it makes node 1 know.
# (TimeoutNow is left out: it makes the receiver campaign at once, see the transfer tests.)
HIGHER_TERM: dict[str, tuple[Callable[[int], Message], int]] = {
    "AppendEntries": (lambda t: AppendEntries(2, 1, t, 0, 0, [], 0), 2),
    "Heartbeat": (lambda t: Heartbeat(2, 1, t, 0), 2),
    "InstallSnapshot": (lambda t: InstallSnapshot(2, 1, t, Snapshot()), 2),
    "AppendResponse": (lambda t: AppendResponse(2, 1, t, 0), NONE),
    "HeartbeatResponse": (lambda t: HeartbeatResponse(2, 1, t), NONE),
    "RequestVote": (lambda t: RequestVote(2, 1, t, 10, t), NONE),  # an up-to-date log
    "VoteResponse": (lambda t: VoteResponse(2, 1, t, True), NONE),
    "ReadIndex": (lambda t: ReadIndex(2, 1, t, b"r"), NONE),
    "ReadIndexResponse": (lambda t: ReadIndexResponse(2, 1, t, 0, b"r"), NONE),
}


@pytest.mark.parametrize("role", [Role.FOLLOWER, Role.CANDIDATE, Role.LEADER])
@pytest.mark.parametrize("kind", sorted(HIGHER_TERM))
def test_higher_term_in_any_message_makes_follower(role: Role, kind: str) -> None:
    """Raft paper §5.1: if a server sees a term larger than its own in any message, it updates
    its term and reverts to follower (knowing the sender as leader only for leader messages)."""
    c = _node_1_as(role)
    term = c.raft(1).term
    make, lead = HIGHER_TERM[kind]
    c.nodes[1].step(make(term + 1))
    r = c.raft(1)
    assert (r.role, r.term, r.lead) == (Role.FOLLOWER, term + 1, lead)
    # A new term starts with no vote; only the (up-to-date) RequestVote gets one.
    assert r.vote == (2 if kind == "RequestVote" else NONE)


def test_stale_term_messages_are_ignored() -> None:
    """Raft paper §5.1: a request with a stale term is rejected; it changes neither the log,
    the commit index, the term nor the vote."""
    node, storage = lone_node(term=5, terms=(1, 2))
    drain(node, storage)
    stale: list[Message] = [
        AppendEntries(2, 1, 3, 2, 2, [Entry(3, 3)], 3),
        Heartbeat(2, 1, 3, 2),
        InstallSnapshot(2, 1, 3, Snapshot()),
        RequestVote(2, 1, 4, 9, 4),
        VoteResponse(2, 1, 4, False),
        TimeoutNow(2, 1, 4),
    ]
    for m in stale:
        node.step(m)
    r = node.raft
    assert (r.role, r.term, r.vote, r.lead) == (Role.FOLLOWER, 5, NONE, NONE)
    assert (r.log.last_index(), r.log.committed) == (2, 0)
    out = drain(node, storage)
    assert not of_type(out, VoteResponse)  # the stale RequestVote got no vote


@pytest.mark.parametrize(("pre_vote", "check_quorum"), [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("kind", [AppendEntries, Heartbeat])
def test_stale_leader_message_answered_with_higher_term(
    pre_vote: bool, check_quorum: bool, kind: type
) -> None:
    """Raft paper §5.1 with thesis §9.6 / §6.2: under pre-vote or check-quorum a stale leader's
    AppendEntries/Heartbeat is answered with an AppendResponse carrying the receiver's higher
    term (else the stale leader could never learn the term and rejoin)."""
    node, storage = lone_node(term=5, terms=(1,), pre_vote=pre_vote, check_quorum=check_quorum)
    drain(node, storage)
    stale = AppendEntries(2, 1, 3, 1, 1, [], 1) if kind is AppendEntries else Heartbeat(2, 1, 3, 1)
    node.step(stale)
    [resp] = of_type(drain(node, storage), AppendResponse)
    assert (resp.to, resp.term) == (2, 5)
    assert node.raft.term == 5


def test_stale_leader_message_dropped_without_pre_vote_or_check_quorum() -> None:
    """Raft paper §5.1: plain Raft simply ignores a stale-term AppendEntries (no answer)."""
    node, storage = lone_node(term=5, terms=(1,), pre_vote=False, check_quorum=False)
    drain(node, storage)
    node.step(AppendEntries(2, 1, 3, 1, 1, [], 1))
    node.step(Heartbeat(2, 1, 3, 1))
    assert drain(node, storage) == []


def test_stale_leader_steps_down_when_it_rejoins() -> None:
    """Raft paper §5.1: a leader cut off while the others elected a newer leader steps down as
    soon as its first heartbeat after the partition is answered with the newer term."""
    c = Cluster()
    c.elect(1)
    old = c.raft(1).term
    c.isolate(1)
    for _ in range(5 * ET):  # only 2 and 3 see time pass: 1 stays a (stale) leader
        c.tick(2)
        c.tick(3)
        if Role.LEADER in (c.raft(2).role, c.raft(3).role):
            break
    new = c.raft(2).term
    assert new == old + 1 and c.raft(1).role is Role.LEADER and c.raft(1).term == old
    c.heal()
    c.tick(1)  # the stale leader heartbeats in its old term
    answers = [m for m in of_type(c.delivered, AppendResponse, to=1) if m.term == new]
    assert answers
    assert (c.raft(1).role, c.raft(1).term) == (Role.FOLLOWER, new)
    assert c.leader() in (2, 3)


def test_follower_times_out_and_becomes_candidate() -> None:
    """Raft paper §5.2: a follower that hears nothing for an election timeout increments its
    term, votes for itself and becomes a candidate, requesting votes from every other server."""
    c = Cluster(pre_vote=False)
    c.isolate(1)
    term = c.raft(1).term
    c.tick(1, 2 * ET)
    r = c.raft(1)
    assert r.role is Role.CANDIDATE and r.term > term and r.vote == 1
    assert {m.to for m in of_type(c.sent, RequestVote) if m.frm == 1} == {2, 3}


def test_candidate_becomes_follower_on_append_from_leader_of_same_term() -> None:
    """Raft paper §5.2: a candidate that receives AppendEntries from a leader whose term is at
    least its own recognises the leader and returns to follower (keeping its term and vote)."""
    c = _node_1_as(Role.CANDIDATE)
    term = c.raft(1).term
    c.nodes[1].step(AppendEntries(2, 1, term, 0, 0, [], 0))
    r = c.raft(1)
    assert (r.role, r.term, r.lead, r.vote) == (Role.FOLLOWER, term, 2, 1)


def test_leader_of_its_own_term_only_after_winning() -> None:
    """Raft paper §5.2: a candidate becomes leader when it wins a majority, then sends
    AppendEntries to every other server to establish its authority."""
    c = Cluster(pre_vote=False)
    c.campaign(1)
    r = c.raft(1)
    assert r.role is Role.LEADER and r.lead == 1
    assert {m.to for m in of_type(c.sent, AppendEntries) if m.frm == 1} == {2, 3}
    assert c.raft(2).lead == 1 and c.raft(3).lead == 1


# -- §5.2 vote granting ------------------------------------------------------------------------


def test_one_vote_per_term_is_persisted() -> None:
    """Raft paper §5.2: each server votes for at most one candidate in a term, first come first
    served; the vote is on disk (HardState.vote) before it is granted, so a restart keeps it."""
    node, storage = lone_node(id_=3)
    node.step(RequestVote(1, 3, 1, 0, 0))
    rd = node.ready()
    assert rd.hard_state == HardState(1, 1, 0) and rd.must_sync
    [grant] = of_type(rd.persisted_messages, VoteResponse)
    assert (grant.to, grant.reject) == (1, False)
    storage.set_hard_state(rd.hard_state)
    node.advance(rd)
    node.step(RequestVote(2, 3, 1, 5, 1))  # a better log, same term: still refused
    [refusal] = of_type(drain(node, storage), VoteResponse)
    assert (refusal.to, refusal.reject) == (2, True)
    # After a restart from the persisted hard state the vote still binds.
    node = RawNode(config(3), storage)
    node.step(RequestVote(2, 3, 1, 5, 1))
    node.step(RequestVote(1, 3, 1, 0, 0))  # the same candidate asking again gets it again
    answers = {m.to: m.reject for m in of_type(drain(node, storage), VoteResponse)}
    assert answers == {2: True, 1: False}


@pytest.mark.parametrize(
    ("last_term", "last_index", "granted"),
    [
        (1, 10, False),  # lower last term, longer log: not up to date (§5.4.1 last-term case)
        (3, 1, True),  # higher last term, shorter log: up to date
        (2, 2, False),  # same last term, shorter log (§5.4.1 last-index case)
        (2, 3, True),  # same last term, same length
        (2, 4, True),  # same last term, longer log
    ],
)
def test_vote_only_for_up_to_date_log(last_term: int, last_index: int, granted: bool) -> None:
    """Raft paper §5.4.1: a voter denies its vote if its own log is more up to date: the log
    whose last entry has the later term wins; with equal last terms, the longer log wins."""
    node, storage = lone_node(term=2, terms=(1, 1, 2))
    node.step(RequestVote(2, 1, 5, last_index, last_term))
    [answer] = of_type(drain(node, storage), VoteResponse)
    assert answer.reject is not granted
    assert node.raft.term == 5  # the higher term is adopted either way (§5.1)
    assert node.raft.vote == (2 if granted else NONE)


def test_granting_a_vote_restarts_the_election_timer() -> None:
    """Raft paper Figure 2 (Followers): a follower converts to candidate only if an election
    timeout elapses without hearing from a leader *or granting a vote*; a grant restarts the
    timer."""
    node, storage = lone_node(term=1, pre_vote=False)
    timeout = node.raft.randomized_election_timeout
    for _ in range(timeout - 1):
        node.tick()
    node.step(RequestVote(2, 1, 1, 0, 0))  # same term: no role change, just a vote
    [grant] = of_type(drain(node, storage), VoteResponse)
    assert not grant.reject
    for _ in range(timeout - 1):
        node.tick()
    assert node.raft.role is Role.FOLLOWER and node.raft.term == 1
    node.tick()
    assert node.raft.role is Role.CANDIDATE and node.raft.term == 2


# -- §5.2 election outcomes --------------------------------------------------------------------


def test_single_voter_elects_itself_without_messages() -> None:
    """Raft paper §5.2: a candidate that holds a majority of votes wins; with one voter its own
    vote is a majority, whether the election starts by campaign or by timeout."""
    by_timeout = Cluster(ids=[1])
    by_timeout.tick(1, 2 * ET)
    by_campaign = Cluster(ids=[1])
    by_campaign.campaign(1)
    for c in (by_timeout, by_campaign):
        assert c.raft(1).role is Role.LEADER and c.raft(1).term == 1
        assert not of_type(c.sent, (RequestVote, VoteResponse))


@pytest.mark.parametrize(("n", "cut"), [(3, [3]), (5, [4, 5])])
def test_candidate_wins_with_a_bare_majority(n: int, cut: list[int]) -> None:
    """Raft paper §5.2: a candidate wins an election if it receives votes from a majority of
    the servers in the full cluster for the same term (here exactly a majority can answer)."""
    c = Cluster(ids=range(1, n + 1))
    for i in cut:
        c.isolate(i)
    c.elect(1)
    assert all(c.raft(i).lead == 1 for i in range(1, n + 1) if i not in cut)


@pytest.mark.parametrize(("n", "reachable"), [(3, []), (5, [2])])
def test_candidate_without_majority_does_not_win(n: int, reachable: list[int]) -> None:
    """Raft paper §5.2: without votes from a majority a candidate does not become leader; it
    stays a candidate in its term until the election times out."""
    c = Cluster(ids=range(1, n + 1), pre_vote=False)
    for i in range(2, n + 1):
        if i not in reachable:
            c.cut(1, i)
    c.campaign(1)
    r = c.raft(1)
    assert r.role is Role.CANDIDATE and r.term == 1
    assert c.leader() is None


@pytest.mark.parametrize("n", [3, 5])
def test_candidate_loses_to_more_up_to_date_majority(n: int) -> None:
    """Raft paper §5.2/§5.4.1: a candidate whose log is behind a majority is refused by them,
    loses the election (returns to follower) and cannot become leader."""
    c = Cluster(ids=range(1, n + 1), pre_vote=False, check_quorum=False)
    c.elect(1)
    c.isolate(n)
    c.propose(1, b"x")
    c.heal()
    c.campaign(n)
    r = c.raft(n)
    assert r.role is Role.FOLLOWER and r.term == 2
    refusals = [m for m in of_type(c.delivered, VoteResponse, to=n) if m.reject]
    assert len(refusals) == n - 1 and c.leader() is None


@pytest.mark.parametrize("n", [3, 5])
def test_split_vote_then_new_election_after_randomized_timeout(n: int) -> None:
    """Raft paper §5.2: when votes split no candidate wins; each times out after a randomized
    election timeout in [et, 2et) and starts a new election in a new term, which resolves it."""
    c = Cluster(ids=range(1, n + 1), pre_vote=False, check_quorum=False)
    if n == 3:
        c.isolate(3)  # 1 and 2 each get only their own vote
    else:
        c.isolate(5)
        c.cut(1, 4)  # 1 gets {1, 3}, 2 gets {2, 4}
        c.cut(2, 3)
    c.nodes[1].campaign()
    c.nodes[2].campaign()
    c.stabilize()
    assert [c.raft(i).role for i in (1, 2)] == [Role.CANDIDATE, Role.CANDIDATE]
    assert c.raft(1).term == c.raft(2).term == 1 and c.leader() is None
    timeout = c.raft(1).randomized_election_timeout
    assert ET <= timeout < 2 * ET
    ticks = 0
    while c.raft(1).term == 1:
        c.tick(1)  # only node 1's clock runs, so it is the first to time out
        ticks += 1
        assert ticks < 2 * ET
    assert ticks == timeout
    assert c.raft(1).role is Role.LEADER and c.raft(1).term == 2


def test_randomized_election_timeout_spans_range_across_seeds() -> None:
    """Raft paper §5.2: election timeouts are chosen randomly from a fixed interval
    ([et, 2et) here) so that split votes are rare; different seeds give different timeouts."""
    seen = set()
    for seed in range(200):
        r = RawNode(Config(id=1, seed=seed), MemoryStorage(ConfState((1, 2, 3)))).raft
        assert ET <= r.randomized_election_timeout < 2 * ET
        seen.add(r.randomized_election_timeout)
    assert seen == set(range(ET, 2 * ET))


def test_follower_campaigns_exactly_at_its_randomized_timeout() -> None:
    """Raft paper §5.2: a follower starts an election when its randomized timeout elapses with
    no word from a leader, no earlier and no later; the delay varies with the seed."""
    delays = set()
    for seed in range(40):
        node = RawNode(config(1, seed=seed), MemoryStorage(ConfState((1, 2, 3))))
        expected = node.raft.randomized_election_timeout
        ticks = 0
        while node.raft.role is Role.FOLLOWER:
            node.tick()
            ticks += 1
            assert ticks <= 2 * ET
        assert ticks == expected
        delays.add(ticks)
    assert len(delays) >= 5
