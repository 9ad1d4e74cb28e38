"""The driver's pipeline, sans I/O (design §3.5, docs/raft.md "Driver").

It joins the pure host (``MultiRaft``), a durable log (the WAL), the application's state machine
and an outbox of peer messages; it reads no clock, starts no thread and knows no event loop.
The asyncio shell (raft/driver.py) and the simulator (tests/sim) run this same code: they feed
it inputs, call ``run_pass`` once per loop iteration (round) and ``tick`` on their timer, and
hand it back each write the log finished (``written``).

Rules:
- A pass takes the Readies of the dirty groups.  Every Ready's "now" messages are queued at
  once; the entries, hard states and snapshots of all groups (and the compactions due) go in
  ONE ``log.submit`` (one group commit).  A log whose ``mode`` is ``WriteMode.INLINE`` writes
  before ``submit`` returns: the queued messages are handed to the outbox first
  (``Outbox.flush_now``), so the followers' writes overlap the leader's.
- A round (a submit and the Readies waiting for it) finishes strictly in submission order:
  publish its write to the views, send the "after persist" messages, restore snapshots, apply,
  resolve proposals and reads, ``advance``.  A submit whose Future is already resolved
  finishes in the pass that made it.
- A Ready that persists nothing, or only a new commit index (``must_sync`` false), is finished
  in its pass; that hard state is held (lazy) and rides in front of the next submit, or goes
  alone at the next tick if nothing else was written: the commit index need not be durable.
- Waiters: a proposal resolves with ``StateMachine.apply``'s result once applied here;
  ``ProposalDropped`` if another entry took its index; ``OutcomeUnknown`` when this node stops
  leading, a snapshot jumps over it, or it is not applied within ``proposal_timeout_s`` (a
  sweep every ``SWEEP_TICKS`` ticks).  At most ``pending_max`` wait at once.
- Reads are batched per group and pass (as etcd's server batches them): the reads of a group
  asked between two passes share ONE ReadIndex request, made at the start of the next pass, so
  its index is taken after every one of them began (linearizable for all).  Its read state is
  served as soon as it comes out of the host (a Ready, or ``read_traffic`` while the group's
  write is in progress: reads never wait for a write): each read resolves with the index once
  it is applied here, in that pass (after its messages left, before its write) or in the one
  that applies it.  A new leader or term fails the group's reads asked before it and not
  answered (the leader they were asked of forgot them): ``ProposalDropped``, ask again.
- Snapshots are ``SnapshotPolicy``'s: by applied entries, by live WAL segments, on request, and
  never past the application's ``floor``.
- Callbacks (a request's ``done``, the hooks, the state machine) run inside a pass, a
  finished write or a tick (``in_pass``).  They may answer clients there (that is what makes
  an answer leave in the pass that applied it); they must not call into the pipeline:
  ``propose``, ``read_index``, ``transfer_leader`` and ``compact`` raise
  ``InvariantViolation`` when they do, which stops the node (what they want to ask waits for
  the runner's next iteration, e.g. a ``call_soon``).
- An exception here stops the pipeline (``fail``): every waiter fails with ``NodeStopped`` and
  ``on_stop`` is called; a failed WAL write and an internal error are told apart.
- Leaving a group: a pass that applies a ``REMOVE_NODE`` of this node, after which the node is
  neither voter nor learner, reports the group to ``on_removed`` once the pass is over (and
  takes no snapshot of it any more, so a restart replays the removal and reports it again).
  ``remove_group`` then drops it: the RawNode goes, its proposals fail ``OutcomeUnknown`` and
  its reads ``GroupNotHosted``, the Readies of it still being written are not finished, and a
  tombstone joins the next submit; ``done`` is called once the tombstone is durable.  Until
  then the group cannot be hosted again; after it, ``add_groups`` hosts it empty (a learner to
  be), never bootstrapped, as it does every group the log says was removed.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from .core import Role
from .errors import (
    GroupNotHosted,
    InvariantViolation,
    NodeStopped,
    OutcomeUnknown,
    ProposalDropped,
    RaftError,
    WalFailed,
)
from .messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Message,
    Snapshot,
    SnapshotMeta,
    decode_conf_change,
)
from .multi import MultiRaft
from .rawnode import ReadState, Ready
from .storage import MemoryStorage, Storage, bootstrap
from .wal_segments import GroupWrite, WriteMode, Written

logger = logging.getLogger("raft.driver")
logger.addHandler(logging.NullHandler())

SWEEP_TICKS = 100

Item = tuple[int, Message]  # (group, message), as raft/transport.py carries them


class StateMachine(Protocol):
    """The application's replicated state, one instance for all groups of the node."""

    def apply(self, group: int, entries: list[Entry]) -> list[object]:
        """Apply committed entries (all kinds, in order); return one result per entry."""
        ...

    def snapshot(self, group: int) -> bytes:
        """The group's state as of the last entry applied."""
        ...

    def restore(self, group: int, data: bytes) -> None:
        """Replace the group's state by a snapshot's (``b""``: the empty state)."""
        ...


