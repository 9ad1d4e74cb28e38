"""The Raft state machine of one group: pure, stepped by messages and ticks.

Rules of this file:
- No I/O, no clock, no global randomness.  Time is ``tick()``; randomness is ``self.rng``, a
  ``random.Random`` seeded from the configuration.
- Output is only ever appended to ``self.msgs`` and ``self.read_states``; RawNode hands them to
  the driver in a Ready.  Nothing here knows whether anything was persisted except through
  ``on_persisted`` (called by RawNode.advance).
- Each role has its own ``tick`` and ``step`` handler, swapped by ``become_*``; the handlers read
  as the paper's rules for that role.

  role           | tick                              | step (same-term messages)
  ---------------+-----------------------------------+-------------------------------------------
  FOLLOWER       | election timer -> hup             | append/heartbeat/snapshot from the leader,
                 |                                   | TimeoutNow, ReadIndexResponse
  PRE_CANDIDATE  | election timer -> hup             | pre-vote answers; a leader's message
  CANDIDATE      | election timer -> hup             | vote answers; a leader's message
  LEADER         | heartbeats, check-quorum, aborts  | append/heartbeat answers, ReadIndex
                 | a stalled transfer                |

Higher-term and lower-term messages are handled in ``step`` before role dispatch (§5.1).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from .errors import (
    Compacted,
    ConfigInvalid,
    InvariantViolation,
    NotLeader,
    ProposalDropped,
    SnapshotTemporarilyUnavailable,
    Unavailable,
    check,
)
from .log import RaftLog
from .messages import (
    NONE,
    AppendEntries,
    AppendResponse,
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
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
    decode_conf_change,
    encode_conf_change,
)
from .progress import Progress, ProgressState
from .quorum import VoteResult, committed_index, majority, vote_result
from .readonly import ReadOnly
from .storage import Storage, entries_bytes


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class CampaignKind(enum.Enum):
    PRE_ELECTION = "pre_election"
    ELECTION = "election"
    TRANSFER = "transfer"


class ReadState(msgspec.Struct, frozen=True):
    """A linearizable read may be served once the local applied index reaches ``index``."""

    index: int
    context: bytes


class SoftState(msgspec.Struct, frozen=True):
    """Volatile state the application may want to observe (not persisted)."""

    lead: int
    role: Role


@dataclass(frozen=True)
class Config:
    """Configuration of one group replica.  Sizes are payload bytes; times are ticks."""

    id: int
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    seed: int = 0
    pre_vote: bool = True
    check_quorum: bool = True
    max_size_per_msg: int = 1 << 20
    max_inflight_msgs: int = 256
    max_inflight_bytes: int = 32 << 20
    max_uncommitted_bytes: int = 64 << 20
    max_committed_bytes_per_ready: int = 64 << 20
    max_pending_reads: int = 4096
    snapshot_timeout_ticks: int = 100
    # After the commit index advances, tell every follower at once (an append, empty if need
    # be), as the paper does.  False: followers learn it with the next append or heartbeat,
    # which saves two messages per follower per commit under load (commit is liveness only).
    commit_broadcast: bool = True
    # Skip the heartbeat to a busy follower (sent appends and acknowledging them since the
    # last round, and already sent the commit a heartbeat would carry) and the empty append a
    # heartbeat answer would trigger while it keeps up.  Under load that cuts the messages per
    # entry by a third; a message dropped on the way is found out a round or two later.
    skip_busy_heartbeats: bool = False
    # The replica lives on a quiescing host (raft/multi.py): a quiesce heartbeat it accepts
    # (``accepts_quiesce``) gets no answer; the host stops ticking the group instead.
    quiesce: bool = False
    applied: int = 0  # on restart: the index the application has already applied

    def validate(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ConfigInvalid(f"raft config: {what}")

        need(self.id > NONE, "id must be positive")
        need(self.heartbeat_ticks > 0, "heartbeat_ticks must be positive")
        need(
            self.election_ticks > self.heartbeat_ticks, "election_ticks must exceed heartbeat_ticks"
        )
        need(self.max_size_per_msg > 0, "max_size_per_msg must be positive")
        need(self.max_inflight_msgs > 0, "max_inflight_msgs must be positive")
        need(self.max_inflight_bytes > 0, "max_inflight_bytes must be positive")
        need(self.max_uncommitted_bytes > 0, "max_uncommitted_bytes must be positive")
        need(
            self.max_committed_bytes_per_ready > 0, "max_committed_bytes_per_ready must be positive"
        )
        need(self.max_pending_reads > 0, "max_pending_reads must be positive")
        need(self.snapshot_timeout_ticks > 0, "snapshot_timeout_ticks must be positive")
        need(self.applied >= 0, "applied must not be negative")


_LEADER_MESSAGES = (AppendEntries, Heartbeat, InstallSnapshot)


class Raft:
    def __init__(self, config: Config, storage: Storage) -> None:
        config.validate()
        self.cfg = config
        self.id = config.id
        self.rng = random.Random(f"raft:{config.seed}:{config.id}")
        self.log = RaftLog(storage, config.max_committed_bytes_per_ready)
        self.term = 0
        self.vote = NONE
        self.lead = NONE
        self.role = Role.FOLLOWER
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self.voters: tuple[int, ...] = ()
        self.learners: tuple[int, ...] = ()
        self.prs: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = config.election_ticks
        self.lead_transferee = NONE
        self.pending_conf_index = 0
        self._removal_scan = (0, False)  # (pending_conf_index scanned, removes this node)
        self.uncommitted_bytes = 0
        self.read_only = ReadOnly(config.max_pending_reads)
        self.pending_reads: list[tuple[int, bytes]] = []  # reads waiting for a current-term commit
        self.bcast_pending = False
        self._tick: Callable[[], None] = self._tick_election
        self._step_role: Callable[[Message], None] = self._step_follower

        hard_state, conf_state = storage.initial_state()
        self._set_conf(conf_state)
        if hard_state != HardState():
            self._load_hard_state(hard_state)
        if config.applied > self.log.applied:
            # The application already applied entries past the snapshot: replay their
            # membership changes, which the storage's (snapshot) membership does not include.
            replay = self.log.slice(self.log.applied + 1, config.applied + 1, None)
            for e in replay:
                if e.type is EntryType.CONF_CHANGE:
                    self._set_conf(self._changed_conf(decode_conf_change(e.data)))
            self.log.applied_to(config.applied)
        self.become_follower(self.term, NONE)

    def __repr__(self) -> str:
        return (
            f"Raft(id={self.id}, role={self.role.value}, term={self.term}, lead={self.lead}, "
            f"vote={self.vote}, {self.log!r})"
        )

    # -- state views -----------------------------------------------------------------------
    @property
    def promotable(self) -> bool:
        return self.id in self.voters

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def soft_state(self) -> SoftState:
        return SoftState(self.lead, self.role)

    def conf_state(self) -> ConfState:
        return ConfState(self.voters, self.learners)

    def committed_entry_in_current_term(self) -> bool:
        return self.log.term_or_zero(self.log.committed) == self.term

    def _load_hard_state(self, hs: HardState) -> None:
        if hs.commit > self.log.last_index():
            raise InvariantViolation(
                f"hard state commit {hs.commit} beyond the last index {self.log.last_index()}: "
                "was the log truncated or lost?"
            )
        self.term = hs.term
        self.vote = hs.vote
        # The commit index need not be durable: it may lag the snapshot we restarted from.
        self.log.committed = max(hs.commit, self.log.committed)

    # -- sending -----------------------------------------------------------------------------
    def _send(self, m: Message) -> None:
        self.msgs.append(m)

    def send_append(self, to: int, send_if_empty: bool = True) -> bool:
        """Send the entries ``to`` needs (or a snapshot); False if nothing was sent."""
        pr = self.prs[to]
        if pr.is_paused():
            return False
        prev_index = pr.next - 1
        try:
            prev_term = self.log.term(prev_index)
            entries = self.log.entries(pr.next, self.cfg.max_size_per_msg)
        except Compacted:
            return self._send_snapshot(to, pr)
        except Unavailable as e:
            raise InvariantViolation(f"progress of {to} beyond the log: {pr!r}") from e
        if entries and len(self.voters) < 3:
            entries = self._only_persisted(entries)
        if not entries and not send_if_empty:
            return False
        commit = self.log.committed
        self._send(AppendEntries(self.id, to, self.term, prev_index, prev_term, entries, commit))
        pr.sent_entries(entries[-1].index if entries else None, entries_bytes(entries))
        pr.contacted = True
        if commit > pr.sent_commit:
            pr.sent_commit = commit
        return True

    def _only_persisted(self, entries: list[Entry]) -> list[Entry]:
        """With fewer than three voters, no parallel write: send only what we persisted.

        Membership changes take effect when applied, so right after a group grows from one
        voter to two, or shrinks from two to one, one of the two nodes may not know the change
        committed and needs the other's vote, which the other grants only to a log at least as
        up to date as its own.  If the other held entries the leader lost in a crash, neither
        could ever win.  Sending only persisted entries keeps every other log within the
        leader's durable one.  (With three or more voters the remaining voters always form a
        majority of the old membership, so the parallel write stays.)
        """
        cap = self.log.persisted_index()
        if entries[-1].index <= cap:
            return entries
        return [e for e in entries if e.index <= cap]

    def _send_snapshot(self, to: int, pr: Progress) -> bool:
        if not pr.recent_active:
            return False  # wait until it answers before shipping a whole snapshot
        try:
            snap = self.log.snapshot()
        except SnapshotTemporarilyUnavailable:
            return False
        check(snap.meta.index > 0, "need a non-empty snapshot to send")
        pr.become_snapshot(snap.meta.index)
        self._send(InstallSnapshot(self.id, to, self.term, snap))
        return True

    def _after_commit(self) -> None:
        if self.cfg.commit_broadcast:
            self.bcast_append()
        else:
            for to in self.prs:
                if to != self.id:
                    self.send_append(to, send_if_empty=False)

    def bcast_append(self) -> None:
        for to in self.prs:
            if to != self.id:
                self.send_append(to)

    def flush_proposals(self) -> None:
        """Send proposals made since the last flush (batched into as few appends as possible)."""
        if self.bcast_pending:
            self.bcast_pending = False
            if self.role is Role.LEADER:
                self.bcast_append()

    def flush_reads(self) -> None:
        """Start the heartbeat round that the reads queued since the last one wait for: the
        reads that arrive in one Ready share one round (RawNode.ready calls this)."""
        if self.role is Role.LEADER and self.read_only.round_wanted():
            self.bcast_heartbeat()

    def bcast_heartbeat(self) -> None:
        """Heartbeat every follower: the next read round (raft/readonly.py).  With
        ``skip_busy_heartbeats`` and no read waiting, skip a busy follower: it was sent appends
        and acknowledged appends since the last round, and was already sent the commit index a
        heartbeat would tell it.  Those appends reset its election timer and their answers
        count for check-quorum: the heartbeat would carry nothing new (under load, most of
        them).  A waiting read needs every voter's answer, so then nobody is skipped."""
        committed = self.log.committed
        read_only = self.read_only
        round_ = read_only.start_round(self.id)
        skip_busy = self.cfg.skip_busy_heartbeats and not read_only.queue
        for to, pr in self.prs.items():
            if to == self.id:
                continue
            commit = min(pr.match, committed)
            busy = pr.contacted and pr.acked
            pr.contacted = False
            pr.acked_before = pr.acked
            pr.acked = False
            if skip_busy and busy and pr.sent_commit >= commit:
                continue
            self._send(Heartbeat(self.id, to, self.term, commit, b"", False, round_))
            if commit > pr.sent_commit:
                pr.sent_commit = commit
        if read_only.queue:
            self._release_reads()  # our own answer may complete a quorum (e.g. voters shrank)

    def send_quiesce(self, to: list[int]) -> None:
        """Tell caught-up followers that this leader stops heartbeating (raft/multi.py)."""
        check(self.role is Role.LEADER, "only a leader quiesces")
        for f in to:
            commit = min(self.prs[f].match, self.log.committed)
            self._send(Heartbeat(self.id, f, self.term, commit, b"", True))

    def owed_commits(self, group: int, out: dict[int, list[int]]) -> None:
        """A leader's commit notices (raft/multi.py): for each follower owed a commit index no
        append or heartbeat has told it (``min(match, committed)``, what a heartbeat would
        carry), append ``group, term, commit`` to ``out[follower]``, and count it as sent.
        With ``commit_broadcast`` off a follower otherwise learns it only with the group's
        next append or heartbeat round, so it applies (and pushes to the clients it holds) a
        committed entry up to a heartbeat interval late."""
        if self.role is not Role.LEADER:
            return
        committed = self.log.committed
        me, term = self.id, self.term
        for to, pr in self.prs.items():
            if to == me:
                continue
            commit = pr.match if pr.match < committed else committed
            if commit > pr.sent_commit:
                pr.sent_commit = commit
                owed = out.get(to)
                if owed is None:
                    out[to] = [group, term, commit]
                else:
                    owed += (group, term, commit)

    def commit_notice(self, frm: int, term: int, commit: int) -> bool:
        """A commit notice from ``frm`` (``owed_commits`` on its side): taken as a heartbeat's
        commit index, and only by a follower of ``frm`` in ``term``: there ``commit`` is at
        most what this replica acknowledged to that leader in that term, which it never
        truncates.  Anything else (a stale term, a leader not yet heard from, a candidate) is
        ignored: the next append or heartbeat carries the commit anyway.  Whether the commit
        index moved."""
        if (
            self.role is not Role.FOLLOWER
            or term != self.term
            or frm != self.lead
            or commit <= self.log.committed
        ):
            return False
        self.log.commit_to(commit)
        return True

    def wake(self) -> None:
        """The group resumes ticking after quiescence: start its timers afresh.

        A follower gives its leader a full election timeout again (and keeps rejecting votes
        while in that lease); a leader treats every member as recently active, so the first
        check-quorum after waking judges only answers received since.
        """
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        if self.role is Role.LEADER:
            for pr in self.prs.values():
                pr.recent_active = True

    def set_election_timeout(self, ticks: int) -> None:
        """Campaign after ``ticks`` ticks without a leader (at least the configured election
        timeout) instead of the drawn timeout, until the next reset draws one again
        (raft/multi.py's back-off after failed campaigns)."""
        check(ticks >= self.cfg.election_ticks, f"election timeout {ticks} below the configured")
        self.randomized_election_timeout = ticks

    def heartbeat_next_tick(self) -> None:
        """A leader heartbeats at its next tick instead of at the end of its interval (a peer
        just connected: raft/multi.py).  Nothing for other roles."""
        if self.role is Role.LEADER:
            self.heartbeat_elapsed = self.cfg.heartbeat_ticks

    def idle_leader(self) -> bool:
        """A leader with nothing in flight: all it has is committed and applied, and no
        transfer, read or membership change is pending.  Followers are judged by the caller."""
        log = self.log
        last = log.last_index()
        return (
            self.role is Role.LEADER
            and not self.msgs
            and not self.bcast_pending
            and self.lead_transferee == NONE
            and not self.pending_reads
            and not self.read_only.queue
            and log.committed == last
            and log.applied == last
            and self.pending_conf_index <= log.applied
            and self.prs[self.id].match == last
        )

    def _send_timeout_now(self, to: int) -> None:
        self._send(TimeoutNow(self.id, to, self.term))

    # -- role changes ------------------------------------------------------------------------
    def _reset(self, term: int) -> None:
        if self.term != term:
            check(term > self.term, f"term going back from {self.term} to {term}")
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        et = self.cfg.election_ticks
        self.randomized_election_timeout = et + self.rng.randrange(et)
        self.lead_transferee = NONE
        self.votes = {}
        last = self.log.last_index()
        for id_, old in list(self.prs.items()):
            pr = Progress(last + 1, self.cfg.max_inflight_msgs, self.cfg.max_inflight_bytes)
            pr.is_learner = old.is_learner
            if id_ == self.id:
                pr.match = self._persisted_for_self()
                pr.recent_active = True
            self.prs[id_] = pr
        self.pending_conf_index = 0
        self.uncommitted_bytes = 0
        self.read_only = ReadOnly(self.cfg.max_pending_reads)
        self.pending_reads = []
        self.bcast_pending = False

    def _persisted_for_self(self) -> int:
        if self.log.unstable.snapshot is not None:
            return 0
        return min(self.log.persisted_index(), self.log.last_index())

    def become_follower(self, term: int, lead: int) -> None:
        self._reset(term)
        self.lead = lead
        self.role = Role.FOLLOWER
        self._tick = self._tick_election
        self._step_role = self._step_follower

    def become_pre_candidate(self) -> None:
        check(self.role is not Role.LEADER, "leader cannot become pre-candidate")
        # Pre-vote changes neither term nor vote (thesis §9.6).
        self.votes = {}
        self.lead = NONE
        self.role = Role.PRE_CANDIDATE
        self._tick = self._tick_election
        self._step_role = self._step_candidate

    def become_candidate(self) -> None:
        check(self.role is not Role.LEADER, "leader cannot become candidate")
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE
        self._tick = self._tick_election
        self._step_role = self._step_candidate

    def become_leader(self) -> None:
        check(self.role is not Role.FOLLOWER, "follower cannot become leader directly")
        self._reset(self.term)
        self.lead = self.id
        self.role = Role.LEADER
        self._tick = self._tick_heartbeat
        self._step_role = self._step_leader
        self.prs[self.id].become_replicate()
        # No membership change until this term's no-op is applied (one at a time, and never on
        # top of changes a previous leader left uncommitted).
        self._append([Entry(self.term, 0)])
        self.pending_conf_index = self.log.last_index()

    # -- elections ---------------------------------------------------------------------------
    def hup(self, kind: CampaignKind | None = None) -> None:
        """Start an election (pre-vote first when enabled), if this node may."""
        if self.role is Role.LEADER or not self.promotable:
            return
        if self._has_unapplied_conf_change():
            return  # its view of the membership is not final yet
        if kind is None:
            kind = CampaignKind.PRE_ELECTION if self.cfg.pre_vote else CampaignKind.ELECTION
        self._campaign(kind)

    def _has_unapplied_conf_change(self) -> bool:
        lo = max(self.log.applied + 1, self.log.first_index())
        if self.log.committed < lo:
            return False
        entries = self.log.slice(lo, self.log.committed + 1, None)
        return any(e.type is EntryType.CONF_CHANGE for e in entries)

    def _campaign(self, kind: CampaignKind) -> None:
        if kind is CampaignKind.PRE_ELECTION:
            self.become_pre_candidate()
            vote_term = self.term + 1
        else:
            self.become_candidate()
            vote_term = self.term
        if self._poll(self.id, True) is VoteResult.WON:
            if kind is CampaignKind.PRE_ELECTION:
                self._campaign(CampaignKind.ELECTION)
            # else: our own vote is a majority; we lead once it is durable (on_persisted).
            return
        last_index = self.log.last_index()
        last_term = self.log.last_term()
        pre = kind is CampaignKind.PRE_ELECTION
        transfer = kind is CampaignKind.TRANSFER
        for v in self.voters:
            if v != self.id:
                self._send(RequestVote(self.id, v, vote_term, last_index, last_term, pre, transfer))

    def _poll(self, frm: int, granted: bool) -> VoteResult:
        self.votes.setdefault(frm, granted)
        return vote_result(self.voters, self.votes)

    def _handle_vote_request(self, m: RequestVote) -> None:
        # §5.2, §5.4.1: one vote per term, only for a log at least as up to date as ours.
        can_vote = (
            self.vote == m.frm
            or (self.vote == NONE and self.lead == NONE)
            or (m.pre_vote and m.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(m.last_index, m.last_term):
            self._send(VoteResponse(self.id, m.frm, m.term, False, m.pre_vote))
            if not m.pre_vote:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(VoteResponse(self.id, m.frm, self.term, True, m.pre_vote))

    # -- ticks -------------------------------------------------------------------------------
    def tick(self) -> None:
        self._tick()

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable and self.election_elapsed >= self.randomized_election_timeout:
            self.election_elapsed = 0
            self.hup()

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        for pr in self.prs.values():
            if pr.state is ProgressState.SNAPSHOT:
                pr.snapshot_elapsed += 1
                if pr.snapshot_elapsed > self.cfg.snapshot_timeout_ticks:
                    pr.become_probe()  # the snapshot (or its answer) was lost: try again
        if self.election_elapsed >= self.cfg.election_ticks:
            self.election_elapsed = 0
            if self.cfg.check_quorum and not self._quorum_active():
                self.become_follower(self.term, NONE)  # §6.2 check-quorum: step down
                return
            if self.lead_transferee != NONE:
                self.lead_transferee = NONE  # the transfer did not finish in time: abort it
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            self.bcast_heartbeat()

    def _quorum_active(self) -> bool:
        active = 0
        for id_, pr in self.prs.items():
            if id_ == self.id:
                if not pr.is_learner:
                    active += 1
                continue
            if pr.recent_active and not pr.is_learner:
                active += 1
            pr.recent_active = False
        return active >= majority(len(self.voters))

    # -- stepping ----------------------------------------------------------------------------
    def step(self, m: Message) -> None:
        if m.to != self.id:
            return
        if m.term > self.term:
            if isinstance(m, RequestVote):
                in_lease = (
                    self.cfg.check_quorum
                    and self.lead != NONE
                    and self.election_elapsed < self.cfg.election_ticks
                )
                if in_lease and not m.transfer:
                    return  # leader stickiness (§9.6): we heard from a leader recently
            if isinstance(m, RequestVote) and m.pre_vote:
                pass  # a pre-vote never changes our term
            elif isinstance(m, VoteResponse) and m.pre_vote and not m.reject:
                pass  # granted pre-votes carry the future term; we bump it when we win
            elif isinstance(m, _LEADER_MESSAGES):
                self.become_follower(m.term, m.frm)
            else:
                self.become_follower(m.term, NONE)
        elif m.term < self.term:
            if (self.cfg.check_quorum or self.cfg.pre_vote) and isinstance(
                m, AppendEntries | Heartbeat
            ):
                # A stale leader (e.g. just healed from a partition) learns our term and steps
                # down; without this it could never rejoin under pre-vote / check-quorum.
                self._send(AppendResponse(self.id, m.frm, self.term, 0))
            elif isinstance(m, RequestVote) and m.pre_vote:
                self._send(VoteResponse(self.id, m.frm, self.term, True, True))
            return
        if isinstance(m, RequestVote):
            self._handle_vote_request(m)
            return
        self._step_role(m)

    def _step_follower(self, m: Message) -> None:
        match m:
            case AppendEntries():
                self.election_elapsed = 0
                self.lead = m.frm
                self._handle_append(m)
            case Heartbeat():
                self.election_elapsed = 0
                self.lead = m.frm
                self._handle_heartbeat(m)
            case InstallSnapshot():
                self.election_elapsed = 0
                self.lead = m.frm
                self._handle_snapshot(m)
            case TimeoutNow():
                self.hup(CampaignKind.TRANSFER)  # §3.10: campaign at once, skipping pre-vote
            case ReadIndexResponse():
                self.read_states.append(ReadState(m.index, m.context))
            case _:
                pass

    def _step_candidate(self, m: Message) -> None:
        match m:
            case AppendEntries():
                self.become_follower(m.term, m.frm)
                self._handle_append(m)
            case Heartbeat():
                self.become_follower(m.term, m.frm)
                self._handle_heartbeat(m)
            case InstallSnapshot():
                self.become_follower(m.term, m.frm)
                self._handle_snapshot(m)
            case VoteResponse():
                if m.pre_vote != (self.role is Role.PRE_CANDIDATE):
                    return  # an answer to an earlier round
                result = self._poll(m.frm, not m.reject)
                if result is VoteResult.WON:
                    if self.role is Role.PRE_CANDIDATE:
                        self._campaign(CampaignKind.ELECTION)
                    else:
                        self.become_leader()
                        self.bcast_append()
                elif result is VoteResult.LOST:
                    self.become_follower(self.term, NONE)
            case _:
                pass

    def _step_leader(self, m: Message) -> None:
        match m:
            case AppendResponse():
                self._handle_append_response(m)
            case HeartbeatResponse():
                self._handle_heartbeat_response(m)
            case ReadIndex():
                if m.frm in self.prs:
                    self._leader_read(m.frm, m.context)
            case AppendEntries() | Heartbeat() | InstallSnapshot():
                raise InvariantViolation(f"two leaders in term {self.term}: {self.id} and {m.frm}")
            case _:
                pass

    # -- follower handlers -------------------------------------------------------------------
    def _handle_append(self, m: AppendEntries) -> None:
        if m.prev_index < self.log.committed:
            self._send(AppendResponse(self.id, m.frm, self.term, self.log.committed))
            return
        last_new = self.log.maybe_append(m.prev_index, m.prev_term, m.commit, m.entries)
        if last_new is not None:
            self._send(AppendResponse(self.id, m.frm, self.term, last_new))
            return
        # §5.3 with the thesis' optimisation: tell the leader where our log may agree.
        hint = min(m.prev_index, self.log.last_index())
        hint, hint_term = self.log.find_conflict_by_term(hint, m.prev_term)
        self._send(AppendResponse(self.id, m.frm, self.term, m.prev_index, True, hint, hint_term))

    def _handle_heartbeat(self, m: Heartbeat) -> None:
        self.log.commit_to(m.commit)
        if self.cfg.quiesce and self.accepts_quiesce(m):
            # We go quiet with our leader: an answer would tell it nothing (it quiesced only
            # with us caught up, and ignores a plain answer of its term while quiescent).
            return
        self._send(HeartbeatResponse(self.id, m.frm, self.term, m.context, m.round))

    def accepts_quiesce(self, m: Heartbeat) -> bool:
        """A follower goes quiet with a quiesce heartbeat from its leader of this term when it
        holds exactly the leader's log, all of it committed."""
        return (
            m.quiesce
            and self.role is Role.FOLLOWER
            and self.term == m.term
            and self.lead == m.frm
            and self.log.last_index() == m.commit
            and self.log.committed == m.commit
        )

    def _handle_snapshot(self, m: InstallSnapshot) -> None:
        if self._restore(m.snapshot):
            self._send(AppendResponse(self.id, m.frm, self.term, self.log.last_index()))
        else:
            self._send(AppendResponse(self.id, m.frm, self.term, self.log.committed))

    def _restore(self, snap: Snapshot) -> bool:
        meta = snap.meta
        if meta.index <= self.log.committed:
            return False
        check(self.role is Role.FOLLOWER, "only a follower restores a snapshot")
        if self.log.match_term(meta.index, meta.term):
            self.log.commit_to(meta.index)  # we already hold it: just fast-forward the commit
            return False
        self.log.restore(snap)
        self._set_conf(meta.conf_state)
        return True

    # -- leader handlers ---------------------------------------------------------------------
    def _handle_append_response(self, m: AppendResponse) -> None:
        pr = self.prs.get(m.frm)
        if pr is None:
            return
        pr.recent_active = True
        if m.reject:
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decr_to(m.index, next_probe):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self.send_append(m.frm)
            return
        was_paused = pr.is_paused()
        if not (
            pr.maybe_update(m.index) or (pr.match == m.index and pr.state is ProgressState.PROBE)
        ):
            return
        pr.acked = True
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT and pr.match + 1 >= self.log.first_index():
            pr.become_probe()
            pr.become_replicate()
        elif pr.state is ProgressState.REPLICATE:
            pr.inflights.free_le(m.index)
        if self._maybe_commit():
            self._after_commit()
        elif was_paused:
            self.send_append(m.frm)
        while self.send_append(m.frm, send_if_empty=False):
            pass
        if m.frm == self.lead_transferee and pr.match == self.log.last_index():
            self._send_timeout_now(m.frm)  # §3.10: the target caught up

    def _handle_heartbeat_response(self, m: HeartbeatResponse) -> None:
        pr = self.prs.get(m.frm)
        if pr is None:
            return
        pr.recent_active = True
        pr.probe_sent = False
        if pr.state is ProgressState.REPLICATE and pr.inflights.full():
            pr.inflights.free_first_one()
        last = self.log.last_index()
        if pr.state is ProgressState.PROBE:
            self.send_append(m.frm)
        elif pr.match < last:
            # A follower that was sent all we have and acknowledged appends in this heartbeat
            # round or the one before is keeping up (its answer to this heartbeat often
            # overtakes the answer to an append it is still writing): an empty append would
            # only cost two messages.  One that went quiet gets one, so an append dropped on
            # the way (raft/transport.py drops them under backpressure) is found out.
            keeping_up = pr.acked or pr.acked_before
            if not (
                keeping_up
                and self.cfg.skip_busy_heartbeats
                and pr.state is ProgressState.REPLICATE
                and pr.next > last
            ):
                self.send_append(m.frm)
        # §6.4: the answer confirms every read queued before the round it answers (never by
        # context: a late answer to an earlier round confirms nothing newer).
        if not pr.is_learner and self.read_only.recv_ack(m.frm, m.round):
            self._release_reads()

    def _maybe_commit(self) -> bool:
        match = {id_: pr.match for id_, pr in self.prs.items()}
        index = committed_index(self.voters, match)
        # Figure 8: only an entry of the current term is committed by counting replicas.
        if not self.log.maybe_commit(index, self.term):
            return False
        if self.pending_reads:
            reads, self.pending_reads = self.pending_reads, []
            for frm, ctx in reads:
                self._leader_read(frm, ctx)
        return True

    def on_persisted(self, durable: HardState) -> None:
        """The driver persisted the log up to ``log.persisted_index()`` and ``durable``.

        A leader counts itself toward the commit quorum.  A candidate whose own vote is a
        majority (a single voter) becomes leader only now: a leader's term and vote are always
        durable before it acts, so a crash can never make it forget a term in which it led.
        """
        if (
            self.role is Role.CANDIDATE
            and (durable.term, durable.vote) == (self.term, self.id)
            and vote_result(self.voters, self.votes) is VoteResult.WON
        ):
            self.become_leader()
            self.bcast_append()
        if self.role is not Role.LEADER:
            return
        pr = self.prs.get(self.id)
        if pr is not None and pr.maybe_update(self._persisted_for_self()) and self._maybe_commit():
            self._after_commit()
        elif len(self.voters) < 3:
            for to in self.prs:  # entries held back until persisted (see _only_persisted)
                if to != self.id:
                    self.send_append(to, send_if_empty=False)

    # -- reads -------------------------------------------------------------------------------
    def read_index(self, context: bytes) -> None:
        """Ask for a linearizable read index; the answer arrives as a ReadState."""
        if self.role is Role.LEADER:
            self._leader_read(self.id, context, local=True)
        elif self.lead != NONE:
            self._send(ReadIndex(self.id, self.lead, self.term, context))
        else:
            raise ProposalDropped("no leader known to serve a read index")

    def _leader_read(self, frm: int, context: bytes, local: bool = False) -> None:
        if not self.committed_entry_in_current_term():
            # §6.4: a new leader does not know the commit index until it commits in its term.
            if len(self.pending_reads) >= self.cfg.max_pending_reads:
                if local:
                    raise ProposalDropped("too many reads waiting for the leader's first commit")
                return
            self.pending_reads.append((frm, context))
            return
        if self.voters == (self.id,):
            self._answer_read(frm, context, self.log.committed)
            return
        if self.read_only.full():
            if local:
                raise ProposalDropped("too many pending reads")
            return  # a remote request is dropped: its asker times out (docs/raft.md §8.7)
        # Confirmed by the next heartbeat round, which flush_reads starts with the next Ready.
        self.read_only.add_request(self.log.committed, frm, context)

    def _answer_read(self, frm: int, context: bytes, index: int) -> None:
        if frm == self.id:
            self.read_states.append(ReadState(index, context))
        else:
            self._send(ReadIndexResponse(self.id, frm, self.term, index, context))

    # -- proposals ---------------------------------------------------------------------------
    def _append(self, entries: list[Entry]) -> int:
        last = self.log.last_index()
        numbered = [Entry(self.term, last + 1 + i, e.type, e.data) for i, e in enumerate(entries)]
        return self.log.append(numbered)

    def _check_can_propose(self) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        if self.lead_transferee != NONE:
            raise ProposalDropped(f"leadership transfer to {self.lead_transferee} in progress")
        if self.id not in self.prs:
            raise ProposalDropped("this node was removed from the group")
        if self._self_removal_pending():
            # Keep our log no longer than the remaining voters' once the removal commits, so
            # one of them can win an election even before it learns of the commit.
            raise ProposalDropped("this node's removal from the group is pending")

    def _self_removal_pending(self) -> bool:
        if self.pending_conf_index <= self.log.applied:
            return False
        if self._removal_scan[0] != self.pending_conf_index:
            entries = self.log.slice(
                max(self.log.applied + 1, self.log.first_index()), self.pending_conf_index + 1, None
            )
            removing = any(
                e.type is EntryType.CONF_CHANGE
                and (cc := decode_conf_change(e.data)).type is ConfChangeType.REMOVE_NODE
                and cc.node_id == self.id
                for e in entries
            )
            self._removal_scan = (self.pending_conf_index, removing)
        return self._removal_scan[1]

    def propose(self, data: bytes) -> int:
        """Append ``data`` as a new entry; returns its index (committed later, or never)."""
        self._check_can_propose()
        size = len(data)
        if (
            self.uncommitted_bytes > 0
            and size > 0
            and self.uncommitted_bytes + size > self.cfg.max_uncommitted_bytes
        ):
            raise ProposalDropped("too many uncommitted bytes; retry when the log drains")
        return self._append_proposal(EntryType.NORMAL, data)

    def propose_conf_change(self, change: ConfChange) -> int:
        """Propose a single-server membership change (one at a time, §4.1)."""
        self._check_can_propose()
        if self.pending_conf_index > self.log.applied:
            raise ProposalDropped("a membership change is still pending")
        self._validate_conf_change(change)
        self.pending_conf_index = self._append_proposal(
            EntryType.CONF_CHANGE, encode_conf_change(change)
        )
        return self.pending_conf_index

    def _append_proposal(self, type_: EntryType, data: bytes) -> int:
        """Append one proposed entry, count it as uncommitted, send it with the next Ready."""
        index = self._append([Entry(0, 0, type_, data)])
        self.uncommitted_bytes += len(data)
        self.bcast_pending = True
        return index

    def _validate_conf_change(self, cc: ConfChange) -> None:
        if cc.node_id <= NONE:
            raise ConfigInvalid(f"invalid node id {cc.node_id}")
        member = cc.node_id in self.voters or cc.node_id in self.learners
        match cc.type:
            case ConfChangeType.ADD_NODE:
                if cc.node_id in self.voters:
                    raise ConfigInvalid(f"{cc.node_id} is already a voter")
            case ConfChangeType.ADD_LEARNER:
                if member:
                    raise ConfigInvalid(f"{cc.node_id} is already a member")
            case ConfChangeType.REMOVE_NODE:
                if not member:
                    raise ConfigInvalid(f"{cc.node_id} is not a member")
                if self.voters == (cc.node_id,):
                    raise ConfigInvalid("cannot remove the last voter")

    # -- membership --------------------------------------------------------------------------
    def _set_conf(self, cs: ConfState) -> None:
        voters = tuple(sorted(set(cs.voters)))
        learners = tuple(sorted(set(cs.learners) - set(voters)))
        self.voters, self.learners = voters, learners
        next_index = self.log.last_index() + 1
        prs: dict[int, Progress] = {}
        for id_ in voters + learners:
            pr = self.prs.get(id_)
            if pr is None:
                pr = Progress(next_index, self.cfg.max_inflight_msgs, self.cfg.max_inflight_bytes)
                if id_ == self.id:
                    pr.match = self._persisted_for_self()
            pr.is_learner = id_ in learners
            prs[id_] = pr
        self.prs = dict(sorted(prs.items()))

    def _changed_conf(self, change: ConfChange) -> ConfState:
        voters, learners = set(self.voters), set(self.learners)
        match change.type:
            case ConfChangeType.ADD_NODE:
                learners.discard(change.node_id)
                voters.add(change.node_id)
            case ConfChangeType.ADD_LEARNER:
                if change.node_id not in voters:  # no demotions
                    learners.add(change.node_id)
            case ConfChangeType.REMOVE_NODE:
                voters.discard(change.node_id)
                learners.discard(change.node_id)
        check(bool(voters), f"membership change {change} would leave no voters")
        return ConfState(tuple(voters), tuple(learners))

    def apply_conf_change(self, change: ConfChange) -> ConfState:
        """Apply a committed membership change (RawNode.advance calls this)."""
        before = set(self.prs)
        self._set_conf(self._changed_conf(change))
        if self.role is Role.LEADER:
            if self.id not in self.voters:
                self._hand_over_and_step_down()
            else:
                for new in self.prs.keys() - before:
                    self.send_append(new)  # start probing a new member at once
                if self.lead_transferee not in self.voters:
                    self.lead_transferee = NONE
                if self._maybe_commit():  # a smaller quorum may commit more
                    self.bcast_append()
                self._release_reads()  # ... or confirm pending reads
        return self.conf_state()

    def _release_reads(self) -> None:
        """Answer the queued reads that a quorum of the current voters has confirmed."""
        for req in self.read_only.release(self.voters):
            self._answer_read(req.frm, req.context, req.index)

    def _hand_over_and_step_down(self) -> None:
        """We applied our own removal: let the most caught-up voter campaign at once.

        The other voters may not know yet that the removal committed (configurations take
        effect when applied), so a TimeoutNow spares them waiting for an election timeout.
        """
        best = max(self.voters, key=lambda v: self.prs[v].match)
        if self.prs[best].match == self.log.last_index():
            self._send_timeout_now(best)
        self.become_follower(self.term, NONE)

    def apply_committed(self, entries: list[Entry]) -> None:
        """Book-keeping once the application applied ``entries`` (called by RawNode.advance)."""
        # A snapshot restored since these entries were handed out already holds the
        # membership they lead to; applying their changes again would corrupt it.
        restored = self.log.unstable.snapshot
        skip_to = restored.meta.index if restored is not None else 0
        for e in entries:
            if e.type is EntryType.CONF_CHANGE and e.index > skip_to:
                self.apply_conf_change(decode_conf_change(e.data))
        self.log.applied_to(entries[-1].index)
        self.uncommitted_bytes = max(0, self.uncommitted_bytes - entries_bytes(entries))

    # -- leadership transfer -----------------------------------------------------------------
    def transfer_leader(self, to: int) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(self.lead)
        if to not in self.voters:
            raise ConfigInvalid(f"cannot transfer leadership to {to}: not a voter")
        if to == self.id or to == self.lead_transferee:
            return
        self.election_elapsed = 0  # the transfer must finish within an election timeout
        self.lead_transferee = to
        if self.prs[to].match == self.log.last_index():
            self._send_timeout_now(to)
        else:
            self.send_append(to)

    # -- reports from the driver -------------------------------------------------------------
    def report_unreachable(self, to: int) -> None:
        pr = self.prs.get(to)
        if self.role is Role.LEADER and pr is not None and pr.state is ProgressState.REPLICATE:
            pr.become_probe()

    def report_snapshot(self, to: int, failed: bool) -> None:
        pr = self.prs.get(to)
        if self.role is not Role.LEADER or pr is None or pr.state is not ProgressState.SNAPSHOT:
            return
        if failed:
            pr.pending_snapshot = 0
        pr.become_probe()
        pr.probe_sent = True  # wait for a heartbeat answer before probing again
