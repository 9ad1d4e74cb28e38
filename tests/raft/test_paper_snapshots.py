"""Paper tests for log compaction and InstallSnapshot (Raft paper §7, thesis §5)."""

from __future__ import annotations

from raft import ConfState, Snapshot
from raft.messages import (
    AppendEntries,
    ConfChange,
    ConfChangeType,
    InstallSnapshot,
)

from .helpers import Cluster, Hold, of_type, persist

ET = 10


def compact_leader(c: Cluster, leader: int = 1, data: bytes = b"app state") -> Snapshot:
    """Snapshot the leader's state machine at its applied index and drop the log up to it."""
    st = c.nodes[leader].status()
    storage = c.storage[leader]
    snap = storage.create_snapshot(st.applied, ConfState(st.voters, st.learners), data)
    storage.compact(st.applied)
    return snap


def lagging_3(**cfg: object) -> tuple[Cluster, Snapshot]:
    """3 misses a,b,c; the leader compacts them away, then appends d (which 3 also lacks)."""
    c = Cluster(**cfg)
    c.elect(1)
    c.isolate(3)
    for data in (b"a", b"b", b"c"):
        c.propose(1, data)
    snap = compact_leader(c)
    c.propose(1, b"d")
    c.heal()
    return c, snap


def test_lagging_follower_gets_a_snapshot_then_normal_appends() -> None:
    """Raft paper §7: when the entries a follower needs were discarded, the leader sends
    InstallSnapshot; the follower replaces its log with the snapshot (the Ready carries it, to be
    persisted and restored), then the leader continues with normal AppendEntries."""
    c, snap = lagging_3()
    assert snap.meta.index == 4 and c.storage[1].first_index() == 5
    start = len(c.delivered)
    c.tick(1)
    delivered = c.delivered[start:]
    [install] = of_type(delivered, InstallSnapshot, to=3)
    assert install.snapshot == snap
    assert c.snapshots[3] == [snap]
    assert c.storage[3].snapshot() == snap and c.storage[3].first_index() == 5
    after = [m for m in of_type(delivered, AppendEntries, to=3) if m.entries]
    assert after and delivered.index(install) < delivered.index(after[0])
    assert [e.data for e in after[0].entries] == [b"d"]
    assert c.log(3) == c.log(1)
    assert c.applied[3] == [b"d"]  # a, b, c came inside the snapshot's data
    assert c.raft(3).log.committed == c.raft(1).log.committed == 5
    assert c.nodes[1].status().progress[3][0] == "replicate"


def test_new_node_learns_log_and_membership_from_a_snapshot() -> None:
    """Raft paper §7 / thesis §4.2.1: a new, empty server is brought up to date with the
    snapshot (which carries the membership as of its index) and then the rest of the log."""
    c = Cluster()
    c.elect(1)
    c.propose(1, b"a")
    snap = compact_leader(c)
    c.add_node(4)
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    c.stabilize()
    assert c.snapshots[4] == [snap]
    assert c.log(4) == c.log(1)
    st = c.nodes[4].status()
    assert (st.voters, st.learners, st.commit) == ((1, 2, 3), (4,), c.raft(1).log.committed)
    c.propose(1, b"b")
    assert c.applied[4] == [b"b"]


def test_failed_snapshot_report_goes_back_to_probe() -> None:
    """Raft paper §7 / etcd ReportSnapshot: when the transport reports that sending the
    snapshot failed, the leader leaves SNAPSHOT for PROBE and, after the next heartbeat answer,
    sends the snapshot again."""
    c, snap = lagging_3()
    hold = Hold(c, lambda m: isinstance(m, InstallSnapshot))
    c.tick(1)
    assert len(hold.held) == 1
    assert c.nodes[1].status().progress[3][0] == "snapshot"
    c.tick(1)  # nothing more while the snapshot is in flight
    assert len(hold.held) == 1
    c.nodes[1].report_snapshot(3, failed=True)
    assert c.nodes[1].status().progress[3][0] == "probe"
    c.filter = None
    c.tick(1)
    assert len(of_type(c.sent, InstallSnapshot)) == 2
    assert c.snapshots[3] == [snap] and c.log(3) == c.log(1)


def test_snapshot_in_flight_times_out() -> None:
    """Raft paper §7 / etcd: a snapshot (or its answer) can be lost without any report; after
    snapshot_timeout_ticks the leader gives up waiting and tries again."""
    c, snap = lagging_3(snapshot_timeout_ticks=5)
    Hold(c, lambda m: isinstance(m, InstallSnapshot))
    c.tick(1)
    c.tick(1, 5)
    assert len(of_type(c.sent, InstallSnapshot)) == 1
    c.tick(1)
    assert len(of_type(c.sent, InstallSnapshot)) == 2
    c.filter = None
    c.tick(1, 7)
    assert c.snapshots[3] == [snap] and c.log(3) == c.log(1)


def test_follower_ignores_a_snapshot_it_already_covers() -> None:
    """Raft paper §7 (InstallSnapshot rules 6-7): a snapshot at or below the follower's commit
    index is not installed, even when the follower compacted its own log past it (installing
    it would move the follower's commit index and state machine backwards)."""
    c = Cluster()
    c.elect(1)
    c.propose(1, b"a")
    snap = compact_leader(c)  # at index 2
    c.propose(1, b"b")
    compact_leader(c, leader=2)  # 2 snapshots its own state at index 3
    assert c.storage[2].first_index() == 4
    c.nodes[2].step(InstallSnapshot(1, 2, c.raft(1).term, snap))
    c.stabilize()
    assert c.snapshots[2] == []
    assert c.raft(2).log.committed == 3 and c.storage[2].snapshot().meta.index == 3
    c.propose(1, b"c")
    assert c.applied[2] == [b"a", b"b", b"c"]


def test_snapshot_restored_mid_ready_is_not_overridden_by_older_conf_change() -> None:
    """Raft paper §7 / thesis §4: a snapshot replaces everything up to its index, membership
    included; a conf change at a lower index, handed out in a Ready taken before the snapshot
    was restored, must not be applied on top of the snapshot's membership."""
    c = Cluster()
    c.elect(1)
    hold = Hold(c, lambda m: m.to == 3)
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4))
    c.stabilize()
    add_index = c.raft(1).log.applied
    c.nodes[1].propose_conf_change(ConfChange(ConfChangeType.REMOVE_NODE, 4))
    c.stabilize()
    snap = compact_leader(c)
    assert snap.meta.conf_state == ConfState((1, 2, 3), ())
    # 3 receives the appends until it has committed the ADD_LEARNER, and takes that Ready.
    held = [m for m in hold.held if isinstance(m, AppendEntries)]
    node = c.nodes[3]
    for m in held:
        node.step(m)
        if node.raft.log.committed >= add_index:
            break
    rd = node.ready()
    assert any(e.index == add_index for e in rd.committed_entries)
    assert snap.meta.index > node.raft.log.committed
    persist(c.storage[3], rd)
    # While the driver applies that Ready, the leader's snapshot arrives.
    node.step(InstallSnapshot(1, 3, c.raft(1).term, snap))
    node.advance(rd)
    c.filter = None
    c.stabilize()
    assert c.nodes[3].status().learners == c.nodes[1].status().learners == ()
