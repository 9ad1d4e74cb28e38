"""The driver's pipeline run by hand, without a loop (raft/pipeline.py), over an in-memory
log: what the asyncio tests cannot time precisely enough."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

from raft import ConfState, Entry, MemoryStorage, Snapshot, SnapshotMeta, Storage
from raft.core import Config
from raft.messages import InstallSnapshot
from raft.multi import HostConfig, MultiRaft
from raft.pipeline import DriverConfig, Pipeline
from raft.storage import bootstrap
from raft.wal import Done, GroupWrite, WriteMode, Written


class Log:
    """A ``DurableLog`` over one MemoryStorage per group, each write durable at once."""

    mode = WriteMode.INLINE

    def __init__(self) -> None:
        self.stores: dict[int, MemoryStorage] = {}
        self.seq = 0

    def storage(self, group: int) -> Storage:
        return self.stores.setdefault(group, MemoryStorage())

    def submit(self, batch: Sequence[GroupWrite]) -> Future[Written]:
        self.seq += 1
        future: Future[Written] = Future()
        future.set_result(Written(self.seq, [Done(w, "", []) for w in batch]))
        return future

    def write_sync(self, batch: Sequence[GroupWrite]) -> Written:
        written = self.submit(batch).result()
        self.publish(written)
        return written

    def publish(self, written: Written) -> None:
        for done in written.done:
            w, ms = done.write, self.stores.setdefault(done.write.group, MemoryStorage())
            if w.snapshot is not None:
                ms.apply_snapshot(w.snapshot)
            if w.compact is not None:
                ms.create_snapshot(w.compact.meta.index, w.compact.meta.conf_state, w.compact.data)
                ms.compact(w.compact.meta.index)
            ms.append(list(w.entries))
            if w.hard_state is not None:
                ms.set_hard_state(w.hard_state)

    def segment_count(self) -> int:
        return 1

    def oldest_segment_groups(self) -> list[int]:
        return []


class Machine:
    def __init__(self) -> None:
        self.applied: list[int] = []
        self.restored: list[bytes] = []

    def apply(self, group: int, entries: list[Entry]) -> list[object]:
        self.applied += [e.index for e in entries]
        return [None] * len(entries)

    def snapshot(self, group: int) -> bytes:
        return b"state@%d" % (self.applied[-1] if self.applied else 0)

    def restore(self, group: int, data: bytes) -> None:
        self.restored.append(data)


def follower() -> tuple[Pipeline, Machine]:
    """Node 2 of group 0 (voters 1, 2, 3), its writes durable as soon as submitted."""
    disk = Log()
    bootstrap(disk.stores.setdefault(0, MemoryStorage()), ConfState((1, 2, 3)))
    sm = Machine()
    host = MultiRaft(HostConfig(Config(2, election_ticks=10, seed=1)))
    p = Pipeline(host, disk, sm, DriverConfig(), clock=lambda: 0.0)
    p.add_groups([0], ())
    p.run_pass()
    assert host.node(0).raft.log.applied == 3  # the bootstrap membership
    return p, sm


def test_a_compaction_due_when_a_leaders_snapshot_arrives_waits_for_it() -> None:
    """Issue 25 (found by the simulation once it ran the pipeline): a group due for a snapshot
    (here: asked for one) had stepped a leader's InstallSnapshot that no Ready carried yet;
    the pass took the snapshot at the applied index, which the log no longer held, and the
    core's ``Compacted`` stopped the node.  The leader's snapshot replaces the state instead."""
    p, sm = follower()
    snap = Snapshot(SnapshotMeta(50, 2, ConfState((1, 2, 3))), b"leader@50")
    p.step([(0, InstallSnapshot(1, 2, 2, snap))])
    p.compact(0)
    p.run_pass()
    assert sm.restored[-1] == b"leader@50"
    assert p.host.node(0).raft.log.applied == 50
    assert p.stats.snapshots_taken == 0
    p.compact(0)  # nothing applied since: nothing to take
    p.run_pass()
    assert p.stats.snapshots_taken == 0


def test_a_compaction_takes_the_state_at_the_applied_index() -> None:
    p, _ = follower()
    p.compact(0)
    p.run_pass()
    assert p.stats.snapshots_taken == 1
    view = p.log.storage(0)
    assert view.snapshot().meta.index == 3 and view.snapshot().data == b"state@3"


def test_a_group_added_without_voters_starts_empty() -> None:
    """A node that joins a group later hosts it empty and learns it from the log."""
    p, _ = follower()
    p.add_groups([1], ())
    assert p.log.storage(1).last_index() == 0
    assert not p.host.node(1).raft.voters
    p.add_groups([2], (1, 2, 3))
    assert p.host.node(2).raft.log.last_index() == 3  # bootstrapped with its voters
