"""Serving a client's request for a group this node does not host (design §4.1, §5.6).

With more than three nodes a group lives on three of them (``Node.replicas``); any node still
takes any request.  A request whose group is not hosted here travels whole, with the
connection's principal, to one of the group's replicas on the peer connection's application
lane (``RelayRequest``), which serves it as if its client were connected there (a write goes
on to the leader through its ``Router``; a read passes its barrier there) and sends the
encoded answer back (``RelayAnswer``, with the leader it knows: later requests of the group go
to that replica first).  The origin tries the replicas in turn: the known leader, else a
connected one; on ``unavailable`` (the replica no longer hosts the group, or could not serve it)
or a replica unreachable it tries the next, within the request's deadline
(``request_timeout_s``, checked every ``SWEEP_S``).  A replica that goes down with a read in
flight is asked again elsewhere; with a write in flight the outcome is unknown: ``timeout``
(the client retries with its ``client_msg_id``), as for a forward today.

Streams (``Subscribe``, and ``SubscribeInbox`` for the groups not hosted here) are relayed the
same way, and then the replica's pushes follow (``RelayPush``) until either side ends them
(``RelayCancel`` from the origin, ``RelayEnded`` from a replica that could not push).  On the
replica a relayed stream is an ordinary subscription whose connection is a ``PeerConn``: its
backlog is the bytes pushed and not yet acknowledged by the origin (``RelayAck``), and the
origin acknowledges only while its client's connection is below ``backlog_bytes_high``.  So a
slow client slows the replica exactly as a local one would (live messages fall back to replay
from the store, ``slow_consumer`` after ``slow_timeout_s``), and the origin buffers nothing of
its own: its client's connection holds at most what it would for a local subscription plus
one window in flight.  The origin keeps each subscription's next seq: when its replica dies,
the relay breaks, a push is lost (a seq jumps) or the replica ends it ``unavailable`` or
``shutdown``, it subscribes again at another replica after the last seq delivered, for at most
``resume_s``; the client sees one subscription, without a gap or a duplicate.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol, cast

import msgspec
from msgspec.structs import replace

from raft import NONE
from wire.aio import Connection, Reply
from wire.protocol import (
    RETRYABLE,
    Append,
    ChunkEvent,
    CloseReason,
    Compact,
    ContextEvent,
    CreateAgent,
    CreateSession,
    DisableAgent,
    Error,
    GapEvent,
    GetAgent,
    GetContext,
    GetSession,
    InboxDelta,
    InboxEntry,
    InboxSnapshot,
    ListAgents,
    ListSessions,
    MarkRead,
    MessageEvent,
    Push,
    Read,
    Request,
    Response,
    SetContextConfig,
    Subscribe,
    Subscribed,
    SubscribeInbox,
    SubscriptionClosed,
    UpdateAgent,
    error,
)

from .auth import Principal
from .inbox import Inboxes
from .placement import group_of
from .registry import Streams
from .subscriptions import SubscriptionLimits

logger = logging.getLogger(__name__)

SWEEP_S = 0.05  # deadlines, withheld acknowledgements and unsent ends are looked at this often


class RelayRequest(msgspec.Struct, array_like=True, tag=40):
    """A client's request (encoded, its rid the client's) with the principal it came with."""

    fid: int
    group: int
    request: bytes
    role: str
    sub: str
    sessions: list[str] | None
    expires_at: float | None
    groups: list[int] = []  # a SubscribeInbox: only these groups' sessions (empty: all hosted)


class RelayAnswer(msgspec.Struct, array_like=True, tag=41):
    """``response``: the encoded answer when ``code`` is empty; ``code`` "unavailable": the
    replica could not take the request (not hosted there, too busy): ask another."""

    fid: int
    response: bytes
    code: str
    message: str
    leader: int  # the group's leader as the replica knows it (0: none)


class RelayPush(msgspec.Struct, array_like=True, tag=42):
    fid: int
    event: bytes  # an encoded wire Push


class RelayAck(msgspec.Struct, array_like=True, tag=43):
    """The origin took these streams' pushes up to ``totals`` bytes (of ``RelayPush.event``)."""

    fids: list[int]
    totals: list[int]


