"""Paper tests for replication flow control (thesis §4.2.1 / etcd raft's Progress design).

A follower's Progress is PROBE (one append per round trip), REPLICATE (pipelined within an
inflight window of messages and bytes) or SNAPSHOT; see raft/progress.py.
"""

from __future__ import annotations

import pytest

from raft import ProposalDropped
from raft.messages import AppendEntries, AppendResponse
from raft.storage import entries_bytes

from .helpers import Cluster, Hold, of_type


def hold_appends_to(c: Cluster, to: int) -> Hold:
    return Hold(c, lambda m: isinstance(m, AppendEntries) and m.to == to)


def with_entries(hold: Hold) -> list[AppendEntries]:
    """The held appends that carry entries (empty ones only update the commit index and take
    no room in the inflight window)."""
    return [m for m in hold.held if isinstance(m, AppendEntries) and m.entries]


def state_of(c: Cluster, leader: int, id_: int) -> str:
    return c.nodes[leader].status().progress[id_][0]


def test_probe_sends_one_append_then_waits_for_an_answer() -> None:
    """Thesis §4.2.1 (probe): while the leader does not know where a follower's log matches,
    it sends one AppendEntries and waits for the answer before sending another."""
    c = Cluster()
    c.elect(1)
    c.nodes[1].report_unreachable(2)
    assert state_of(c, 1, 2) == "probe"
    hold = hold_appends_to(c, 2)
    for data in (b"a", b"b", b"c"):
        c.propose(1, data)
    assert len(with_entries(hold)) == 1
    c.tick(1)  # a heartbeat answer is an answer: one more probe may go
    assert len(with_entries(hold)) == 2
    hold.release()  # the answers arrive: the follower matches and catches up
    assert state_of(c, 1, 2) == "replicate"
    assert c.log(2) == c.log(1)


def test_replicate_pipelines_up_to_max_inflight_msgs() -> None:
    """Thesis §4.2.1 (pipelining): once a follower matches, the leader sends appends without
    waiting for answers, up to max_inflight_msgs unacknowledged messages, then pauses."""
    c = Cluster(max_inflight_msgs=3)
    c.elect(1)
    assert state_of(c, 1, 2) == "replicate"
    hold = hold_appends_to(c, 2)
    for i in range(6):
        c.propose(1, b"%d" % i)
    assert len(with_entries(hold)) == 3
    assert [m.entries[0].data for m in with_entries(hold)] == [b"0", b"1", b"2"]
    hold.release()
    assert c.log(2) == c.log(1)
    assert c.applied[2] == [b"%d" % i for i in range(6)]


def test_heartbeat_response_frees_one_inflight_slot() -> None:
    """Thesis §4.2.1 / etcd: a heartbeat answer from a follower whose window is full frees one
    slot, so lost acknowledgements cannot stall replication to it forever."""
    c = Cluster(max_inflight_msgs=2)
    c.elect(1)
    hold = hold_appends_to(c, 2)
    for i in range(5):
        c.propose(1, b"%d" % i)
    assert len(with_entries(hold)) == 2
    c.tick(1)  # one slot freed: the rest of the backlog goes in one append
    assert len(with_entries(hold)) == 3
    assert [e.data for e in with_entries(hold)[-1].entries] == [b"2", b"3", b"4"]
    c.propose(1, b"5")  # the window is full again: nothing is sent
    assert len(with_entries(hold)) == 3
    c.tick(1)
    assert len(with_entries(hold)) == 4
    assert [e.data for e in with_entries(hold)[-1].entries] == [b"5"]


def test_inflight_bytes_limit_pauses_replication() -> None:
    """Thesis §4.2.1 / etcd MaxInflightBytes: the window is also capped in payload bytes; the
    leader pauses once the unacknowledged bytes reach max_inflight_bytes."""
    c = Cluster(max_inflight_bytes=10)
    c.elect(1)
    hold = hold_appends_to(c, 2)
    for _ in range(4):
        c.propose(1, b"12345")
    assert len(with_entries(hold)) == 2  # 5 + 5 bytes fill the window
    hold.release()
    assert c.log(2) == c.log(1)


@pytest.mark.parametrize(("limit", "batches"), [(10, 3), (1 << 20, 1)])
def test_max_size_per_msg_splits_entries(limit: int, batches: int) -> None:
    """Thesis §10.2 / etcd MaxSizePerMsg: an AppendEntries carries at most max_size_per_msg
    payload bytes (and always at least one entry); a backlog goes in several messages."""
    c = Cluster(max_size_per_msg=limit)
    c.elect(1)
    for _ in range(6):
        c.nodes[1].propose(b"abcd")  # no stabilize: one backlog of six entries
    c.stabilize()
    sent = [m for m in of_type(c.sent, AppendEntries, to=2) if m.entries]
    sent = sent[1:]  # the first one carried the no-op
    assert len(sent) == batches
    assert all(entries_bytes(m.entries) <= limit for m in sent)
    assert sum(len(m.entries) for m in sent) == 6
    assert c.log(2) == c.log(1)


def test_single_oversized_entry_still_goes() -> None:
    """etcd MaxSizePerMsg: the limit never blocks progress; one entry is always sent."""
    c = Cluster(max_size_per_msg=2)
    c.elect(1)
    c.propose(1, b"much larger than two bytes")
    assert c.applied[2] == [b"much larger than two bytes"]


def test_uncommitted_bytes_cap_drops_proposals() -> None:
    """Thesis §10.2 / etcd MaxUncommittedEntriesSize: a leader that cannot commit refuses new
    proposals (ProposalDropped) once too many payload bytes are waiting, and accepts again once
    they are committed and applied."""
    c = Cluster(max_uncommitted_bytes=10)
    c.elect(1)
    c.isolate(1)
    c.propose(1, b"123456")
    with pytest.raises(ProposalDropped):
        c.propose(1, b"123456")
    c.propose(1, b"")  # empty proposals are always admitted
    c.heal()
    c.tick(1)
    assert c.applied[1] == [b"123456"]
    c.propose(1, b"123456")
    assert c.applied[2] == [b"123456", b"123456"]


def test_rejection_moves_replicate_back_to_probe() -> None:
    """Thesis §4.2.1: a rejected append shows the leader's guess was wrong; the follower goes
    back to PROBE and the leader backs off until it finds the match."""
    c = Cluster()
    c.elect(1)
    c.isolate(2)
    for data in (b"a", b"b"):
        c.propose(1, data)  # 2's window fills with appends it never sees
    assert state_of(c, 1, 2) == "replicate"
    c.heal()
    hold = hold_appends_to(c, 2)
    c.tick(1)  # heartbeat answer -> one more append beyond 2's log -> rejected
    [gap] = hold.held
    hold.held.clear()
    c.nodes[2].step(gap)
    [nack] = c.process(2)
    assert isinstance(nack, AppendResponse) and nack.reject
    c.send([nack])
    assert state_of(c, 1, 2) == "probe"
    assert len(with_entries(hold)) == 1  # the probe, from where 2's log may match
    hold.release()
    assert state_of(c, 1, 2) == "replicate" and c.log(2) == c.log(1)
