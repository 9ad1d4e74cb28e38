"""Per-user inboxes: a snapshot of the user's sessions, then batched deltas (design §5.7).

Each node indexes, for the groups it replicates, ``user_id -> sessions`` (``ConversationState``).
``SubscribeInbox{user_id}`` answers ``InboxSnapshot`` with one ``InboxEntry`` per session (the
most recently active first, at most ``snapshot_max``; ``truncated`` says more exist) and then
pushes ``InboxDelta``s: the sessions that changed (a message, a new session, a read cursor
moved), batched every ``interval_s`` (250 ms) or at once when ``dirty_max`` (50) sessions are
waiting.  Entries are built from the state when the delta leaves, so a delta always shows the
latest values; unread = ``last_seq`` minus the owner's read cursor, which an append as ``user``
moves to its seq: the user's own messages never count (``ctxstore.state``).

Bounds: a subscriber's pending changes are a set of session ids (at most the user's sessions);
while its connection is backlogged the set waits (and merges) instead of queueing deltas.
An inbox reads this node's applied state (no barrier): it may lag a write acknowledged by
another node by a replication delay, and catches up by itself.

A node that does not host every group serves the rest of a user's inbox from replicas
(``ctxstore.relay``): there an inbox subscription may be narrowed to some ``groups`` (those it
was asked for), and here to the groups hosted.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from wire.aio import Connection
from wire.protocol import InboxDelta, InboxEntry, SubscriptionClosed

from .placement import GROUPS, group_of
from .records import StoredMessage, decode_parts
from .registry import Streams
from .state import ConversationState

PREVIEW_CHARS = 120


@dataclass(frozen=True)
class InboxLimits:
    interval_s: float = 0.25
    dirty_max: int = 50
    snapshot_max: int = 1000
    delta_entries_max: int = 500  # entries per InboxDelta push
    per_connection_max: int = 100
    node_max: int = 100_000
    backlog_bytes_high: int = 2 * 1024 * 1024


class _InboxSub:
    __slots__ = ("closed", "conn", "dirty", "groups", "sub_id", "timer", "user_id")

    def __init__(
        self, sub_id: int, conn: Connection, user_id: str, groups: frozenset[int] | None
    ) -> None:
        self.sub_id = sub_id
        self.conn = conn
        self.user_id = user_id
        self.groups = groups  # only these groups' sessions (None: all)
        self.dirty: set[str] = set()
        self.timer: asyncio.Handle | None = None
        self.closed = False


def entry(state: ConversationState, session_id: str) -> InboxEntry | None:
    session = state.get_session(session_id)
    if session is None:
        return None
    last: StoredMessage | None = state.last_message(session_id)
    return InboxEntry(
        session.id,
        session.agent_id,
        session.last_seq,
        state.unread(session_id, session.user_id) or 0,
        last.inserted_at if last is not None else session.created_at,
        last.sender if last is not None else None,
        last.sender_id if last is not None else None,
        preview(last) if last is not None else "",
    )


def preview(m: StoredMessage) -> str:
    """The start of a message's text: its content, or its first text part's."""
    parts = decode_parts(m.parts)
    if parts is None:
        return m.content[:PREVIEW_CHARS]
    for p in parts:
        if p["type"] == "text":
            text: str = p["text"]
            return text[:PREVIEW_CHARS]
    return ""


class Inboxes(Streams[str, _InboxSub]):
    def __init__(self, state: ConversationState, limits: InboxLimits) -> None:
        super().__init__(limits)
        self.state = state
        self.limits: InboxLimits = limits
        self.deltas = 0

    def group_of(self, session_id: str) -> int:
        return group_of(session_id, self.state.group_count or GROUPS)

    def snapshot(
        self, user_id: str, groups: frozenset[int] | None = None
    ) -> tuple[list[InboxEntry], bool]:
        """The user's sessions (of ``groups`` only, if given), the most recently active first,
        at most ``snapshot_max``; whether there were more."""
        ids = self.state.user_session_ids(user_id)
        if groups is not None:
            ids = [sid for sid in ids if self.group_of(sid) in groups]
        entries = [e for sid in ids if (e := entry(self.state, sid)) is not None]
        entries.sort(key=lambda e: (-e.last_activity, e.session_id))
        limit = self.limits.snapshot_max
        return entries[:limit], len(entries) > limit

    def start(
        self, conn: Connection, sub_id: int, user_id: str, groups: frozenset[int] | None = None
    ) -> None:
        """Register after the snapshot was queued: changes from now on become deltas (of
        ``groups``' sessions only, if given)."""
        sub = _InboxSub(sub_id, conn, user_id, groups)
        self._subs.add(user_id, sub)

    def on_writable(self, conn: Connection) -> None:
        for sub in self._subs.of_conn(conn):
            if sub.dirty and sub.timer is None:
                self._flush(sub)

    def close_all(self, message: str) -> None:
        for sub in self._subs.all():
            self._remove(sub)
            sub.conn.push(SubscriptionClosed(sub.sub_id, "shutdown", message))

    # -- the state's side -------------------------------------------------------------------------
    def on_change(self, user_id: str, session_id: str) -> None:
        subs = self._subs.of_key(user_id)
        if not subs:
            return
        group = -1
        for sub in subs.values():
            if sub.groups is not None:
                if group < 0:
                    group = self.group_of(session_id)
                if group not in sub.groups:
                    continue
            sub.dirty.add(session_id)
            if len(sub.dirty) >= self.limits.dirty_max:
                if sub.timer is not None:
                    sub.timer.cancel()
                sub.timer = asyncio.get_running_loop().call_soon(self._flush, sub)
            elif sub.timer is None:
                loop = asyncio.get_running_loop()
                sub.timer = loop.call_later(self.limits.interval_s, self._flush, sub)

    def on_group_replaced(self, group: int) -> None:
        for sid in self.state.session_ids(group):
            session = self.state.get_session(sid)
            if session is not None:
                self.on_change(session.user_id, sid)

    def _flush(self, sub: _InboxSub) -> None:
        sub.timer = None
        if sub.closed or not sub.dirty:
            return
        if not sub.conn.writable or sub.conn.backlog_bytes > self.limits.backlog_bytes_high:
            return  # on_writable flushes it; changes keep merging meanwhile
        ids, sub.dirty = sorted(sub.dirty), set()
        entries = [e for sid in ids if (e := entry(self.state, sid)) is not None]
        step = self.limits.delta_entries_max
        for i in range(0, len(entries), step):
            sub.conn.push(InboxDelta(sub.sub_id, entries[i : i + step]))
            self.deltas += 1

    def _remove(self, sub: _InboxSub) -> None:
        if sub.closed:
            return
        sub.closed = True
        if sub.timer is not None:
            sub.timer.cancel()
            sub.timer = None
        self._subs.remove(sub.user_id, sub)


__all__ = ["InboxLimits", "Inboxes", "entry"]