class RelayCancel(msgspec.Struct, array_like=True, tag=44):
    fids: list[int]


class RelayEnded(msgspec.Struct, array_like=True, tag=45):
    """The replica ended these streams without a word (a push could not be queued)."""

    fids: list[int]


RelayEnvelope = RelayRequest | RelayAnswer | RelayPush | RelayAck | RelayCancel | RelayEnded
RELAY_ENVELOPES = (RelayRequest, RelayAnswer, RelayPush, RelayAck, RelayCancel, RelayEnded)

_encode = msgspec.msgpack.Encoder().encode
_decode_request = msgspec.msgpack.Decoder(Request).decode
_decode_answer = msgspec.msgpack.Decoder(Response).decode
_decode_push = msgspec.msgpack.Decoder(Push).decode

RELAYED = (Append, Read, GetContext, SetContextConfig, Compact, GetSession, Subscribe,
           MarkRead, CreateSession, CreateAgent, UpdateAgent, GetAgent, DisableAgent,
           SubscribeInbox, ListSessions, ListAgents)  # fmt: skip
"""The requests a replica serves for another node."""

READS = (Read, GetSession, GetContext, GetAgent, Subscribe, SubscribeInbox, ListSessions,
         ListAgents)  # fmt: skip
"""Requests asked again at another replica when the one asked goes down with it."""

RESUME_S = 10.0  # a broken relayed stream is resumed elsewhere for at most this long
ENDS_MAX = 100_000  # streams whose end a replica still has to tell (more: the origin's
# sweep finds them anyway when it resumes after its next push is refused)


def relay_group(request: Request, groups: int) -> int | None:
    """The group whose replicas serve ``request`` (None: any node serves it from its own
    state: ``Ping``, ``GetRoutes``, ``Unsubscribe``, ``ListSessions``, ``ListAgents``, and
    ``SubscribeInbox``, which spans groups; a ``CreateSession`` is named before this)."""
    key = _KEY_OF.get(type(request))
    if key is None:
        return None
    name = key(request)
    return None if name is None else group_of(name, groups)


_KEY_OF: dict[type, Callable[[Any], str | None]] = {
    **{t: (lambda r: r.session_id) for t in (Append, Read, GetContext, SetContextConfig, Compact,
                                             GetSession, Subscribe, MarkRead, CreateSession)},
    CreateAgent: lambda r: r.agent.id,
    UpdateAgent: lambda r: r.agent.id,
    GetAgent: lambda r: r.agent_id,
    DisableAgent: lambda r: r.agent_id,
}  # fmt: skip


class Served(Protocol):
    """The service's side: what a relayed request meets on the replica."""

    def on_request(self, conn: Connection, request: Request) -> Reply: ...

    def on_writable(self, conn: Connection) -> None: ...

    def on_close(self, conn: Connection) -> None: ...


class Transport(Protocol):
    def send_app(self, to: int, payload: bytes) -> bool: ...

    def is_connected(self, peer: int) -> bool: ...


# -- the replica's side ----------------------------------------------------------------------------
class PeerConn:
    """A relayed request's (or stream's) connection on the replica: what the service's
    handlers use of ``wire.aio.Connection``, its answer and pushes going to the origin."""

    def __init__(self, relay: Relay, peer: int, fid: int, group: int, principal: Principal,
                 groups: frozenset[int] | None) -> None:  # fmt: skip
        self.relay = relay
        self.peer = peer
        self.fid = fid
        self.group = group
        self.context: Principal = principal
        self.credential: str | None = None
        self.groups = groups  # an inbox: only these groups' sessions (None: all)
        self.closed = False
        self.replied = False
        self.stream = False  # answered Subscribed or InboxSnapshot: pushes follow
        self.sent = 0  # bytes pushed
        self.acked = 0  # of them, taken by the origin
        self.core = self  # (``conn.core.awaits_answer``)

    def awaits_answer(self, rid: int) -> bool:
        return not self.replied

    def reply(self, response: Response) -> None:
        if self.replied or self.closed:
            return
        self.replied = True
        self.relay._reply(self, response)

    def push(self, event: Push) -> int:
        if self.closed:
            return 0
        return self.relay._push(self, event)

    @property
    def backlog_bytes(self) -> int:
        return self.sent - self.acked

    @property
    def writable(self) -> bool:
        return not self.closed

    def close(self, code: Any = None, message: str = "") -> None:
        self.relay._drop_served(self, tell=True)


