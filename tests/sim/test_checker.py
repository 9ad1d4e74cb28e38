"""The simulation's checkers must be able to fail: each is fed a broken history directly."""

from __future__ import annotations

import dataclasses
import os

import pytest

from raft import Config, ConfState, Entry, HardState, MemoryStorage, RawNode, Ready
from raft.messages import VoteResponse
from raft.wal_segments import segment_name

from ..raft.helpers import Cluster
from .checker import Checker, Violation
from .cluster import ROUNDS_PER_TICK, Faults, SimCluster
from .disk import Durable, WalDisk, allowed_outcomes
from .runner import liveness_phase


def leader_of(term: int) -> Cluster:
    c = Cluster((1, 2, 3))
    c.elect(1)
    assert c.raft(1).term == term
    return c


def test_two_leaders_in_one_term() -> None:
    ch = Checker()
    c = leader_of(1)
    ch.scan(1, 0, c.nodes[1])
    other = leader_of(1)  # another cluster's leader stands for node 2 in the same term
    with pytest.raises(Violation, match="two leaders in term 1"):
        ch.scan(2, 0, other.nodes[1])


def test_commit_going_back() -> None:
    ch = Checker()
    c = leader_of(1)
    c.propose(1, b"a")
    ch.scan(1, 0, c.nodes[1])
    c.raft(1).log.committed -= 1
    with pytest.raises(Violation, match="commit went back"):
        ch.scan(1, 0, c.nodes[1])
    ch.on_restart(1)  # a restarted node may come back with an older (durable) commit
    ch.scan(1, 0, c.nodes[1])


def test_leader_lacking_a_committed_entry() -> None:
    ch = Checker()
    ch.on_committed(2, 0, 0, [Entry(1, 5, data=b"x")])  # committed in term 0 < 1
    with pytest.raises(Violation, match="lacks committed index 5"):
        ch.scan(1, 0, leader_of(1).nodes[1])


def test_vote_granted_twice_in_a_term() -> None:
    ch = Checker()
    ch.on_send(0, VoteResponse(3, 1, 7, reject=False))
    ch.on_send(0, VoteResponse(3, 1, 7, reject=False))  # the same vote again is fine
    ch.on_send(0, VoteResponse(3, 2, 7, reject=True))  # so is a rejection
    with pytest.raises(Violation, match="voted for n1 and n2 in term 7"):
        ch.on_send(0, VoteResponse(3, 2, 7, reject=False))


def test_log_matching() -> None:
    ch = Checker()
    c = leader_of(1)
    ch.on_persist(1, 0, c.storage[1], [Entry(1, 2, data=b"a")])
    with pytest.raises(Violation, match="log matching broken at index 2"):
        ch.on_persist(2, 0, c.storage[2], [Entry(1, 2, data=b"b")])


def test_compare_logs() -> None:
    Checker.compare_logs(0, {1: {1: 1, 2: 1, 3: 2}, 2: {1: 1, 2: 1, 3: 3}})
    with pytest.raises(Violation, match="differ at 1"):
        Checker.compare_logs(0, {1: {1: 1, 2: 2}, 2: {1: 3, 2: 2}})


def test_committed_entry_changing() -> None:
    ch = Checker()
    ch.on_committed(1, 0, 2, [Entry(2, 4, data=b"a")])
    with pytest.raises(Violation, match="committed index 4 changed"):
        ch.on_committed(2, 0, 3, [Entry(3, 4, data=b"b")])


def test_replicas_applying_different_data() -> None:
    ch = Checker()
    ch.on_apply(1, 0, 4, b"a", b"s1", proposal=True)
    with pytest.raises(Violation, match="applied b'b' at 4"):
        ch.on_apply(2, 0, 4, b"b", b"s1", proposal=True)
    with pytest.raises(Violation, match="state after 4 differs"):
        ch.on_apply(3, 0, 4, b"a", b"s2", proposal=True)
    with pytest.raises(Violation, match="applied at g0 i5"):
        ch.on_apply(1, 0, 5, b"a", b"s3", proposal=True)


