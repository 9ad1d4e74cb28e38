"""The simulation's checkers must be able to fail: each is fed a broken history directly."""

from __future__ import annotations

import dataclasses
import os

import pytest

from ctxstore import commands
from ctxstore.state import ConversationState
from raft import Config, ConfState, Entry, HardState, MemoryStorage, RawNode
from raft.messages import VoteResponse
from raft.wal import GroupWrite
from raft.wal_segments import segment_name
from wire.protocol import Sender

from ..raft.helpers import Cluster
from .app import History, SimApp, owner
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


def test_a_torn_write_may_leave_any_prefix_of_its_records() -> None:
    st = MemoryStorage()
    st.append([Entry(1, 1), Entry(1, 2)])
    st.set_hard_state(HardState(1, 1, 2))
    base = Durable.of(st)
    write = GroupWrite(0, [Entry(2, 2, data=b"a"), Entry(2, 3, data=b"b")], HardState(2, 1, 2))
    outcomes = allowed_outcomes(base, [write])
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


# -- the product's invariants (app.py) ---------------------------------------------------------
def _append(cmid: str, content: str = "x", sender: Sender = "agent") -> commands.Append:
    return commands.Append(
        session_id="s",
        sender=sender,
        sender_id="u" if sender == "user" else "a",
        kind="text",
        content=content,
        metadata={},
        client_msg_id=cmid,
        expected_seq=None,
        token_count=None,
        inserted_at=1,
    )


def _appended(seq: int, deduped: bool = False) -> commands.Appended:
    return commands.Appended(seq, 1, deduped)


def test_a_message_appended_twice_breaks_dedupe() -> None:
    h = History()
    h.applied_append(1, _append("c1"), _appended(1))
    h.applied_append(2, _append("c1"), _appended(1))  # another replica: the same seq
    h.applied_append(1, _append("c1"), _appended(1, deduped=True))  # a retry, deduped
    with pytest.raises(Violation, match="deduped to seq 2"):
        h.applied_append(1, _append("c1"), _appended(2, deduped=True))
    with pytest.raises(Violation, match="appended twice"):
        h.applied_append(1, _append("c1"), _appended(2))


def test_two_messages_at_one_seq() -> None:
    h = History()
    h.applied_append(1, _append("c1"), _appended(1))
    with pytest.raises(Violation, match="seq 1 holds c2"):
        h.applied_append(2, _append("c2"), _appended(1))


def test_an_append_acknowledged_at_two_seqs_or_where_it_was_not_applied() -> None:
    h = History()
    h.applied_append(1, _append("c1"), _appended(1))
    h.acknowledged("s", "c1", _appended(1))
    with pytest.raises(Violation, match="acknowledged at seq 1, then at 2"):
        h.acknowledged("s", "c1", _appended(2, deduped=True))
    with pytest.raises(Violation, match="not applied there"):
        h.acknowledged("s", "c9", _appended(1))


def test_a_cursor_a_client_was_told_moving_back() -> None:
    h = History()
    h.cursor_told("s", 3, 0)
    h.cursor_told("s", 2, 0)  # a request sent before the first answer: concurrent
    assert h.cursor_acked["s"] == 3
    h.cursor_told("s", 3, 3)
    with pytest.raises(Violation, match="moved back"):
        h.cursor_told("s", 2, 3)


def _entries(*cmds: commands.Command) -> list[Entry]:
    return [Entry(1, i, data=commands.encode_command(c)) for i, c in enumerate(cmds, 1)]


def test_a_replica_that_lost_an_acknowledged_append() -> None:
    h = History()
    state = ConversationState()
    create = commands.CreateSession("s", "u", "a", {}, 1)
    results = state.apply(0, _entries(create, _append("c1", "one")))
    h.applied_append(1, _append("c1", "one"), results[1])
    h.acknowledged("s", "c1", _appended(1))
    h.check_replica(1, state, ["s"])
    h.applied_append(2, _append("c2", "two"), _appended(2))  # applied elsewhere, not here
    h.acknowledged("s", "c2", _appended(2))
    with pytest.raises(Violation, match="acknowledged s c2 is not at seq 2"):
        h.check_replica(1, state, ["s"])


def test_a_replica_whose_cursor_moves_back() -> None:
    app = SimApp(1, 1, Checker(), History(), term=lambda g: 1)
    app.restore(0, b"")
    create = commands.CreateSession("s", owner("s"), "a", {}, 1)
    app.apply(0, _entries(create, _append("c1", sender="user")))  # the user's: cursor 1
    assert app.cursors["s"] == 1
    app.cursors["s"] = 5  # as if this replica had seen the cursor at 5 before
    mark = Entry(1, 3, data=commands.encode_command(commands.MarkRead("s", owner("s"), 0)))
    with pytest.raises(Violation, match="cursor moved back 5 -> 1"):
        app.apply(0, [mark])
