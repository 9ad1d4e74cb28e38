"""The asyncio driver of a node's Raft groups (design §3.5, docs/raft.md "Driver").

It joins the pure host (``MultiRaft``), the shared WAL, the peer transport and the
application's state machine, on one event loop:

    inputs (peer batches, proposals, reads, the tick timer, peer up/down)
      -> host.step / propose / tick                       (marks groups dirty)
      -> one pass over the Readies of every dirty group:
           "now" messages go to the transport at once (the leader replicates while it writes;
           before an inline WAL's write, the transport writes them to the sockets at once)
           entries / hard states / snapshots of all groups -> ONE WAL submit (one fsync)
      -> when that fsync returns (writer thread -> loop, through ``call_soon_threadsafe``; an
         inline WAL: at once, in the pass that submitted it): publish the views, send the
         "after persist" messages, restore snapshots, apply committed entries
         (``StateMachine.apply``), resolve proposals and reads, ``advance``

- One pass per loop iteration at most (``call_soon`` once), so everything that arrived in an
  iteration shares one group commit and one frame per peer.
- A Ready that persists nothing is finished in the same pass.  A Ready whose only change is
  the commit index (``must_sync`` false) is finished at once too, and its hard state is held:
  it rides in front of the next submit (no fsync of its own), or goes alone at the next tick
  if nothing else was written (the commit index need not be durable: it is re-learned).
- Snapshots: after ``snapshot_entries`` applied entries past the last snapshot of a group, or
  when more than ``wal_segments_max`` WAL segments are alive (then the groups pinning the oldest
  one), the driver takes ``StateMachine.snapshot(group)`` at the applied index and compacts the
  log to it in the next group commit — or, with a ``compact_floor`` (the application keeps
  what entries produce elsewhere, e.g. an archive), as soon as the floor reaches the snapshot's
  index: the log never loses an entry the application has not made durable.  Snapshots
  received from a leader are restored with ``StateMachine.restore``, then reported to
  ``on_snapshot_installed``.
- Proposals resolve with the state machine's result once applied on this node.  If another
  entry is applied at their index (a new leader overwrote it) they fail with
  ``ProposalDropped``; when this node stops leading the group, or a snapshot jumps over them,
  with ``OutcomeUnknown`` (they may still commit).  At most ``pending_max`` proposals and
  reads wait at once (``ProposalDropped`` beyond).  A proposal not applied within
  ``proposal_timeout_s`` (a group that cannot commit) fails with ``OutcomeUnknown`` too, at the
  next sweep, so a stuck group cannot hold the node's slots: its callers' deadlines are shorter.
- A failed WAL write stops the node: every waiter fails and ``failed`` resolves; the process
  must exit and recover from disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass
from typing import Any, Protocol

from .core import Role
from .errors import (
    InvariantViolation,
    NodeStopped,
    OutcomeUnknown,
    ProposalDropped,
    RaftError,
    WalFailed,
)
from .messages import ConfState, Entry, HardState, Message, Snapshot, SnapshotMeta
from .multi import MultiRaft
from .rawnode import Ready
from .storage import MemoryStorage, bootstrap
from .transport import Item, Transport
from .wal import WAL, GroupWrite, WriteMode, Written

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

SWEEP_TICKS = 100


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
    applied_entries: int = 0
    snapshots_taken: int = 0
    snapshots_restored: int = 0
    soft_state_changes: int = 0  # leader or role changes of a group
    proposals_expired: int = 0  # failed after proposal_timeout_s without being applied
    messages_sent: int = 0
    pass_seconds_max: float = 0.0


ResultCallback = Callable[[Any, BaseException | None], None]
"""A callback in place of a future: ``(result, None)`` or ``(None, error)``, called once
(``Driver.propose_then``, ctxstore's ``Router.submit_then``)."""


class _Waiter:
    """A proposal waiting to be applied (one per append on a leader).  Hot-path records are
    plain classes: compiled, their ``__init__`` is native; a dataclass's stays interpreted."""

    __slots__ = ("done", "proposed_at", "term")

    def __init__(self, term: int, done: ResultCallback, proposed_at: float) -> None:
        self.term = term
        self.done = done
        self.proposed_at = proposed_at  # time.perf_counter() (commit latency)


def _resolve(w: _Waiter, result: object, exc: BaseException | None) -> None:
    try:
        w.done(result, exc)
    except Exception:  # a caller's bug must not stop the pass that applies the group
        logger.exception("a proposal's callback failed")


def settle(future: asyncio.Future[Any]) -> ResultCallback:
    """A ``(result, error)`` callback that completes ``future`` (unless it is done already)."""

    def done(result: object, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)

    return done


class _Round:
    """A WAL submit and the Readies that wait for it (a plain class, as ``_Waiter``)."""

    __slots__ = ("failed", "readies", "written")

    def __init__(self, readies: list[tuple[int, Ready]]) -> None:
        self.readies = readies
        self.written: Written | None = None
        self.failed: BaseException | None = None


class Driver:
    def __init__(
        self,
        host: MultiRaft,
        wal: WAL,
        state_machine: StateMachine,
        config: DriverConfig | None = None,
        on_leader_change: Callable[[int, int], None] = lambda group, leader: None,
    ) -> None:
        self.host = host
        self.wal = wal
        self.sm = state_machine
        self.config = config or DriverConfig()
        self.on_leader_change = on_leader_change
        self.transport: Transport | None = None
        self.stats = DriverStats()
        self.on_commit_latency: Callable[[float], None] | None = None  # propose -> applied, s
        # The highest index of a group the application has made durable elsewhere (an archive):
        # the log is never compacted past it.  None: no such bound.
        self.compact_floor: Callable[[int], int] | None = None
        # Called with (group, index) after a snapshot from a leader replaced a group's state.
        self.on_snapshot_installed: Callable[[int, int], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._tick_handle: asyncio.TimerHandle | None = None
        self._next_tick = 0.0
        self._rounds: deque[_Round] = deque()  # submitted, in submission order
        self._proposals: dict[int, dict[int, _Waiter]] = {}  # group -> index -> waiter
        self._reads: dict[int, dict[bytes, asyncio.Future[int]]] = {}  # group -> ctx -> future
        self._read_waits: dict[int, list[tuple[int, asyncio.Future[int]]]] = {}
        self._pending = 0
        # A read's context is this process's random prefix and a counter: an answer still on
        # its way to an earlier process of this node must not answer a read of this one (both
        # counters start at 1).  The core never matches by context (docs/raft.md §8.7).
        self._read_prefix = os.urandom(8)
        self._read_seq = 0
        self._snap_index: dict[int, int] = {}  # group -> index of its newest (or coming) snapshot
        self._compact: set[int] = set()
        self._held: dict[int, Snapshot] = {}  # group -> snapshot taken, waiting for the floor
        self._out: dict[int, list[Item]] = {}
        # Hard states whose only change is the commit index (need not be durable at once).
        self._lazy_hard_states: dict[int, HardState] = {}
        self._submitted_since_tick = False
        self.failed: asyncio.Future[BaseException] | None = None
        self._stopped = False

    # -- set-up --------------------------------------------------------------------------------
    def add_groups(self, groups: Iterable[int], voters: tuple[int, ...]) -> None:
        """Host ``groups``; a group new to this WAL starts with ``voters`` (one fsync for all)."""
        groups = list(groups)
        fresh = []
        for g in groups:
            view = self.wal.storage(g)
            if view.last_index() == 0 and view.snap_meta.index == 0:
                memory = MemoryStorage()
                bootstrap(memory, ConfState(voters))
                fresh.append(GroupWrite(g, memory.ents[1:], memory.hard_state))
        if fresh:
            self.wal.write_sync(fresh)
        for g in groups:
            view = self.wal.storage(g)
            snap = view.snapshot()
            self.sm.restore(g, snap.data)
            self._snap_index[g] = snap.meta.index
            self.host.add_group(g, view, applied=snap.meta.index)
            self._proposals[g] = {}
            self._reads[g] = {}
            self._read_waits[g] = []

    def attach(self, transport: Transport) -> None:
        self.transport = transport

    def transport_callbacks(
        self,
    ) -> tuple[
        Callable[[int, list[Item]], None],
        Callable[[int], None],
        Callable[[int], None],
        Callable[[int, int, bool], None],
    ]:
        """``on_batch, on_peer_up, on_peer_down, on_snapshot_status`` for ``Transport``."""
        return self.on_batch, self.on_peer_up, self.on_peer_down, self.on_snapshot_status

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.failed = self._loop.create_future()
        self._next_tick = self._loop.time() + self.config.tick_s
        self._tick_handle = self._loop.call_at(self._next_tick, self._on_tick)
        self._kick()

    async def stop(self) -> None:
        """Stop ticking and fail every waiter; what was submitted is still written."""
        self._stopped = True
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        while self._rounds and self._rounds[0].failed is None:
            await asyncio.sleep(0.001)
            if self.failed is not None and self.failed.done():
                break
        self._fail_all(NodeStopped("the node is stopping"))

    # -- requests from the application ----------------------------------------------------------
    def propose(self, group: int, data: bytes) -> asyncio.Future[object]:
        """Propose ``data`` to ``group`` (this node must lead it: ``NotLeader`` otherwise).

        The future resolves with ``StateMachine.apply``'s result for the entry once it is
        applied here."""
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[object] = loop.create_future()
        self.propose_then(group, data, settle(future))
        return future

    def propose_then(self, group: int, data: bytes, done: ResultCallback) -> None:
        """``propose`` without a future: ``done(result, None)`` is called once the entry is
        applied here, ``done(None, error)`` if it will not be (``ProposalDropped``, or
        ``OutcomeUnknown``...), from inside the driver's pass and at most once.  ``done`` must
        not raise (it is logged) and must not call into the driver; it saves a future and a
        loop iteration per proposal on the hot path.  Raises as ``propose`` does."""
        self._admit()
        index = self.host.propose(group, data)
        term = self.host.node(group).raft.term
        self._proposals[group][index] = _Waiter(term, done, time.perf_counter())
        self._pending += 1
        self.stats.proposals += 1
        self._kick()

    def read_index(self, group: int) -> asyncio.Future[int]:
        """A linearizable read barrier: resolves with an index once this node has applied
        everything committed before the call (``ProposalDropped`` without a leader)."""
        self._admit()
        self._read_seq += 1
        ctx = self._read_prefix + self._read_seq.to_bytes(8, "big")
        self.host.read_index(group, ctx)
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[int] = loop.create_future()
        self._reads[group][ctx] = future
        self._pending += 1
        self._kick()
        return future

    def transfer_leader(self, group: int, to: int) -> None:
        self.host.transfer_leader(group, to)
        self._kick()

    def compact(self, group: int) -> None:
        """Take a snapshot of ``group`` at its applied index in the next pass."""
        self._compact.add(group)
        self._kick()

    def leader(self, group: int) -> int:
        return self.host.leader(group)

    def _admit(self) -> None:
        if self._stopped:
            raise NodeStopped("the node is stopping")
        if self._pending >= self.config.pending_max:
            raise ProposalDropped(f"{self._pending} requests already waiting on this node")

    # -- inputs from the transport --------------------------------------------------------------
    def on_batch(self, peer: int, items: list[Item]) -> None:
        step = self.host.step
        try:
            for group, message in items:
                step(group, message)
        except BaseException as e:
            self._crash(e)
            raise
        self._kick()

    def on_peer_up(self, peer: int) -> None:
        self.host.peer_up(peer)
        self._kick()

    def on_peer_down(self, peer: int) -> None:
        self.host.peer_down(peer)
        self._kick()

    def on_snapshot_status(self, peer: int, group: int, ok: bool) -> None:
        self.host.report_snapshot(group, peer, failed=not ok)
        self._kick()

    # -- the loop ---------------------------------------------------------------------------------
    def _on_tick(self) -> None:
        try:
            self._tick_once()
        except BaseException as e:
            self._crash(e)
            raise

    def _tick_once(self) -> None:
        loop = self._loop
        assert loop is not None
        if self._stopped:
            return
        self.host.tick()
        if self.host.now % SWEEP_TICKS == 0:
            self._sweep()
        if self._lazy_hard_states and not self._submitted_since_tick:
            self._submit_with_lazy(_Round([]), [])  # an idle node's commit indexes, once
        self._submitted_since_tick = False
        self._kick()
        now = loop.time()
        self._next_tick += self.config.tick_s
        if self._next_tick < now:  # we fell behind (a long pause): do not tick in a burst
            self._next_tick = now + self.config.tick_s
        self._tick_handle = loop.call_at(self._next_tick, self._on_tick)

    def _kick(self) -> None:
        if not self._scheduled and self._loop is not None and not self._stopped:
            self._scheduled = True
            self._loop.call_soon(self._pass)

    def _pass(self) -> None:
        self._scheduled = False
        if self.failed is not None and self.failed.done():
            return
        try:
            self._pass_once()
        except BaseException as e:
            self._crash(e)
            raise

    def _pass_once(self) -> None:
        started = time.perf_counter()
        writes = self._compactions()
        readies = self.host.ready()
        if not readies and not writes:
            return
        self.stats.passes += 1
        self.stats.readies += len(readies)
        wait: list[tuple[int, Ready]] = []
        now: list[tuple[int, Ready]] = []
        lazy = self._lazy_hard_states
        for group, rd in readies:
            if rd.soft_state is not None:
                self.stats.soft_state_changes += 1
                if rd.soft_state.role is not Role.LEADER:
                    self._deposed(group)
                self.on_leader_change(group, rd.soft_state.lead)
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
        self._flush()  # the leader's appends leave before its own fsync starts:
        if writes:
            if self.wal.mode is WriteMode.INLINE and self.transport is not None:
                self.transport.flush_now()  # written now, not after the inline fsync below
            self._submit_with_lazy(_Round(wait), writes)
        for group, rd in now:
            self._finish(group, rd)
        self._flush()
        elapsed = time.perf_counter() - started
        if elapsed > self.stats.pass_seconds_max:
            self.stats.pass_seconds_max = elapsed

    def _submit_with_lazy(self, rnd: _Round, writes: list[GroupWrite]) -> None:
        """Submit, with the commit-only hard states held since the last submit in front: they
        are older than anything in ``writes``, and ride on its fsync instead of costing one."""
        lazy = self._lazy_hard_states
        if lazy:
            writes = [GroupWrite(g, hard_state=hs) for g, hs in lazy.items()] + writes
            lazy.clear()
        self._submitted_since_tick = True
        self._submit(rnd, writes)

    def _submit(self, rnd: _Round, writes: list[GroupWrite]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            future = self.wal.submit(writes)
        except WalFailed as e:
            self._wal_failed(e)
            return
        self.stats.submits += 1
        self._rounds.append(rnd)

        if future.done():  # an inline WAL wrote it already: finish the round in this pass
            self._written_once(rnd, future)
            return

        def done(f: ThreadFuture[Written]) -> None:  # on the writer thread
            loop.call_soon_threadsafe(self._written, rnd, f)

        future.add_done_callback(done)

    def _written(self, rnd: _Round, f: ThreadFuture[Written]) -> None:
        try:
            self._written_once(rnd, f)
        except BaseException as e:
            self._crash(e)
            raise

    def _written_once(self, rnd: _Round, f: ThreadFuture[Written]) -> None:
        exc = f.exception()
        if exc is not None:
            rnd.failed = exc
            self._wal_failed(exc)
            return
        rnd.written = f.result()
        # Publish strictly in submission order (the writer resolves in order anyway).
        while self._rounds and self._rounds[0].written is not None:
            head = self._rounds.popleft()
            assert head.written is not None
            self.wal.publish(head.written)
            for group, rd in head.readies:
                self._finish(group, rd)
        self._flush()
        self._kick()

    def _finish(self, group: int, rd: Ready) -> None:
        """The Ready is durable: send what waited for it, apply, advance."""
        self._queue(group, rd.persisted_messages)
        if rd.snapshot is not None:
            self.sm.restore(group, rd.snapshot.data)
            self.stats.snapshots_restored += 1
            self._held.pop(group, None)  # older than what was just installed
            self._snap_index[group] = max(self._snap_index[group], rd.snapshot.meta.index)
            self._jumped(group, rd.snapshot.meta.index)
            if self.on_snapshot_installed is not None:
                self.on_snapshot_installed(group, rd.snapshot.meta.index)
        if rd.committed_entries:
            results = self.sm.apply(group, rd.committed_entries)
            self.stats.applied_entries += len(rd.committed_entries)
            waiting = self._proposals[group]
            if waiting:
                for e, result in zip(rd.committed_entries, results, strict=True):
                    w = waiting.pop(e.index, None)
                    if w is None:
                        continue
                    self._pending -= 1
                    if w.term == e.term:
                        _resolve(w, result, None)
                        if self.on_commit_latency is not None:
                            self.on_commit_latency(time.perf_counter() - w.proposed_at)
                    else:
                        dropped = ProposalDropped(f"entry {e.index} was replaced by a new leader")
                        _resolve(w, None, dropped)
        for rs in rd.read_states:
            fut = self._reads[group].pop(rs.context, None)
            if fut is not None:
                self._read_waits[group].append((rs.index, fut))
        self.host.advance(group, rd)
        applied = self.host.node(group).raft.log.applied
        waits = self._read_waits[group]
        if waits:
            keep = []
            for index, fut in waits:
                if index <= applied:
                    self._pending -= 1
                    if not fut.done():
                        fut.set_result(index)
                else:
                    keep.append((index, fut))
            self._read_waits[group] = keep
        if applied - self._snap_index[group] >= self.config.snapshot_entries:
            self._compact.add(group)
            self._kick()

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
            _resolve(w, None, error())

    def _jumped(self, group: int, index: int) -> None:
        waiting = self._proposals[group]
        for i in [i for i in waiting if i <= index]:
            w = waiting.pop(i)
            self._pending -= 1
            _resolve(w, None, OutcomeUnknown(f"a snapshot at {index} covered entry {i}"))

    def _compactions(self) -> list[GroupWrite]:
        floor = self.compact_floor
        writes = []
        if self._held:
            assert floor is not None
            for group in [g for g, snap in self._held.items() if floor(g) >= snap.meta.index]:
                writes.append(GroupWrite(group, compact=self._held.pop(group)))
                applied = self.host.node(group).raft.log.applied
                if applied - self._snap_index[group] >= self.config.snapshot_entries:
                    self._compact.add(group)  # it fell behind while this one waited
        if self.wal.segment_count() > self.config.wal_segments_max:
            self._compact.update(self.wal.oldest_segment_groups())
        if not self._compact:
            return writes
        for group in sorted(self._compact):
            if group in self._held:  # the one taken waits for the floor: not a newer one
                self._compact.discard(group)
                continue
            node = self.host.node(group)
            if node.outstanding:
                continue  # after its Ready is advanced (the snapshot must match applied)
            self._compact.discard(group)
            r = node.raft
            applied = r.log.applied
            if applied <= self._snap_index[group]:
                continue
            meta = SnapshotMeta(applied, r.log.term(applied), r.conf_state())
            snap = Snapshot(meta, self.sm.snapshot(group))
            self._snap_index[group] = applied
            self.stats.snapshots_taken += 1
            if floor is not None and floor(group) < applied:
                self._held[group] = snap  # compacted once the floor reaches it
            else:
                writes.append(GroupWrite(group, compact=snap))
        return writes

    # -- output ---------------------------------------------------------------------------------
    def _queue(self, group: int, messages: list[Message]) -> None:
        out = self._out
        for m in messages:
            items = out.get(m.to)
            if items is None:
                items = out[m.to] = []
            items.append((group, m))

    def _flush(self) -> None:
        if not self._out:
            return
        out, self._out = self._out, {}
        transport = self.transport
        if transport is None:
            return  # a single-node cluster
        for to, items in out.items():
            self.stats.messages_sent += len(items)
            transport.send(to, items)

    def _sweep(self) -> None:
        """Forget reads whose caller gave up (a lost ReadIndex answer is never resent); fail
        proposals waiting for longer than ``proposal_timeout_s``."""
        for reads in self._reads.values():
            for ctx in [c for c, f in reads.items() if f.done()]:
                del reads[ctx]
                self._pending -= 1
        timeout = self.config.proposal_timeout_s
        cutoff = time.perf_counter() - timeout
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
                _resolve(w, None, error)

    # -- failure ----------------------------------------------------------------------------------
    def _crash(self, exc: BaseException) -> None:
        """A bug or a broken invariant: stop everything; the process must exit."""
        logger.critical("driver stopped by %r", exc, exc_info=exc)
        self._wal_failed(exc)

    def _wal_failed(self, exc: BaseException) -> None:
        logger.critical("the node stops: %r", exc)
        self._stopped = True
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self.failed is not None and not self.failed.done():
            self.failed.set_result(exc)
        self._fail_all(NodeStopped(f"the WAL failed: {exc!r}"))

    def _fail_all(self, exc: RaftError) -> None:
        for group in self._proposals:
            self._drop_waiters(group, lambda: exc)
        for reads in self._reads.values():
            for fut in reads.values():
                if not fut.done():
                    fut.set_exception(exc)
            reads.clear()
        for group, waits in self._read_waits.items():
            for _, fut in waits:
                if not fut.done():
                    fut.set_exception(exc)
            self._read_waits[group] = []
        self._pending = 0


__all__ = [
    "Driver",
    "DriverConfig",
    "DriverStats",
    "NodeStopped",
    "OutcomeUnknown",
    "StateMachine",
]
