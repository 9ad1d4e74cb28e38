"""The asyncio shell of a node's driver (design §3.5, docs/raft.md "Driver").

Everything the driver decides is in the pipeline (raft/pipeline.py, sans I/O, also run by the
simulator); this shell only gives it an event loop:

- the tick timer (``DriverConfig.tick_s``; after a long pause it does not tick in a burst);
- one pass per loop iteration at most (``call_soon`` once, whatever asked for it), so
  everything that arrived in an iteration shares one group commit and one frame per peer;
- the hand-off of a write the WAL's thread finished back to the loop
  (``call_soon_threadsafe``);
- futures for callers that want them (``propose``, ``read_index``), the ``failed`` future, and
  the transport's callbacks.  An exception escaping the pipeline stops it (``Pipeline.fail``).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future as ThreadFuture
from typing import Any

from .errors import NodeStopped, OutcomeUnknown
from .messages import ConfChange
from .multi import MultiRaft
from .pipeline import (
    DriverConfig,
    DriverStats,
    Item,
    Pipeline,
    ResultCallback,
    Round,
    StateMachine,
)
from .transport import Transport
from .wal import WAL, Written


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
        # A read's context starts with this process's random prefix: an answer still on its way
        # to an earlier process of this node must not answer a read of this one.
        p = self.pipeline = Pipeline(
            host, wal, state_machine, self.config, time.perf_counter, os.urandom(8)
        )
        p.on_leader_change = on_leader_change
        p.wait_for_write = self._hand_off
        p.want_pass = self._kick
        p.on_stop = self._on_stop
        self.transport: Transport | None = None
        self.failed: asyncio.Future[BaseException] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False
        self._stopping = False
        self._tick_handle: asyncio.TimerHandle | None = None
        self._next_tick = 0.0
        # Called at the start of each pass, before the pipeline's: the application's last
        # chance to propose what it gathered in this loop iteration (ctxstore's router batches
        # appends so).  It may propose; it must not raise.
        self.before_pass: Callable[[], None] | None = None

    # -- the pipeline's settings, for the application ----------------------------------------
    @property
    def stats(self) -> DriverStats:
        return self.pipeline.stats

    @property
    def on_leader_change(self) -> Callable[[int, int], None] | None:
        return self.pipeline.on_leader_change

    @on_leader_change.setter
    def on_leader_change(self, hook: Callable[[int, int], None] | None) -> None:
        self.pipeline.on_leader_change = hook

    @property
    def on_commit_latency(self) -> Callable[[float], None] | None:
        """Called with each proposal's seconds from ``propose`` to applied here."""
        return self.pipeline.on_commit_latency

    @on_commit_latency.setter
    def on_commit_latency(self, hook: Callable[[float], None] | None) -> None:
        self.pipeline.on_commit_latency = hook

    @property
    def compact_floor(self) -> Callable[[int], int] | None:
        """The highest index of a group the application made durable elsewhere (an archive):
        the log is never compacted past it.  None: no such bound."""
        return self.pipeline.snapshots.floor

    @compact_floor.setter
    def compact_floor(self, floor: Callable[[int], int] | None) -> None:
        self.pipeline.snapshots.floor = floor

    @property
    def on_snapshot_installed(self) -> Callable[[int, int], None] | None:
        """Called with (group, index) after a snapshot from a leader replaced a group's state."""
        return self.pipeline.on_snapshot_installed

    @on_snapshot_installed.setter
    def on_snapshot_installed(self, hook: Callable[[int, int], None] | None) -> None:
        self.pipeline.on_snapshot_installed = hook

    @property
    def on_removed(self) -> Callable[[int], None] | None:
        """Called with a group once this node applied its own removal from it (a
        ``REMOVE_NODE`` of itself, after which it is neither voter nor learner), after the pass
        that applied it; again after a restart if the group was not removed meanwhile.  The
        application answers with ``remove_group`` (ctxstore: ``retire.retire_group``)."""
        return self.pipeline.on_removed

    @on_removed.setter
    def on_removed(self, hook: Callable[[int], None] | None) -> None:
        self.pipeline.on_removed = hook

    # -- set-up --------------------------------------------------------------------------------
    def add_groups(self, groups: Iterable[int], voters: tuple[int, ...]) -> None:
        """Host ``groups``; a group new to this WAL starts with ``voters`` (one fsync for all).
        A group the WAL says was removed (``removed_groups``) is never bootstrapped: it is
        hosted empty, to join as a learner; a node that does not want it skips it."""
        self.pipeline.add_groups(groups, voters)

    def removed_groups(self) -> list[int]:
        """The groups this node left (their tombstone is their last durable record)."""
        return self.wal.removed_groups()

    def remove_group(self, group: int) -> asyncio.Future[object]:
        """Stop hosting ``group`` now (``Pipeline.remove_group``); the future resolves once
        its tombstone is durable (a restart no longer knows the group), or fails
        ``NodeStopped`` if the driver stops first.  Raises ``GroupNotHosted`` if it is not
        hosted."""
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[object] = loop.create_future()
        self.pipeline.remove_group(group, settle(future))
        return future

    def attach(self, transport: Transport) -> None:
        self.transport = transport
        self.pipeline.outbox = transport
        transport.on_commits = self.on_commits

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
        self._stopping = True
        self.pipeline.stopped = True
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        while self.pipeline.writing():
            await asyncio.sleep(0.001)
            if self.failed is not None and self.failed.done():
                break
        self.pipeline.fail_all(NodeStopped("the node is stopping"))

    # -- requests from the application ----------------------------------------------------------
    def propose(self, group: int, data: bytes) -> asyncio.Future[object]:
        """Propose ``data`` to ``group`` (this node must lead it: ``NotLeader`` otherwise).

        The future resolves with ``StateMachine.apply``'s result for the entry once it is
        applied here."""
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[object] = loop.create_future()
        self.pipeline.propose(group, data, settle(future))
        return future

    def propose_then(self, group: int, data: bytes, done: ResultCallback) -> None:
        """``propose`` without a future (``Pipeline.propose``): ``done(result, None)`` once the
        entry is applied here, ``done(None, error)`` if it will not be (``ProposalDropped``,
        ``OutcomeUnknown``...), from inside the driver's pass and at most once.  ``done`` must
        not raise (it is logged) and must not call into the driver; it saves a future and a
        loop iteration per proposal on the hot path.  Raises as ``propose`` does."""
        self.pipeline.propose(group, data, done)

    def propose_conf_change(self, group: int, change: ConfChange) -> asyncio.Future[object]:
        """A membership change of ``group`` (``Pipeline.propose_conf_change``); the future
        resolves once it is applied here."""
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[object] = loop.create_future()
        self.pipeline.propose_conf_change(group, change, settle(future))
        return future

    def read_index(self, group: int) -> asyncio.Future[int]:
        """A linearizable read barrier: resolves with an index once this node has applied
        everything committed before the call (``ProposalDropped`` without a leader)."""
        loop = self._loop
        assert loop is not None
        future: asyncio.Future[int] = loop.create_future()
        self.pipeline.read_index(group, settle(future), future.done)
        return future

    def read_index_then(
        self, group: int, done: ResultCallback, abandoned: Callable[[], bool] | None = None
    ) -> None:
        """``read_index`` without a future (``Pipeline.read_index``): ``done(index, None)`` or
        ``done(None, error)`` from inside the driver's pass, at most once; it must not raise and
        must not call into the driver.  ``abandoned()`` true: the caller gave up."""
        self.pipeline.read_index(group, done, abandoned)

    def transfer_leader(self, group: int, to: int) -> None:
        self.pipeline.transfer_leader(group, to)

    def compact(self, group: int) -> None:
        """Take a snapshot of ``group`` at its applied index in the next pass."""
        self.pipeline.compact(group)

    def leader(self, group: int) -> int:
        return self.host.leader(group)

    # -- inputs from the transport --------------------------------------------------------------
    def on_batch(self, peer: int, items: list[Item]) -> None:
        try:
            self.pipeline.step(items)
        except BaseException as e:
            self.pipeline.fail(e)
            raise

    def on_commits(self, peer: int, notices: list[int]) -> None:
        """``Transport``'s ``on_commits``: a peer's commit notices (``MultiRaft``)."""
        try:
            self.pipeline.commit_notices(peer, notices)
        except BaseException as e:
            self.pipeline.fail(e)
            raise

    def on_peer_up(self, peer: int) -> None:
        self.pipeline.peer_up(peer)

    def on_peer_down(self, peer: int) -> None:
        self.pipeline.peer_down(peer)

    def on_snapshot_status(self, peer: int, group: int, ok: bool) -> None:
        self.pipeline.snapshot_status(peer, group, ok)

    # -- the loop ---------------------------------------------------------------------------------
    def _on_tick(self) -> None:
        loop = self._loop
        assert loop is not None
        if self._stopping:
            return
        try:
            self.pipeline.tick()
        except BaseException as e:
            self.pipeline.fail(e)
            raise
        now = loop.time()
        self._next_tick += self.config.tick_s
        if self._next_tick < now:  # we fell behind (a long pause): do not tick in a burst
            self._next_tick = now + self.config.tick_s
        self._tick_handle = loop.call_at(self._next_tick, self._on_tick)

    def kick(self) -> None:
        """Ask for a pass in the next loop iteration (``before_pass`` runs first)."""
        self._kick()

    def _kick(self) -> None:
        if not self._scheduled and self._loop is not None and not self._stopping:
            self._scheduled = True
            self._loop.call_soon(self._pass)

    def _pass(self) -> None:
        started = time.perf_counter()
        try:
            if self.before_pass is not None:
                self.before_pass()  # its proposals join this pass (none schedules another)
            self._scheduled = False
            worked = self.pipeline.run_pass()
        except BaseException as e:
            self.pipeline.fail(e)
            raise
        if worked:
            elapsed = time.perf_counter() - started
            stats = self.pipeline.stats
            if elapsed > stats.pass_seconds_max:
                stats.pass_seconds_max = elapsed

    def _hand_off(self, rnd: Round, future: ThreadFuture[Written]) -> None:
        """A write the WAL's thread will finish: back to the loop once it has."""
        loop = self._loop
        assert loop is not None

        def done(f: ThreadFuture[Written]) -> None:  # on the writer thread
            loop.call_soon_threadsafe(self._written, rnd, f)

        future.add_done_callback(done)

    def _written(self, rnd: Round, f: ThreadFuture[Written]) -> None:
        try:
            self.pipeline.written(rnd, f)
        except BaseException as e:
            self.pipeline.fail(e)
            raise

    def _on_stop(self, exc: BaseException) -> None:
        self._stopping = True
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self.failed is not None and not self.failed.done():
            self.failed.set_result(exc)


__all__ = [
    "Driver",
    "DriverConfig",
    "DriverStats",
    "NodeStopped",
    "OutcomeUnknown",
    "ResultCallback",
    "StateMachine",
    "settle",
]