def test_stale_read() -> None:
    ch = Checker()
    ch.on_committed(1, 0, 1, [Entry(1, 9, data=b"a")])
    ch.on_read_asked(1, 0, b"r1")
    ch.on_read_answered(1, 0, b"r1", 9)
    with pytest.raises(Violation, match="stale read"):
        ch.on_read_answered(1, 0, b"r1", 8)
    with pytest.raises(Violation, match="unknown context"):
        ch.on_read_answered(1, 0, b"nope", 9)


def test_reads_are_told_apart_by_node_and_judged_by_any_commit_index() -> None:
    """Two nodes' reads carry the same context; a commit index a scan saw (not yet applied
    anywhere) counts as known committed."""
    ch = Checker()
    ch.on_read_asked(1, 0, b"r1")  # nothing committed yet
    storage = MemoryStorage(ConfState((1,)))
    storage.append([Entry(1, i) for i in (1, 2, 3)])
    storage.set_hard_state(HardState(1, 1, 3))
    ch.scan(2, 0, RawNode(Config(id=2), storage))
    ch.on_read_asked(2, 0, b"r1")
    ch.on_read_answered(1, 0, b"r1", 0)
    with pytest.raises(Violation, match="stale read"):
        ch.on_read_answered(2, 0, b"r1", 2)


# -- the disk and the host: what recovery and quiescence must show -----------------------------
CALM = Faults(drop=0.0, duplicate=0.0, crash=0.0, restart=0.0, partition=0.0, heal=0.0)


def _ready(entries: list[Entry], hard_state: HardState | None) -> Ready:
    return Ready(1, None, hard_state, entries, None, [], [], [], [], True)


def test_a_torn_write_may_leave_any_prefix_of_its_records() -> None:
    st = MemoryStorage()
    st.append([Entry(1, 1), Entry(1, 2)])
    st.set_hard_state(HardState(1, 1, 2))
    base = Durable.of(st)
    rd = _ready([Entry(2, 2, data=b"a"), Entry(2, 3, data=b"b")], HardState(2, 1, 2))
    outcomes = allowed_outcomes(base, rd)
    assert outcomes[0] == base
    assert outcomes[-1].hard_state == HardState(2, 1, 2)
    assert [e.term for e in outcomes[1].entries] == [1, 2]  # the suffix replaced from index 2
    forgot = Durable(HardState(), base.snapshot, base.entries)
    assert forgot not in outcomes  # the acknowledged term and vote must survive


@pytest.mark.parametrize("wal", [False, True], ids=["memory", "wal"])
def test_a_restart_over_a_disk_that_forgot_acknowledged_state(wal: bool) -> None:
    with SimCluster(1, 3, 1, CALM, wal=wal) as c:
        for _ in range(60 * ROUNDS_PER_TICK):
            c.round()
        assert c.leader(0) is not None
        c.crash(2)
        node = c.nodes[2]
        if isinstance(node.disk, WalDisk):  # damage the middle of the first segment
            name = os.path.join(node.disk.path, segment_name(1))
            with open(name, "r+b") as f:
                f.seek(os.path.getsize(name) // 2)
                f.write(b"\xff\xff\xff\xff")
        else:
            disk = node.disk.storage(0)
            assert isinstance(disk, MemoryStorage)
            disk.hard_state = HardState()
        with pytest.raises(Violation, match="the disk recovered"):
            c.restart(2)


def test_groups_that_never_quiesce_fail_the_liveness_phase() -> None:
    with SimCluster(1, 3, 2, CALM, wal=False, quiesce=True) as c:
        for n, node in c.nodes.items():  # hosts that keep waiting before they quiesce
            node.config = dataclasses.replace(node.config, quiesce_after_ticks=10**6)
            c.crash(n)
            c.restart(n)
        with pytest.raises(Violation, match="quiescence: still awake"):
            liveness_phase(c, 400)
