"""A node leaving a group (raft/pipeline.py ``remove_group``, ``on_removed``; raft/multi.py),
run by hand over an in-memory log that keeps tombstones as the WAL does."""

from __future__ import annotations

import pytest

from raft import ConfState, GroupNotHosted, InvariantViolation, MemoryStorage, OutcomeUnknown
from raft.core import Config, Role
from raft.messages import (
    AppendEntries,
    ConfChange,
    ConfChangeType,
    Entry,
    EntryType,
    Heartbeat,
    encode_conf_change,
)
from raft.multi import HostConfig, MultiRaft
from raft.pipeline import DriverConfig, Pipeline
from raft.storage import bootstrap
from raft.wal import Written

from .test_pipeline import Log, Machine, Outbox, SlowLog, answer, leader, reader


class TombLog(Log):
    """``Log`` with tombstones: a removed group's storage is replaced by an empty one."""

    def __init__(self) -> None:
        super().__init__()
        self.gone: set[int] = set()

    def publish(self, written: Written) -> None:
        for done in written.done:
            w = done.write
            if w.remove:
                self.stores[w.group] = MemoryStorage()
                self.gone.add(w.group)
            else:
                self.gone.discard(w.group)
                super().publish(Written(written.seq, [done]))

    def removed(self, group: int) -> bool:
        return group in self.gone


class SlowTombLog(SlowLog, TombLog):
    pass


def removal(node: int, index: int, term: int = 1) -> Entry:
    change = ConfChange(ConfChangeType.REMOVE_NODE, node)
    return Entry(term, index, EntryType.CONF_CHANGE, encode_conf_change(change))


def follower(disk: TombLog) -> tuple[Pipeline, list[int]]:
    """Node 2 of group 0 (voters 1, 2, 3) on ``disk``, its bootstrap applied; the groups it
    was told it left."""
    if not disk.stores:
        bootstrap(disk.stores.setdefault(0, MemoryStorage()), ConfState((1, 2, 3)))
    host = MultiRaft(HostConfig(Config(2, election_ticks=10, seed=1)))
    p = Pipeline(host, disk, Machine(), DriverConfig(), clock=lambda: 0.0)
    p.outbox = Outbox()
    left: list[int] = []
    p.on_removed = left.append
    p.add_groups([0], (1, 2, 3))
    p.run_pass()
    return p, left


def removed_by_leader(p: Pipeline) -> None:
    """Leader 1 (term 1) appends and commits the removal of node 2 at index 4."""
    p.step([(0, AppendEntries(1, 2, 1, 3, 1, [removal(2, 4)], 4))])


def done_log() -> tuple[list[tuple[object, BaseException | None]], object]:
    got: list[tuple[object, BaseException | None]] = []
    return got, lambda result, exc: got.append((result, exc))


def test_a_follower_that_applies_its_removal_reports_it_once_after_the_pass() -> None:
    disk = TombLog()
    p, left = follower(disk)
    seen_in_pass: list[list[int]] = []
    p.on_leader_change = lambda g, lead: seen_in_pass.append(list(left))
    removed_by_leader(p)
    p.run_pass()
    assert seen_in_pass == [[]]  # reported after the pass, not inside it
    assert left == [0]
    r = p.host.node(0).raft
    assert r.voters == (1, 3) and r.log.applied == 4
    p.compact(0)  # no snapshot past the removal: a restart must replay it
    p.run_pass()
    assert p.stats.snapshots_taken == 0
    p.step([(0, Heartbeat(1, 2, 1, 4, b"", False, 1))])
    p.run_pass()
    assert left == [0]  # once


def test_removing_a_group_fails_its_waiters_and_writes_a_tombstone() -> None:
    disk = TombLog()
    p, left = follower(disk)
    removed_by_leader(p)
    p.run_pass()
    assert left == [0]
    _, read = reader(p)  # a follower's read: a ReadIndex to the leader, unanswered
    p.run_pass()
    _, later = reader(p)  # asked since the last pass
    got, done = done_log()
    p.remove_group(0, done)  # type: ignore[arg-type]
    assert len(read) == len(later) == 1
    assert isinstance(read[0][1], GroupNotHosted) and isinstance(later[0][1], GroupNotHosted)
    assert p._pending == 0 and 0 not in p.host
    assert got == [] and not disk.removed(0)  # the tombstone goes with the next pass
    p.run_pass()
    assert got == [(None, None)] and disk.removed(0)
    assert disk.storage(0).last_index() == 0
    assert p.stats.groups_removed == 1
    # Stray messages for the group are counted and dropped; requests fail clearly.
    p.step([(0, AppendEntries(1, 2, 1, 4, 1, [], 4)), (0, Heartbeat(1, 2, 1, 4, b"", False, 1))])
    p.run_pass()
    assert p.host.stats.unknown_group_messages == 2
    for ask in (
        lambda: p.propose(0, b"x", done),  # type: ignore[arg-type]
        lambda: p.read_index(0, done),  # type: ignore[arg-type]
        lambda: p.transfer_leader(0, 1),
        lambda: p.remove_group(0, done),  # type: ignore[arg-type]
    ):
        with pytest.raises(GroupNotHosted):
            ask()
    p.compact(0)
    p.run_pass()  # nothing to snapshot, no crash
    # Hosted again (placement moved it back): empty, never bootstrapped with its voters.
    p.add_groups([0], (1, 2, 3))
    assert p.host.node(0).raft.voters == () and disk.storage(0).last_index() == 0


