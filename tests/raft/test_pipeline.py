"""The driver's pipeline run by hand, without a loop (raft/pipeline.py), over an in-memory
log: what the asyncio tests cannot time precisely enough."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future

import pytest

from raft import ConfState, Entry, MemoryStorage, ProposalDropped, Snapshot, SnapshotMeta, Storage
from raft.core import Config, Role
from raft.errors import InvariantViolation
from raft.messages import (
    AppendEntries,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    ReadIndex,
    RequestVote,
    VoteResponse,
)
from raft.multi import HostConfig, MultiRaft
from raft.pipeline import DriverConfig, Pipeline, Round
from raft.storage import bootstrap
from raft.wal import Done, GroupWrite, WriteMode, Written

from .helpers import of_type


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

    def removed(self, group: int) -> bool:
        return False


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


# -- reads (batched per group and pass; never waiting for a write) -----------------------------
class Outbox:
    def __init__(self) -> None:
        self.sent: list[tuple[int, Message]] = []  # (group, message)
        self.commits: list[tuple[int, list[int]]] = []  # (to, notices)

    def send(self, to: int, items: list[tuple[int, Message]]) -> None:
        self.sent += items

    def send_commits(self, to: int, notices: list[int]) -> None:
        self.commits.append((to, notices))

    def flush_now(self) -> None:
        pass

    def take(self) -> list[Message]:
        out, self.sent = [m for _, m in self.sent], []
        return out


class SlowLog(Log):
    """Writes finish only when the test says (``finish``): a disk that is busy."""

    mode = WriteMode.THREAD

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[tuple[Round, Future[Written]]] = []

    def submit(self, batch: Sequence[GroupWrite]) -> Future[Written]:
        done = super().submit(batch)
        future: Future[Written] = Future()
        future.done_result = done.result()  # type: ignore[attr-defined]
        return future

    def finish(self, p: Pipeline) -> None:
        waiting, self.waiting = self.waiting, []
        for rnd, future in waiting:
            future.set_result(future.done_result)  # type: ignore[attr-defined]
            p.written(rnd, future)


def answer(messages: list[Message], heartbeats: bool = True) -> list[tuple[int, Message]]:
    """Followers 2 and 3, agreeing to everything: votes, appends, heartbeats (``heartbeats``
    False: those are lost)."""
    out: list[tuple[int, Message]] = []
    for m in messages:
        if isinstance(m, RequestVote):
            out.append((0, VoteResponse(m.to, m.frm, m.term, False, m.pre_vote)))
        elif isinstance(m, AppendEntries):
            last = m.entries[-1].index if m.entries else m.prev_index
            out.append((0, AppendResponse(m.to, m.frm, m.term, last)))
        elif isinstance(m, Heartbeat) and heartbeats:
            out.append((0, HeartbeatResponse(m.to, m.frm, m.term, m.context, m.round)))
    return out


def leader(
    log: Log | None = None, commit_broadcast: bool = True
) -> tuple[Pipeline, Outbox, SlowLog | Log]:
    """Node 1 of group 0 (voters 1, 2, 3), elected, its first entry committed and applied."""
    disk = log or Log()
    bootstrap(disk.stores.setdefault(0, MemoryStorage()), ConfState((1, 2, 3)))
    cfg = Config(1, election_ticks=10, seed=1, commit_broadcast=commit_broadcast)
    host = MultiRaft(HostConfig(cfg, quiesce=False))
    p = Pipeline(host, disk, Machine(), DriverConfig(), clock=lambda: 0.0)
    outbox = p.outbox = Outbox()
    if isinstance(disk, SlowLog):
        p.wait_for_write = lambda rnd, future: disk.waiting.append((rnd, future))
    p.add_groups([0], ())
    p.run_pass()  # the bootstrap membership
    host.campaign(0)
    for _ in range(20):
        p.run_pass()
        if isinstance(disk, SlowLog):
            disk.finish(p)
        p.step(answer(outbox.take()))
        r = host.node(0).raft
        if r.role is Role.LEADER and r.log.applied == r.log.last_index() > 3:
            return p, outbox, disk
    raise AssertionError("node 1 was not elected")


def reader(p: Pipeline, group: int = 0) -> tuple[bytes, list[tuple[object, object]]]:
    got: list[tuple[object, object]] = []
    ctx = p.read_index(group, lambda index, exc: got.append((index, exc)))
    return ctx, got


def test_the_reads_of_a_group_between_two_passes_share_one_read_index_round() -> None:
    p, outbox, _ = leader()
    commit = p.host.node(0).raft.log.committed
    (ctx, a), (same, b) = reader(p), reader(p)
    assert same == ctx and a == b == []  # nothing answered before a pass
    p.run_pass()
    hbs = of_type(outbox.take(), Heartbeat)
    assert len(hbs) == 2 and len(p.host.node(0).raft.read_only.queue) == 1
    later, c = reader(p)  # after the pass: the next batch
    assert later != ctx
    p.step(answer(hbs[:1]))  # a quorum with the leader
    p.run_pass()
    assert a == b == [(commit, None)] and c == []
    p.step(answer(of_type(outbox.take(), Heartbeat)))
    p.run_pass()
    assert c == [(commit, None)]
    assert p._pending == 0


def test_a_read_is_served_while_the_leaders_write_is_in_progress() -> None:
    """The leader's disk is busy with an append: its read round and read state do not wait for
    the write (the read's index, the commit index when it was asked, is applied already)."""
    p, outbox, disk = leader(SlowLog())
    assert isinstance(disk, SlowLog)
    commit = p.host.node(0).raft.log.committed
    p.propose(0, b"x", lambda result, exc: None)
    p.run_pass()
    assert disk.waiting and p.host.node(0).outstanding
    appends = outbox.take()
    _, got = reader(p)
    p.run_pass()
    p.step(answer(of_type(outbox.take(), Heartbeat)))
    p.run_pass()
    assert got == [(commit, None)] and disk.waiting  # the write still in progress
    p.step(answer(appends))
    disk.finish(p)
    p.run_pass()
    assert p.host.node(0).raft.log.applied == commit + 1


def test_a_read_waits_for_its_index_to_be_applied() -> None:
    """A read asked once an entry is committed (its answers in) but before the busy disk let the
    leader apply it: served only once applied."""
    p, outbox, disk = leader(SlowLog())
    assert isinstance(disk, SlowLog)
    p.propose(0, b"x", lambda result, exc: None)
    p.run_pass()
    p.step(answer(outbox.take()))  # the followers hold it: committed once the leader's write...
    disk.finish(p)  # ... is done; it is applied with the next Ready, whose write we hold
    p.propose(0, b"y", lambda result, exc: None)
    p.run_pass()
    r = p.host.node(0).raft
    x = r.log.committed
    assert x == r.log.applied + 1 and disk.waiting
    _, got = reader(p)
    p.run_pass()
    p.step(answer(of_type(outbox.take(), Heartbeat)))
    p.run_pass()
    assert got == []  # confirmed at x, not yet applied
    disk.finish(p)
    assert r.log.applied == x and got == [(x, None)]


def test_a_new_leader_fails_the_reads_asked_of_the_old_one() -> None:
    p, outbox, _ = leader()
    _, got = reader(p)
    p.run_pass()
    outbox.take()  # the round's heartbeats are lost
    term = p.host.node(0).raft.term
    p.step([(0, Heartbeat(2, 1, term + 1, 0, b"", False, 1))])  # node 2 leads a new term
    p.run_pass()
    assert len(got) == 1 and isinstance(got[0][1], ProposalDropped)
    assert p._pending == 0
    _, again = reader(p)  # asked of the new leader
    p.run_pass()
    [ask] = of_type(outbox.take(), ReadIndex)
    assert ask.to == 2 and again == []


def test_reads_without_a_leader_fail_at_the_next_pass() -> None:
    p, _ = follower()
    _, got = reader(p)
    p.run_pass()
    assert len(got) == 1 and isinstance(got[0][1], ProposalDropped)


@pytest.mark.parametrize("slow", [False, True], ids=["inline", "threaded"])
def test_a_callback_may_answer_but_not_call_into_the_pipeline(slow: bool) -> None:
    """A proposal's callback runs inside the pass (or the finished write) that applies it: it
    may answer its client there; a request it makes of the pipeline is refused with an
    ``InvariantViolation`` that nobody catches (the rule is checked, not only written)."""
    p, outbox, disk = leader(SlowLog() if slow else None)
    answered: list[object] = []

    def done(result: object, exc: object) -> None:
        answered.append(result)
        p.propose(0, b"again", lambda result, exc: None)

    p.propose(0, b"x", done)
    with pytest.raises(InvariantViolation, match="from inside its pass"):
        for _ in range(5):
            p.run_pass()
            if isinstance(disk, SlowLog):
                disk.finish(p)
            p.step(answer(outbox.take()))
    assert answered == [None]  # (Machine.apply's result)
    assert not p.in_pass


def test_a_read_callback_may_not_ask_another_read() -> None:
    p, outbox, _ = leader()

    def done(index: object, exc: object) -> None:
        p.read_index(0, lambda index, exc: None)

    p.read_index(0, done)
    with pytest.raises(InvariantViolation, match="from inside its pass"):
        for _ in range(5):
            p.run_pass()
            p.step(answer(outbox.take()))
    assert not p.in_pass


# -- commit notices (raft/multi.py) ------------------------------------------------------------
def test_each_follower_is_told_the_commit_in_the_pass_that_learns_it_acknowledged_it() -> None:
    """``commit_broadcast`` off: the first follower's answer commits the entry (a quorum with
    the leader) and that follower gets a notice in that pass; the second follower's answer
    comes later, in a pass with no Ready (nothing new to apply or write), which still sends
    it its notice.  Neither waits for an append or a heartbeat round."""
    p, outbox, _ = leader(commit_broadcast=False)
    r = p.host.node(0).raft
    outbox.take()
    outbox.commits.clear()
    done: list[object] = []
    index = p.propose(0, b"x", lambda result, exc: done.append(result))
    p.run_pass()
    appends = of_type(outbox.take(), AppendEntries)
    assert sorted(m.to for m in appends) == [2, 3] and outbox.commits == []
    first, second = answer(appends)
    p.step([first])
    p.run_pass()
    assert r.log.committed == index and done == [None]
    assert outbox.commits == [(2, [0, r.term, index])] and outbox.take() == []
    p.step([second])
    assert not p.host.node(0).has_ready()
    p.run_pass()
    assert outbox.commits[1:] == [(3, [0, r.term, index])] and outbox.take() == []
    p.run_pass()  # told once
    assert len(outbox.commits) == 2


def test_a_follower_takes_a_notice_only_from_its_leader_in_its_term() -> None:
    p, sm = follower()
    r = p.host.node(0).raft
    p.step([(0, AppendEntries(1, 2, 1, 3, 1, [Entry(1, 4, b"a"), Entry(1, 5, b"b")], 3))])
    p.run_pass()
    assert r.lead == 1 and r.log.committed == 3 and sm.applied[-1] == 3
    for frm, term in ((3, 1), (1, 2), (1, 0)):  # another node, another term
        p.commit_notices(frm, [0, term, 5])
        p.run_pass()
        assert r.log.committed == 3
    p.commit_notices(1, [7, 1, 5, 0, 1, 4])  # a group not hosted here is skipped
    p.run_pass()
    assert r.log.committed == 4 and sm.applied[-1] == 4
    p.commit_notices(1, [0, 1, 3])  # behind: nothing
    p.commit_notices(1, [0, 1, 5])
    p.run_pass()
    assert r.log.committed == 5 and sm.applied[-1] == 5
    assert p.stats.commit_notices_received == 7


def test_a_group_not_prompt_takes_the_notice_and_applies_it_with_its_next_work() -> None:
    """``MultiRaft.prompt`` (ctxstore: the groups this node pushes to subscribers) says which
    groups apply a notified commit at once; another takes it without a Ready of its own."""
    p, sm = follower()
    r = p.host.node(0).raft
    p.step([(0, AppendEntries(1, 2, 1, 3, 1, [Entry(1, 4, b"a"), Entry(1, 5, b"b")], 3))])
    p.run_pass()
    p.run_pass()  # (the advance of that Ready: nothing left to do)
    assert not p.host.has_dirty()
    asked: list[int] = []
    p.host.prompt = lambda group: asked.append(group) is not None  # (False)
    p.commit_notices(1, [0, 1, 4])
    p.run_pass()
    assert asked == [0] and r.log.committed == 4 and sm.applied[-1] == 3
    p.step([(0, Heartbeat(1, 2, 1, 4))])  # the group's next work applies it
    p.run_pass()
    assert sm.applied[-1] == 4
    p.host.prompt = lambda group: True
    p.commit_notices(1, [0, 1, 5])
    p.run_pass()
    assert sm.applied[-1] == 5