# -- the origin's side -----------------------------------------------------------------------------
class _Call:
    __slots__ = ("data", "deadline", "done", "fid", "finished", "group", "groups", "hops",
                 "peer", "principal", "read", "rid", "targets", "tried")  # fmt: skip

    def __init__(self, group: int, rid: int, data: bytes, principal: Principal, read: bool,
                 deadline: float, done: Callable[[Response], None]) -> None:  # fmt: skip
        self.group = group
        self.rid = rid
        self.data = data
        self.principal = principal
        self.read = read
        self.deadline = deadline
        self.done = done
        self.fid = 0
        self.peer = NONE
        self.hops = 0
        self.tried: set[int] = set()
        self.finished = False
        self.targets: tuple[int, ...] | None = None  # who may serve it (None: group's replicas)
        self.groups: list[int] = []  # an inbox part: its groups


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
    def __init__(self, relay: Relay, limits: SubscriptionLimits) -> None:
        super().__init__(limits)
        self.relay = relay

    def add(self, s: _Stream) -> None:
        self._subs.add(s.session_id, s)

    def all(self) -> list[_Stream]:
        return self._subs.all()

    def _remove(self, s: _Stream) -> None:
        if s.closed:
            return
        s.closed = True
        self._subs.remove(s.session_id, s)
        self.relay._cancel(s)


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
    def __init__(self, relay: Relay, limits: SubscriptionLimits) -> None:
        super().__init__(limits)
        self.relay = relay

    def add(self, box: _Inbox) -> None:
        self._subs.add(box.request.user_id, box)

    def all(self) -> list[_Inbox]:
        return self._subs.all()

    def _remove(self, box: _Inbox) -> None:
        if box.closed:
            return
        box.closed = True
        self._subs.remove(box.request.user_id, box)
        relay = self.relay
        for part in box.parts:
            part.closed = True
            relay._to_ack.discard(part)
            if part.fid:
                relay._by_fid.pop(part.fid, None)
                relay._tell(part.peer, RelayCancel([part.fid]))
                part.fid = 0
        box.parts.clear()


