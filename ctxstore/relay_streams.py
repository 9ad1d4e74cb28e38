"""The origin's side of relayed subscriptions and inboxes (design §4.1, §5.6;
``ctxstore.relay`` carries them).

A client's ``Subscribe`` of a session whose group is not hosted here is relayed to a replica
(``Relay.send``), which answers ``Subscribed`` and pushes as for a local subscription, to a
``PeerConn``: its backlog is the bytes pushed and not yet acknowledged here (``RelayAck``), and
this side acknowledges only while its client's connection is below ``backlog_bytes_high``.  So
a slow client slows the replica exactly as a local one would (live messages fall back to
replay from the store, ``slow_consumer`` after ``slow_timeout_s``), and nothing is buffered
here: the client's connection holds at most what it would for a local subscription plus one
window in flight.  This side keeps each subscription's next seq: when its replica dies, the
relay breaks, a push is lost (a seq jumps) or the replica ends it ``unavailable`` or
``shutdown``, it subscribes again at another replica after the last seq delivered, for at most
``RESUME_S``; the client sees one subscription, without a gap or a duplicate.

A ``SubscribeInbox`` on a node that does not host every group is the user's sessions of the
hosted groups (``Inboxes``, narrowed to them) plus, for the others, inboxes narrowed to their
groups at as few nodes as host them all (``Relay.cover``): one ``InboxSnapshot`` once every
part answered (merged, most recent first), then the parts' deltas under the client's sub_id,
acknowledged the same way.  A part whose node dies is followed again from others; its sessions'
current entries come as a delta.
"""

from __future__ import annotations

import logging

import msgspec
from msgspec.structs import replace

from raft import NONE
from wire.aio import Connection
from wire.protocol import (
    RETRYABLE,
    ChunkEvent,
    CloseReason,
    ContextEvent,
    Error,
    GapEvent,
    InboxDelta,
    InboxEntry,
    InboxSnapshot,
    MessageEvent,
    Push,
    Response,
    Subscribe,
    Subscribed,
    SubscribeInbox,
    SubscriptionClosed,
    error,
)

from .auth import Principal
from .inbox import Inboxes
from .peer_messages import RelayAck, RelayCancel, RelayPush
from .registry import Streams
from .relay import Call, Relay
from .subscriptions import SubscriptionLimits

logger = logging.getLogger(__name__)

RESUME_S = 10.0  # a broken relayed stream is resumed elsewhere for at most this long

_encode = msgspec.msgpack.Encoder().encode
_decode_push = msgspec.msgpack.Decoder(Push).decode


def _current(conn: Connection, principal: Principal) -> Principal:
    """The principal a stream of ``conn`` is (re)opened with: the connection's now (a second
    Hello may have refreshed its token since it subscribed: the same principal, a later
    expiry), else the one it subscribed with."""
    now = conn.context
    return now if isinstance(now, Principal) else principal


class _Stream:
    """A subscription whose pushes come from a replica."""

    __slots__ = ("acked", "answered", "closed", "conn", "fid", "group", "next_seq", "peer",
                 "principal", "received", "request", "resume_until", "session_id",
                 "sub_id")  # fmt: skip

    def __init__(self, sub_id: int, conn: Connection, request: Subscribe, group: int,
                 principal: Principal) -> None:  # fmt: skip
        self.sub_id = sub_id
        self.conn = conn
        self.request = request
        self.session_id = request.session_id
        self.group = group
        self.principal = principal
        self.next_seq = request.after_seq + 1
        self.fid = 0  # the relay now carrying it (0: none)
        self.peer = NONE
        self.answered = False  # the client has its Subscribed
        self.received = 0  # bytes of pushes received on the current relay
        self.acked = 0  # of them, acknowledged
        self.resume_until = 0.0  # broken since: resumed until then (0: not broken)
        self.closed = False


class _RemoteStreams(Streams[str, _Stream]):
    def __init__(self, follow: Followers, limits: SubscriptionLimits) -> None:
        super().__init__(limits)
        self.follow = follow

    def add(self, s: _Stream) -> None:
        self._subs.add(s.session_id, s)

    def all(self) -> list[_Stream]:
        return self._subs.all()

    def _remove(self, s: _Stream) -> None:
        if s.closed:
            return
        s.closed = True
        self._subs.remove(s.session_id, s)
        self.follow._cancel(s)


