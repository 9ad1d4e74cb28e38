"""ReadIndex confirmed by heartbeat rounds (raft/readonly.py, docs/raft.md §8.7).

Issue 27: reads were matched to heartbeat answers by their context bytes alone, and the
driver's contexts are a per-node counter, so two nodes' reads share bytes.  A late answer to an
earlier heartbeat confirmed a new read, and a stale leader answered it at an index older than
one a new leader may already have committed.  Now every heartbeat broadcast is a numbered round,
a read waits for a round started after it arrived, and contexts are never keys.
"""

from __future__ import annotations

import msgspec
import pytest

from raft import InvariantViolation, ProposalDropped, ReadState
from raft import peer_codec as codec
from raft.messages import (
    AppendEntries,
    Heartbeat,
    HeartbeatResponse,
    Message,
    ReadIndex,
    ReadIndexResponse,
    RequestVote,
)

from .helpers import Cluster, Hold, of_type, persist


def echo(hb: Message) -> HeartbeatResponse:
    """The follower's answer to heartbeat ``hb`` (delivered whenever the test wants)."""
    assert isinstance(hb, Heartbeat)
    return HeartbeatResponse(hb.to, hb.frm, hb.term, hb.context, hb.round)


def heartbeats(msgs: list[Message]) -> dict[int, Heartbeat]:
    return {m.to: m for m in msgs if isinstance(m, Heartbeat)}


def answers(msgs: list[Message]) -> list[tuple[int, int, bytes]]:
    return [(m.to, m.index, m.context) for m in of_type(msgs, ReadIndexResponse)]


def test_a_late_heartbeat_answer_does_not_confirm_a_newer_read() -> None:
    """The report's reproduction: leader of 3 at commit 1; node 2 reads with context A, node 3
    answers the heartbeat (A is answered); a local read B loses its heartbeats; node 2 asks A
    again, and node 2's delayed answer to the *first* heartbeat arrives.  It used to release B
    (and A) with no quorum having heard from the leader since B arrived."""
    c = Cluster()
    c.elect(1)
    leader = c.nodes[1]
    assert c.raft(1).log.committed == 1 and c.raft(1).term == 1
    leader.step(ReadIndex(2, 1, 1, b"A"))
    first = heartbeats(c.process(1))
    leader.step(echo(first[3]))
    assert answers(c.process(1)) == [(2, 1, b"A")]
    leader.read_index(b"B")
    lost = heartbeats(c.process(1))  # B's round: lost
    leader.step(ReadIndex(2, 1, 1, b"A"))
    again = heartbeats(c.process(1))  # the second A's own round: lost too
    leader.step(echo(first[2]))  # delayed
    leader.step(HeartbeatResponse(2, 1, 1, b"A"))  # the report's literal message
    assert answers(c.process(1)) == [] and c.read_states[1] == []
    leader.step(echo(lost[2]))  # a quorum (1 and 2) heard from the leader after B arrived
    assert answers(c.process(1)) == [] and c.read_states[1] == [ReadState(1, b"B")]
    leader.step(echo(again[3]))
    assert answers(c.process(1)) == [(2, 1, b"A")]


def test_a_late_answer_of_an_old_round_confirms_no_read_after_it() -> None:
    """Five voters: all four answers to a round started before the read arrive late; only
    answers to a round started after it confirm it (two of them and the leader: 3 of 5)."""
    c = Cluster(ids=range(1, 6))
    c.elect(1)
    c.propose(1, b"a")
    commit = c.raft(1).log.committed
    leader = c.nodes[1]
    old = Hold(c, lambda m: isinstance(m, HeartbeatResponse))
    c.tick(1)  # a plain heartbeat round: its answers are held
    assert len(old.held) == 4
    c.filter = lambda m: not isinstance(m, Heartbeat)
    leader.read_index(b"r")
    c.stabilize()  # the read's round is lost
    c.filter = None
    c.send(old.held)  # the old round's answers, late
    c.stabilize()
    assert c.read_states[1] == []
    assert c.raft(1).read_only.queue[0].round > max(m.round for m in old.held)
    new = Hold(c, lambda m: isinstance(m, HeartbeatResponse))
    c.tick(1)  # the next round
    assert len(new.held) == 4
    c.filter = None
    c.send(new.held[:1])
    assert c.read_states[1] == []  # 2 of 5
    c.send(new.held[1:2])
    assert c.read_states[1] == [ReadState(commit, b"r")]  # 3 of 5


