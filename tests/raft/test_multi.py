"""MultiRaft: many groups per node, preferred-leader start, quiescence, liveness per peer."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

from raft import (
    ConfChange,
    ConfChangeType,
    ConfState,
    InvariantViolation,
    MemoryStorage,
    Message,
    RawNode,
    Role,
)
from raft.core import Config
from raft.messages import AppendEntries, Heartbeat, HeartbeatResponse, RequestVote
from raft.multi import HostConfig, MultiRaft
from raft.storage import bootstrap

from .helpers import Cluster, of_type, persist

GROUPS = 24


class Host:
    """Nodes of MultiRaft over MemoryStorages, with instant delivery between live nodes."""

    def __init__(self, ids: tuple[int, ...] = (1, 2, 3), groups: int = GROUPS, **kw: object):
        self.ids = ids
        self.groups = groups
        self.kw = kw
        self.disks: dict[tuple[int, int], MemoryStorage] = {}
        for i in ids:
            for g in range(groups):
                s = MemoryStorage()
                bootstrap(s, ConfState(ids))
                self.disks[i, g] = s
        self.nodes: dict[int, MultiRaft] = {}
        self.up: set[int] = set()
        self.sent: Counter[type] = Counter()
        for i in ids:
            self.start(i)

    def start(self, i: int) -> None:
        hc = HostConfig(Config(i, election_ticks=10, seed=7), **self.kw)  # type: ignore[arg-type]
        m = MultiRaft(hc)
        for g in range(self.groups):
            m.add_group(g, self.disks[i, g], applied=0)
        self.nodes[i] = m
        for j in self.up:
            m.peer_up(j)
            self.nodes[j].peer_up(i)
        self.up.add(i)

    def kill(self, i: int) -> None:
        self.up.discard(i)
        del self.nodes[i]
        for j in self.up:
            self.nodes[j].peer_down(i)

    def round(self) -> int:
        """Process every Ready once and deliver its messages; returns messages delivered."""
        inbox: list[tuple[int, int, Message]] = []
        for i in sorted(self.up):
            m = self.nodes[i]
            for g, rd in m.ready():
                persist(self.disks[i, g], rd)
                for msg in rd.messages + rd.persisted_messages:
                    inbox.append((msg.to, g, msg))
                m.advance(g, rd)
        for to, g, msg in inbox:
            self.sent[type(msg)] += 1
            if to in self.up:
                self.nodes[to].step(g, msg)
        return len(inbox)

    def settle(self) -> None:
        for _ in range(100):
            if self.round() == 0 and not any(n.has_dirty() for n in self.nodes.values()):
                return
        raise AssertionError("messages still flowing after 100 rounds")

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            for i in sorted(self.up):
                self.nodes[i].tick()
            self.settle()

    def leaders(self) -> dict[int, int]:
        out = {}
        for g in range(self.groups):
            for i in self.up:
                if self.nodes[i].node(g).raft.role is Role.LEADER:
                    out[g] = i
        return out

    def terms(self) -> dict[tuple[int, int], int]:
        return {
            (i, g): self.nodes[i].node(g).raft.term for i in self.up for g in range(self.groups)
        }


def test_preferred_nodes_lead_a_fresh_cluster_evenly_without_split_votes() -> None:
    h = Host()
    h.tick(8)
    leaders = h.leaders()
    assert len(leaders) == GROUPS
    assert leaders == {g: (1, 2, 3)[g % 3] for g in range(GROUPS)}
    # One pre-vote round and one vote round per group, nothing more.
    assert all(t == 2 for t in h.terms().values())
    assert sum(n.stats.campaigns for n in h.nodes.values()) == 0


def test_idle_groups_quiesce_on_every_node_and_then_send_nothing() -> None:
    h = Host()
    h.tick(20)
    assert all(n.awake_count() == 0 for n in h.nodes.values())
    h.sent.clear()
    h.tick(200)  # 20 election timeouts
    assert sum(h.sent.values()) == 0
    assert len(h.leaders()) == GROUPS


def test_a_proposal_wakes_its_group_only_and_it_quiesces_again() -> None:
    h = Host()
    h.tick(20)
    leaders = h.leaders()
    leader = h.nodes[leaders[5]]
    index = leader.propose(5, b"x")
    h.settle()
    for i in h.up:
        assert h.disks[i, 5].last_index() == index
        assert h.nodes[i].node(5).raft.log.committed == index
    awake = {i: h.nodes[i].awake_count() for i in h.up}
    assert awake[leaders[5]] == 1  # the others stay asleep
    h.tick(5)
    assert all(n.awake_count() == 0 for n in h.nodes.values())
    assert all(n.is_quiescent(5) for n in h.nodes.values())


def test_groups_of_a_killed_leader_elect_new_leaders_and_others_stay_quiet() -> None:
    h = Host()
    h.tick(20)
    before = h.leaders()
    terms = h.terms()
    h.kill(1)
    h.tick(2 * 10 + 5)  # within two election timeouts of the failure notice
    after = h.leaders()
    assert set(after) == set(range(GROUPS))
    for g, lead in before.items():
        if lead == 1:
            assert after[g] in (2, 3)
        else:
            assert after[g] == lead
            assert h.nodes[2].node(g).raft.term == terms[2, g]  # no election there
    h.tick(10)
    assert all(h.nodes[i].awake_count() == 0 for i in h.up)


def test_a_restarted_follower_rejoins_without_any_election() -> None:
    h = Host()
    h.tick(20)
    h.kill(3)
    h.tick(30)  # node 3's groups elect new leaders
    terms = {g: h.nodes[1].node(g).raft.term for g in range(GROUPS)}
    h.start(3)
    h.tick(40)
    assert h.terms() == {(i, g): terms[g] for i in (1, 2, 3) for g in range(GROUPS)}
    assert set(h.leaders().values()) == {1, 2}  # no rebalancing (yet)
    assert all(n.awake_count() == 0 for n in h.nodes.values())


def test_a_full_restart_elects_every_group_once_on_its_preferred_node() -> None:
    h = Host()
    h.tick(20)
    for i in (1, 2, 3):
        h.kill(i)
    for i in (1, 2, 3):
        h.start(i)
    h.tick(10)
    assert h.leaders() == {g: (1, 2, 3)[g % 3] for g in range(GROUPS)}
    assert all(t == 3 for t in h.terms().values())


def test_failed_campaigns_back_off() -> None:
    """An isolated node keeps campaigning, ever more slowly."""
    h = Host(groups=3)
    h.tick(20)
    h.kill(2)
    h.kill(3)
    lone = h.nodes[1]
    campaigns = []
    for _ in range(6):
        before = lone.stats.campaigns
        h.tick(100)
        campaigns.append(lone.stats.campaigns - before)
    # Without backoff each group would campaign every ~1.5 election timeouts: 3 groups x ~6.6
    # per 100 ticks.  With the range growing to 9 timeouts, the later windows see far fewer.
    assert campaigns[0] >= campaigns[-1]
    assert sum(campaigns[3:]) <= 3 * 3 * 100 // (10 * 3)
    assert all(lone.node(g).raft.role is not Role.LEADER for g in range(3))


def test_followers_that_go_quiet_do_not_answer_the_quiesce_heartbeat() -> None:
    """Quiescing a group costs one message per follower: an answer from a follower that went
    quiet with its leader would tell the (quiescent) leader nothing."""
    h = Host(groups=1, quiesce_after_ticks=1)  # quiesce at the first idle tick: no heartbeat
    h.tick(20)
    lead = h.leaders()[0]
    h.nodes[lead].propose(0, b"x")
    h.settle()
    h.sent.clear()
    h.tick(5)
    assert all(n.is_quiescent(0) for n in h.nodes.values())
    assert h.sent == Counter({Heartbeat: 2})  # the two quiesce heartbeats, unanswered


def test_a_follower_that_cannot_go_quiet_answers_the_quiesce_heartbeat() -> None:
    r = MultiRaft(HostConfig(Config(2, election_ticks=10, seed=7)))
    s = MemoryStorage()
    bootstrap(s, ConfState((1, 2, 3)))
    r.add_group(0, s)
    r.step(0, Heartbeat(1, 2, 1, 0))  # becomes its follower in term 1
    for g, rd in r.ready():
        persist(s, rd)
        r.advance(g, rd)
    # Its leader claims a commit index the follower's log has not reached (index 1 is
    # the bootstrap membership): it does not go quiet and says so.
    r.step(0, Heartbeat(1, 2, 1, 1, b"", True))
    assert not r.is_quiescent(0)
    [(_, rd)] = r.ready()
    answers = [m for m in rd.messages + rd.persisted_messages if isinstance(m, HeartbeatResponse)]
    assert len(answers) == 1


def test_a_missed_quiesce_heartbeat_is_repaired_without_an_election() -> None:
    h = Host()
    h.tick(3)
    real_step = MultiRaft.step
    dropped = []

    def lossy(self: MultiRaft, group: int, m: Message) -> None:
        if isinstance(m, Heartbeat) and m.quiesce and self.id == 2 and not dropped:
            dropped.append((group, m))
            return
        real_step(self, group, m)

    MultiRaft.step = lossy  # type: ignore[method-assign]
    try:
        h.tick(20)
    finally:
        MultiRaft.step = real_step  # type: ignore[method-assign]
    assert dropped
    terms = h.terms()
    h.tick(60)
    assert h.terms() == terms
    assert all(n.awake_count() == 0 for n in h.nodes.values())


def test_messages_for_an_unknown_group_are_counted_and_ignored() -> None:
    h = Host(groups=1)
    h.nodes[1].step(99, AppendEntries(2, 1, 1, 0, 0, [], 0))
    assert h.nodes[1].stats.unknown_group_messages == 1


def test_without_quiescence_leaders_keep_heartbeating() -> None:
    h = Host(quiesce=False)
    h.tick(20)
    h.sent.clear()
    h.tick(10)
    assert h.sent[Heartbeat] >= GROUPS * 2 * 10
    assert h.sent[RequestVote] == 0


@pytest.mark.parametrize("n", [1, 5])
def test_other_cluster_sizes_elect_every_group(n: int) -> None:
    h = Host(ids=tuple(range(1, n + 1)), groups=10)
    h.tick(40)
    assert len(h.leaders()) == 10
    if n > 1:
        assert all(m.awake_count() == 0 for m in h.nodes.values())


def test_a_late_plain_heartbeat_does_not_wake_a_quiescent_follower() -> None:
    """(found by the simulation) A heartbeat the leader sent just before quiescing, delivered
    after the quiescing one, kept a learner awake for good and made a voter campaign."""
    h = Host(ids=(1, 2, 3, 4), groups=1)
    h.tick(20)
    lead = h.leaders()[0]
    learner = next(i for i in h.ids if i != lead)
    for cc in (ConfChangeType.REMOVE_NODE, ConfChangeType.ADD_LEARNER):
        h.nodes[lead].propose_conf_change(0, ConfChange(cc, learner))
        h.tick(20)
    r = h.nodes[lead].node(0).raft
    assert r.learners == (learner,)
    assert all(n.awake_count() == 0 for n in h.nodes.values())
    voter = next(i for i in h.ids if i not in (lead, learner))
    for to in (learner, voter):
        h.nodes[to].step(0, Heartbeat(lead, to, r.term, r.log.committed))
        h.settle()
        h.sent.clear()
        h.tick(100)
        assert all(n.awake_count() == 0 for n in h.nodes.values())
        assert sum(h.sent.values()) == 0


def test_the_host_drives_groups_through_the_raw_node_not_the_cores_fields() -> None:
    """Issue 25: multi.py wrote the core's ``randomized_election_timeout`` and
    ``heartbeat_elapsed`` and called ``hup()`` past RawNode; it reads the core, and changes it
    only through RawNode's methods (``set_election_timeout``, ``heartbeat_next_tick``...)."""
    source = Path(__file__).parents[2] / "raft" / "multi.py"
    tree = ast.parse(source.read_text())
    writes = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        for t in targets:
            if isinstance(t, ast.Attribute):
                root = t.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if not (isinstance(root, ast.Name) and root.id in ("self", "g")) or (
                    "raft" in ast.unparse(t) or ".node." in ast.unparse(t)
                ):
                    writes.append(ast.unparse(t))
    calls = [
        ast.unparse(n)
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr in ("hup", "send_quiesce", "tick")
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == "r"
    ]
    assert not writes and not calls, (writes, calls)


def test_the_raw_nodes_timer_api() -> None:
    """A host may lengthen the election timeout (never below the configured one) and have a
    leader heartbeat at its next tick."""
    fresh = Cluster((1, 2, 3))
    fresh.stabilize()  # the bootstrap membership applied: node 1 may campaign
    rn: RawNode = fresh.nodes[1]
    with pytest.raises(InvariantViolation):
        rn.set_election_timeout(9)
    rn.set_election_timeout(25)
    roles = []
    for _ in range(25):
        rn.tick()
        roles.append(rn.raft.role)
    assert roles[:24] == [Role.FOLLOWER] * 24 and roles[24] is not Role.FOLLOWER  # campaigned

    c = Cluster((1, 2, 3), heartbeat_ticks=3)
    c.elect(1)
    leader = c.nodes[1]
    leader.tick()  # mid-interval: no heartbeat yet
    assert not of_type(c.process(1), Heartbeat)
    leader.heartbeat_next_tick()
    leader.tick()
    assert len(of_type(c.process(1), Heartbeat)) == 2