class Relay:
    def __init__(
        self,
        node_id: int,
        transport: Callable[[], Transport | None],
        hosted: Callable[[int], bool],
        replicas: Callable[[int], tuple[int, ...]],
        leader: Callable[[int], int],
        served: Served,
        request_timeout_s: float = 5.0,
        hops_max: int = 5,
        retry_delay_s: float = 0.02,
        calls_max: int = 100_000,
        limits: SubscriptionLimits | None = None,
        local_inboxes: Inboxes | None = None,
    ) -> None:
        self.node_id = node_id
        self._transport = transport
        self.hosted = hosted
        self.replicas = replicas
        self.leader = leader
        self.served = served
        self.request_timeout_s = request_timeout_s
        self.hops_max = hops_max
        self.retry_delay_s = retry_delay_s
        self.calls_max = calls_max
        self.limits = limits or SubscriptionLimits()
        self._fids = itertools.count(1)
        self._calls: dict[int, _Call] = {}  # fid -> request relayed by this node
        self._leaders: dict[int, int] = {}  # group -> its leader, as a replica told us
        self.streams = _RemoteStreams(self, self.limits)
        self._by_fid: dict[int, _Stream | _Part] = {}  # fid -> the stream it carries
        self.inboxes = _RemoteInboxes(self, limits or SubscriptionLimits())
        self.local_inboxes = local_inboxes
        self._to_ack: set[_Stream | _Part] = set()
        self._ack_scheduled = False
        self._served: dict[tuple[int, int], PeerConn] = {}  # (origin, fid) -> served here
        self._ends: dict[int, set[int]] = {}  # origin -> fids ended here, still to tell it
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.relayed = 0  # requests sent to a replica
        self.served_relays = 0  # requests served for another node
        self.refused_relays = 0  # requests for a group not hosted here (the origin asks on)
        self.resumed = 0  # relayed streams resumed at another replica
        self.acks_withheld = 0  # times a stream's client was too far behind to take more

    # -- lifecycle ---------------------------------------------------------------------------------
    def _now(self) -> float:
        loop = self._loop
        if loop is None:  # the first use: the sweep starts
            loop = self._loop = asyncio.get_running_loop()
            if not self._stopped:
                self._timer = loop.call_later(SWEEP_S, self._sweep)
        return loop.time()

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for call in list(self._calls.values()):
            self._finish(call, error(call.rid, "unavailable", "the node is stopping"))
        self._calls.clear()
        for conn in list(self._served.values()):
            self._drop_served(conn, tell=False)

    def close_all(self, reason: CloseReason, message: str) -> None:
        for s in self.streams.all():
            self._end(s, reason, message)
        for box in self.inboxes.all():
            self._end_inbox(box, reason, message)

    # -- requests (the origin) ---------------------------------------------------------------------
    def request(
        self, group: int, request: Request, principal: Principal, done: Callable[[Response], None]
    ) -> None:
        """Have a replica of ``group`` serve ``request``; ``done(response)`` exactly once,
        within ``request_timeout_s`` (an ``Error`` if no replica answered)."""
        if len(self._calls) >= self.calls_max:
            done(error(request.rid, "unavailable", "too many relayed requests waiting"))
            return
        deadline = self._now() + self.request_timeout_s
        read = isinstance(request, READS)
        call = _Call(group, request.rid, _encode(request), principal, read, deadline, done)
        self._send(call)

    def _choose(self, call: _Call) -> int:
        transport = self._transport()
        if transport is None:
            return NONE
        targets = self.replicas(call.group) if call.targets is None else call.targets
        candidates = [p for p in targets
                      if p != self.node_id and p not in call.tried
                      and transport.is_connected(p)]  # fmt: skip
        if not candidates:
            return NONE
        leader = self._leaders.get(call.group, NONE)
        if leader in candidates:
            return leader
        return candidates[call.group % len(candidates)]  # spread the groups' first asks

    def _send(self, call: _Call) -> None:
        if call.finished:
            return
        transport = self._transport()
        while transport is not None:
            peer = self._choose(call)
            if peer == NONE:
                break
            call.tried.add(peer)
            fid = next(self._fids)
            p = call.principal
            sessions = None if p.sessions is None else sorted(p.sessions)
            envelope = RelayRequest(fid, call.group, call.data, p.role, p.sub, sessions,
                                    p.expires_at, call.groups)  # fmt: skip
            if transport.send_app(peer, _encode(envelope)):
                call.fid, call.peer = fid, peer
                self._calls[fid] = call
                self.relayed += 1
                return
        # No replica to ask now: ask them all again a little later, while time remains.
        call.hops += 1
        if call.hops > self.hops_max or self._now() >= call.deadline:
            message = f"no replica of group {call.group} could serve the request"
            self._finish(call, error(call.rid, "unavailable", message))
            return
        call.tried.clear()
        assert self._loop is not None
        self._loop.call_later(self.retry_delay_s * call.hops, self._send, call)

    def _finish(self, call: _Call, response: Response) -> None:
        if call.finished:
            return
        call.finished = True
        try:
            call.done(response)
        except Exception:
            logger.exception("answering relayed request %d failed", call.rid)

    def _answered(self, peer: int, answer: RelayAnswer) -> None:
        call = self._calls.get(answer.fid)
        if call is None or call.peer != peer:
            # Timed out meanwhile: a stream it may have opened there is not wanted.
            self._tell(peer, RelayCancel([answer.fid]))
            return
        del self._calls[answer.fid]
        if answer.leader in self.replicas(call.group):
            self._leaders[call.group] = answer.leader
        if answer.code:
            self._send(call)  # not served there: the next replica
            return
        try:
            response = _decode_answer(answer.response)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self._finish(call, error(call.rid, "internal", f"undecodable answer from {peer}: {e}"))
            return
        others = [p for p in self.replicas(call.group) if p != self.node_id]
        if (
            call.read
            and isinstance(response, Error)
            and response.code == "unavailable"
            and any(p not in call.tried for p in others)
        ):
            self._send(call)  # another replica may do better (its archive, its link)
            return
        self._finish(call, response)

    def leader_of(self, group: int) -> int:
        """The leader of a group not hosted here, as its replicas last told (0: unknown)."""
        return self._leaders.get(group, NONE)

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
        deadline = self._now() + self.request_timeout_s
        call = _Call(s.group, request.rid, _encode(request), s.principal, True, deadline,
                     lambda response: self._opened(s, call, response))  # fmt: skip
        self._send(call)

    def _opened(self, s: _Stream, call: _Call, response: Response) -> None:
        if isinstance(response, Subscribed):
            if s.closed:
                self._tell(call.peer, RelayCancel([call.fid]))
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
        now = self._now()
        if not s.resume_until:
            s.resume_until = now + RESUME_S
        if now >= s.resume_until:
            self._end(s, "unavailable", "no replica of the session could carry on: "
                      "subscribe again after the last seq")  # fmt: skip
            return
        self.resumed += 1
        assert self._loop is not None
        self._loop.call_later(self.retry_delay_s, self._open, s)

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
            self._tell(s.peer, RelayCancel([s.fid]))
            s.fid = 0

    def _pushed(self, peer: int, envelope: RelayPush) -> None:
        s = self._by_fid.get(envelope.fid)
        if s is None or s.peer != peer:
            self._tell(peer, RelayCancel([envelope.fid]))  # not (or no longer) wanted
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
            assert self._loop is not None
            self._loop.call_soon(self._send_acks)

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
            if self._tell(peer, ack):
                for s in streams:
                    s.acked = s.received
                    self._to_ack.discard(s)
        self._to_ack = {s for s in self._to_ack if not s.closed and s.fid}

    def stop_stream(self, conn: Connection, sub_id: int) -> bool:
        return self.streams.stop(conn, sub_id) or self.inboxes.stop(conn, sub_id)

    def on_writable(self, conn: Connection) -> None:
        if any(s.conn is conn for s in self._to_ack) and not self._ack_scheduled:
            self._ack_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._send_acks)

    def on_close(self, conn: Connection) -> None:
        self.streams.on_close(conn)
        self.inboxes.on_close(conn)

    # -- lists spanning groups (the origin) --------------------------------------------------------
    def gather(
        self,
        request: Request,
        principal: Principal,
        hosted: frozenset[int],
        groups: int,
        done: Callable[[list[Response]], None],
    ) -> None:
        """Ask ``request`` (a list over every group) of as few nodes as hold the groups not
        ``hosted`` here; ``done(answers)`` once each answered, exactly once, within
        ``request_timeout_s`` (an ``Error`` among them if one could not)."""
        parts = self._cover(frozenset(range(groups)) - hosted, NONE)
        answers: list[Response] = []
        data = _encode(request)
        deadline = self._now() + self.request_timeout_s

        def answered(response: Response) -> None:
            answers.append(response)
            if len(answers) == len(parts):
                done(answers)

        if not parts:
            done(answers)
            return
        for part in parts:
            call = _Call(min(part), request.rid, data, principal, True, deadline, answered)
            hosts = [set(self.replicas(g)) for g in part]
            call.targets = tuple(sorted(set.intersection(*hosts) - {self.node_id}))
            call.groups = sorted(part)
            self._send(call)

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
        deadline = self._now() + self.request_timeout_s
        remote = frozenset(range(groups)) - hosted
        for part_groups in self._cover(remote, NONE):
            self._open_part(box, _Part(box, part_groups), deadline)

    def _cover(self, groups: frozenset[int], without: int) -> list[frozenset[int]]:
        """``groups`` split among as few nodes as host them (connected ones first; greedy)."""
        transport = self._transport()
        hosts = {g: [p for p in self.replicas(g) if p not in (self.node_id, without)]
                 for g in groups}  # fmt: skip
        left, parts = set(groups), []
        while left:
            counts: Counter[int] = Counter()
            for g in left:
                for p in hosts[g]:
                    counts[p] += 2 if transport is not None and transport.is_connected(p) else 1
            if not counts:  # no other node holds them: asked anyway, they fail unavailable
                parts.append(frozenset(left))
                break
            best = max(counts, key=lambda p: (counts[p], -p))
            take = frozenset(g for g in left if best in hosts[g])
            parts.append(take)
            left -= take
        return parts

    def _open_part(self, box: _Inbox, part: _Part, deadline: float) -> None:
        if box.closed:
            return
        box.parts.add(part)
        request = SubscribeInbox(box.request.rid, box.request.user_id)
        call = _Call(
            min(part.groups), request.rid, _encode(request), box.principal, True, deadline,
            lambda response: self._part_opened(part, call, response),
        )  # fmt: skip
        hosts = [set(self.replicas(g)) for g in part.groups]
        call.targets = tuple(sorted(set.intersection(*hosts) - {self.node_id}))
        call.groups = sorted(part.groups)
        self._send(call)

    def _part_opened(self, part: _Part, call: _Call, response: Response) -> None:
        box = part.box
        if isinstance(response, InboxSnapshot):
            if box.closed or part.closed:
                self._tell(call.peer, RelayCancel([call.fid]))
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
            self._tell(old, RelayCancel([part.fid]))
        self._by_fid.pop(part.fid, None)
        self._to_ack.discard(part)
        part.closed = True
        box.parts.discard(part)
        now = self._now()
        until = part.resume_until or now + RESUME_S
        if now >= until or not box.answered:
            self._end_inbox(box, "unavailable", "the inbox could not be followed: subscribe again")
            return
        self.resumed += 1
        for groups in self._cover(part.groups, old):
            again = _Part(box, groups)
            again.resume_until = until
            assert self._loop is not None
            self._loop.call_later(self.retry_delay_s, self._open_part, box, again,
                                  now + self.request_timeout_s)  # fmt: skip

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

    # -- the replica's side ------------------------------------------------------------------------
    def _serve(self, peer: int, envelope: RelayRequest) -> None:
        if not self.hosted(envelope.group) or not all(map(self.hosted, envelope.groups)):
            self.refused_relays += 1
            self._answer(peer, envelope.fid, b"", "unavailable", "the group is not hosted here")
            return
        if len(self._served) >= self.calls_max:
            self._answer(peer, envelope.fid, b"", "unavailable", "too many relayed requests")
            return
        try:
            request = _decode_request(envelope.request)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self._answer(peer, envelope.fid, b"", "unavailable", f"undecodable request: {e}")
            return
        if not isinstance(request, RELAYED):
            self._answer(peer, envelope.fid, b"", "unavailable", "not a relayed request")
            return
        sessions = None if envelope.sessions is None else frozenset(envelope.sessions)
        principal = Principal(envelope.sub, cast(Any, envelope.role), sessions,
                              envelope.expires_at)  # fmt: skip
        groups = frozenset(envelope.groups) if envelope.groups else None
        conn = PeerConn(self, peer, envelope.fid, envelope.group, principal, groups)
        self._served[(peer, envelope.fid)] = conn
        self.served_relays += 1
        view = cast(Connection, conn)
        try:
            answer = self.served.on_request(view, request)
        except Exception:
            logger.exception("serving relayed request %d failed", request.rid)
            answer = error(request.rid, "internal", "internal error")
        if answer is None:
            return
        if isinstance(answer, msgspec.Struct):
            conn.reply(answer)
            return
        task = asyncio.ensure_future(answer)
        task.add_done_callback(lambda t: conn.reply(_task_answer(request.rid, t)))

    def _answer(self, peer: int, fid: int, response: bytes, code: str, message: str,
                leader: int = NONE) -> None:  # fmt: skip
        self._tell(peer, RelayAnswer(fid, response, code, message, leader))

    def _reply(self, conn: PeerConn, response: Response) -> None:
        """``conn``'s answer, to its origin (lost if it went: it times out there)."""
        leader = self.leader(conn.group) if self.hosted(conn.group) else NONE
        if isinstance(response, Subscribed | InboxSnapshot) and not conn.closed:
            conn.stream = True
        else:
            self._served.pop((conn.peer, conn.fid), None)
            conn.closed = True
        self._answer(conn.peer, conn.fid, _encode(response), "", "", leader)

    def _push(self, conn: PeerConn, event: Push) -> int:
        encoded = _encode(event)
        data = _encode(RelayPush(conn.fid, encoded))
        if not self._tell(conn.peer, data):
            self._drop_served(conn, tell=True)  # the origin resumes the stream elsewhere
            return 0
        conn.sent += len(encoded)
        if type(event) is SubscriptionClosed:
            self._served.pop((conn.peer, conn.fid), None)
            conn.closed = True
        return len(data)

    def _drop_served(self, conn: PeerConn, tell: bool) -> None:
        if conn.closed and not conn.stream:
            return
        self._served.pop((conn.peer, conn.fid), None)
        was_stream, conn.stream = conn.stream, False
        conn.closed = True
        self.served.on_close(cast(Connection, conn))
        if tell and was_stream:
            ends = self._ends.setdefault(conn.peer, set())
            if len(ends) < ENDS_MAX:
                ends.add(conn.fid)

    # -- the peer connection -----------------------------------------------------------------------
    def _tell(self, peer: int, message: RelayEnvelope | bytes) -> bool:
        transport = self._transport()
        if transport is None or peer == NONE:
            return False
        data = message if isinstance(message, bytes) else _encode(message)
        return transport.send_app(peer, data)

    def on_envelope(self, peer: int, envelope: RelayEnvelope) -> None:
        match envelope:
            case RelayRequest():
                self._serve(peer, envelope)
            case RelayAnswer():
                self._answered(peer, envelope)
            case RelayPush():
                self._pushed(peer, envelope)
            case RelayAck(fids, totals):
                for fid, total in zip(fids, totals, strict=False):
                    conn = self._served.get((peer, fid))
                    if conn is not None and conn.stream and conn.acked < total <= conn.sent:
                        conn.acked = total
                        self.served.on_writable(cast(Connection, conn))
            case RelayCancel(fids):
                for fid in fids:
                    conn = self._served.get((peer, fid))
                    if conn is not None:
                        self._drop_served(conn, tell=False)
            case RelayEnded(fids):
                for fid in fids:
                    s = self._by_fid.get(fid)
                    if s is not None and s.peer == peer:
                        self._break(s)

    def on_peer_down(self, peer: int) -> None:
        for fid in [f for f, c in self._calls.items() if c.peer == peer]:
            call = self._calls.pop(fid)
            if call.read:
                self._send(call)  # nothing changed: ask another replica
            else:
                message = f"node {peer} went down with the request; outcome unknown"
                self._finish(call, error(call.rid, "timeout", message))
        for s in [s for s in self._by_fid.values() if s.peer == peer]:
            self._break(s)
        # Its streams end here; told when it is back, in case it never saw the link go.
        for conn in [c for (p, _), c in self._served.items() if p == peer]:
            self._drop_served(conn, tell=True)

    def _sweep(self) -> None:
        now = self._now()
        for fid in [f for f, c in self._calls.items() if c.deadline <= now or c.finished]:
            call = self._calls.pop(fid)
            outcome = "" if call.read else "; outcome unknown"
            self._finish(call, error(call.rid, "timeout", f"no answer from a replica{outcome}"))
        waiting = [s for s in self._by_fid.values() if s.received > s.acked]
        if waiting:
            self._to_ack.update(waiting)
            self._send_acks()
        for peer, fids in list(self._ends.items()):
            if self._tell(peer, RelayEnded(sorted(fids))):
                del self._ends[peer]
        assert self._loop is not None
        if not self._stopped:
            self._timer = self._loop.call_later(SWEEP_S, self._sweep)


def _task_answer(rid: int, task: asyncio.Future[Response]) -> Response:
    if task.cancelled():
        return error(rid, "unavailable", "the request was cancelled")
    exc = task.exception()
    if exc is not None:
        return error(rid, "internal", "internal error")
    return task.result()


__all__ = ["RELAY_ENVELOPES", "PeerConn", "Relay", "RelayEnvelope", "relay_group"]
