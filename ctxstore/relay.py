"""Serving a client's request for a group this node does not host (design §4.1, §5.6).

With more than three nodes a group lives on three of them (``Node.replicas``); any node still
takes any request.  A request whose group is not hosted here travels whole, with the
connection's principal, to one of the group's replicas on the peer connection's application
lane (``RelayRequest``), which serves it as if its client were connected there (a write goes
on to the leader through its ``Router``; a read passes its barrier there) and sends the
encoded answer back (``RelayAnswer``, with the leader it knows: later requests of the group go
to that replica first).  The origin tries the replicas in turn: the known leader, else a
connected one; on ``unavailable`` (the replica no longer hosts the group, or could not serve it,
or it lost the group before proposing anything of the request: ``PeerConn.refuse``)
or a replica unreachable it tries the next, within the request's deadline
(``request_timeout_s``, checked every ``SWEEP_S``).  A replica that goes down with a read in
flight is asked again elsewhere; with a write in flight the outcome is unknown: ``timeout``
(the client retries with its ``client_msg_id``), as for a forward today.  Lists spanning
groups (``ListSessions``, ``ListAgents``) ask the same page of as few nodes as hold the groups
not hosted here (``gather``).

Streams (``Subscribe``, and ``SubscribeInbox`` for the groups not hosted here) are relayed the
same way, and then the replica's pushes follow (``RelayPush``) until either side ends them
(``RelayCancel`` from the origin, ``RelayEnded`` from a replica that could not push); on the
replica a relayed stream is an ordinary subscription or inbox whose connection is a
``PeerConn``, and the origin's side is ``ctxstore.relay_streams``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol, cast

import msgspec

from raft import NONE
from wire.aio import Connection, Reply
from wire.protocol import (
    Append,
    Compact,
    CreateAgent,
    CreateSession,
    DisableAgent,
    Error,
    GetAgent,
    GetContext,
    GetSession,
    InboxSnapshot,
    ListAgents,
    ListSessions,
    MarkRead,
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
from .peer_messages import (
    RelayAck,
    RelayAnswer,
    RelayCancel,
    RelayEnded,
    RelayEnvelope,
    RelayPush,
    RelayRequest,
)
from .placement import group_of

logger = logging.getLogger(__name__)

SWEEP_S = 0.05  # deadlines, withheld acknowledgements and unsent ends are looked at this often


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

    def retired(self, peer: int) -> bool: ...  # removed from the cluster for good


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

    def refuse(self, message: str) -> None:
        """Not served here after all, with nothing of it proposed here (its group left, or is
        leaving with no leader known here: ``router.GroupMoved``): the origin asks the
        group's next replica, as for a group not hosted here, instead of answering."""
        if self.replied or self.closed:
            return
        self.replied = True
        self.relay._refuse(self, message)

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
class Call:
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