class _Inbox:
    """A user's inbox followed here for the hosted groups and from replicas for the rest."""

    __slots__ = ("answered", "closed", "conn", "entries", "hosted", "parts", "principal",
                 "request", "sub_id", "truncated")  # fmt: skip

    def __init__(self, sub_id: int, conn: Connection, request: SubscribeInbox,
                 principal: Principal, hosted: frozenset[int]) -> None:  # fmt: skip
        self.sub_id = sub_id
        self.conn = conn
        self.request = request
        self.principal = principal
        self.hosted = hosted
        self.parts: set[_Part] = set()
        self.entries: dict[str, InboxEntry] = {}  # the parts' snapshots, until answered
        self.truncated = False
        self.answered = False
        self.closed = False


class _Part:
    """Some groups of an inbox, followed from one node that hosts them all."""

    __slots__ = ("acked", "box", "closed", "conn", "fid", "groups", "peer", "received",
                 "resume_until")  # fmt: skip

    def __init__(self, box: _Inbox, groups: frozenset[int]) -> None:
        self.box = box
        self.conn = box.conn
        self.groups = groups
        self.fid = 0
        self.peer = NONE
        self.received = 0
        self.acked = 0
        self.resume_until = 0.0
        self.closed = False


class _RemoteInboxes(Streams[str, _Inbox]):
    def __init__(self, follow: Followers, limits: SubscriptionLimits) -> None:
        super().__init__(limits)
        self.follow = follow

    def add(self, box: _Inbox) -> None:
        self._subs.add(box.request.user_id, box)

    def all(self) -> list[_Inbox]:
        return self._subs.all()

    def _remove(self, box: _Inbox) -> None:
        if box.closed:
            return
        box.closed = True
        self._subs.remove(box.request.user_id, box)
        follow = self.follow
        for part in box.parts:
            part.closed = True
            follow._to_ack.discard(part)
            if part.fid:
                follow._by_fid.pop(part.fid, None)
                follow.relay.tell(part.peer, RelayCancel([part.fid]))
                part.fid = 0
        box.parts.clear()