def test_equal_contexts_from_two_nodes_are_two_reads() -> None:
    """Two nodes (and the leader) read with the same context bytes, as two drivers counting
    from 1 do: each is answered; the second used to be dropped as a duplicate."""
    c = Cluster()
    c.elect(1)
    c.propose(1, b"a")
    commit = c.raft(1).log.committed
    ctx = (1).to_bytes(8, "big")
    for n in (2, 3, 1):
        c.nodes[n].read_index(ctx)
    c.stabilize()
    for n in (1, 2, 3):
        assert c.read_states[n] == [ReadState(commit, ctx)], n


def test_a_request_sent_twice_is_answered_twice() -> None:
    c = Cluster()
    c.elect(1)
    c.nodes[1].step(ReadIndex(2, 1, 1, b"x"))
    c.nodes[1].step(ReadIndex(2, 1, 1, b"x"))
    c.stabilize()
    assert answers(of_type(c.delivered, ReadIndexResponse)) == [(2, 1, b"x"), (2, 1, b"x")]


def test_reads_of_one_ready_share_one_round_and_are_released_in_order() -> None:
    c = Cluster()
    c.elect(1)
    c.sent.clear()
    c.nodes[1].read_index(b"a")
    c.nodes[1].step(ReadIndex(2, 1, 1, b"b"))
    c.nodes[1].read_index(b"c")
    c.stabilize()
    assert len(of_type(c.sent, Heartbeat)) == 2  # one round, to nodes 2 and 3
    assert [rs.context for rs in c.read_states[1]] == [b"a", b"c"]
    assert answers(of_type(c.delivered, ReadIndexResponse)) == [(2, 1, b"b")]


def test_answers_to_rounds_never_started_and_from_learners_count_for_nothing() -> None:
    c = Cluster(ids=(1, 2, 3), learners=(4,))
    c.elect(1)
    c.filter = lambda m: not isinstance(m, Heartbeat)
    c.nodes[1].read_index(b"r")
    c.stabilize()
    c.filter = None
    round_ = c.raft(1).read_only.round
    c.send([HeartbeatResponse(2, 1, 1, b"r", round_ + 1)])  # forged: never started
    c.send([HeartbeatResponse(4, 1, 1, b"r", round_)])  # a learner is no voter
    assert c.read_states[1] == []
    c.send([HeartbeatResponse(3, 1, 1, b"", round_)])  # a voter, any context
    assert [rs.context for rs in c.read_states[1]] == [b"r"]


def test_the_read_queue_is_bounded() -> None:
    """``max_pending_reads``: a local read beyond it raises ProposalDropped; a remote one is
    dropped (its asker times out)."""
    c = Cluster(max_pending_reads=2)
    c.elect(1)
    c.filter = lambda m: not isinstance(m, Heartbeat)
    c.nodes[1].read_index(b"a")
    c.nodes[1].step(ReadIndex(2, 1, 1, b"b"))
    c.nodes[1].step(ReadIndex(3, 1, 1, b"dropped"))
    with pytest.raises(ProposalDropped):
        c.nodes[1].read_index(b"c")
    c.stabilize()
    assert len(c.raft(1).read_only.queue) == 2
    c.filter = None
    c.tick(1)
    assert [rs.context for rs in c.read_states[1]] == [b"a"]
    assert answers(of_type(c.delivered, ReadIndexResponse)) == [(2, 1, b"b")]