class Follow(Protocol):
    """The origin's side of relayed streams (``ctxstore.relay_streams.Followers``)."""

    def on_push(self, peer: int, envelope: RelayPush) -> None: ...

    def on_ended(self, peer: int, fids: list[int]) -> None: ...

    def on_peer_down(self, peer: int) -> None: ...

    def sweep(self) -> None: ...


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
        self._fids = itertools.count(1)
        self._calls: dict[int, Call] = {}  # fid -> request relayed by this node
        self._leaders: dict[int, int] = {}  # group -> its leader, as a replica told us
        self.follow: Follow | None = None  # the relayed streams' origin side
        self._served: dict[tuple[int, int], PeerConn] = {}  # (origin, fid) -> served here
        self._ends: dict[int, set[int]] = {}  # origin -> fids ended here, still to tell it
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.relayed = 0  # requests sent to a replica
        self.served_relays = 0  # requests served for another node
        self.refused_relays = 0  # requests for a group not hosted here (the origin asks on)

    # -- lifecycle ---------------------------------------------------------------------------------
    def now(self) -> float:
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

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        self.now()
        assert self._loop is not None
        return self._loop

    # -- requests (the origin) ---------------------------------------------------------------------
    def request(
        self,
        group: int,
        request: Request,
        principal: Principal,
        done: Callable[[Response], None],
        timeout_s: float | None = None,
    ) -> None:
        """Have a replica of ``group`` serve ``request``; ``done(response)`` exactly once,
        within ``timeout_s`` (what is left of a request's deadline: at most, and by default,
        ``request_timeout_s``; an ``Error`` if no replica answered)."""
        if len(self._calls) >= self.calls_max:
            done(error(request.rid, "unavailable", "too many relayed requests waiting"))
            return
        wait_s = self.request_timeout_s if timeout_s is None else timeout_s
        deadline = self.now() + min(wait_s, self.request_timeout_s)
        read = isinstance(request, READS)
        call = Call(group, request.rid, _encode(request), principal, read, deadline, done)
        self.send(call)

    def _choose(self, call: Call) -> int:
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
        return candidates[0]  # (the view's order; the answer tells the leader for the next)

    def send(self, call: Call) -> None:
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
        if call.hops > self.hops_max or self.now() >= call.deadline:
            message = f"no replica of group {call.group} could serve the request"
            self._finish(call, error(call.rid, "unavailable", message))
            return
        call.tried.clear()
        assert self._loop is not None
        self._loop.call_later(self.retry_delay_s * call.hops, self.send, call)

    def _finish(self, call: Call, response: Response) -> None:
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
            self.tell(peer, RelayCancel([answer.fid]))
            return
        del self._calls[answer.fid]
        if answer.leader in self.replicas(call.group):
            self._leaders[call.group] = answer.leader
        if answer.code:
            self.send(call)  # not served there: the next replica
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
            self.send(call)  # another replica may do better (its archive, its link)
            return
        self._finish(call, response)

    def leader_of(self, group: int) -> int:
        """The leader of a group not hosted here, as its replicas last told (0: unknown)."""
        return self._leaders.get(group, NONE)

    def cover(self, groups: frozenset[int], without: int) -> list[frozenset[int]]:
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
        parts = self.cover(frozenset(range(groups)) - hosted, NONE)
        answers: list[Response] = []
        data = _encode(request)
        deadline = self.now() + self.request_timeout_s

        def answered(response: Response) -> None:
            answers.append(response)
            if len(answers) == len(parts):
                done(answers)

        if not parts:
            done(answers)
            return
        for part in parts:
            call = Call(min(part), request.rid, data, principal, True, deadline, answered)
            hosts = [set(self.replicas(g)) for g in part]
            call.targets = tuple(sorted(set.intersection(*hosts) - {self.node_id}))
            call.groups = sorted(part)
            self.send(call)

    # -- the replica's side ------------------------------------------------------------------------
    def _serve(self, peer: int, envelope: RelayRequest) -> None:
        self.now()  # (the sweep runs from the first use on)
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

    def _leader_here(self, group: int) -> int:
        """The group's leader as this replica knows it, for the origin (0: none, or not
        hosted here any more)."""
        return self.leader(group) if self.hosted(group) else NONE

    def _answer(self, peer: int, fid: int, response: bytes, code: str, message: str,
                leader: int = NONE) -> None:  # fmt: skip
        self.tell(peer, RelayAnswer(fid, response, code, message, leader))

    def _reply(self, conn: PeerConn, response: Response) -> None:
        """``conn``'s answer, to its origin (lost if it went: it times out there)."""
        leader = self._leader_here(conn.group)
        if isinstance(response, Subscribed | InboxSnapshot) and not conn.closed:
            conn.stream = True
        else:
            self._served.pop((conn.peer, conn.fid), None)
            conn.closed = True
        self._answer(conn.peer, conn.fid, _encode(response), "", "", leader)

    def _refuse(self, conn: PeerConn, message: str) -> None:
        self._served.pop((conn.peer, conn.fid), None)
        conn.closed = True
        self.refused_relays += 1
        leader = self._leader_here(conn.group)
        self._answer(conn.peer, conn.fid, b"", "unavailable", message, leader)

    def _push(self, conn: PeerConn, event: Push) -> int:
        encoded = _encode(event)
        data = _encode(RelayPush(conn.fid, encoded))
        if not self.tell(conn.peer, data):
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
    def tell(self, peer: int, message: RelayEnvelope | bytes) -> bool:
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
                if self.follow is not None:
                    self.follow.on_push(peer, envelope)
                else:
                    self.tell(peer, RelayCancel([envelope.fid]))
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
                if self.follow is not None:
                    self.follow.on_ended(peer, fids)

    def on_peer_down(self, peer: int) -> None:
        for fid in [f for f, c in self._calls.items() if c.peer == peer]:
            call = self._calls.pop(fid)
            if call.read:
                self.send(call)  # nothing changed: ask another replica
            else:
                message = f"node {peer} went down with the request; outcome unknown"
                self._finish(call, error(call.rid, "timeout", message))
        if self.follow is not None:
            self.follow.on_peer_down(peer)
        # Its streams end here; told when it is back, in case it never saw the link go.
        for conn in [c for (p, _), c in self._served.items() if p == peer]:
            self._drop_served(conn, tell=True)

    def _sweep(self) -> None:
        """Every ``SWEEP_S``, rescheduled first (the deadlines depend on it: an error in one
        round, logged by the loop, must not end the next ones)."""
        now = self.now()
        assert self._loop is not None
        if not self._stopped:
            self._timer = self._loop.call_later(SWEEP_S, self._sweep)
        for fid in [f for f, c in self._calls.items() if c.deadline <= now or c.finished]:
            call = self._calls.pop(fid)
            outcome = "" if call.read else "; outcome unknown"
            self._finish(call, error(call.rid, "timeout", f"no answer from a replica{outcome}"))
        if self.follow is not None:
            self.follow.sweep()
        transport = self._transport()
        for peer, fids in list(self._ends.items()):
            if self.tell(peer, RelayEnded(sorted(fids))):
                del self._ends[peer]
            elif transport is not None and transport.retired(peer):
                del self._ends[peer]  # removed from the cluster: it will never be told


def _task_answer(rid: int, task: asyncio.Future[Response]) -> Response:
    if task.cancelled():
        return error(rid, "unavailable", "the request was cancelled")
    exc = task.exception()
    if exc is not None:
        return error(rid, "internal", "internal error")
    return task.result()


__all__ = ["PeerConn", "Relay", "relay_group"]