class DurableLog(Protocol):
    """What the pipeline needs of the WAL (raft/wal.py; tests/sim/disk.py simulates it)."""

    @property
    def mode(self) -> WriteMode: ...

    def storage(self, group: int) -> Storage: ...

    def write_sync(self, batch: Sequence[GroupWrite]) -> Written: ...

    def submit(self, batch: Sequence[GroupWrite]) -> Future[Written]: ...

    def publish(self, written: Written) -> None: ...

    def segment_count(self) -> int: ...

    def oldest_segment_groups(self) -> list[int]: ...

    def removed(self, group: int) -> bool:
        """Whether the group's last durable record is a tombstone (it left this node)."""
        ...


class Outbox(Protocol):
    """Where peer messages go (raft/transport.py): one ``send`` per peer and pass."""

    def send(self, to: int, items: list[Item]) -> None: ...

    def send_commits(self, to: int, notices: list[int]) -> None:
        """Commit notices (``MultiRaft.take_commit_notices``) for ``to``, with its next batch;
        dropped if it cannot take them (they are an optimisation: appends and heartbeats
        carry the commit too)."""

    def flush_now(self) -> None: ...


@dataclass(frozen=True)
class DriverConfig:
    tick_s: float = 0.05
    snapshot_entries: int = 100_000  # applied entries between snapshots of a group
    wal_segments_max: int = 16  # above this, compact the groups pinning the oldest segment
    pending_max: int = 200_000  # proposals and reads waiting on this node
    proposal_timeout_s: float = 60.0  # not applied by then: OutcomeUnknown (checked per sweep)


@dataclass
class DriverStats:
    passes: int = 0  # Ready passes
    readies: int = 0
    submits: int = 0  # WAL submits (each joins the writer's next group commit)
    proposals: int = 0
    conf_changes: int = 0  # membership changes proposed (propose_conf_change)
    applied_entries: int = 0
    snapshots_taken: int = 0
    snapshots_restored: int = 0
    groups_removed: int = 0  # groups this node left (tombstones written)
    soft_state_changes: int = 0  # leader or role changes of a group
    proposals_expired: int = 0  # failed after proposal_timeout_s without being applied
    messages_sent: int = 0
    commit_notices_sent: int = 0  # (group, commit) notices to followers (MultiRaft)
    commit_notices_received: int = 0
    pass_seconds_max: float = 0.0


ResultCallback = Callable[[Any, BaseException | None], None]
"""A callback in place of a future: ``(result, None)`` or ``(None, error)``, called once
(``Pipeline.propose``, ctxstore's ``Router.submit_then``)."""


class _Waiter:
    """A proposal waiting to be applied (one per append on a leader).  Hot-path records are
    plain classes: compiled, their ``__init__`` is native; a dataclass's stays interpreted."""

    __slots__ = ("done", "proposed_at", "term")

    def __init__(self, term: int, done: ResultCallback, proposed_at: float) -> None:
        self.term = term
        self.done = done
        self.proposed_at = proposed_at  # the pipeline's clock (commit latency, expiry)


class _Read:
    """A read barrier waiting for its ReadState (with the others of its batch), then for its
    index to be applied."""

    __slots__ = ("abandoned", "done")

    def __init__(self, done: ResultCallback, abandoned: Callable[[], bool] | None) -> None:
        self.done = done
        self.abandoned = abandoned  # the caller gave up: forget it at the next sweep


def _resolve(done: ResultCallback, result: object, exc: BaseException | None) -> None:
    try:
        done(result, exc)
    except InvariantViolation:
        raise  # (a callback that called into the pipeline: never caught)
    except Exception:  # a caller's bug must not stop the pass that applies the group
        logger.exception("a request's callback failed")


class Round:
    """A log submit and the Readies that wait for it (opaque to the shell, which hands it back
    to ``Pipeline.written``)."""

    __slots__ = ("failed", "readies", "removals", "written")

    def __init__(self, readies: list[tuple[int, Ready]]) -> None:
        self.readies = readies
        self.removals: list[tuple[int, ResultCallback]] = []  # tombstones in its write
        self.written: Written | None = None
        self.failed: BaseException | None = None


