"""Routing a write to its group's leader, wherever the request arrived (design §4.1, §6).

``Router.submit(group, command)`` returns a future resolved with the state machine's result for
the command once the group's leader applied it (``submit_then`` calls back instead, without a
future: the service's hot path):

- this node leads the group: ``Driver.propose``;
- another node leads it: the command travels to it on the peer connection's application lane
  (``Transport.send_app``, batched per loop iteration) as a ``Forward``; the leader proposes it
  and answers with a ``ForwardReply`` carrying the encoded result;
- no leader is known: the request waits for one (``leader_wait_s``), then fails ``unavailable``;
- the group is no longer hosted here (it moved to other nodes while the request waited for a
  leader or a retry), or it is moving away (no longer ``placed`` here) and no leader is known
  here (a replica being removed hears from no leader until it retires the group): it is
  not served here.  A read, or a write never proposed here, fails at once with ``GroupMoved``
  (``unavailable``): nothing of it was applied, so the service hands the client's request on
  to the group's new replicas (``ctxstore.relay``) instead of answering.  A write proposed
  here before (refused, or replaced by a new leader's entry, then re-routed) fails a plain
  ``unavailable`` at once (not applied either): the client resends it elsewhere.  (Callers
  other than the service, a ``GroupMoved`` is just ``unavailable`` to them.)

A forward that meets a node that no longer leads, or no longer hosts the group (it moved away),
comes back ``not_leader`` with a hint (none from the latter) and is re-routed (at most
``hops_max`` times): nothing was proposed, so that is safe.  Likewise a
proposal refused at once (``ProposalDropped``) or replaced by a new leader's entry was never
applied and is retried while time remains.  Everything else whose outcome is unknown (the
leader's connection dropped with the forward in flight, the deadline passed, a snapshot jumped
over the entry) fails with ``timeout``: the client retries with its ``client_msg_id``, which the
state machine deduplicates.

Every request has a deadline (``request_timeout_s``) that holds on every path: a request
still unanswered at its deadline — waiting for a leader, forwarded, proposed here and not yet
applied (a group that cannot commit), retrying a read barrier — fails then (``timeout``; its
late result is dropped), checked every ``SWEEP_S``.  Waiting forwards are bounded
(``forwards_max``) and fail at once when the peer they wait on goes down.  A command over
``entry_bytes_max`` (commands.ENTRY_BYTES_MAX) is refused ``too_large`` before anything else:
the peer transport could not carry it (ctxstore/limits.py).
Which failure is which is decided in one place, ``errors.proposal_outcome``, on both sides of
a forward.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import msgspec

from raft import NONE, RaftError
from raft.driver import Driver, ResultCallback, settle
from raft.transport import Transport

from . import commands
from .errors import OUTCOME_CODES, Outcome, ServiceError, proposal_outcome
from .peer_messages import (
    RELAY_ENVELOPES,
    STRAY_ENVELOPES,
    Advertise,
    ChunkInterest,
    ChunkRelay,
    Forward,
    ForwardReply,
    HistoryFetch,
    HistoryRows,
    Led,
    MemberAnswer,
    MemberQuery,
)
from .peer_messages import decode_envelope as _decode_envelope
from .peer_messages import encode as _encode
from .relay import Relay

logger = logging.getLogger(__name__)

SWEEP_S = 0.05  # how often deadlines are checked (a request fails at most this late)


RouteError = ServiceError  # the name the router's callers know it by


class GroupMoved(ServiceError):
    """``unavailable``: the request's group left this node (or is leaving it with no leader
    known here) before anything of the request was proposed here (a read, or a write only
    ever forwarded and refused ``not_leader``): its caller may hand it on to the group's
    replicas, who deduplicate a write by its ``client_msg_id`` anyway."""


CHUNK_INTEREST_MAX = 100_000  # sessions one peer may ask chunks of (more are ignored)
HistoryServer = Callable[[HistoryFetch], Coroutine[Any, Any, HistoryRows]]


@dataclass(frozen=True)
class RouterConfig:
    request_timeout_s: float = 5.0
    leader_wait_s: float = 3.0
    hops_max: int = 5
    forwards_max: int = 100_000
    retry_delay_s: float = 0.02
    history_serves_max: int = 8  # history fetches served at once (more: "unavailable")
    read_retry_s: float = 1.0  # a read barrier not answered by then is asked again
    entry_bytes_max: int = commands.ENTRY_BYTES_MAX  # a bigger command: too_large
    batch_appends_max: int = 1024  # appends in one AppendBatch entry (1: no batching)


class _Pending:
    __slots__ = (
        "append", "asks", "command", "deadline", "done", "finished", "group", "hops", "peer",
        "proposed", "wait_until",
    )  # fmt: skip

    def __init__(
        self,
        group: int,
        command: bytes | None,
        done: ResultCallback,
        deadline: float,
        append: bool = False,
    ) -> None:
        self.group = group
        self.command = command
        self.append = append  # command is an encoded commands.Append
        self.done = done
        self.finished = False
        self.deadline = deadline
        self.hops = 0
        self.peer = NONE  # the node a forward waits on
        self.wait_until = 0.0  # while no leader is known: give up then
        self.asks = 0  # read barriers asked for it (a read: the newest is retried)
        self.proposed = False  # a write proposed here (then never handed on: ``_gone``)


class Router:
    """Its I/O is three objects, each replaceable (tests/sim runs the router over a simulated
    network and clock): ``driver`` (``leader``, ``propose_then``, ``read_index_then``, ``kick``,
    ``host``), the transport given to ``attach`` (``is_connected``, ``connected_peers``,
    ``send_app``), and ``loop``, whose ``time``, ``call_later`` and ``call_soon`` are the
    router's clock and timers (default: the running loop, found at first use).
    ``fid_start``: the first forward id (default: random)."""

    def __init__(
        self,
        node_id: int,
        driver: Driver,
        config: RouterConfig | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        fid_start: int | None = None,
    ) -> None:
        self.node_id = node_id
        self.driver = driver
        self.config = config or RouterConfig()
        self.transport: Transport | None = None
        # Forward and fetch ids, unique across this node's processes too (they start at
        # random): a peer answers on whatever connection is up when it answers, so a reply
        # meant for an earlier process of this node may reach this one; it must match nothing.
        if fid_start is None:
            fid_start = int.from_bytes(os.urandom(6), "big") << 16
        self._fids = itertools.count(fid_start)
        self._forwards: dict[int, _Pending] = {}  # fid -> request forwarded by this node
        self._leader_waits: dict[int, list[_Pending]] = {}  # group -> requests without a leader
        # Every request, in the order of its deadline (all share request_timeout_s); finished
        # ones leave when they reach the front, so this holds at most a timeout's requests.
        self._deadlines: deque[_Pending] = deque()
        # Read barriers asked, in the order asked: (when to ask again, request, its ask number).
        self._read_retries: deque[tuple[float, _Pending, int]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self.client_address = ""  # set by the server once it listens
        self.addresses: dict[int, str] = {}  # node id -> client address (advertised)
        self.forwarded = 0  # requests this node sent to a leader
        self.served_forwards = 0  # requests other nodes forwarded to this node
        self.group_gone = 0  # requests failed because their group left (or leaves) this node
        # Whether the cluster view places a group here (False: it is moving away; ctxstore.node)
        self.placed: Callable[[int], bool] = lambda group: True
        self.history_server: HistoryServer | None = None
        self.on_chunks: Callable[[str, int, int, list[dict[str, Any]]], object] | None = None
        self.chunk_sessions: Callable[[], list[str]] = list  # those with subscribers here
        self._chunk_peers: dict[int, set[str]] = {}  # peer -> sessions it wants chunks of
        self.chunks_relayed = 0
        self.relay: Relay | None = None  # requests for groups not hosted here (ctxstore.relay)
        # Membership questions about groups a node may have left (ctxstore.strays)
        self.on_member: Callable[[int, MemberQuery | MemberAnswer], None] | None = None
        self.on_led: Callable[[int, int], None] | None = None  # a peer's led groups (mover)
        self._fetches: dict[int, tuple[asyncio.Future[HistoryRows], int, float]] = {}
        self._history_serving = 0
        # group -> the appends to propose in this loop iteration's pass, in arrival order:
        # (encoded Append, callback); proposed by ``propose_batches``, called by the driver at
        # the start of its pass.  Bounded by what one iteration reads off the sockets.
        self._batches: dict[int, list[tuple[bytes, ResultCallback]]] = {}
        self.appends_batched = 0  # appends proposed inside an AppendBatch entry
        self.batches_proposed = 0  # AppendBatch entries proposed
        # The loop, kept: asyncio.get_running_loop() costs a getpid() system call each time
        # (fork detection), a few percent of a node's CPU when done per request.
        self._loop: asyncio.AbstractEventLoop | None = loop

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def attach(self, transport: Transport) -> None:
        self.transport = transport

    def start(self) -> None:
        loop = self._running_loop()
        self._timer = loop.call_later(SWEEP_S, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.relay is not None:
            self.relay.stop()
        batches, self._batches = self._batches, {}
        for appends in batches.values():
            for _, done in appends:
                done(None, RouteError("unavailable", "the node is stopping"))
        for waits in self._leader_waits.values():  # sent nowhere yet
            for p in waits:
                self._fail(p, RouteError("unavailable", "the node is stopping"))
        self._leader_waits.clear()
        # Forwarded or proposed here: a read was not served, a write may still commit.
        for p in [*self._forwards.values(), *self._deadlines]:
            if p.command is None:
                self._fail(p, RouteError("unavailable", "the node is stopping"))
            else:
                self._fail(p, RouteError("timeout", "outcome unknown: the node is stopping"))
        self._forwards.clear()
        self._deadlines.clear()
        self._read_retries.clear()
        for fut, _, _ in self._fetches.values():
            if not fut.done():
                fut.set_exception(RouteError("unavailable", "the node is stopping"))
        self._fetches.clear()

    # -- the origin's side -------------------------------------------------------------------
    def submit(self, group: int, command: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._running_loop().create_future()
        self.submit_then(group, command, settle(future))
        return future

    def submit_then(
        self, group: int, command: bytes, done: ResultCallback, append: bool = False
    ) -> None:
        """``submit`` without a future: ``done(result, None)`` or ``done(None, RouteError)``,
        exactly once, possibly from inside the driver's pass (``Driver.propose_then``): it must
        not raise and must not call into the router or the driver synchronously.  ``append``:
        ``command`` is an encoded ``commands.Append``, which the leader may propose together
        with the group's other appends of its loop iteration (``AppendBatch``); the result is
        still this append's own."""
        if len(command) > self.config.entry_bytes_max:
            limit = self.config.entry_bytes_max
            done(None, RouteError("too_large", f"a {len(command)}-byte command > {limit}"))
            return
        deadline = self._running_loop().time() + self.config.request_timeout_s
        self._start(_Pending(group, command, done, deadline, append))

    def barrier(self, group: int) -> asyncio.Future[Any]:
        """A linearizable read barrier for ``group`` (ReadIndex, served by any replica):
        resolves once this node applied everything committed before the call."""
        future: asyncio.Future[Any] = self._running_loop().create_future()
        self.barrier_then(group, settle(future))
        return future

    def barrier_then(self, group: int, done: ResultCallback) -> None:
        """``barrier`` without a future: ``done(index, None)`` or ``done(None, RouteError)``,
        exactly once, possibly from inside the driver's pass, like ``submit_then``'s: a read
        is answered in the pass that serves its barrier, with no loop iteration in between."""
        deadline = self._running_loop().time() + self.config.request_timeout_s
        self._start(_Pending(group, None, done, deadline))

    def _start(self, p: _Pending) -> None:
        self._deadlines.append(p)
        self._route(p)

    def _reachable_leader(self, group: int) -> int:
        """The group's leader if this node can reach it, else NONE (a leader whose peer
        connection is down is as good as none until a new one is elected)."""
        leader = self.driver.leader(group)
        if leader in (NONE, self.node_id) or self.transport is None:
            return leader
        return leader if self.transport.is_connected(leader) else NONE

    def _route(self, p: _Pending) -> None:
        if p.finished:
            return
        if p.group not in self.driver.host:
            self._gone(p)
            return
        leader = self._reachable_leader(p.group)
        if p.command is None:
            if leader == NONE:
                self._wait_for_leader(p)
            else:
                self._read_here(p)
        elif leader == self.node_id:
            self._propose_here(p)
        elif leader == NONE:
            self._wait_for_leader(p)
        else:
            self._forward(p, leader)

    def _wait_for_leader(self, p: _Pending) -> None:
        if not self.placed(p.group):
            self._gone(p)  # (a replica on its way out: the new ones may have a leader)
            return
        now = self._running_loop().time()
        p.wait_until = min(p.deadline, now + self.config.leader_wait_s)
        self._leader_waits.setdefault(p.group, []).append(p)

    def _read_here(self, p: _Pending) -> None:
        p.asks += 1
        ask = p.asks

        def done(index: object, exc: BaseException | None) -> None:
            if p.finished or ask != p.asks:
                return  # answered, or asked again since (that ask answers)
            if exc is not None:
                self._retry_later(p, exc)  # a read may be retried freely
            else:
                self._complete(p, index)

        try:
            self.driver.read_index_then(p.group, done, lambda: p.finished or ask != p.asks)
        except RaftError as e:
            self._retry_later(p, e)
            return
        # A ReadIndex whose answer is lost is never resent: ask again after a while (_sweep).
        at = self._running_loop().time() + self.config.read_retry_s
        self._read_retries.append((at, p, ask))

    def _propose_here(self, p: _Pending) -> None:
        assert p.command is not None
        p.proposed = True

        def failed(exc: BaseException) -> None:
            outcome = proposal_outcome(exc)
            if outcome is Outcome.NOT_APPLIED:
                self._retry_later(p, exc)  # refused, or replaced by a new leader's entry
            elif outcome is Outcome.UNKNOWN:
                self._fail(p, RouteError("timeout", f"outcome unknown: {exc}"))
            else:
                self._fail(p, RouteError(OUTCOME_CODES[outcome], str(exc)))

        def done(result: object, exc: BaseException | None) -> None:
            if p.finished:
                return
            if exc is None:
                self._complete(p, result)
            else:
                failed(exc)

        self._propose(p.group, p.command, done, p.append)

    # -- proposing, appends batched per group and loop iteration -------------------------------
    def _propose(self, group: int, command: bytes, done: ResultCallback, append: bool) -> None:
        """Propose ``command`` here (the leader); ``done`` as ``Driver.propose_then``'s, also
        with the ``RaftError`` of a refused proposal.  An append waits for the driver's next
        pass (``propose_batches``); any other command first sends the group's waiting appends
        ahead of it, so the group's commands keep their arrival order."""
        if append and self.config.batch_appends_max > 1:
            batch = self._batches.get(group)
            if batch is None:
                batch = self._batches[group] = []
                if len(self._batches) == 1:
                    self.driver.kick()
            batch.append((command, done))
            return
        if group in self._batches:
            self._propose_appends(group, self._batches.pop(group))
        try:
            self.driver.propose_then(group, command, done)
        except RaftError as e:
            done(None, e)

    def propose_batches(self) -> None:
        """Propose the appends gathered since the last pass (``Driver.before_pass``): per group,
        one ``AppendBatch`` entry for up to ``batch_appends_max`` of them (and within
        ``entry_bytes_max``), or the append alone."""
        if not self._batches:
            return
        batches = self._batches
        self._batches = {}
        for group, appends in batches.items():
            self._propose_appends(group, appends)

    def _propose_appends(self, group: int, appends: list[tuple[bytes, ResultCallback]]) -> None:
        size_max = self.config.entry_bytes_max - commands.APPEND_BATCH_OVERHEAD_BYTES
        count_max = self.config.batch_appends_max
        start = 0
        while start < len(appends):
            end = start + 1
            size = len(appends[start][0])
            while end < len(appends) and end - start < count_max:
                size += len(appends[end][0])
                if size > size_max:
                    break
                end += 1
            self._propose_batch(group, appends[start:end])
            start = end

    def _propose_batch(self, group: int, appends: list[tuple[bytes, ResultCallback]]) -> None:
        if len(appends) == 1:
            command, done = appends[0]
            data = command
        else:
            data = commands.encode_append_batch([command for command, _ in appends])
            dones = [done for _, done in appends]

            def done(result: object, exc: BaseException | None) -> None:
                # One result per append, in order (ConversationState.apply); a failure is the
                # same for all: the entry was (or was not) applied as a whole.
                results = result if isinstance(result, list) else []
                if exc is None and len(results) != len(dones):
                    exc = RouteError("internal", f"a batch of {len(dones)} got {result!r}")
                for i, one in enumerate(dones):
                    try:
                        if exc is None:
                            one(results[i], None)
                        else:
                            one(None, exc)
                    except Exception:  # like raft.pipeline's: the others are still answered
                        logger.exception("answering an append of a batch failed")

            self.batches_proposed += 1
            self.appends_batched += len(appends)
        try:
            self.driver.propose_then(group, data, done)
        except RaftError as e:
            done(None, e)

    def _forward(self, p: _Pending, leader: int) -> None:
        if self.transport is None:
            self._wait_for_leader(p)
            return
        if len(self._forwards) >= self.config.forwards_max:
            self._fail(p, RouteError("unavailable", "too many forwarded requests waiting"))
            return
        fid = next(self._fids)
        assert p.command is not None
        forward = Forward(fid, p.group, p.command, p.append)
        if not self.transport.send_app(leader, _encode(forward)):
            self._retry_later(p)  # the leader's connection is down: a new leader will come
            return
        p.peer = leader
        self._forwards[fid] = p
        self.forwarded += 1

    def _gone(self, p: _Pending) -> None:
        """``p``'s group is not (or no longer) hosted here: it moved to other nodes while
        ``p`` waited (a leader, a retry); or it is moving away and has no leader here.
        Nothing of ``p`` is in flight here, so it was not applied: it fails at once,
        retryable.  ``GroupMoved`` if it was never proposed here (its caller may hand it on
        to the group's replicas); else a plain ``unavailable``, and the client asks a node
        that hosts the group."""
        self.group_gone += 1
        message = f"group {p.group} moved (or is moving) away from node {self.node_id}: retry"
        if not p.proposed:  # (a read never is)
            self._fail(p, GroupMoved("unavailable", message))
        else:
            self._fail(p, RouteError("unavailable", message))

    def _retry_later(self, p: _Pending, cause: BaseException | None = None) -> None:
        p.hops += 1
        if p.hops > self.config.hops_max:
            why = f" ({cause})" if cause else ""
            self._fail(p, RouteError("unavailable", f"no stable leader for the group{why}"))
            return
        loop = self._running_loop()
        loop.call_later(self.config.retry_delay_s * p.hops, self._route, p)

    def _complete(self, p: _Pending, result: Any) -> None:
        self._finish(p, result, None)

    def _fail(self, p: _Pending, error: RouteError) -> None:
        self._finish(p, None, error)

    @staticmethod
    def _finish(p: _Pending, result: Any, error: RouteError | None) -> None:
        if not p.finished:
            p.finished = True
            p.done(result, error)

    def on_leader_change(self, group: int, leader: int) -> None:
        """(Called from inside the driver's pass, which no request may enter: the requests
        waiting for a leader are routed in the next loop iteration.)"""
        if leader == NONE:
            return
        waits = self._leader_waits.pop(group, None)
        if waits:
            self._running_loop().call_soon(self._route_all, waits)

    def _route_all(self, waits: list[_Pending]) -> None:
        for p in waits:
            self._route(p)

    def relay_chunks(
        self, session_id: str, trigger_seq: int, attempt: int, chunks: list[dict[str, Any]]
    ) -> None:
        """Send live agent chunks (one read's, in order) to the connected peers with
        subscribers of the session, in one ``ChunkRelay`` each."""
        if self.transport is None or not chunks:
            return
        data = b""
        for peer, wanted in self._chunk_peers.items():  # (a peer's entry goes when it does)
            if session_id not in wanted:
                continue
            data = data or _encode(
                ChunkRelay(session_id, trigger_seq, attempt, chunks[0], chunks[1:])
            )
            if self.transport.send_app(peer, data):
                self.chunks_relayed += len(chunks)

    def chunk_interest(self, session_id: str, on: bool) -> None:
        """Tell every connected peer that this node now has (or no longer has) chunk
        subscribers of ``session_id``."""
        if self.transport is None:
            return
        data = _encode(ChunkInterest([session_id], on))
        for peer in self.transport.connected_peers():
            self.transport.send_app(peer, data)

    def on_peer_up(self, peer: int) -> None:
        if self.client_address and self.transport is not None:
            self.transport.send_app(peer, _encode(Advertise(self.node_id, self.client_address)))
        sessions = self.chunk_sessions()
        if sessions and self.transport is not None:
            self.transport.send_app(peer, _encode(ChunkInterest(sessions, True)))

    def on_peer_down(self, peer: int) -> None:
        self._chunk_peers.pop(peer, None)
        if self.relay is not None:
            self.relay.on_peer_down(peer)
        for fid in [f for f, p in self._forwards.items() if p.peer == peer]:
            p = self._forwards.pop(fid)
            self._fail(p, RouteError("timeout", f"node {peer} went down with the request"))
        for fid in [f for f, (_, at, _) in self._fetches.items() if at == peer]:
            fut = self._fetches.pop(fid)[0]
            if not fut.done():
                fut.set_exception(RouteError("unavailable", f"node {peer} went down"))

    def _sweep(self) -> None:
        """Every ``SWEEP_S``, rescheduled first: every deadline depends on it, so an error in
        one round (logged by the loop) must not end the next ones."""
        loop = self._running_loop()
        self._timer = loop.call_later(SWEEP_S, self._sweep)
        now = loop.time()
        for fid in [f for f, p in self._forwards.items() if p.deadline <= now or p.finished]:
            p = self._forwards.pop(fid)
            self._fail(p, RouteError("timeout", "no answer from the leader in time"))
        for fid in [f for f, (fut, _, at) in self._fetches.items() if at <= now or fut.done()]:
            fut = self._fetches.pop(fid)[0]
            if not fut.done():
                fut.set_exception(RouteError("timeout", "no history from the peer in time"))
        host = self.driver.host
        for group in list(self._leader_waits):
            keep = []
            # It may have moved away, or started moving away, since: the waits go on to its
            # leader if one is known here, else fail at once (``_route``).
            placed = group in host and self.placed(group)
            for p in self._leader_waits[group]:
                if p.finished:
                    continue
                if not placed:
                    self._route(p)
                elif p.wait_until <= now:
                    self._fail(p, RouteError("unavailable", f"group {group} has no leader"))
                elif self._reachable_leader(group) != NONE:
                    self._route(p)
                else:
                    keep.append(p)
            if keep:
                self._leader_waits[group] = keep
            else:
                del self._leader_waits[group]
        retries = self._read_retries
        while retries and (retries[0][1].finished or retries[0][0] <= now):
            _, p, ask = retries.popleft()
            if not p.finished and ask == p.asks:
                self._route(p)
        self._expire(now)

    def _expire(self, now: float) -> None:
        """Fail every request past its deadline, wherever it waits (a proposal the group never
        commits, a read barrier retried until then...); what answers it later is dropped."""
        deadlines = self._deadlines
        while deadlines and (deadlines[0].finished or deadlines[0].deadline <= now):
            p = deadlines.popleft()
            if p.finished:
                continue
            if p.command is None:
                self._fail(p, RouteError("timeout", "the read barrier was not confirmed in time"))
            else:
                self._fail(p, RouteError("timeout", "not applied in time; outcome unknown"))

    # -- the leader's side ---------------------------------------------------------------------
    def on_app(self, peer: int, payloads: list[bytes]) -> None:
        for data in payloads:
            try:
                envelope = _decode_envelope(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                logger.warning("dropping a malformed forward from node %d: %s", peer, e)
                continue
            if isinstance(envelope, Forward):
                self._serve(peer, envelope)
            elif isinstance(envelope, RELAY_ENVELOPES):
                self._on_relay(peer, envelope)
            elif isinstance(envelope, STRAY_ENVELOPES):
                if self.on_member is not None:
                    self.on_member(peer, envelope)
            elif isinstance(envelope, Led):
                if self.on_led is not None:
                    self.on_led(peer, envelope.count)
            elif isinstance(envelope, ForwardReply):
                self._answered(peer, envelope)
            elif isinstance(envelope, HistoryFetch):
                self._serve_history(peer, envelope)
            elif isinstance(envelope, ChunkInterest):
                wanted = self._chunk_peers.setdefault(peer, set())
                if not envelope.on:
                    wanted.difference_update(envelope.sessions)
                else:
                    for sid in envelope.sessions:
                        if len(wanted) < CHUNK_INTEREST_MAX:
                            wanted.add(sid)
            elif isinstance(envelope, ChunkRelay):
                if self.on_chunks is not None:
                    self.on_chunks(envelope.session_id, envelope.trigger_seq, envelope.attempt,
                                   [envelope.chunk, *envelope.more])  # fmt: skip
            elif isinstance(envelope, HistoryRows):
                entry = self._fetches.pop(envelope.fid, None)
                if entry is not None and entry[1] == peer and not entry[0].done():
                    entry[0].set_result(envelope)
            elif envelope.node_id == peer:
                self.addresses[peer] = envelope.client_address

    def _on_relay(self, peer: int, envelope: Any) -> None:
        if self.relay is not None:
            self.relay.on_envelope(peer, envelope)

    def _serve(self, peer: int, fwd: Forward) -> None:
        self.served_forwards += 1

        def reply(result: bytes, code: str = "", message: str = "") -> None:
            leader = self.driver.leader(fwd.group) if fwd.group in self.driver.host else NONE
            assert self.transport is not None
            out = ForwardReply(fwd.fid, result, code, message, leader)
            self.transport.send_app(peer, _encode(out))  # lost if the peer went: it times out

        if fwd.group not in self.driver.host:  # it moved away (the origin's view is behind)
            reply(b"", "not_leader", f"group {fwd.group} is not hosted here")  # never proposed
            return

        def failed(exc: BaseException) -> None:
            outcome = proposal_outcome(exc)
            if outcome is Outcome.NOT_APPLIED:
                reply(b"", "not_leader", str(exc))  # never applied: the origin re-routes
            else:
                reply(b"", OUTCOME_CODES[outcome], str(exc))

        def done(result: object, exc: BaseException | None) -> None:
            if exc is None:
                reply(commands.encode_result(result))  # type: ignore[arg-type]
            else:
                failed(exc)

        self._propose(fwd.group, fwd.command, done, fwd.append)

    # -- history between archives --------------------------------------------------------------
    def fetch_history(
        self, peer: int, session_id: str, after_seq: int, to_seq: int, limit: int
    ) -> asyncio.Future[HistoryRows]:
        """Ask ``peer`` for messages ``after_seq < seq <= to_seq`` (fails ``unavailable`` when
        it cannot be asked, ``timeout`` without an answer within ``request_timeout_s``)."""
        loop = self._running_loop()
        fut: asyncio.Future[HistoryRows] = loop.create_future()
        fid = next(self._fids)
        fetch = HistoryFetch(fid, session_id, after_seq, to_seq, limit)
        if self.transport is None or not self.transport.send_app(peer, _encode(fetch)):
            fut.set_exception(RouteError("unavailable", f"node {peer} is not connected"))
            return fut
        self._fetches[fid] = (fut, peer, loop.time() + self.config.request_timeout_s)
        return fut

    def _serve_history(self, peer: int, fetch: HistoryFetch) -> None:
        assert self.transport is not None
        transport = self.transport
        server = self.history_server
        if server is None or self._history_serving >= self.config.history_serves_max:
            busy = HistoryRows(fetch.fid, [], 0, "unavailable", "busy, ask again")
            transport.send_app(peer, _encode(busy))
            return
        self._history_serving += 1

        def done(task: asyncio.Task[HistoryRows]) -> None:
            self._history_serving -= 1
            if task.cancelled() or task.exception() is not None:
                why = "cancelled" if task.cancelled() else repr(task.exception())
                answer = HistoryRows(fetch.fid, [], 0, "unavailable", why)
            else:
                answer = task.result()
            transport.send_app(peer, _encode(answer))

        self._running_loop().create_task(server(fetch)).add_done_callback(done)

    def _answered(self, peer: int, ans: ForwardReply) -> None:
        p = self._forwards.pop(ans.fid, None)
        if p is None or p.finished:
            return  # timed out meanwhile
        if not ans.code:
            try:
                result = commands.decode_result(ans.result)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                self._fail(p, RouteError("internal", f"undecodable answer from node {peer}: {e}"))
                return
            self._complete(p, result)
        elif ans.code == "not_leader":
            self._retry_later(p)
        elif ans.code == "timeout":
            self._fail(p, RouteError("timeout", ans.message))
        else:
            self._fail(p, RouteError("unavailable", ans.message))