def test_a_leader_that_applies_its_own_removal_steps_down_and_reports_it() -> None:
    p, outbox, disk = leader(TombLog())
    left: list[int] = []
    p.on_removed = left.append
    got, done = done_log()
    p.propose(0, b"x", done)  # type: ignore[arg-type]
    p.run_pass()
    removed_at = p.propose_conf_change(0, ConfChange(ConfChangeType.REMOVE_NODE, 1), done)  # type: ignore[arg-type]
    for _ in range(5):
        p.run_pass()
        p.step(answer(outbox.take()))
    r = p.host.node(0).raft
    assert r.log.applied >= removed_at and r.role is not Role.LEADER
    assert left == [0]
    assert got == [(None, None), (None, None)]  # "x" and the change, applied
    removed, rdone = done_log()
    p.remove_group(0, rdone)  # type: ignore[arg-type]
    p.run_pass()
    assert removed == [(None, None)] and disk.removed(0)  # type: ignore[attr-defined]


def test_a_proposal_waiting_when_its_group_is_removed_fails_outcome_unknown() -> None:
    """Removal straight from the application (e.g. its view says the node left) while this
    node still leads: the entry may commit under another leader, so its outcome is unknown."""
    p, outbox, _ = leader(TombLog())
    got, done = done_log()
    p.propose(0, b"x", done)  # type: ignore[arg-type]
    p.run_pass()
    p.remove_group(0, lambda result, exc: None)
    assert len(got) == 1 and isinstance(got[0][1], OutcomeUnknown)
    p.step(answer(outbox.take()))  # the followers' answers arrive for a group not hosted
    p.run_pass()
    assert p.host.stats.unknown_group_messages >= 1


def test_a_ready_in_flight_is_not_finished_and_the_group_waits_for_its_tombstone() -> None:
    disk = SlowTombLog()
    bootstrap(disk.stores.setdefault(0, MemoryStorage()), ConfState((1, 2, 3)))
    host = MultiRaft(HostConfig(Config(2, election_ticks=10, seed=1)))
    p = Pipeline(host, disk, Machine(), DriverConfig(), clock=lambda: 0.0)
    p.wait_for_write = lambda rnd, future: disk.waiting.append((rnd, future))
    p.add_groups([0], ())
    p.run_pass()
    disk.finish(p)
    p.step([(0, AppendEntries(1, 2, 1, 3, 1, [Entry(1, 4, data=b"y")], 3))])
    p.run_pass()
    assert disk.waiting and host.node(0).outstanding  # its write is in progress
    got, done = done_log()
    p.remove_group(0, done)  # type: ignore[arg-type]
    p.run_pass()  # the tombstone's round, behind the entry's
    with pytest.raises(InvariantViolation, match="tombstone"):
        p.add_groups([0], ())
    disk.finish(p)  # both rounds: the entry's Ready is not finished (its group is gone)
    assert got == [(None, None)] and disk.removed(0)
    p.add_groups([0], ())
    assert p.host.node(0).raft.log.last_index() == 0


def test_a_restart_before_the_tombstone_reports_the_removal_again() -> None:
    """The node applied its removal and crashed before removing the group: the log still
    holds the removal entry (no snapshot was taken past it), so the restarted node applies it
    again and reports it again."""
    disk = TombLog()
    p, left = follower(disk)
    p.compact(0)
    p.run_pass()  # a snapshot before the removal is fine
    removed_by_leader(p)
    p.run_pass()
    assert left == [0]
    assert disk.storage(0).snapshot().meta.index == 3
    again, left_again = follower(disk)  # the same disk, a new process: its first pass
    assert left_again == [0] and again.host.node(0).raft.voters == (1, 3)


def test_a_removed_group_is_never_bootstrapped_again() -> None:
    disk = TombLog()
    p, _ = follower(disk)
    p.remove_group(0, lambda result, exc: None)
    p.run_pass()
    again, _ = follower(disk)  # a restart asking for every group with the first voters
    assert again.host.node(0).raft.voters == ()
    assert disk.storage(0).last_index() == 0