class SnapshotPolicy:
    """When to snapshot a group and compact its log.

    A group is due after ``snapshot_entries`` applied entries past its last snapshot, when more
    than ``wal_segments_max`` segments are alive (the groups pinning the oldest one), or on
    request.  The snapshot is the state machine's at the applied index (taken once the group's
    Ready is advanced, so it matches), with that index's term and the membership as applied.
    With a ``floor`` (the highest index the application made durable elsewhere, e.g. an
    archive) it is held until the floor reaches it: the log never loses an entry the
    application has not made durable."""

    def __init__(self, config: DriverConfig, host: MultiRaft, sm: StateMachine) -> None:
        self.entries = config.snapshot_entries
        self.segments_max = config.wal_segments_max
        self.host = host
        self.sm = sm
        self.floor: Callable[[int], int] | None = None
        self.taken = 0
        self._index: dict[int, int] = {}  # group -> index of its newest (or coming) snapshot
        self._due: set[int] = set()
        self._held: dict[int, Snapshot] = {}  # group -> snapshot taken, waiting for the floor
        self._frozen: set[int] = set()  # groups leaving this node: no new snapshot

    def add_group(self, group: int, index: int) -> None:
        self._index[group] = index
        self._frozen.discard(group)

    def remove_group(self, group: int) -> None:
        self._index.pop(group, None)
        self._due.discard(group)
        self._held.pop(group, None)
        self._frozen.discard(group)

    def freeze(self, group: int) -> None:
        """Take no more snapshots of ``group`` (it applied its removal of this node)."""
        self._frozen.add(group)
        self._due.discard(group)

    def request(self, group: int) -> None:
        if group in self._index and group not in self._frozen:
            self._due.add(group)

    def after_apply(self, group: int, applied: int) -> bool:
        """The group applied up to ``applied``; whether it just became due."""
        if applied - self._index[group] >= self.entries and group not in self._due:
            if group in self._frozen:
                return False
            self._due.add(group)
            return True
        return False

    def installed(self, group: int, index: int) -> None:
        """A snapshot from a leader replaced the group's state at ``index``."""
        self._held.pop(group, None)  # older than what was just installed
        self._index[group] = max(self._index[group], index)

    def compactions(self, log: DurableLog) -> list[GroupWrite]:
        """The compactions to write in this pass (snapshots taken now or released by the floor)."""
        floor = self.floor
        writes = []
        if self._held:
            assert floor is not None
            for group in [g for g, snap in self._held.items() if floor(g) >= snap.meta.index]:
                writes.append(GroupWrite(group, compact=self._held.pop(group)))
                applied = self.host.node(group).raft.log.applied
                if applied - self._index[group] >= self.entries:
                    self._due.add(group)  # it fell behind while this one waited
        if log.segment_count() > self.segments_max:
            index = self._index
            self._due.update(g for g in log.oldest_segment_groups() if g in index)
            self._due -= self._frozen
        if not self._due:
            return writes
        for group in sorted(self._due):
            if group in self._held:  # the one taken waits for the floor: not a newer one
                self._due.discard(group)
                continue
            node = self.host.node(group)
            if node.outstanding:
                continue  # after its Ready is advanced (the snapshot must match applied)
            self._due.discard(group)
            r = node.raft
            applied = r.log.applied
            if applied <= self._index[group]:
                continue
            if applied < r.log.first_index() - 1:
                continue  # a leader's snapshot, stepped but not yet in a Ready, replaces it
            meta = SnapshotMeta(applied, r.log.term(applied), r.conf_state())
            snap = Snapshot(meta, self.sm.snapshot(group))
            self._index[group] = applied
            self.taken += 1
            if floor is not None and floor(group) < applied:
                self._held[group] = snap  # compacted once the floor reaches it
            else:
                writes.append(GroupWrite(group, compact=snap))
        return writes


def _nothing() -> None:
    pass