def test_the_round_travels_on_the_peer_wire_and_old_peers_read_it_as_absent() -> None:
    """The round is appended to Heartbeat and HeartbeatResponse with a default (schema
    evolution, raft/messages.py): it round-trips through the peer codec; a message from a peer
    without the field decodes with round 0 (which confirms no read), and a decoder without the
    field ignores it."""
    hb = Heartbeat(1, 2, 3, 4, b"", False, 5)
    answer = HeartbeatResponse(2, 1, 3, b"", 5)
    frame = codec.encode_frame(codec.Batch([(0, hb), (1, answer)]))
    decoded = msgspec.msgpack.decode(frame[codec.HEADER.size :], type=codec.Frame)
    assert isinstance(decoded, codec.Batch) and decoded.items == [(0, hb), (1, answer)]
    old = msgspec.msgpack.encode([4, 2, 1, 3, b"ctx"])  # tag 4, frm, to, term, context
    assert msgspec.msgpack.decode(old, type=Message) == HeartbeatResponse(2, 1, 3, b"ctx", 0)

    class OldHeartbeatResponse(msgspec.Struct, array_like=True, tag=4):
        frm: int
        to: int
        term: int
        context: bytes = b""

    got = msgspec.msgpack.decode(msgspec.msgpack.encode(answer), type=OldHeartbeatResponse)
    assert got == OldHeartbeatResponse(2, 1, 3, b"")


# -- read traffic while a Ready is outstanding (RawNode.read_traffic) ---------------------------
def test_a_read_round_runs_while_the_leaders_write_is_in_progress() -> None:
    """The leader's Ready (a new entry) is handed out and not advanced: the disk is busy.  A
    read still gets its round and its read state from ``read_traffic``, not after the write;
    the entry's append waits for the next Ready as before."""
    c = Cluster()
    c.elect(1)
    leader = c.nodes[1]
    leader.propose(b"x")
    rd = leader.ready()  # its write "in progress"
    assert rd.entries
    leader.read_index(b"r")
    assert not leader.has_ready()  # (one Ready at a time)
    traffic = leader.read_traffic()
    assert traffic is not None and traffic.read_states == []
    hbs = heartbeats(traffic.messages)
    assert set(hbs) == {2, 3} and all(isinstance(m, Heartbeat) for m in traffic.messages)
    leader.step(echo(hbs[2]))  # a quorum: the leader and node 2
    traffic = leader.read_traffic()
    assert traffic is not None and traffic.messages == []
    assert traffic.read_states == [ReadState(1, b"r")]  # the commit index when it arrived
    assert leader.read_traffic() is None  # nothing more
    persist(c.storage[1], rd)
    leader.advance(rd)
    c.send(rd.messages + rd.persisted_messages)
    c.stabilize()
    assert c.raft(1).log.committed == 2  # the entry went its usual way


def test_a_followers_heartbeat_answer_leaves_during_its_write() -> None:
    c = Cluster()
    c.elect(1)
    c.capture_types = (AppendEntries,)
    c.propose(1, b"x")
    follower = c.nodes[2]
    follower.step(of_type(c.captured, AppendEntries, to=2)[0])
    rd = follower.ready()  # the follower's write of the entry, in progress
    assert rd.entries and rd.persisted_messages  # its append answer waits for the write
    follower.step(Heartbeat(1, 2, 1, 1, b"", False, 7))
    traffic = follower.read_traffic()
    assert traffic is not None
    assert traffic.messages == [HeartbeatResponse(2, 1, 1, b"", 7)]
    follower.step(ReadIndex(3, 2, 1, b"not-a-leader"))  # dropped by a follower: nothing
    assert follower.read_traffic() is None


def test_no_read_traffic_while_a_new_term_or_vote_is_being_written() -> None:
    """A message carries the node's term: nothing leaves before a new term and vote are
    durable, read traffic included."""
    c = Cluster()
    c.elect(1)
    voter = c.nodes[3]
    voter.step(RequestVote(2, 3, 2, c.raft(3).log.last_index(), 1, transfer=True))
    rd = voter.ready()
    assert rd.hard_state is not None and (rd.hard_state.term, rd.hard_state.vote) == (2, 2)
    voter.step(Heartbeat(2, 3, 2, 0, b"", False, 1))  # the new leader, at once
    assert voter.read_traffic() is None
    persist(c.storage[3], rd)
    voter.advance(rd)
    assert voter.has_ready() and of_type(voter.ready().messages, HeartbeatResponse)


def test_read_traffic_needs_an_outstanding_ready() -> None:
    c = Cluster()
    c.elect(1)
    with pytest.raises(InvariantViolation):
        c.nodes[1].read_traffic()
