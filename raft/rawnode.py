"""RawNode: the driver's handle on one group's core, and the numbered Ready it hands out.

The Ready contract (the driver's loop for one group):

    if node.has_ready():
        rd = node.ready()
        send(rd.messages)                      # now, in parallel with the write below
        persist(rd.snapshot, rd.entries, rd.hard_state)   # fsync when rd.must_sync
        send(rd.persisted_messages)            # only once the write above is durable
        apply(rd.snapshot, rd.committed_entries); serve(rd.read_states)
        node.advance(rd)

At most one Ready is outstanding: ``ready()`` again before ``advance`` raises.  Between
``ready()`` and ``advance()`` the driver may keep calling ``step``/``tick``/``propose`` (the
network and the clock go on while the disk works); whatever they produce goes into the next Ready,
except the read traffic, which ``read_traffic()`` hands out at once (reads never wait for a
write: raft/readonly.py).
"""

from __future__ import annotations

import msgspec

from .core import CampaignKind, Config, Raft, ReadState, Role, SoftState
from .errors import InvariantViolation
from .messages import (
    AppendEntries,
    ConfChange,
    Entry,
    HardState,
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
from .storage import Storage

# Messages that promise nothing about this Ready's entries: a leader's messages (its term is
# durable; followers count only their own persisted entries), heartbeat answers and read
# requests.  Unless the term or vote changed, they may leave before the Ready is persisted.
_SEND_NOW = (
    AppendEntries,
    Heartbeat,
    InstallSnapshot,
    TimeoutNow,
    ReadIndexResponse,
    HeartbeatResponse,
    ReadIndex,
)


# Read traffic: a read round's heartbeats and their answers, ReadIndex requests and answers.
# None of them promises anything about entries (a leader's heartbeat carries a commit index the
# follower has acknowledged), so they need not wait for an outstanding Ready's write.
_READ_TRAFFIC = (Heartbeat, HeartbeatResponse, ReadIndex, ReadIndexResponse)


class ReadTraffic:
    """What ``RawNode.read_traffic`` hands out while a Ready is outstanding."""

    __slots__ = ("messages", "read_states")

    def __init__(self, messages: list[Message], read_states: list[ReadState]) -> None:
        self.messages = messages  # send now
        self.read_states = read_states  # serve once their index is applied


class Ready:
    """One group's output (a plain class, not a msgspec Struct: it is never encoded, and
    compiled it is a native object, cheap to make once per group per driver pass)."""

    def __init__(
        self,
        number: int,
        soft_state: SoftState | None,
        hard_state: HardState | None,
        entries: list[Entry],
        snapshot: Snapshot | None,
        committed_entries: list[Entry],
        messages: list[Message],
        persisted_messages: list[Message],
        read_states: list[ReadState],
        must_sync: bool,
    ) -> None:
        self.number = number
        self.soft_state = soft_state  # set when leader or role changed
        self.hard_state = hard_state  # set when term, vote or commit changed: persist it
        self.entries = entries  # persist (append, replacing any conflicting suffix)
        self.snapshot = snapshot  # persist and restore the state machine from it
        self.committed_entries = committed_entries  # apply, after the persist above
        self.messages = messages  # send now
        self.persisted_messages = persisted_messages  # send only after the persist above
        self.read_states = read_states
        self.must_sync = must_sync  # the persist must be fsynced (entries, snapshot, term, vote)

    def __repr__(self) -> str:
        return (
            f"Ready({self.number}, soft={self.soft_state!r}, hard={self.hard_state!r}, "
            f"entries={len(self.entries)}, snapshot={self.snapshot is not None}, "
            f"committed={len(self.committed_entries)}, messages={len(self.messages)}"
            f"+{len(self.persisted_messages)}, reads={len(self.read_states)}, "
            f"must_sync={self.must_sync})"
        )


class RawNode:
    def __init__(self, config: Config, storage: Storage) -> None:
        self.raft = Raft(config, storage)
        self._prev_soft = self.raft.soft_state()
        self._prev_hard = self.raft.hard_state()
        self._durable_hard = self._prev_hard  # what storage holds, as of the last advance
        self._number = 0
        self._outstanding: Ready | None = None

    # -- inputs ------------------------------------------------------------------------------
    def tick(self) -> None:
        self.raft.tick()

    def step(self, m: Message) -> None:
        self.raft.step(m)

    def campaign(self) -> None:
        """Start an election now (with pre-vote when enabled)."""
        self.raft.hup()

    def propose(self, data: bytes) -> int:
        return self.raft.propose(data)

    def set_election_timeout(self, ticks: int) -> None:
        """See ``Raft.set_election_timeout`` (a host's campaign back-off)."""
        self.raft.set_election_timeout(ticks)

    def heartbeat_next_tick(self) -> None:
        """See ``Raft.heartbeat_next_tick`` (a host saw a peer connect)."""
        self.raft.heartbeat_next_tick()

    def quiesce(self, followers: list[int]) -> None:
        """A leader tells caught-up ``followers`` it stops heartbeating (``Raft.send_quiesce``)."""
        self.raft.send_quiesce(followers)

    def wake(self) -> None:
        """The group ticks again after quiescence (``Raft.wake``)."""
        self.raft.wake()

    def propose_conf_change(self, change: ConfChange) -> int:
        return self.raft.propose_conf_change(change)

    def transfer_leader(self, to: int) -> None:
        self.raft.transfer_leader(to)

    def read_index(self, context: bytes) -> None:
        self.raft.read_index(context)

    def report_unreachable(self, to: int) -> None:
        self.raft.report_unreachable(to)

    def report_snapshot(self, to: int, failed: bool) -> None:
        self.raft.report_snapshot(to, failed)

    # -- outputs -----------------------------------------------------------------------------
    @property
    def outstanding(self) -> bool:
        """A Ready was handed out and not advanced yet."""
        return self._outstanding is not None

    def has_ready(self) -> bool:
        if self._outstanding is not None:
            return False
        r = self.raft
        if r.msgs or r.read_states or r.bcast_pending or r.read_only.round_wanted():
            return True
        log = r.log
        if log.unstable.entries or log.unstable.snapshot is not None or log.has_next_committed():
            return True
        soft, hard = self._prev_soft, self._prev_hard  # compared field by field: no allocation
        return (
            r.lead != soft.lead
            or r.role is not soft.role
            or r.term != hard.term
            or r.vote != hard.vote
            or log.committed != hard.commit
        )

    def ready(self) -> Ready:
        if self._outstanding is not None:
            raise InvariantViolation(f"Ready {self._outstanding.number} was not advanced")
        r = self.raft
        r.flush_proposals()
        r.flush_reads()
        prev_soft, prev = self._prev_soft, self._prev_hard
        # New SoftState / HardState objects only when a field changed (most Readies: none).
        soft_changed = r.lead != prev_soft.lead or r.role is not prev_soft.role
        soft = r.soft_state() if soft_changed else prev_soft
        vote_changed = r.term != prev.term or r.vote != prev.vote
        hard_changed = vote_changed or r.log.committed != prev.commit
        hard = r.hard_state() if hard_changed else prev
        now: list[Message] = []
        later: list[Message] = []
        for m in r.msgs:
            if vote_changed:
                later.append(m)  # nothing leaves before the new term and vote are durable
            elif isinstance(m, _SEND_NOW) or (
                isinstance(m, RequestVote | VoteResponse) and m.pre_vote
            ):
                now.append(m)
            else:
                later.append(m)
        unstable = r.log.unstable
        self._number += 1
        rd = Ready(
            number=self._number,
            soft_state=soft if soft_changed else None,
            hard_state=hard if hard_changed else None,
            entries=list(unstable.entries),
            snapshot=unstable.snapshot,
            committed_entries=r.log.next_committed(),
            messages=now,
            persisted_messages=later,
            read_states=r.read_states,
            must_sync=vote_changed or bool(unstable.entries) or unstable.snapshot is not None,
        )
        r.msgs = []
        r.read_states = []
        self._prev_soft = soft
        self._prev_hard = hard
        self._outstanding = rd
        return rd

    def read_traffic(self) -> ReadTraffic | None:
        """While a Ready is outstanding: the read traffic that need not wait for its write, or
        None.  The read round that queued reads wait for starts now (``Raft.flush_reads``); its
        heartbeats, heartbeat answers, ReadIndex requests and answers leave at once, and the
        read states are served once applied, so a read never waits for a write.  These messages
        carry the node's term: they leave early only while the term and vote are those already
        durable (the outstanding Ready changed neither).  Other messages keep their order and
        wait for the next Ready."""
        if self._outstanding is None:
            raise InvariantViolation("read_traffic without an outstanding Ready: use ready()")
        r = self.raft
        durable = self._durable_hard
        if r.term != durable.term or r.vote != durable.vote:
            return None
        r.flush_reads()
        if not r.read_states and not any(isinstance(m, _READ_TRAFFIC) for m in r.msgs):
            return None
        now: list[Message] = []
        later: list[Message] = []
        for m in r.msgs:
            (now if isinstance(m, _READ_TRAFFIC) else later).append(m)
        r.msgs = later
        traffic = ReadTraffic(now, r.read_states)
        r.read_states = []
        return traffic

    def advance(self, rd: Ready) -> None:
        """The driver persisted, sent and applied ``rd``."""
        if rd is not self._outstanding:
            raise InvariantViolation(f"advance of Ready {rd.number} that is not outstanding")
        self._outstanding = None
        r = self.raft
        if rd.hard_state is not None:
            self._durable_hard = rd.hard_state
        if rd.snapshot is not None:
            index = rd.snapshot.meta.index
            r.log.unstable.stable_snap_to(index)
            if index > r.log.applied:
                r.log.applied = index
        if rd.entries:
            last = rd.entries[-1]
            r.log.unstable.stable_to(last.index, last.term)
        r.on_persisted(self._durable_hard)
        if rd.committed_entries:
            r.apply_committed(rd.committed_entries)

    # -- views -------------------------------------------------------------------------------
    def status(self) -> Status:
        r = self.raft
        return Status(
            id=r.id,
            role=r.role.value,
            term=r.term,
            vote=r.vote,
            lead=r.lead,
            commit=r.log.committed,
            applied=r.log.applied,
            last_index=r.log.last_index(),
            voters=r.voters,
            learners=r.learners,
            progress={i: (p.state.value, p.match, p.next) for i, p in r.prs.items()}
            if r.role is Role.LEADER
            else {},
            conf_pending=r.pending_conf_index > r.log.applied,
        )


class Status(msgspec.Struct, frozen=True):
    id: int
    role: str
    term: int
    vote: int
    lead: int
    commit: int
    applied: int
    last_index: int
    voters: tuple[int, ...]
    learners: tuple[int, ...]
    progress: dict[int, tuple[str, int, int]]  # (on a leader) member -> (state, match, next)
    conf_pending: bool = False  # a membership change is in the log, not applied yet


__all__ = [
    "CampaignKind",
    "Config",
    "RawNode",
    "ReadState",
    "ReadTraffic",
    "Ready",
    "SoftState",
    "Status",
]