class Pipeline:
    """One node's Raft groups between its inputs and its disk, network and state machine.

    ``clock`` (seconds, any origin) times proposals; ``read_prefix`` starts every read context
    (the shell: random per process, so an answer meant for an earlier process of this node
    never resolves a read of this one; docs/raft.md §8.7).  Hooks the runner sets:
    ``outbox`` (None: a single-node cluster), ``wait_for_write(round, future)`` for a submit
    not finished at once (call ``written(round, future)`` on this thread once it is),
    ``want_pass`` (there is work for another pass), ``on_stop(exc)``."""

    def __init__(
        self,
        host: MultiRaft,
        log: DurableLog,
        state_machine: StateMachine,
        config: DriverConfig,
        clock: Callable[[], float],
        read_prefix: bytes = b"",
    ) -> None:
        self.host = host
        self.log = log
        self.sm = state_machine
        self.config = config
        self.clock = clock
        self.stats = DriverStats()
        self.snapshots = SnapshotPolicy(config, host, state_machine)
        self.outbox: Outbox | None = None
        self.wait_for_write: Callable[[Round, Future[Written]], None] | None = None
        self.want_pass: Callable[[], None] = _nothing
        self.on_stop: Callable[[BaseException], None] | None = None
        self.on_leader_change: Callable[[int, int], None] | None = None
        self.on_commit_latency: Callable[[float], None] | None = None  # propose -> applied, s
        # Called with (group, index) after a snapshot from a leader replaced a group's state.
        self.on_snapshot_installed: Callable[[int, int], None] | None = None
        # Called with a group once a pass applied this node's removal from it (see the rules).
        self.on_removed: Callable[[int], None] | None = None
        self.read_prefix = read_prefix
        self.read_seq = 0  # the last read's counter (its context: read_prefix + 8 bytes)
        # The WAL's mode, read once: an inline write blocks, so what is queued leaves first.
        self._send_before_write = log.mode is WriteMode.INLINE
        self._rounds: deque[Round] = deque()  # submitted, in submission order
        self._proposals: dict[int, dict[int, _Waiter]] = {}  # group -> index -> waiter
        # Reads asked since the last pass: group -> (context, the batch).
        self._read_batches: dict[int, tuple[bytes, list[_Read]]] = {}
        # group -> context -> (batch, (leader, term) when asked)
        self._reads: dict[int, dict[bytes, tuple[list[_Read], tuple[int, int]]]] = {}
        self._read_waits: dict[int, list[tuple[int, list[_Read]]]] = {}  # answered, not applied
        self._reads_served: list[tuple[list[_Read], int]] = []  # resolved at the end of a pass
        self._pending = 0
        self._out: dict[int, list[Item]] = {}
        # Hard states whose only change is the commit index (need not be durable at once).
        self._lazy_hard_states: dict[int, HardState] = {}
        self._submitted_since_tick = False
        self.stopped = False  # no new requests (stopping, or failed)
        self.failure: BaseException | None = None
        # True while a pass, a finished write or a tick runs (and the callbacks they make):
        # no request may enter then (``_enter``).
        self.in_pass = False
        self._left: list[int] = []  # groups that applied their removal of us, to report
        self._leaving: set[int] = set()  # reported (or to be), still hosted
        self._removals: list[tuple[int, int, ResultCallback]] = []  # tombstones to submit
        self._removing: set[int] = set()  # tombstones submitted, not yet durable

    # -- set-up --------------------------------------------------------------------------------
    def add_groups(self, groups: Iterable[int], voters: tuple[int, ...]) -> None:
        """Host ``groups``; a group new to the log starts with ``voters`` (one write for all),
        or empty without voters (this node joins it later and learns it from the log)."""
        groups = list(groups)
        fresh = []
        for g in groups:
            if g in self._removing:
                raise InvariantViolation(f"group {g} hosted again before its tombstone is durable")
            view = self.log.storage(g)
            # (nor a snapshot: it would be the last); a group that left is never bootstrapped
            if voters and view.last_index() == 0 and not self.log.removed(g):
                memory = MemoryStorage()
                bootstrap(memory, ConfState(voters))
                fresh.append(GroupWrite(g, memory.ents[1:], memory.hard_state))
        if fresh:
            self.log.write_sync(fresh)
        for g in groups:
            snap = self.log.storage(g).snapshot()
            self.sm.restore(g, snap.data)
            self.snapshots.add_group(g, snap.meta.index)
            self.host.add_group(g, self.log.storage(g), applied=snap.meta.index)
            self._proposals[g] = {}
            self._reads[g] = {}
            self._read_waits[g] = []

    # -- requests --------------------------------------------------------------------------------
    def propose(self, group: int, data: bytes, done: ResultCallback) -> int:
        """Propose ``data`` to ``group`` (this node must lead it: ``NotLeader`` otherwise); its
        index.  ``done(result, None)`` once the entry is applied here, ``done(None, error)`` if
        it will not be, at most once, from inside a pass: it must not raise (it is logged) and
        must not call into the pipeline."""
        self._admit()
        if group not in self._proposals:
            raise GroupNotHosted(f"group {group} is not hosted on this node")
        self.stats.proposals += 1
        return self._wait(group, self.host.propose(group, data), done)

    def propose_conf_change(self, group: int, change: ConfChange, done: ResultCallback) -> int:
        """Propose a membership change of ``group`` (leader only; one pending at a time:
        ``ProposalDropped`` while another is; ``ConfigInvalid`` for a change that makes no
        sense, as adding a voter twice); its index.  ``done`` as for ``propose``, once the
        change is applied here (the new configuration is in force on this node)."""
        self._admit()
        if group not in self._proposals:
            raise GroupNotHosted(f"group {group} is not hosted on this node")
        self.stats.conf_changes += 1
        return self._wait(group, self.host.propose_conf_change(group, change), done)

    def _wait(self, group: int, index: int, done: ResultCallback) -> int:
        """``done`` waits for the entry at ``index``, proposed in the leader's current term."""
        term = self.host.node(group).raft.term
        self._proposals[group][index] = _Waiter(term, done, self.clock())
        self._pending += 1
        self.want_pass()
        return index

    def read_index(
        self, group: int, done: ResultCallback, abandoned: Callable[[], bool] | None = None
    ) -> bytes:
        """A linearizable read barrier; the context of its batch (the group's reads until the
        next pass).  ``done(index, None)`` once this node has applied everything committed
        before the call, ``done(None, ProposalDropped)`` without a leader or when the leader
        changed first (ask again), from inside a pass like a proposal's.  ``abandoned()`` true:
        the caller gave up (forgotten at the next sweep: a lost answer is never resent)."""
        self._admit()
        if group not in self._reads:
            raise GroupNotHosted(f"group {group} is not hosted on this node")
        read = _Read(done, abandoned)
        batch = self._read_batches.get(group)
        if batch is None:
            seq = self.read_seq + 1
            ctx = self.read_prefix + seq.to_bytes(8, "big")
            self.read_seq = seq
            batch = self._read_batches[group] = (ctx, [read])
        else:
            batch[1].append(read)
        self._pending += 1
        self.want_pass()
        return batch[0]

    def transfer_leader(self, group: int, to: int) -> None:
        self._enter()
        if group not in self._proposals:
            raise GroupNotHosted(f"group {group} is not hosted on this node")
        self.host.transfer_leader(group, to)
        self.want_pass()

    def compact(self, group: int) -> None:
        """Take a snapshot of ``group`` at its applied index in the next pass."""
        self._enter()
        self.snapshots.request(group)
        self.want_pass()

    def remove_group(self, group: int, done: ResultCallback) -> None:
        """Stop hosting ``group`` (this node left its membership) and write its tombstone in
        the next pass; ``done(None, None)`` once the tombstone is durable (a restart no longer
        knows the group), ``done(None, error)`` if the pipeline stops first (the tombstone may
        or may not be written).  Its waiting proposals fail ``OutcomeUnknown`` (they may commit
        under another leader), its reads ``GroupNotHosted``; later requests too.  Safe from
        ``on_removed``; ``done`` as a proposal's callback."""
        if self.stopped:
            raise NodeStopped("the node is stopping")
        if group not in self._proposals:
            raise GroupNotHosted(f"group {group} is not hosted on this node")
        node = self.host.remove_group(group)
        self.snapshots.remove_group(group)
        self._lazy_hard_states.pop(group, None)  # (void once the tombstone is written)
        for rnd in self._rounds:  # written or not, nothing of it is finished any more
            if any(g == group for g, _ in rnd.readies):
                rnd.readies = [(g, rd) for g, rd in rnd.readies if g != group]
        self._drop_waiters(group, lambda: OutcomeUnknown(f"group {group} left this node"))
        del self._proposals[group]
        batches = [batch for batch, _ in self._reads.pop(group).values()]
        batches += [batch for _, batch in self._read_waits.pop(group)]
        asked = self._read_batches.pop(group, None)
        if asked is not None:
            batches.append(asked[1])
        for batch in batches:
            self._pending -= len(batch)
            for read in batch:
                _resolve(read.done, None, GroupNotHosted(f"group {group} left this node"))
        self._leaving.discard(group)
        if group in self._left:
            self._left.remove(group)
        self._removing.add(group)
        self._removals.append((group, node.raft.log.last_index(), done))
        self.stats.groups_removed += 1
        self.want_pass()

    def _enter(self) -> None:
        """A request may not come from a callback the pipeline is running (module rules)."""
        if self.in_pass:
            raise InvariantViolation(
                "a request entered the pipeline from inside its pass (a callback or a hook "
                "called into it): ask in the runner's next iteration instead"
            )

    def _admit(self) -> None:
        self._enter()
        if self.stopped:
            raise NodeStopped("the node is stopping")
        if self._pending >= self.config.pending_max:
            raise ProposalDropped(f"{self._pending} requests already waiting on this node")

    # -- inputs from peers ---------------------------------------------------------------------
    def step(self, items: list[Item]) -> None:
        step = self.host.step
        for group, message in items:
            step(group, message)
        self.want_pass()

    def commit_notices(self, frm: int, notices: list[int]) -> None:
        """The commit notices a peer's leaders sent this node's followers (the transport)."""
        self.stats.commit_notices_received += len(notices) // 3
        self.host.commit_notices(frm, notices)
        self.want_pass()

    def peer_up(self, peer: int) -> None:
        self.host.peer_up(peer)
        self.want_pass()

    def peer_down(self, peer: int) -> None:
        self.host.peer_down(peer)
        self.want_pass()

    def snapshot_status(self, peer: int, group: int, ok: bool) -> None:
        self.host.report_snapshot(group, peer, failed=not ok)
        self.want_pass()

    # -- time ----------------------------------------------------------------------------------
    def tick(self) -> None:
        if self.stopped:
            return
        self.host.tick()
        if self.host.now % SWEEP_TICKS == 0:
            self.in_pass = True
            try:
                self._sweep()
            finally:
                self.in_pass = False
        if self._lazy_hard_states and not self._submitted_since_tick:
            self._submit_with_lazy(Round([]), [])  # an idle node's commit indexes, once
        self._submitted_since_tick = False
        self.want_pass()

    # -- the pass --------------------------------------------------------------------------------
    def run_pass(self) -> bool:
        """One pass; whether it found work."""
        if self.failure is not None:
            return False
        self.in_pass = True
        try:
            worked = self._run_pass()
        finally:
            self.in_pass = False
        if self._left:
            self._report_left()
        return worked

    def _run_pass(self) -> bool:
        if self._read_batches:
            self._ask_reads()
        writes = self.snapshots.compactions(self.log)
        self.stats.snapshots_taken = self.snapshots.taken
        removals = self._removals
        if removals:
            self._removals = []
            writes += [GroupWrite(g, remove=True, last_index=last) for g, last, _ in removals]
        readies = self.host.ready()
        traffic = self.host.read_traffic()
        for group, t in traffic:
            self._queue(group, t.messages)
            self._answered(group, t.read_states)
        if not readies and not writes:
            self._flush()  # (also the commit notices of a late follower's answer: no Ready)
            if traffic:
                self._serve_reads()
            return bool(traffic)
        self.stats.passes += 1
        self.stats.readies += len(readies)
        wait: list[tuple[int, Ready]] = []
        now: list[tuple[int, Ready]] = []
        lazy = self._lazy_hard_states
        for group, rd in readies:
            if rd.read_states:  # (first: an answer a leader gave stays good after it)
                self._answered(group, rd.read_states)
            if rd.soft_state is not None:
                self.stats.soft_state_changes += 1
                if rd.soft_state.role is not Role.LEADER:
                    self._deposed(group)
                self._drop_reads(group)
                if self.on_leader_change is not None:
                    self.on_leader_change(group, rd.soft_state.lead)
            elif rd.hard_state is not None and self._reads[group]:
                self._drop_reads(group)  # (only if the term changed)
            self._queue(group, rd.messages)
            if rd.must_sync:
                writes.append(GroupWrite(group, rd.entries, rd.hard_state, rd.snapshot))
                wait.append((group, rd))
            else:
                if rd.entries or rd.snapshot is not None:  # (per Ready: no check call)
                    raise InvariantViolation("unsynced entries or snapshot")
                if rd.hard_state is not None:
                    lazy[group] = rd.hard_state  # only the commit index changed
                now.append((group, rd))
        self._flush()  # the leader's appends leave before its own write starts:
        if writes:
            if self._send_before_write and self.outbox is not None:
                self.outbox.flush_now()  # written now, not after the blocking write below
            self._serve_reads()  # the reads found applied do not wait for it either
            rnd = Round(wait)
            rnd.removals = [(g, done) for g, _, done in removals]
            self._submit_with_lazy(rnd, writes)
        for group, rd in now:
            self._finish(group, rd)
        self._flush()
        self._serve_reads()
        return True

    def writing(self) -> bool:
        """A submitted round is neither finished nor failed."""
        return bool(self._rounds) and self._rounds[0].failed is None

    def _submit_with_lazy(self, rnd: Round, writes: list[GroupWrite]) -> None:
        """Submit, with the commit-only hard states held since the last submit in front: they
        are older than anything in ``writes``, and ride on its fsync instead of costing one."""
        lazy = self._lazy_hard_states
        if lazy:
            writes = [GroupWrite(g, hard_state=hs) for g, hs in lazy.items()] + writes
            lazy.clear()
        self._submitted_since_tick = True
        try:
            future = self.log.submit(writes)
        except WalFailed as e:  # it failed earlier, and that round's failure stopped us
            self.fail(e)
            for _, done in rnd.removals:
                _resolve(done, None, NodeStopped(f"the WAL failed: {e!r}"))
            return
        self.stats.submits += 1
        self._rounds.append(rnd)
        if future.done():  # an inline write: finish the round in this pass
            self.written(rnd, future)
        else:
            assert self.wait_for_write is not None, "a deferred write needs a runner"
            self.wait_for_write(rnd, future)

    def written(self, rnd: Round, f: Future[Written]) -> None:
        """``rnd``'s write finished (on the pipeline's thread): finish every round now written,
        in submission order."""
        was, self.in_pass = self.in_pass, True  # (inside a pass: an inline write's)
        try:
            self._written(rnd, f)
        finally:
            self.in_pass = was
        if self._left and not was:
            self._report_left()  # (after the pass: the hook may call in)

    def _written(self, rnd: Round, f: Future[Written]) -> None:
        exc = f.exception()
        if exc is not None:
            rnd.failed = exc
            self.fail(exc)
            return
        rnd.written = f.result()
        removed: list[ResultCallback] = []
        while self._rounds and self._rounds[0].written is not None:
            head = self._rounds.popleft()
            assert head.written is not None
            self.log.publish(head.written)
            for group, rd in head.readies:
                self._finish(group, rd)
            for group, done in head.removals:
                self._removing.discard(group)
                removed.append(done)
        self._flush()
        self._serve_reads()
        for done in removed:
            _resolve(done, None, None)
        self.want_pass()

    def _finish(self, group: int, rd: Ready) -> None:
        """The Ready is durable: send what waited for it, apply, advance."""
        if group not in self._proposals:
            return  # removed meanwhile (by a callback of this pass)
        self._queue(group, rd.persisted_messages)
        if rd.snapshot is not None:
            index = rd.snapshot.meta.index
            self.sm.restore(group, rd.snapshot.data)
            self.stats.snapshots_restored += 1
            self.snapshots.installed(group, index)
            self._jumped(group, index)
            if self.on_snapshot_installed is not None:
                self.on_snapshot_installed(group, index)
        if rd.committed_entries:
            self._apply(group, rd.committed_entries)
        self.host.advance(group, rd)
        r = self.host.node(group).raft
        if rd.committed_entries and r.id not in r.voters and r.id not in r.learners:
            self._check_left(group, rd.committed_entries)
        applied = r.log.applied
        if self._read_waits[group]:
            self._applied_reads(group, applied)
        if self.snapshots.after_apply(group, applied):
            self.want_pass()

    def _check_left(self, group: int, entries: list[Entry]) -> None:
        """This node is no member of ``group`` after applying ``entries``: if one of them
        removed it, it left the group (else it was never in: a learner to be)."""
        if group in self._leaving:
            return
        me = self.host.id
        for e in entries:
            if e.type is EntryType.CONF_CHANGE:
                cc = decode_conf_change(e.data)
                if cc.type is ConfChangeType.REMOVE_NODE and cc.node_id == me:
                    self._leaving.add(group)
                    self._left.append(group)
                    self.snapshots.freeze(group)
                    logger.info(
                        "group %d: this node was removed from it (entry %d)", group, e.index
                    )
                    return

    def _report_left(self) -> None:
        left, self._left = self._left, []
        hook = self.on_removed
        if hook is None:
            return
        for group in left:
            try:
                hook(group)
            except Exception:  # the application's bug must not stop the node
                logger.exception("on_removed(%d) failed", group)

    # -- reads -----------------------------------------------------------------------------------
    def _ask_reads(self) -> None:
        """One ReadIndex request per group for the reads asked since the last pass."""
        batches, self._read_batches = self._read_batches, {}
        for group, (ctx, reads) in batches.items():
            try:
                self.host.read_index(group, ctx)
            except RaftError as e:  # no leader known, or too many reads waiting
                self._pending -= len(reads)
                for read in reads:
                    _resolve(read.done, None, e)
                continue
            r = self.host.node(group).raft
            self._reads[group][ctx] = (reads, (r.lead, r.term))

    def _answered(self, group: int, read_states: list[ReadState]) -> None:
        """Read states came out of the host: serve those applied already (in this pass, once
        its messages left), keep the others until their index is applied."""
        reads = self._reads[group]
        waits = self._read_waits[group]
        for rs in read_states:
            asked = reads.pop(rs.context, None)
            if asked is not None:
                waits.append((rs.index, asked[0]))
        if waits:
            self._applied_reads(group, self.host.node(group).raft.log.applied)

    def _applied_reads(self, group: int, applied: int) -> None:
        keep = []
        for index, batch in self._read_waits[group]:
            if index <= applied:
                self._reads_served.append((batch, index))
            else:
                keep.append((index, batch))
        self._read_waits[group] = keep

    def _serve_reads(self) -> None:
        """Resolve the reads found applied so far in this pass (after its messages left)."""
        served, self._reads_served = self._reads_served, []
        for batch, index in served:
            self._pending -= len(batch)
            for read in batch:
                _resolve(read.done, index, None)

    def _drop_reads(self, group: int) -> None:
        """The group's leader or term changed: the read requests asked of an earlier one may
        never be answered (a leader forgets its queue when its term ends).  Fail them now, so
        they are asked again."""
        reads = self._reads[group]
        if not reads:
            return
        r = self.host.node(group).raft
        now = (r.lead, r.term)
        stale = [ctx for ctx, (_, asked) in reads.items() if asked != now]
        for ctx in stale:
            batch = reads.pop(ctx)[0]
            self._pending -= len(batch)
            for read in batch:
                _resolve(read.done, None, ProposalDropped("the group's leader changed"))

    def _apply(self, group: int, entries: list[Entry]) -> None:
        results = self.sm.apply(group, entries)
        self.stats.applied_entries += len(entries)
        waiting = self._proposals[group]
        if not waiting:
            return
        for e, result in zip(entries, results, strict=True):
            w = waiting.pop(e.index, None)
            if w is None:
                continue
            self._pending -= 1
            if w.term == e.term:
                _resolve(w.done, result, None)
                if self.on_commit_latency is not None:
                    self.on_commit_latency(self.clock() - w.proposed_at)
            else:
                dropped = ProposalDropped(f"entry {e.index} was replaced by a new leader")
                _resolve(w.done, None, dropped)

    def _deposed(self, group: int) -> None:
        """This node no longer leads ``group``: its waiting proposals may or may not commit
        (under the next leader).  Tell their callers now rather than at their deadline, so they
        can retry (idempotently) without waiting."""
        self._drop_waiters(group, lambda: OutcomeUnknown("this node stopped leading the group"))

    def _drop_waiters(self, group: int, error: Callable[[], BaseException]) -> None:
        """Fail every proposal waiting in ``group`` with ``error()``; they are detached first,
        so the bookkeeping is whole whatever their callbacks do."""
        waiting = self._proposals[group]
        if not waiting:
            return
        waiters = list(waiting.values())
        waiting.clear()
        self._pending -= len(waiters)
        for w in waiters:
            _resolve(w.done, None, error())

    def _jumped(self, group: int, index: int) -> None:
        waiting = self._proposals[group]
        for i in [i for i in waiting if i <= index]:
            w = waiting.pop(i)
            self._pending -= 1
            _resolve(w.done, None, OutcomeUnknown(f"a snapshot at {index} covered entry {i}"))

    def _sweep(self) -> None:
        """Forget reads whose caller gave up; fail proposals waiting for longer than
        ``proposal_timeout_s``."""
        for reads in self._reads.values():
            for ctx, (batch, asked) in list(reads.items()):
                keep = [r for r in batch if r.abandoned is None or not r.abandoned()]
                self._pending -= len(batch) - len(keep)
                if keep:
                    reads[ctx] = (keep, asked)
                else:
                    del reads[ctx]
        timeout = self.config.proposal_timeout_s
        cutoff = self.clock() - timeout
        for waiting in self._proposals.values():
            old: list[int] = []
            for index, w in waiting.items():  # in index order, so oldest first
                if w.proposed_at > cutoff:
                    break
                old.append(index)
            for index in old:
                w = waiting.pop(index)
                self._pending -= 1
                self.stats.proposals_expired += 1
                error = OutcomeUnknown(f"entry {index} was not applied within {timeout:g} s")
                _resolve(w.done, None, error)

    # -- output --------------------------------------------------------------------------------
    def _queue(self, group: int, messages: list[Message]) -> None:
        out = self._out
        for m in messages:
            items = out.get(m.to)
            if items is None:
                items = out[m.to] = []
            items.append((group, m))

    def _flush(self) -> None:
        notices = self.host.take_commit_notices()
        if not self._out and not notices:
            return
        out, self._out = self._out, {}
        outbox = self.outbox
        if outbox is None:
            return  # a single-node cluster
        for to, items in out.items():
            self.stats.messages_sent += len(items)
            outbox.send(to, items)
        for to, flat in notices.items():
            self.stats.commit_notices_sent += len(flat) // 3
            outbox.send_commits(to, flat)

    # -- stopping ------------------------------------------------------------------------------
    def fail(self, exc: BaseException) -> None:
        """Stop for good: a WAL write failed (``WalFailed``: the disk), or anything else went
        wrong inside the pipeline (a bug or a broken invariant).  Every waiter fails with
        ``NodeStopped``, saying which; ``on_stop(exc)``.  The process must exit and recover."""
        if self.failure is not None:
            return
        self.failure = exc
        self.stopped = True
        if isinstance(exc, WalFailed):
            why = f"the WAL failed: {exc!r}"
            logger.critical("the node stops: %s", why)
        else:
            why = f"an internal error stopped the driver: {exc!r}"
            logger.critical("the node stops: %s", why, exc_info=exc)
        self.fail_all(NodeStopped(why))
        if self.on_stop is not None:
            self.on_stop(exc)

    def fail_all(self, exc: RaftError) -> None:
        """Fail every waiting read with ``exc``, and every waiting proposal with
        ``OutcomeUnknown`` saying ``exc``: it is in the log and may have reached followers, so
        another leader may still commit it."""
        unknown = OutcomeUnknown(f"the node stopped with the proposal in flight ({exc})")
        for group in self._proposals:
            self._drop_waiters(group, lambda: unknown)
        batches = [batch for _, batch in self._read_batches.values()]
        self._read_batches.clear()
        for reads in self._reads.values():
            batches += [batch for batch, _ in reads.values()]
            reads.clear()
        for group, waits in self._read_waits.items():
            self._read_waits[group] = []
            batches += [batch for _, batch in waits]
        batches += [batch for batch, _ in self._reads_served]
        self._reads_served = []
        for batch in batches:
            for read in batch:
                _resolve(read.done, None, exc)
        self._pending = 0
        removals = [done for _, _, done in self._removals]
        self._removals = []
        for rnd in self._rounds:
            removals += [done for _, done in rnd.removals]
            rnd.removals = []
        for done in removals:
            _resolve(done, None, exc)


__all__ = [
    "SWEEP_TICKS",
    "DriverConfig",
    "DriverStats",
    "DurableLog",
    "Outbox",
    "Pipeline",
    "ResultCallback",
    "Round",
    "SnapshotPolicy",
    "StateMachine",
]
