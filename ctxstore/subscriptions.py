"""Live subscriptions to sessions: replay, then live, with no gap and no duplicate (design §4.1,
invariant 5).

A subscription delivers every message with ``seq > after_seq`` of its session, in order, each
once, as ``MessageEvent`` pushes, with a ``GapEvent`` for any range the node cannot serve
(retention).  It has one cursor, ``next_seq`` (the next seq to deliver), and one of two modes:

- **replay**: a task reads pages from ``History`` (hot tail, then archive) after ``next_seq - 1``
  and pushes them, waiting while the connection's unsent bytes are above
  ``backlog_bytes_high``.  When ``next_seq`` passes the session's ``last_seq`` it switches to
  live — in the same loop callback as that check, so no message applied in between is missed;
- **live**: each message applied on this node (``on_message``, from the state observer) whose
  seq is ``next_seq`` joins the subscription's outbox; outboxes leave as one ``MessageEvent``
  per subscription per loop iteration, as far as they fit under ``backlog_bytes_high``.  What
  does not fit is not buffered: the subscription goes back to replay from the first message
  left out; so does one whose session jumped ahead (a snapshot was installed).  A connection's
  unsent bytes therefore stay below ``backlog_bytes_high`` + one page (or one message).

Every message of a subscription is pushed, or stated missing: a ``MessageEvent`` holds at most
``page_bytes`` of messages (one message may be alone over it) and is split further if the
connection's frame cannot hold it; a message no frame could hold alone (ruled out at start-up by
ctxstore/limits.py) becomes a ``GapEvent`` (``unavailable``) and is logged and counted
(``unpushable``).  Any other failure while pushing closes the subscription
(``unavailable``): the client subscribes again after the last seq it processed, so nothing is
skipped silently.

Memory per subscription is a few hundred bytes plus at most one page while replaying; what a
slow reader has not taken stays in the store, not in a buffer.  A subscription that could not
push anything for ``slow_timeout_s`` is told ``SubscriptionClosed(slow_consumer)`` and dropped.
Subscriptions per connection (``bad_request``) and per node (``unavailable``: try another
node) are capped.  When this node has known no leader for a subscription's group for a while
(the node is cut off from its peers, ``Node`` decides), ``close_group`` ends its subscriptions
with ``unavailable``, so their clients resume on another node instead of waiting in silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from wire.aio import Connection
from wire.errors import LocalProtocolError
from wire.protocol import (
    ChunkEvent,
    CloseReason,
    ContextEvent,
    ContextReason,
    GapEvent,
    GapReason,
    MessageEvent,
    SubscriptionClosed,
)

from .history import History, HistoryUnavailable, message_bytes
from .records import StoredMessage, messages_to_wire
from .registry import Streams
from .state import ConversationState
from .window import Window

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubscriptionLimits:
    per_connection_max: int = 1000
    node_max: int = 100_000
    page_messages: int = 500
    page_bytes: int = 1024 * 1024
    backlog_bytes_high: int = 2 * 1024 * 1024  # a connection's unsent bytes: pushes pause above
    slow_timeout_s: float = 30.0  # no push possible for this long: dropped (slow_consumer)
    retry_s: float = 0.5  # history not servable yet (being copied here): ask again after


class _Sub:
    __slots__ = ("closed", "conn", "context_events", "events", "group", "live", "next_seq",
                 "outbox", "session_id", "stream_chunks", "sub_id", "task")  # fmt: skip

    def __init__(
        self, sub_id: int, conn: Connection, session_id: str, group: int, context_events: bool,
        stream_chunks: bool = False,
    ) -> None:  # fmt: skip
        self.sub_id = sub_id
        self.context_events = context_events
        self.stream_chunks = stream_chunks
        self.conn = conn
        self.session_id = session_id
        self.group = group
        self.next_seq = 1
        self.live = False
        self.closed = False
        self.outbox: list[StoredMessage] = []
        self.events: list[ContextEvent] = []  # pushed after the outbox's messages
        self.task: asyncio.Task[None] | None = None


class _SlowConsumer(Exception):
    pass


def _closed(sub: _Sub) -> bool:
    return sub.closed


class Subscriptions(Streams[str, _Sub]):
    def __init__(
        self, state: ConversationState, history: History, limits: SubscriptionLimits
    ) -> None:
        super().__init__(limits)
        self.state = state
        self.history = history
        self.limits: SubscriptionLimits = limits
        self._dirty: list[_Sub] = []
        self._flush_scheduled = False
        self._writable: dict[Connection, asyncio.Event] = {}
        self.replaying = 0
        self.dropped_slow = 0
        self.pushed_messages = 0
        self.gaps = 0
        self.unpushable = 0  # messages no frame could hold: pushed as a gap (never expected)
        self.closed_leaderless = 0  # closed by close_group
        self.pushed_chunks = 0  # live agent chunks pushed (ChunkEvent)
        # Sessions with subscriptions here that asked for chunks (how many); the router tells
        # the peers, so a leader relays a session's chunks only to the nodes that want them.
        self.chunk_sessions: dict[str, int] = {}
        self.on_chunk_interest: Callable[[str, bool], None] | None = None
        self.chunks_dropped = 0  # not pushed: the connection was behind
        # Subscriptions per group: a follower applies those groups' commits as soon as their
        # leader's notice comes (raft/multi.py ``prompt``), not with the next append.
        self.groups: dict[int, int] = {}

    # -- requests ---------------------------------------------------------------------------------
    def start(
        self,
        conn: Connection,
        sub_id: int,
        session_id: str,
        group: int,
        after_seq: int,
        last_seq: int,
        context_events: bool = False,
        stream_chunks: bool = False,
    ) -> None:
        """Begin delivering after ``after_seq`` (the ``Subscribed`` answer, with the session's
        ``last_seq``, is already queued); ``context_events``: ``on_context`` pushes too."""
        sub = _Sub(sub_id, conn, session_id, group, context_events, stream_chunks)
        sub.next_seq = after_seq + 1
        self._subs.add(session_id, sub)
        self.groups[group] = self.groups.get(group, 0) + 1
        if stream_chunks:
            self._chunk_interest(session_id, 1)
        if sub.next_seq > last_seq:
            sub.live = True
        else:
            self._replay(sub)

    def on_close(self, conn: Connection) -> None:
        super().on_close(conn)
        self._writable.pop(conn, None)

    def on_writable(self, conn: Connection) -> None:
        event = self._writable.pop(conn, None)
        if event is not None:
            event.set()

    def close_all(self, reason: CloseReason, message: str) -> None:
        for sub in self._subs.all():
            self._close(sub, reason, message)

    def close_group(self, group: int, message: str) -> int:
        """End the subscriptions of ``group``'s sessions with ``unavailable`` (this node cannot
        follow the group: its clients should resume elsewhere); how many were ended."""
        subs = [sub for sub in self._subs.all() if sub.group == group]
        for sub in subs:
            self._close(sub, "unavailable", message)
        self.closed_leaderless += len(subs)
        return len(subs)

    # -- the state's side -------------------------------------------------------------------------
    def on_message(self, message: StoredMessage) -> None:
        subs = self._subs.of_key(message.session_id)
        if not subs:
            return
        for sub in subs.values():
            if not sub.live:
                continue  # replaying: its task reads this message from the store
            if message.seq == sub.next_seq:
                if not sub.outbox and not sub.events:
                    self._dirty.append(sub)
                sub.outbox.append(message)
                sub.next_seq += 1
            elif message.seq > sub.next_seq:  # the session jumped (a snapshot): read it
                self._to_replay(sub)
        if self._dirty and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def on_chunks(
        self, session_id: str, trigger_seq: int, attempt: int, chunks: list[dict[str, Any]]
    ) -> int:
        """Push live agent chunks (ctxstore/agents/engine.py: those one read of the agent's
        stream brought, in order) to the session's subscribers that asked for them, at once;
        to one whose connection is over ``backlog_bytes_high`` they are dropped (chunks are not
        replayed: the stored reply is the record).  How many pushes were made."""
        subs = self._subs.of_key(session_id)
        if not subs:
            return 0
        pushed = 0
        high = self.limits.backlog_bytes_high
        for sub in subs.values():
            if not sub.stream_chunks or sub.closed:
                continue
            conn = sub.conn
            for chunk in chunks:
                if conn.backlog_bytes > high:
                    self.chunks_dropped += 1
                    continue
                try:
                    conn.push(ChunkEvent(sub.sub_id, trigger_seq, attempt, chunk))
                except LocalProtocolError:  # too large for the frame, or the connection is going
                    self.chunks_dropped += 1
                    continue
                pushed += 1
        self.pushed_chunks += pushed
        return pushed

    def _chunk_interest(self, session_id: str, delta: int) -> None:
        n = self.chunk_sessions.get(session_id, 0) + delta
        if n > 0:
            self.chunk_sessions[session_id] = n
        else:
            self.chunk_sessions.pop(session_id, None)
        first_or_last = (n == 1 and delta > 0) or n <= 0
        if first_or_last and self.on_chunk_interest is not None:
            self.on_chunk_interest(session_id, n > 0)

    def on_context(self, session_id: str, window: Window, reasons: list[ContextReason]) -> None:
        """Queue a ``ContextEvent`` per reason for the session's subscribers, pushed after the
        messages applied before it (a replaying subscription gets it at once)."""
        subs = self._subs.of_key(session_id)
        if not subs:
            return
        first = window.first_seq
        if first is None:
            first = (self.state.last_seq(session_id) or 0) + 1
        for sub in subs.values():
            if not sub.context_events:
                continue
            if not sub.outbox and not sub.events:
                self._dirty.append(sub)
            for reason in reasons:
                sub.events.append(ContextEvent(
                    sub.sub_id, reason, window.version, window.tokens, window.needs_compaction,
                    first,
                ))  # fmt: skip
        if self._dirty and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def on_restore(self, group: int) -> None:
        """``group``'s state was replaced: its live subscriptions catch up from the store."""
        for sub in self._subs.all():
            if sub.group == group and sub.live:
                self._to_replay(sub)

    # -- pushing ----------------------------------------------------------------------------------
    def _flush(self) -> None:
        self._flush_scheduled = False
        dirty, self._dirty = self._dirty, []
        high = self.limits.backlog_bytes_high
        for sub in dirty:
            if sub.closed:
                continue
            try:
                if sub.live and sub.outbox:
                    self._flush_one(sub, high)
                events, sub.events = sub.events, []
                for event in events:
                    sub.conn.push(event)
            except Exception:  # a bug: never lose the outbox silently; the client resumes
                logger.exception("subscription %d: pushing live messages failed", sub.sub_id)
                self._close(sub, "unavailable", "internal error; subscribe again")

    def _flush_one(self, sub: _Sub, high: int) -> None:
        room = high - sub.conn.backlog_bytes
        outbox, sub.outbox = sub.outbox, []
        cut, size = 0, 0
        for m in outbox:  # what fits under the high mark (at least one message)
            size += message_bytes(m)
            if size > room and (cut or room <= 0):
                break
            cut += 1
        if cut:
            self._push_messages(sub, outbox[:cut] if cut < len(outbox) else outbox)
        if cut < len(outbox):  # the rest is read again from the store, when it fits
            sub.next_seq = outbox[cut].seq
            sub.live = False
            self._replay(sub)

    def _push_messages(self, sub: _Sub, messages: list[StoredMessage]) -> None:
        """One or more MessageEvents, each at most ``page_bytes`` of messages (or one)."""
        limit = self.limits.page_bytes
        start, size = 0, 0
        for i, m in enumerate(messages):
            n = message_bytes(m)
            if size + n > limit and i > start:
                self._push_event(sub, messages[start:i])
                start, size = i, 0
            size += n
        self._push_event(sub, messages[start:] if start else messages)
        self.pushed_messages += len(messages)

    def _push_event(self, sub: _Sub, messages: list[StoredMessage]) -> None:
        """Push ``messages`` in one MessageEvent, or in halves if the frame cannot hold them;
        a message alone over the frame limit becomes a GapEvent (see the module docstring)."""
        try:
            sub.conn.push(MessageEvent(sub.sub_id, messages_to_wire(messages)))
            return
        except LocalProtocolError as e:
            if e.code != "too_large":
                raise
        if len(messages) > 1:
            half = len(messages) // 2
            self._push_event(sub, messages[:half])
            self._push_event(sub, messages[half:])
            return
        seq = messages[0].seq
        self.unpushable += 1
        self.gaps += 1
        logger.error("subscription %d: message %d of session %r fits no frame: sent as a gap",
                     sub.sub_id, seq, sub.session_id)  # fmt: skip
        sub.conn.push(GapEvent(sub.sub_id, seq, seq, "unavailable"))

    def _to_replay(self, sub: _Sub) -> None:
        if sub.outbox:
            sub.next_seq = sub.outbox[0].seq
            sub.outbox = []
        sub.live = False
        self._replay(sub)

    def _replay(self, sub: _Sub) -> None:
        if sub.task is None and not sub.closed:
            sub.task = asyncio.get_running_loop().create_task(self._run_replay(sub))

    async def _run_replay(self, sub: _Sub) -> None:
        self.replaying += 1
        limits = self.limits
        try:
            while not sub.closed:
                await self._wait_writable(sub)
                try:
                    page = await self.history.read(
                        sub.session_id, sub.next_seq - 1, limits.page_messages, limits.page_bytes
                    )
                except HistoryUnavailable as e:
                    logger.debug("subscription %d waits: %s", sub.sub_id, e)
                    await asyncio.sleep(limits.retry_s)
                    continue
                if _closed(sub):  # while the page was read
                    return
                if page is None:
                    self._close(sub, "not_found", f"no session {sub.session_id!r}")
                    return
                if page.gap is not None:
                    lo, hi, reason = page.gap
                    if lo != sub.next_seq:
                        raise AssertionError(f"gap from {lo}, expected {sub.next_seq}")
                    sub.conn.push(GapEvent(sub.sub_id, lo, hi, cast(GapReason, reason)))
                    sub.next_seq = hi + 1
                    self.gaps += 1
                if page.messages:
                    if page.messages[0].seq != sub.next_seq:
                        raise AssertionError(
                            f"page from {page.messages[0].seq}, expected {sub.next_seq}"
                        )
                    self._push_messages(sub, page.messages)
                    sub.next_seq = page.messages[-1].seq + 1
                last_seq = self.state.last_seq(sub.session_id)
                if last_seq is None or sub.next_seq > last_seq:
                    sub.live = True  # from here on_message carries it, with nothing between
                    return
        except _SlowConsumer:
            self.dropped_slow += 1
            self._close(sub, "slow_consumer", "the subscriber did not read for "
                        f"{limits.slow_timeout_s:g} s")  # fmt: skip
        except Exception:
            logger.exception("subscription %d failed", sub.sub_id)
            self._close(sub, "unavailable", "internal error")
        finally:
            self.replaying -= 1
            sub.task = None

    async def _wait_writable(self, sub: _Sub) -> None:
        high = self.limits.backlog_bytes_high
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.slow_timeout_s
        while not sub.closed and (not sub.conn.writable or sub.conn.backlog_bytes > high):
            left = deadline - loop.time()
            if left <= 0:
                raise _SlowConsumer
            event = self._writable.setdefault(sub.conn, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(left, 0.05))

    # -- ending -----------------------------------------------------------------------------------
    def _close(self, sub: _Sub, reason: CloseReason, message: str) -> None:
        if sub.closed:
            return
        self._remove(sub)
        sub.conn.push(SubscriptionClosed(sub.sub_id, reason, message))

    def _remove(self, sub: _Sub) -> None:
        if sub.closed:
            return
        sub.closed = True
        self._subs.remove(sub.session_id, sub)
        left = self.groups[sub.group] - 1
        if left:
            self.groups[sub.group] = left
        else:
            del self.groups[sub.group]
        if sub.stream_chunks:
            self._chunk_interest(sub.session_id, -1)
        if sub.task is not None and sub.task is not asyncio.current_task():
            sub.task.cancel()


__all__ = ["SubscriptionLimits", "Subscriptions"]