class Followers:
    """This node's clients' subscriptions and inboxes followed from other nodes."""

    def __init__(
        self, relay: Relay, limits: SubscriptionLimits, local_inboxes: Inboxes | None = None
    ) -> None:
        self.relay = relay
        self.limits = limits
        self.local_inboxes = local_inboxes
        self.streams = _RemoteStreams(self, limits)
        self.inboxes = _RemoteInboxes(self, limits)
        self._by_fid: dict[int, _Stream | _Part] = {}  # fid -> the stream it carries
        self._to_ack: set[_Stream | _Part] = set()
        self._ack_scheduled = False
        self.resumed = 0  # relayed streams resumed at another replica
        self.acks_withheld = 0  # times a stream's client was too far behind to take more

    def close_all(self, reason: CloseReason, message: str) -> None:
        for s in self.streams.all():
            self._end(s, reason, message)
        for box in self.inboxes.all():
            self._end_inbox(box, reason, message)

    # -- streams (the origin) ----------------------------------------------------------------------
    def subscribe(
        self, conn: Connection, sub_id: int, request: Subscribe, principal: Principal, group: int
    ) -> None:
        """Follow ``request``'s session from one of its replicas; the client's ``Subscribed``
        (or error) is answered when the replica answers."""
        s = _Stream(sub_id, conn, request, group, principal)
        self.streams.add(s)
        self._open(s)

    def _open(self, s: _Stream) -> None:
        if s.closed:
            return
        request = replace(s.request, after_seq=s.next_seq - 1)
        deadline = self.relay.now() + self.relay.request_timeout_s
        principal = _current(s.conn, s.principal)
        call = Call(s.group, request.rid, _encode(request), principal, True, deadline,
                    lambda response: self._opened(s, call, response))  # fmt: skip
        self.relay.send(call)

    def _opened(self, s: _Stream, call: Call, response: Response) -> None:
        if isinstance(response, Subscribed):
            if s.closed:
                self.relay.tell(call.peer, RelayCancel([call.fid]))
                return
            s.fid, s.peer, s.received, s.acked = call.fid, call.peer, 0, 0
            s.resume_until = 0.0
            self._by_fid[call.fid] = s
            if not s.answered:
                s.answered = True
                s.conn.reply(Subscribed(s.request.rid, s.sub_id, response.last_seq))
            return
        if s.closed:
            return
        if not s.answered:
            s.closed = True  # (never announced: nothing to cancel)
            self.streams._subs.remove(s.session_id, s)
            s.conn.reply(response)
        elif isinstance(response, Error) and response.code in RETRYABLE:
            self._broken(s)
        elif isinstance(response, Error) and response.code == "not_found":
            self._end(s, "not_found", response.message)
        else:
            message = response.message if isinstance(response, Error) else "unexpected answer"
            self._end(s, "unavailable", message)

    def _broken(self, s: _Stream) -> None:
        """The relay carrying ``s`` is gone: subscribe again elsewhere, after the last seq."""
        if s.closed:
            return
        if s.fid:
            self._by_fid.pop(s.fid, None)
            self._to_ack.discard(s)
            s.fid, s.peer = 0, NONE
        now = self.relay.now()
        if not s.resume_until:
            s.resume_until = now + RESUME_S
        if now >= s.resume_until:
            self._end(s, "unavailable", "no replica of the session could carry on: "
                      "subscribe again after the last seq")  # fmt: skip
            return
        self.resumed += 1
        self.relay.loop.call_later(self.relay.retry_delay_s, self._open, s)

    def _end(self, s: _Stream, reason: CloseReason, message: str) -> None:
        if s.closed:
            return
        self.streams._remove(s)
        s.conn.push(SubscriptionClosed(s.sub_id, reason, message))

    def _cancel(self, s: _Stream) -> None:
        """``s`` is no longer wanted (unsubscribed, ended, its connection closed)."""
        self._to_ack.discard(s)
        if s.fid:
            self._by_fid.pop(s.fid, None)
            self.relay.tell(s.peer, RelayCancel([s.fid]))
            s.fid = 0

    def on_push(self, peer: int, envelope: RelayPush) -> None:
        s = self._by_fid.get(envelope.fid)
        if s is None or s.peer != peer:
            self.relay.tell(peer, RelayCancel([envelope.fid]))  # not (or no longer) wanted
            return
        if isinstance(s, _Part):
            self._part_pushed(s, envelope)
            return
        s.received += len(envelope.event)
        try:
            event = _decode_push(envelope.event)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            logger.warning("relayed push from node %d undecodable: %s", peer, e)
            self._lost(s)
            return
        match event:
            case MessageEvent(_, messages):
                fresh = [m for m in messages if m.seq >= s.next_seq]
                if fresh and fresh[0].seq != s.next_seq:
                    self._lost(s)  # a push went missing: read it again
                    return
                if fresh:
                    s.conn.push(MessageEvent(s.sub_id, fresh))
                    s.next_seq = fresh[-1].seq + 1
            case GapEvent(_, from_seq, to_seq, reason):
                if from_seq > s.next_seq:
                    self._lost(s)
                    return
                if to_seq >= s.next_seq:
                    s.conn.push(GapEvent(s.sub_id, s.next_seq, to_seq, reason))
                    s.next_seq = to_seq + 1
            case SubscriptionClosed(_, reason, message):
                if reason in ("unavailable", "shutdown"):
                    self._by_fid.pop(s.fid, None)
                    s.fid = 0  # ended there: nothing to cancel
                    self._broken(s)
                else:
                    self._by_fid.pop(s.fid, None)
                    s.fid = 0  # ended there: nothing to cancel
                    self._end(s, reason, message)
                return
            case ContextEvent() | ChunkEvent() | InboxDelta():
                s.conn.push(replace(event, sub_id=s.sub_id))
        self._ack_soon(s)

    def _break(self, s: _Stream | _Part) -> None:
        if isinstance(s, _Part):
            self._part_broken(s)
        else:
            self._broken(s)

    def _lost(self, s: _Stream) -> None:
        self._cancel(s)
        self._broken(s)

    def _ack_soon(self, s: _Stream | _Part) -> None:
        self._to_ack.add(s)
        if not self._ack_scheduled:
            self._ack_scheduled = True
            self.relay.loop.call_soon(self._send_acks)

    def _send_acks(self) -> None:
        """Acknowledge what the streams' clients can take: those whose connection is over
        ``backlog_bytes_high`` wait (their replica stops pushing, as for a local one)."""
        self._ack_scheduled = False
        high = self.limits.backlog_bytes_high
        by_peer: dict[int, list[_Stream | _Part]] = {}
        for s in self._to_ack:
            if s.closed or not s.fid or s.received <= s.acked:
                continue
            if s.conn.backlog_bytes > high:
                self.acks_withheld += 1  # the replica waits, as for a slow local client
                continue
            by_peer.setdefault(s.peer, []).append(s)
        for peer, streams in by_peer.items():
            ack = RelayAck([s.fid for s in streams], [s.received for s in streams])
            if self.relay.tell(peer, ack):
                for s in streams:
                    s.acked = s.received
                    self._to_ack.discard(s)
        self._to_ack = {s for s in self._to_ack if not s.closed and s.fid}

    def stop_stream(self, conn: Connection, sub_id: int) -> bool:
        return self.streams.stop(conn, sub_id) or self.inboxes.stop(conn, sub_id)

    def on_writable(self, conn: Connection) -> None:
        if any(s.conn is conn for s in self._to_ack) and not self._ack_scheduled:
            self._ack_scheduled = True
            self.relay.loop.call_soon(self._send_acks)

    def on_close(self, conn: Connection) -> None:
        self.streams.on_close(conn)
        self.inboxes.on_close(conn)

    # -- inboxes (the origin) ----------------------------------------------------------------------
    def subscribe_inbox(
        self,
        conn: Connection,
        sub_id: int,
        request: SubscribeInbox,
        principal: Principal,
        hosted: frozenset[int],
        groups: int,
    ) -> None:
        """Follow the user's inbox here for the ``hosted`` groups and from replicas for the
        others (as few as cover them); the client's ``InboxSnapshot`` (the parts' merged) is
        answered once every part answered, or an error if one could not be opened in time."""
        box = _Inbox(sub_id, conn, request, principal, hosted)
        self.inboxes.add(box)
        deadline = self.relay.now() + self.relay.request_timeout_s
        remote = frozenset(range(groups)) - hosted
        for part_groups in self.relay.cover(remote, NONE):
            self._open_part(box, _Part(box, part_groups), deadline)

    def _open_part(self, box: _Inbox, part: _Part, deadline: float) -> None:
        if box.closed:
            return
        box.parts.add(part)
        request = SubscribeInbox(box.request.rid, box.request.user_id)
        call = Call(
            min(part.groups), request.rid, _encode(request), _current(box.conn, box.principal),
            True, deadline,
            lambda response: self._part_opened(part, call, response),
        )  # fmt: skip
        hosts = [set(self.relay.replicas(g)) for g in part.groups]
        call.targets = tuple(sorted(set.intersection(*hosts) - {self.relay.node_id}))
        call.groups = sorted(part.groups)
        self.relay.send(call)

    def _part_opened(self, part: _Part, call: Call, response: Response) -> None:
        box = part.box
        if isinstance(response, InboxSnapshot):
            if box.closed or part.closed:
                self.relay.tell(call.peer, RelayCancel([call.fid]))
                return
            part.fid, part.peer, part.received, part.acked = call.fid, call.peer, 0, 0
            part.resume_until = 0.0
            self._by_fid[call.fid] = part
            if not box.answered:
                for e in response.entries:
                    box.entries[e.session_id] = e
                box.truncated = box.truncated or response.truncated
                if all(p.fid for p in box.parts):
                    self._inbox_answer(box)
            else:  # resumed elsewhere: its sessions as they are now
                self._inbox_push(box, response.entries)
            return
        if box.closed or part.closed:
            return
        if not box.answered:  # an inbox opens whole or not at all
            self.inboxes._remove(box)
            box.conn.reply(response)
        elif isinstance(response, Error) and response.code in RETRYABLE:
            self._part_broken(part)
        else:
            message = response.message if isinstance(response, Error) else "unexpected answer"
            self._end_inbox(box, "unavailable", message)

    def _inbox_answer(self, box: _Inbox) -> None:
        local = self.local_inboxes
        entries = list(box.entries.values())
        truncated = box.truncated
        if local is not None and box.hosted:
            mine, more = local.snapshot(box.request.user_id, box.hosted)
            entries += mine
            truncated = truncated or more
        entries.sort(key=lambda e: (-e.last_activity, e.session_id))
        limit = local.limits.snapshot_max if local is not None else len(entries)
        box.answered = True
        box.entries = {}
        box.conn.reply(InboxSnapshot(box.request.rid, box.sub_id, entries[:limit],
                                     truncated or len(entries) > limit))  # fmt: skip
        if local is not None and box.hosted:
            local.start(box.conn, box.sub_id, box.request.user_id, box.hosted)

    def _inbox_push(self, box: _Inbox, entries: list[InboxEntry]) -> None:
        step = self.local_inboxes.limits.delta_entries_max if self.local_inboxes else 500
        for i in range(0, len(entries), step):
            box.conn.push(InboxDelta(box.sub_id, entries[i : i + step]))

    def _part_pushed(self, part: _Part, envelope: RelayPush) -> None:
        part.received += len(envelope.event)
        box = part.box
        try:
            event = _decode_push(envelope.event)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            logger.warning("relayed inbox push from node %d undecodable: %s", part.peer, e)
            self._part_broken(part, cancel=True)
            return
        match event:
            case InboxDelta(_, entries):
                if box.answered:
                    self._inbox_push(box, entries)
                else:
                    for entry in entries:
                        box.entries[entry.session_id] = entry
            case SubscriptionClosed(_, reason, message):
                self._by_fid.pop(part.fid, None)
                part.fid = 0  # ended there: nothing to cancel
                if reason in ("unavailable", "shutdown"):
                    self._part_broken(part)
                else:
                    self._end_inbox(box, reason, message)
                return
        self._ack_soon(part)

    def _part_broken(self, part: _Part, cancel: bool = False) -> None:
        """The relay of ``part`` is gone: its groups are followed again from other nodes (its
        sessions' current entries come as a delta, then their changes)."""
        box = part.box
        if part.closed or box.closed:
            return
        old = part.peer
        if cancel and part.fid:
            self.relay.tell(old, RelayCancel([part.fid]))
        self._by_fid.pop(part.fid, None)
        self._to_ack.discard(part)
        part.closed = True
        box.parts.discard(part)
        now = self.relay.now()
        until = part.resume_until or now + RESUME_S
        if now >= until or not box.answered:
            self._end_inbox(box, "unavailable", "the inbox could not be followed: subscribe again")
            return
        self.resumed += 1
        for groups in self.relay.cover(part.groups, old):
            again = _Part(box, groups)
            again.resume_until = until
            self.relay.loop.call_later(self.relay.retry_delay_s, self._open_part, box, again,
                                       now + self.relay.request_timeout_s)  # fmt: skip

    def _end_inbox(self, box: _Inbox, reason: CloseReason, message: str) -> None:
        if box.closed:
            return
        answered = box.answered
        self.inboxes._remove(box)
        if self.local_inboxes is not None:
            self.local_inboxes.stop(box.conn, box.sub_id)
        if answered:
            box.conn.push(SubscriptionClosed(box.sub_id, reason, message))
        else:
            box.conn.reply(error(box.request.rid, "unavailable", message))

    # -- what the relay reports ------------------------------------------------------------------
    def on_ended(self, peer: int, fids: list[int]) -> None:
        for fid in fids:
            s = self._by_fid.get(fid)
            if s is not None and s.peer == peer:
                self._break(s)

    def on_peer_down(self, peer: int) -> None:
        for s in [s for s in self._by_fid.values() if s.peer == peer]:
            self._break(s)

    def sweep(self) -> None:
        """Acknowledge what was withheld from clients that have caught up since."""
        waiting = [s for s in self._by_fid.values() if s.received > s.acked]
        if waiting:
            self._to_ack.update(waiting)
            self._send_acks()


__all__ = ["RESUME_S", "Followers"]
