"""The asyncio transport between Raft nodes: one authenticated TCP connection per peer pair.

The wire protocol lives in ``peer_codec`` (sans I/O); this module owns sockets and timers.

- One connection per pair: the node with the lower id dials, the higher id only accepts.  A
  newer authenticated connection from a peer replaces an older one (the peer restarted).
- Anything that fails the handshake (unknown node, wrong cluster, bad HMAC, timeout) or breaks
  the protocol later (garbage, oversize frame) closes that connection only and is logged.
- ``send`` queues ``(group, message)`` pairs; everything queued for a peer during one event-loop
  iteration leaves as one ``Batch`` frame (a flush scheduled once with ``call_soon``).
- Bounded memory: while a peer's socket buffer is above its high-water mark, or its queue is
  over ``queue_bytes_max``, messages Raft resends (appends, heartbeats and their responses)
  are dropped and counted; other messages wait in the queue up to ``queue_bytes_max``, beyond
  which they are dropped and counted too.  Nothing is queued for a peer that is not connected.
  A message that could not fit even an empty queue (or one frame) would be dropped on every
  resend: it is counted apart (``dropped_unfit``) and logged (at most every
  ``UNFIT_LOG_INTERVAL_S``); the application must keep its entries small enough that this never
  happens (ctxstore checks it at start-up: ctxstore/limits.py).
- Snapshots travel on a separate lane, as chunks of the encoded ``InstallSnapshot``: at most
  one chunk per peer per flush, so batches of other groups interleave with them, and at most
  ``snapshot_bytes_per_s`` of chunks per second over all peers (a token bucket holding one
  chunk: moving groups to a new node must not starve the appends of the others).  The receiver
  reassembles and delivers an ordinary ``(group, InstallSnapshot)`` item; the sender reports
  ``on_snapshot_status(peer, group, ok)`` once the last chunk is written or the lane fails.
- An application lane: ``send_app(to, payload)`` carries opaque bytes (the product forwards
  requests to group leaders with it), batched per loop iteration like Raft messages and
  delivered in order through ``on_app(peer, payloads)``.  Its queue is bounded by
  ``app_queue_bytes_max``; ``send_app`` returns False (nothing queued) when the peer is down
  or the queue is full, so the caller can fail the request at once.
- Liveness per peer: a Ping every ``ping_interval_s``; a connection silent for
  ``dead_after_s`` is closed and reported down.
- Bounded handshakes: an inbound connection must authenticate within ``handshake_timeout_s``
  (2 s).  At most ``handshakes_max`` (64) inbound connections are in their handshake at once,
  and ``handshakes_per_source_max`` (8) from one address; a new one always gets a slot, which
  it takes from the oldest handshake of its own address if that address has all of its own,
  else from the oldest of all if all are taken (that one is closed).  So stalled or slow
  unauthenticated connections cannot keep a peer out: a peer's handshake takes milliseconds,
  and is lost only if more connections than that arrive meanwhile (it dials again).  Closed
  unauthenticated connections are logged once per ``REFUSED_LOG_INTERVAL_S`` per reason (the
  refusal's code, a timeout, an eviction) with a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import cast

from . import peer_codec as codec
from .errors import check
from .messages import (
    AppendEntries,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
)
from .storage import entries_bytes

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

Item = tuple[int, Message]
Address = tuple[str, int]

RESENDABLE: frozenset[type] = frozenset(
    {AppendEntries, AppendResponse, Heartbeat, HeartbeatResponse}
)
"""Messages Raft sends again on its own (next heartbeat / probe), so a slow peer may lose them."""
REFUSED_LOG_INTERVAL_S = 10.0  # one log line per this for closed unauthenticated connections

_MESSAGE_OVERHEAD_BYTES = 48
_ENTRY_OVERHEAD_BYTES = 16
QUEUE_BYTES_MAX = 4 * 1024 * 1024  # default queue_bytes_max: Raft messages queued per peer
APP_QUEUE_BYTES_MAX = 8 * 1024 * 1024  # default app_queue_bytes_max: app payloads per peer
SNAPSHOT_BYTES_PER_S = 32 * 1024 * 1024  # default snapshot_bytes_per_s, over all peers
UNFIT_LOG_INTERVAL_S = 10.0  # at most one log line per peer per this for unfit messages


def message_bytes(message: Message) -> int:
    """An estimate of a message's encoded size, counted against a peer's queue limit."""
    if isinstance(message, AppendEntries):
        entries = message.entries
        return (
            _MESSAGE_OVERHEAD_BYTES + entries_bytes(entries) + _ENTRY_OVERHEAD_BYTES * len(entries)
        )
    return _MESSAGE_OVERHEAD_BYTES


@dataclass
class PeerStats:
    connects: int = 0  # connections that completed the handshake
    batches_sent: int = 0
    items_sent: int = 0
    commits_sent: int = 0  # commit notices (raft/multi.py), one per group
    commits_received: int = 0
    commits_dropped: int = 0  # not sent: no connection, the queue full, or over a frame
    bytes_sent: int = 0
    items_received: int = 0
    dropped_slow: int = 0  # resendable messages dropped while the peer was slow
    dropped_overflow: int = 0  # other messages dropped because the queue was full
    dropped_unconnected: int = 0  # messages for a peer without a connection
    dropped_unfit: int = 0  # messages larger than an empty queue or one frame (never sendable)
    snapshots_sent: int = 0
    snapshots_failed: int = 0
    snapshots_received: int = 0
    app_sent: int = 0
    app_received: int = 0
    app_refused: int = 0  # send_app calls refused (peer down or app queue full)


@dataclass
class TransportStats:
    accepted: int = 0  # inbound TCP connections
    refused: int = 0  # connections closed during the handshake (either side)
    handshakes_evicted: int = 0  # inbound handshakes closed to make room for newer ones
    protocol_errors: int = 0  # established connections closed for a protocol error
    refused_retired: int = 0  # handshakes of a retired node that got past the id check
    dropped_no_peer: int = 0  # messages for a node that is no peer (retired, or not yet known)
    snapshot_waits: int = 0  # flushes that held a snapshot chunk back (snapshot_bytes_per_s)
    peers: dict[int, PeerStats] = field(default_factory=dict)


@dataclass
class _OutboundSnapshot:
    group: int
    index: int
    data: bytes
    offset: int = 0


@dataclass
class _Peer:
    id: int
    address: Address
    stats: PeerStats
    conn: _Connection | None = None
    queue: list[Item] = field(default_factory=list)
    queue_bytes: int = 0
    commits: list[int] = field(default_factory=list)  # commit notices for the next batch
    snapshots: deque[_OutboundSnapshot] = field(default_factory=deque)
    app_queue: list[bytes] = field(default_factory=list)
    app_queue_bytes: int = 0
    dialer: asyncio.Task[None] | None = None
    unfit_logged_at: float = -1.0  # loop time of the last "unfit" log line (-1: never)


class Transport:
    def __init__(
        self,
        node_id: int,
        cluster_id: str,
        secret: bytes,
        listen: Address | socket.socket,
        peers: dict[int, Address],
        on_batch: Callable[[int, list[Item]], None],
        on_peer_up: Callable[[int], None] = lambda peer: None,
        on_peer_down: Callable[[int], None] = lambda peer: None,
        on_snapshot_status: Callable[[int, int, bool], None] = lambda peer, group, ok: None,
        on_app: Callable[[int, list[bytes]], None] = lambda peer, payloads: None,
        *,
        on_commits: Callable[[int, list[int]], None] = lambda peer, notices: None,
        frame_bytes_max: int = codec.FRAME_BYTES_MAX,
        queue_bytes_max: int = QUEUE_BYTES_MAX,
        app_queue_bytes_max: int = APP_QUEUE_BYTES_MAX,
        write_buffer_high_bytes: int = 4 * 1024 * 1024,
        snapshot_chunk_bytes: int = 1024 * 1024,
        snapshot_bytes_max: int = 1024 * 1024 * 1024,
        snapshot_bytes_per_s: int = SNAPSHOT_BYTES_PER_S,
        handshake_timeout_s: float = 2.0,
        handshakes_max: int = 64,
        handshakes_per_source_max: int = 8,
        connect_timeout_s: float = 5.0,
        backoff_min_s: float = 0.05,
        backoff_max_s: float = 2.0,
        ping_interval_s: float = 0.5,
        dead_after_s: float = 3.0,
    ) -> None:
        check(node_id not in peers, "a node is not its own peer")
        check(snapshot_chunk_bytes + 1024 <= frame_bytes_max, "snapshot chunk exceeds frame size")
        check(0 < backoff_min_s <= backoff_max_s, "bad backoff bounds")
        check(snapshot_bytes_per_s > 0, "snapshot_bytes_per_s must be positive")
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.stats = TransportStats()
        self.on_batch = on_batch
        self.on_peer_up = on_peer_up
        self.on_peer_down = on_peer_down
        self.on_snapshot_status = on_snapshot_status
        self.on_app = on_app
        self.on_commits = on_commits
        self.app_queue_bytes_max = app_queue_bytes_max
        self.frame_bytes_max = frame_bytes_max
        self.queue_bytes_max = queue_bytes_max
        self.write_buffer_high_bytes = write_buffer_high_bytes
        self.snapshot_chunk_bytes = snapshot_chunk_bytes
        self.snapshot_bytes_max = snapshot_bytes_max
        self.snapshot_bytes_per_s = snapshot_bytes_per_s
        self._snap_budget = float(snapshot_chunk_bytes)  # bytes of chunks that may leave now
        self._snap_refilled = 0.0  # loop time the budget was last refilled
        self._snap_timer: asyncio.TimerHandle | None = None
        self.handshake_timeout_s = handshake_timeout_s
        self.handshakes_max = handshakes_max
        self.handshakes_per_source_max = min(handshakes_per_source_max, handshakes_max)
        self.connect_timeout_s = connect_timeout_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.ping_interval_s = ping_interval_s
        self.dead_after_s = dead_after_s
        self._secret = secret
        self._listen = listen
        self._peers = {
            pid: _Peer(pid, addr, self.stats.peers.setdefault(pid, PeerStats()))
            for pid, addr in peers.items()
        }
        self._lower_ids = frozenset(pid for pid in peers if pid < node_id)
        self._retired: set[int] = set()  # removed from the cluster: refused for good
        self._connections: set[_Connection] = set()  # every open connection, authenticated or not
        # inbound connections in their handshake -> their source address, oldest first
        self._handshaking: dict[_Connection, str] = {}
        # One counted log per reason (the codec's error codes, a timeout, an eviction: a small
        # fixed set), so a flood of one kind does not hide another.
        self._refused_logs: dict[str, _CountedLog] = {}
        self._server: asyncio.Server | None = None
        self._flush_scheduled = False
        self._liveness: asyncio.TimerHandle | None = None
        self._closing = False
        self._rng = random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None

    # lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if isinstance(self._listen, socket.socket):
            self._server = await self._loop.create_server(self._accept, sock=self._listen)
        else:
            host, port = self._listen
            self._server = await self._loop.create_server(self._accept, host, port)
        for peer in self._peers.values():
            if peer.id > self.node_id:
                peer.dialer = self._loop.create_task(self._dial_loop(peer))
        self._liveness = self._loop.call_later(self.ping_interval_s, self._check_liveness)

    @property
    def address(self) -> Address:
        check(self._server is not None, "transport not started")
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    async def close(self) -> None:
        self._closing = True
        if self._liveness is not None:
            self._liveness.cancel()
        if self._snap_timer is not None:
            self._snap_timer.cancel()
            self._snap_timer = None
        dialers = [p.dialer for p in self._peers.values() if p.dialer is not None]
        for task in dialers:
            task.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.abort("transport closed")
        await asyncio.gather(*dialers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def is_connected(self, peer: int) -> bool:
        p = self._peers.get(peer)
        return p is not None and p.conn is not None

    # membership -----------------------------------------------------------------------------------

    def peers(self) -> dict[int, Address]:
        return {pid: peer.address for pid, peer in self._peers.items()}

    def add_peer(self, peer_id: int, address: Address) -> None:
        """Talk to ``peer_id`` at ``address`` from now on (a node that joined the cluster), or
        dial it at a new address.  A retired id is refused (``InvariantViolation``: the caller
        checks the cluster view first)."""
        check(peer_id != self.node_id, "a node is not its own peer")
        check(peer_id not in self._retired, f"node {peer_id} is retired")
        peer = self._peers.get(peer_id)
        if peer is not None:
            peer.address = address  # (the next dial uses it)
            return
        peer = _Peer(peer_id, address, self.stats.peers.setdefault(peer_id, PeerStats()))
        self._peers[peer_id] = peer
        if peer_id < self.node_id:
            self._lower_ids = self._lower_ids | {peer_id}
        elif self._loop is not None and not self._closing:
            peer.dialer = self._loop.create_task(self._dial_loop(peer))

    def retire_peer(self, peer_id: int) -> None:
        """Forget ``peer_id`` for good (a node removed from the cluster): its connection closes
        (reported down), nothing more is sent to it, and its handshakes are refused from now
        on, whatever data it comes back with."""
        self._retired.add(peer_id)
        self._lower_ids = self._lower_ids - {peer_id}
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return
        if peer.dialer is not None:
            peer.dialer.cancel()
        conn = peer.conn
        if conn is not None:
            peer.conn = None
            self._peer_down(peer)
            conn.abort("retired")

    def retired(self, peer_id: int) -> bool:
        return peer_id in self._retired

    def connected_peers(self) -> list[int]:
        return sorted(pid for pid, peer in self._peers.items() if peer.conn is not None)

    def connection_count(self) -> int:
        """Open connections, authenticated or still in their handshake."""
        return len(self._connections)

    # sending -------------------------------------------------------------------------------------

    def send_commits(self, to: int, notices: list[int]) -> None:
        """Queue commit notices (``MultiRaft.take_commit_notices``) for ``to``'s next batch.
        Not for a peer that is unknown or not connected, nor beyond ``queue_bytes_max``: they
        are dropped (an optimisation; the next append or heartbeat carries the commit)."""
        peer = self._peers.get(to)
        if peer is None:
            return
        if (
            peer.conn is None
            or peer.queue_bytes + 9 * (len(peer.commits) + len(notices)) > self.queue_bytes_max
        ):
            peer.stats.commits_dropped += len(notices) // 3
            return
        peer.commits += notices
        self._schedule_flush()

    def send(self, to: int, items: Iterable[Item]) -> None:
        """Queue messages for ``to``; they leave at the end of this loop iteration.  For a node
        that is no peer (retired, or not known yet) they are dropped and counted."""
        peer = self._peers.get(to)
        if peer is None:
            for group, message in items:
                self.stats.dropped_no_peer += 1
                if isinstance(message, InstallSnapshot):
                    self._snapshot_failed(to, group)
            return
        conn = peer.conn
        for group, message in items:
            if isinstance(message, InstallSnapshot):
                self.send_snapshot(to, group, message)
                continue
            if conn is None:
                peer.stats.dropped_unconnected += 1
                continue
            size = message_bytes(message)
            if size > self.queue_bytes_max:
                self._drop_unfit(peer, group, f"a {type(message).__name__} of ~{size} bytes")
                continue
            full = peer.queue_bytes + size > self.queue_bytes_max
            if conn.paused or full:
                if type(message) in RESENDABLE:
                    peer.stats.dropped_slow += 1
                    continue
                if full:
                    peer.stats.dropped_overflow += 1
                    continue
            peer.queue.append((group, message))
            peer.queue_bytes += size
        self._schedule_flush()

    def _drop_unfit(self, peer: _Peer, group: int, what: str) -> None:
        """Drop a message that can never be sent (over an empty queue or one frame): counted,
        and logged at most once per ``UNFIT_LOG_INTERVAL_S`` per peer."""
        peer.stats.dropped_unfit += 1
        now = self._loop.time() if self._loop is not None else 0.0
        if peer.unfit_logged_at < 0 or now - peer.unfit_logged_at >= UNFIT_LOG_INTERVAL_S:
            peer.unfit_logged_at = now
            logger.error(
                "node %d: dropping %s for node %d, group %d: it can never be sent "
                "(queue_bytes_max %d, frame_bytes_max %d; %d such drops so far)",
                self.node_id, what, peer.id, group, self.queue_bytes_max,
                self.frame_bytes_max, peer.stats.dropped_unfit,
            )  # fmt: skip

    def send_app(self, to: int, payload: bytes) -> bool:
        """Queue an application payload for ``to``; False (and nothing queued) if ``to`` is
        down or its application queue is full."""
        peer = self._peers.get(to)
        if peer is None or peer.conn is None:
            if peer is not None:
                peer.stats.app_refused += 1
            return False
        size = len(payload) + 8
        if peer.app_queue_bytes + size > self.app_queue_bytes_max:
            peer.stats.app_refused += 1
            return False
        peer.app_queue.append(payload)
        peer.app_queue_bytes += size
        self._schedule_flush()
        return True

    def send_snapshot(self, to: int, group: int, message: InstallSnapshot) -> None:
        """Stream ``message`` to ``to`` on the snapshot lane; the outcome arrives through
        ``on_snapshot_status(to, group, ok)``.  A queued, unstarted snapshot of the same group
        is replaced (and reported failed)."""
        peer = self._peers.get(to)
        if peer is None:
            self.stats.dropped_no_peer += 1
            self._snapshot_failed(to, group)
            return
        if peer.conn is None:
            self._report_snapshot(peer, group, ok=False)
            return
        for i, queued in enumerate(peer.snapshots):
            if queued.group == group and queued.offset == 0:
                del peer.snapshots[i]
                self._report_snapshot(peer, group, ok=False)
                break
        data = codec.encode_snapshot_message(message)
        peer.snapshots.append(_OutboundSnapshot(group, message.snapshot.meta.index, data))
        self._schedule_flush()

    def _snapshot_failed(self, to: int, group: int) -> None:
        check(self._loop is not None, "transport not started")
        assert self._loop is not None
        self._loop.call_soon(self.on_snapshot_status, to, group, False)

    def _report_snapshot(self, peer: _Peer, group: int, *, ok: bool) -> None:
        if ok:
            peer.stats.snapshots_sent += 1
        else:
            peer.stats.snapshots_failed += 1
        check(self._loop is not None, "transport not started")
        assert self._loop is not None
        self._loop.call_soon(self.on_snapshot_status, peer.id, group, ok)

    def flush_now(self) -> None:
        """Write the Raft messages queued so far at once instead of at the end of this loop
        iteration (the driver, before it blocks in an inline WAL write).  The snapshot and
        application lanes keep their pace: they leave at the scheduled flush."""
        for peer in self._peers.values():
            conn = peer.conn
            if (peer.queue or peer.commits) and conn is not None and conn.writable:
                items, peer.queue, peer.queue_bytes = peer.queue, [], 0
                commits, peer.commits = peer.commits, []
                self._write_batch(peer, conn, items, commits)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        again = paced = False
        for peer in self._peers.values():
            conn = peer.conn
            if conn is None or not conn.writable:
                continue
            if peer.queue or peer.commits:
                items, peer.queue, peer.queue_bytes = peer.queue, [], 0
                commits, peer.commits = peer.commits, []
                self._write_batch(peer, conn, items, commits)
            if peer.app_queue:
                payloads, peer.app_queue, peer.app_queue_bytes = peer.app_queue, [], 0
                self._write_app(peer, conn, payloads)
            if peer.snapshots and conn.writable:
                if self._snapshot_budget() > 0:
                    self._snap_budget -= self._write_chunk(peer, conn)
                    again = again or bool(peer.snapshots)
                else:
                    paced = True
        if again:
            self._schedule_flush()
        elif paced:
            self._pace_snapshots()

    def _snapshot_budget(self) -> float:
        """Refill the snapshot lane's token bucket (one chunk at most) and return it."""
        assert self._loop is not None
        now = self._loop.time()
        refill = (now - self._snap_refilled) * self.snapshot_bytes_per_s
        self._snap_budget = min(float(self.snapshot_chunk_bytes), self._snap_budget + refill)
        self._snap_refilled = now
        return self._snap_budget

    def _pace_snapshots(self) -> None:
        """Flush again once the bucket is positive (the chunk that overdrew it is paid off)."""
        self.stats.snapshot_waits += 1
        if self._snap_timer is not None or self._loop is None:
            return
        delay = max(0.001, -self._snap_budget / self.snapshot_bytes_per_s)

        def due() -> None:
            self._snap_timer = None
            self._schedule_flush()

        self._snap_timer = self._loop.call_later(delay, due)

    def _write_batch(
        self, peer: _Peer, conn: _Connection, items: list[Item], commits: list[int]
    ) -> None:
        try:
            data = conn.core.send(codec.Batch(items, commits))
        except codec.ProtocolError:
            if not items:  # notices alone over a frame: dropped (appends, heartbeats carry them)
                peer.stats.commits_dropped += len(commits) // 3
                return
            if commits:  # the messages, and the notices after them, each in a frame of its own
                self._write_batch(peer, conn, items, [])
                self._write_batch(peer, conn, [], commits)
                return
            if len(items) == 1:
                group, message = items[0]
                self._drop_unfit(peer, group, f"a {type(message).__name__} over one frame")
                return
            half = len(items) // 2
            self._write_batch(peer, conn, items[:half], [])
            self._write_batch(peer, conn, items[half:], [])
            return
        conn.write(data)
        peer.stats.batches_sent += 1
        peer.stats.items_sent += len(items)
        peer.stats.commits_sent += len(commits) // 3
        peer.stats.bytes_sent += len(data)

    def _write_app(self, peer: _Peer, conn: _Connection, payloads: list[bytes]) -> None:
        try:
            data = conn.core.send(codec.AppBatch(payloads))
        except codec.ProtocolError:
            if len(payloads) == 1:
                logger.error("dropping an application payload too large for one frame")
                peer.stats.app_refused += 1
                return
            half = len(payloads) // 2
            self._write_app(peer, conn, payloads[:half])
            self._write_app(peer, conn, payloads[half:])
            return
        conn.write(data)
        peer.stats.app_sent += len(payloads)
        peer.stats.bytes_sent += len(data)

    def _write_chunk(self, peer: _Peer, conn: _Connection) -> int:
        """Write the next chunk of the peer's first snapshot; its size."""
        snap = peer.snapshots[0]
        offset = snap.offset
        end = min(offset + self.snapshot_chunk_bytes, len(snap.data))
        last = end == len(snap.data)
        chunk = codec.SnapshotChunk(
            snap.group, snap.index, snap.offset, snap.data[snap.offset : end], last
        )
        data = conn.core.send(chunk)
        conn.write(data)
        peer.stats.bytes_sent += len(data)
        snap.offset = end
        if last:
            peer.snapshots.popleft()
            self._report_snapshot(peer, snap.group, ok=True)
        return end - offset

    # connections ---------------------------------------------------------------------------------

    def _accept(self) -> _Connection:
        self.stats.accepted += 1
        return _Connection(self, codec.Role.ACCEPTOR, self._lower_ids)

    async def _dial_loop(self, peer: _Peer) -> None:
        backoff = self.backoff_min_s
        while not self._closing:
            if await self._dial_once(peer):
                backoff = self.backoff_min_s
            delay = self._rng.uniform(backoff / 2, backoff)
            backoff = min(backoff * 2, self.backoff_max_s)
            await asyncio.sleep(delay)

    async def _dial_once(self, peer: _Peer) -> bool:
        """Connect to ``peer`` and wait until that connection ends; True if it authenticated."""
        loop = asyncio.get_running_loop()
        conn = _Connection(self, codec.Role.DIALER, frozenset({peer.id}))
        host, port = peer.address
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: conn, host, port), self.connect_timeout_s
            )
        except (OSError, TimeoutError) as e:
            logger.debug("node %d: dialling node %d failed: %s", self.node_id, peer.id, e)
            return False
        await conn.lost
        return conn.authenticated

    def _opened(self, conn: _Connection) -> None:
        """Track a new connection; an inbound one takes a handshake slot, closing the oldest
        handshake of its address, or of all, if they are all taken."""
        self._connections.add(conn)
        if conn.role is not codec.Role.ACCEPTOR:
            return  # our own dials: one per peer
        handshaking = self._handshaking
        same = [c for c, source in handshaking.items() if source == conn.source]
        if len(same) >= self.handshakes_per_source_max:
            self._evict(same[0], f"{len(same)} handshakes in progress from {conn.source}")
        elif len(handshaking) >= self.handshakes_max:
            self._evict(next(iter(handshaking)), f"{len(handshaking)} handshakes in progress")
        handshaking[conn] = conn.source

    def _evict(self, conn: _Connection, why: str) -> None:
        del self._handshaking[conn]
        self.stats.handshakes_evicted += 1
        conn.abort("evicted")
        self.refused("evicted", f"closing the oldest: {why}")

    def refused(self, reason: str, what: str) -> None:
        """Log a closed unauthenticated connection (counted: once per interval per reason)."""
        log = self._refused_logs.get(reason)
        if log is None:
            log = self._refused_logs[reason] = _CountedLog(REFUSED_LOG_INTERVAL_S)
        line = log.line()
        if line is not None:
            logger.warning(
                "node %d: unauthenticated peer connections closed: %s (%s)",
                self.node_id,
                what,
                line,
            )

    def _authenticated(self, conn: _Connection, peer_id: int) -> None:
        self._handshaking.pop(conn, None)
        peer = self._peers.get(peer_id)
        if peer is None:  # retired while its handshake was in progress
            self.stats.refused_retired += 1
            self.refused("retired", f"node {peer_id} is retired")
            conn.abort("retired")
            return
        old = peer.conn
        peer.conn = conn
        peer.stats.connects += 1
        logger.info("node %d: connected to node %d (%s)", self.node_id, peer_id, conn.role.value)
        if old is not None:
            old.abort("replaced by a newer connection")
            self._peer_down(peer)
        self.on_peer_up(peer_id)
        self._schedule_flush()

    def _lost(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        self._handshaking.pop(conn, None)
        if not conn.authenticated:
            self.stats.refused += 1
            logger.info(
                "node %d: %s connection closed before authentication (%s)",
                self.node_id,
                conn.role.value,
                conn.error,
            )
            return
        peer = self._peers.get(conn.core.peer_id)
        if peer is not None and peer.conn is conn:
            peer.conn = None
            self._peer_down(peer)

    def _peer_down(self, peer: _Peer) -> None:
        peer.stats.dropped_unconnected += len(peer.queue)
        peer.queue, peer.queue_bytes = [], 0
        peer.stats.commits_dropped += len(peer.commits) // 3
        peer.commits = []
        peer.app_queue, peer.app_queue_bytes = [], 0
        while peer.snapshots:
            self._report_snapshot(peer, peer.snapshots.popleft().group, ok=False)
        logger.info("node %d: node %d down", self.node_id, peer.id)
        self.on_peer_down(peer.id)

    def _resumed(self, conn: _Connection) -> None:
        self._schedule_flush()

    def _check_liveness(self) -> None:
        check(self._loop is not None, "transport not started")
        assert self._loop is not None
        now = self._loop.time()
        for peer in self._peers.values():
            conn = peer.conn
            if conn is None:
                continue
            if now - conn.last_receive_s > self.dead_after_s:
                conn.abort(f"node {peer.id} silent for {self.dead_after_s} s")
            elif conn.writable:
                conn.write(conn.core.send(codec.Ping()))
        self._liveness = self._loop.call_later(self.ping_interval_s, self._check_liveness)


class _CountedLog:
    """Counts events and says when one more log line is due: at most one per ``interval_s``."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._count = 0
        self._next = 0.0

    def line(self) -> str | None:
        """Count one event; the count to log now (since the last line), or None."""
        self._count += 1
        now = time.monotonic()
        if now < self._next:
            return None
        count, self._count = self._count, 0
        self._next = now + self.interval_s
        return f"{count} in the last {self.interval_s:g} s"


class _Connection(asyncio.Protocol):
    """One TCP connection: feeds bytes to a ``PeerProtocol`` and reports to its ``Transport``.

    The first error is sticky: after it the connection is aborted and ignores further input."""

    def __init__(self, owner: Transport, role: codec.Role, peer_ids: frozenset[int]) -> None:
        self.owner = owner
        self.role = role
        self.core = codec.PeerProtocol(
            role,
            owner.node_id,
            owner.cluster_id,
            owner._secret,
            os.urandom(codec.CHALLENGE_BYTES),
            peer_ids,
            owner.frame_bytes_max,
        )
        self.authenticated = False
        self.source = ""  # the remote address (host)
        self.paused = False
        self.error: str | None = None
        self.last_receive_s = 0.0
        # Kept: asyncio.get_running_loop() costs a getpid() system call on every call.
        self._loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._snapshot_key: tuple[int, int] | None = None
        self._snapshot = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        high = self.owner.write_buffer_high_bytes
        transport.set_write_buffer_limits(high=high, low=high // 4)
        peer = transport.get_extra_info("peername")
        self.source = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        loop = asyncio.get_running_loop()
        self.last_receive_s = loop.time()
        self._timer = loop.call_later(self.owner.handshake_timeout_s, self._handshake_timeout)
        self.owner._opened(self)
        self._write_own()

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        self.last_receive_s = self._loop.time()
        try:
            self.core.receive_data(data)
            while (event := self.core.next_event()) is not None:
                self._dispatch(event)
        except codec.ProtocolError as e:
            self._protocol_error(e)
            return
        self._write_own()

    def _dispatch(self, event: codec.Event) -> None:
        match event:
            case codec.BatchReceived(items, commits):
                stats = self.owner.stats.peers[self.core.peer_id]
                if items:
                    stats.items_received += len(items)
                    self.owner.on_batch(self.core.peer_id, items)
                if commits:  # (after the items: the appends they acknowledge came first)
                    stats.commits_received += len(commits) // 3
                    self.owner.on_commits(self.core.peer_id, commits)
            case codec.ChunkReceived(chunk):
                self._on_chunk(chunk)
            case codec.AppReceived(payloads):
                self.owner.stats.peers[self.core.peer_id].app_received += len(payloads)
                self.owner.on_app(self.core.peer_id, payloads)
            case codec.PeerAuthenticated(peer_id):
                self._write_own()  # the dialer's Auth goes out before any batch
                self.authenticated = True
                if self._timer is not None:
                    self._timer.cancel()
                self.owner._authenticated(self, peer_id)

    def _on_chunk(self, chunk: codec.SnapshotChunk) -> None:
        key = (chunk.group, chunk.snapshot_index)
        if chunk.offset == 0:
            self._snapshot_key, self._snapshot = key, bytearray()
        elif key != self._snapshot_key or chunk.offset != len(self._snapshot):
            raise codec.ProtocolError(codec.MALFORMED_SNAPSHOT, f"chunk out of order: {key}")
        if len(self._snapshot) + len(chunk.data) > self.owner.snapshot_bytes_max:
            raise codec.ProtocolError(codec.FRAME_TOO_LARGE, "snapshot exceeds snapshot_bytes_max")
        self._snapshot += chunk.data
        if chunk.last:
            message = codec.decode_snapshot_message(self._snapshot)
            self.core.check_addressing(message)
            self._snapshot_key, self._snapshot = None, bytearray()
            peer_id = self.core.peer_id
            self.owner.stats.peers[peer_id].snapshots_received += 1
            self.owner.on_batch(peer_id, [(chunk.group, message)])

    def _protocol_error(self, e: codec.ProtocolError) -> None:
        if self.authenticated:
            self.owner.stats.protocol_errors += 1
            logger.warning(
                "node %d: closing connection to node %d: %s",
                self.owner.node_id,
                self.core.peer_id,
                e,
            )
        else:
            self.owner.refused(e.code, f"{self.role.value} from {self.source}: {e}")
        self.abort(e.code)

    def _handshake_timeout(self) -> None:
        if not self.authenticated:
            self.owner.refused(
                "handshake_timeout", f"{self.role.value} from {self.source}: handshake timed out"
            )
            self.abort("handshake_timeout")

    def _write_own(self) -> None:
        data = self.core.data_to_send()
        if data and self._transport is not None and self.error is None:
            self._transport.write(data)

    @property
    def writable(self) -> bool:
        """Open, without error, and below the write buffer's high-water mark."""
        return self.error is None and not self.paused

    def write(self, data: bytes | bytearray) -> None:
        if self._transport is not None and self.error is None:
            self._transport.write(data)

    def abort(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        if self._transport is not None:
            self._transport.abort()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.owner._resumed(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is None:
            self.error = str(exc) if exc is not None else "closed by peer"
        if self._timer is not None:
            self._timer.cancel()
        self.owner._lost(self)
        if not self.lost.done():
            self.lost.set_result(None)

    def pause_reading(self) -> None:
        """Stop reading from the socket (tests use it to make a slow receiver)."""
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()
