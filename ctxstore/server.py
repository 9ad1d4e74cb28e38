"""The client-facing service: native protocol requests (``wire``) on a ``Node``.

- Writes (``CreateSession``, ``Append``, ``MarkRead``) become commands stamped with this node's
  clock, go to the session's group through the ``Router`` (proposed here or forwarded to the
  leader) and are answered with the state machine's result once applied: an ack means the
  command is committed on a quorum and applied.
- Reads (``GetSession``, ``Read``) first pass a ReadIndex barrier of the session's group (any
  replica may serve it), so a read sees every write acknowledged before it was sent, whichever
  node acknowledged it.  ``Read`` serves the hot tail and, for older messages, the local
  archive (``History``); a range deleted by retention is skipped (the seqs show it).
  ``ListSessions`` reads this node's applied state (all groups are replicated here): it may lag
  a write acknowledged by another node by a replication delay.
- ``Subscribe`` passes the same barrier, answers ``Subscribed`` with the session's last seq,
  then ``Subscriptions`` pushes replay and live messages.  ``SubscribeInbox`` answers an
  ``InboxSnapshot`` from applied state, then ``Inboxes`` pushes deltas.  Sub ids are unique per
  node.
- Authorization (ctxstore/auth.py, ctxstore/authz.py, docs/auth.md): the Hello's token (or the
  credential its transport carried) becomes the connection's ``Principal`` (``conn.context``);
  a restricted one (a user or an agent token, or one narrowed to sessions) has every request
  checked by ``authz.admit`` before anything else, its writes carry an ``Actor`` the state
  machine checks against the session on apply (on the leader, wherever the request came in),
  and its reads are checked against the session after the barrier: ``forbidden`` either way,
  whether or not the session exists.  An append's sender is the token's.  A second Hello
  (protocol version 4) with a new token of the same principal refreshes the connection: its
  expiry moves to the new token's, its subscriptions go on.  When the token expires, the
  connection is closed with the goodbye ``unauthorized`` (its subscriptions end): the client
  connects again with a new token.
- Backpressure: while the local archive is behind (``Archive.overloaded``) appends are refused
  ``unavailable`` (retryable) so the archive's queue stays bounded.
- Answers never block the loop and need no task per request: the router's futures call back.
- Errors: domain refusals carry the state machine's code (``not_found``, ``conflict``,
  ``bad_request``); a request that cannot reach a leader in time is ``unavailable``
  (retryable); one whose outcome is unknown is ``timeout`` (retry with the same
  ``client_msg_id``).  Every request is answered within ``request_timeout_s`` (the router's
  deadline; an archive read likewise).  Input limits are the wire's (the schema, and metadata
  at most ``METADATA_BYTES_MAX`` encoded, checked by ``wire.framing`` before a request reaches
  us), plus an append's message: content and metadata at most ``MESSAGE_BYTES_MAX`` together
  (``too_large``), so that it fits its Raft entry, the peer transport and one response frame
  (ctxstore/limits.py).  A ``read`` answer holds at most ``Limits.read_bytes_max`` of messages
  (``READ_BYTES_MAX``), always at least one: the client reads on from the last seq.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, cast, get_args

from msgspec.structs import replace

from raft.errors import check
from wire.aio import BaseHandler, Connection, Reply
from wire.framing import SENDER_ROLES
from wire.protocol import (
    MESSAGE_BYTES_MAX,
    AgentInfo,
    AgentList,
    Append,
    Appended,
    Compact,
    ContextChanged,
    CreateAgent,
    CreateSession,
    DisableAgent,
    Error,
    GetAgent,
    GetContext,
    GetRoutes,
    GetSession,
    Hello,
    InboxSnapshot,
    ListAgents,
    ListSessions,
    MarkRead,
    Messages,
    Ping,
    Pong,
    Read,
    ReadMarked,
    Request,
    Response,
    Routes,
    SessionInfo,
    SessionList,
    SetContextConfig,
    Subscribe,
    Subscribed,
    SubscribeInbox,
    Unsubscribe,
    Unsubscribed,
    UpdateAgent,
    error,
)

from . import authz, commands, context, records
from .agents.registry import check_agent
from .auth import SERVICE, Principal, Unauthorized, Verifier, same_principal, verifier_of
from .history import HistoryUnavailable, Page, TailMiss
from .node import Node
from .placement import group_of
from .records import AgentRecord
from .relay import PeerConn, Relay, relay_group
from .relay_streams import Followers
from .router import GroupMoved, RouteError
from .state import fingerprint, payload_bytes
from .tokens import OFFLOAD_CHARS, offload

logger = logging.getLogger(__name__)

EXPIRED_GOODBYE = (
    "the token expired: send a new one in a hello before it expires, or connect again with one"
)
REFRESH_REFUSED = (
    "a second hello must carry a token of the same principal (sub and role), not narrowed "
    "further: connect again to be someone else"
)

EXPIRY_HORIZON_S = 10 * 365 * 86400
"""A token valid for longer than this (10 years) is treated as one that never expires by its
connection: no timer, ``expires_in_ms`` nil (its requests are still checked against it)."""

HAND_ON_MIN_S = 0.05  # a request handed on with less of its deadline left is answered instead
_ROUTE_CODES = frozenset({"unavailable", "timeout", "too_large"})  # passed on to the client


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Service(BaseHandler):
    def __init__(
        self, node: Node, clock_ms: Callable[[], int] = now_ms, verifier: Verifier | None = None
    ) -> None:
        s = node.settings
        super().__init__(s.node_id, s.cluster_id)
        self.verifier = verifier_of(s) if verifier is None else verifier
        self._expiries: dict[Connection, asyncio.TimerHandle] = {}
        self.node = node
        self.state = node.state
        self.router = node.router
        self.groups = s.groups
        self.clock_ms = clock_ms
        self.subscriptions = node.subscriptions
        self.inboxes = node.inboxes
        self.archive = node.archive
        self.history = node.history
        self.read_bytes_max = node.limits.read_bytes_max
        self.request_timeout_s = s.request_timeout_s
        self.counters = node.counters
        self.window_cache = node.window_cache
        # Encoded get_context answers per window version (within the node's context cache).
        self.replies = context.ReplyCache(min(s.context_cache_bytes, context.REPLY_CACHE_BYTES_MAX))
        self.window_records_max = node.state.limits.window_records_max
        # Appends of a connection waiting for a count off the loop, and those behind them (a
        # connection's appends are proposed in the order they came).
        self._counting: dict[Connection, deque[Append]] = {}
        self.messages_counted = 0  # messages whose tokens this node counted
        self.counted_off_loop = 0  # of those, counted on a thread (long ones)
        self.count_seconds = 0.0  # time spent counting (on the loop and on threads)
        self._sub_ids = itertools.count(1)
        self.requests = 0
        self.handed_on = 0  # requests whose group moved away while here: relayed (_hand_on)
        self.errors: dict[str, int] = {}
        self.on_append_latency: Callable[[float, bool], None] | None = None  # seconds, ok
        rc = node.router.config
        self.relay = Relay(
            s.node_id, lambda: node.transport, lambda g: g in node.driver.host,
            lambda g: node.replicas(g),  # (the node's view, whenever it changes)
            node.host.leader, self, s.request_timeout_s, rc.hops_max, rc.retry_delay_s,
            rc.forwards_max,
        )  # fmt: skip
        self.follow = Followers(self.relay, node.subscriptions.limits, node.inboxes)
        self.relay.follow = self.follow
        node.router.relay = self.relay
        node.dispatcher.fetch_agent = self._fetch_agent

    def _fetch_agent(self, agent_id: str, done: Callable[[AgentRecord | None, bool], None]) -> None:
        """Read an agent of a group not hosted here from a replica, for the dispatcher:
        ``done(agent, True)`` (None: not registered), or ``done(None, False)`` when no replica
        answered (any error but ``not_found``)."""

        def answered(response: Response) -> None:
            if isinstance(response, AgentInfo):
                done(records.agent_from_wire(response.agent), True)
            elif isinstance(response, Error) and response.code == "not_found":
                done(None, True)
            else:
                done(None, False)

        group = group_of(agent_id, self.groups)
        self.relay.request(group, GetAgent(1, agent_id), SERVICE, answered)

    def on_hello(self, conn: Connection, hello: Hello) -> Reply:
        if conn.greeted:
            return self._refresh(conn, hello)
        try:
            principal = self.verifier.verify(hello.token or conn.credential)
        except Unauthorized as e:
            return self._error(error(hello.rid, "unauthorized", e.message))
        conn.context = principal
        return conn.welcome(self.node_id, self.cluster_id, self._expire_later(conn, principal))

    def _refresh(self, conn: Connection, hello: Hello) -> Reply:
        """A second Hello (protocol version 4): a new token for the connection's principal.
        Refused (the connection goes on with its token until it expires): ``unauthorized`` for
        an invalid token (the upgrade request's credential does not count: a refresh carries its
        own), ``forbidden`` for one of another principal (``same_principal``)."""
        try:
            principal = self.verifier.verify(hello.token)
        except Unauthorized as e:
            return self._error(error(hello.rid, "unauthorized", e.message))
        now: Principal = conn.context or SERVICE
        if not same_principal(now, principal):
            return self._error(error(hello.rid, "forbidden", REFRESH_REFUSED))
        conn.context = principal
        self.verifier.refreshed += 1
        return conn.welcome(self.node_id, self.cluster_id, self._expire_later(conn, principal))

    def _expire_later(self, conn: Connection, principal: Principal) -> int | None:
        """Close ``conn`` when ``principal``'s token expires (instead of when an earlier one
        of it would have); how long that is in ms (None: never)."""
        timer = self._expiries.pop(conn, None)
        if timer is not None:
            timer.cancel()
        if principal.expires_at is None:
            return None
        delay_s = max(0.0, principal.expires_at - time.time())
        if delay_s > EXPIRY_HORIZON_S:  # (its ms would not fit the Welcome's integer)
            return None
        loop = asyncio.get_running_loop()
        self._expiries[conn] = loop.call_later(delay_s, self._expired, conn)
        return int(delay_s * 1000)

    def _expired(self, conn: Connection) -> None:
        self._expiries.pop(conn, None)
        self.verifier.refuse("expired")
        conn.close("unauthorized", EXPIRED_GOODBYE)

    def _refusal(self, conn: Connection, p: Principal, request: Request) -> Error | None:
        """Why a restricted principal may not make ``request`` (the checks needing no state)."""
        if p.expires_at is not None and time.time() > p.expires_at:
            self.verifier.refuse("expired")
            return self._error(error(request.rid, "unauthorized", "the token expired"))
        operation = request.__struct_config__.tag
        assert isinstance(operation, str)
        session_id = getattr(request, "session_id", None)
        user_id = getattr(request, "user_id", None)
        if authz.admit(p.role, p.sub, p.sessions, operation, session_id, user_id):
            return None
        return self._forbidden(request.rid)

    def _forbidden(self, rid: int) -> Error:
        return self._error(error(rid, "forbidden", authz.FORBIDDEN_MESSAGE))

    def _may_touch(self, session_id: str, actor: commands.Actor) -> bool:
        """False if the session is known here and ``actor`` does not own it (one not known here
        yet is left to the state machine's check on apply)."""
        state = self.state
        return state.last_seq(session_id) is None or state.owned_by(
            session_id, actor.role, actor.sub
        )

    @staticmethod
    def _actor(conn: Connection) -> commands.Actor | None:
        p: Principal = conn.context or SERVICE
        return None if p.role == "service" else commands.Actor(p.role, p.sub)

    def on_request(self, conn: Connection, request: Request) -> Reply:
        self.requests += 1
        principal: Principal = conn.context or SERVICE
        if principal.restricted:
            denied = self._refusal(conn, principal, request)
            if denied is not None:
                return denied
        if type(request) is CreateSession and request.session_id is None:
            request = replace(request, session_id=uuid.uuid4().hex)  # named here, wherever served
        group = relay_group(request, self.groups)
        if group is not None and group not in self.node.driver.host:
            return self._relay(conn, group, request, principal)
        handler = _HANDLERS.get(type(request))
        if handler is None:
            return self._error(error(request.rid, "bad_request", "unsupported request"))
        return handler(self, conn, request)

    def _relay(
        self,
        conn: Connection,
        group: int,
        request: Request,
        p: Principal,
        received: float | None = None,  # when it came in (its latency, what is left of its
        # deadline: a request handed on, ``_hand_on``); None: now
    ) -> Reply:
        """Have a replica of ``group`` serve ``request`` (this node does not host it).  Not
        a request relayed here (the origin checked it hosts the group; it moved since): that
        one is refused so that its origin asks the next replica, and a relayed request never
        travels further than one replica."""
        peer = cast(object, conn)
        if isinstance(peer, PeerConn):
            peer.refuse(f"group {group} moved away from node {self.node_id}")
            return None
        if isinstance(request, Subscribe):
            refused = self.subscriptions.admit(conn) or self.follow.streams.admit(conn)
            if refused is not None:
                return self._error(error(request.rid, *refused))
            self.follow.subscribe(conn, next(self._sub_ids), request, p, group)
            return None
        timeout_s = None
        if received is not None:
            timeout_s = self.request_timeout_s - (time.perf_counter() - received)
        else:
            received = time.perf_counter()
        if isinstance(request, Append) and self.on_append_latency is not None:
            measure, since = self.on_append_latency, received

            def answer(response: Response) -> None:
                conn.reply(response)
                measure(time.perf_counter() - since, not isinstance(response, Error))

            self.relay.request(group, request, p, answer, timeout_s)
        else:
            self.relay.request(group, request, p, conn.reply, timeout_s)
        return None

    def _hand_on(
        self, conn: Connection, group: int, request: Request, received: float, exc: GroupMoved
    ) -> None:
        """``request``'s group moved away from this node before anything of it was proposed
        here (``router.GroupMoved``): relay it to the group's replicas in the next loop
        iteration (the router may call back from inside the driver's pass) rather than
        answer ``unavailable`` and have the client retry, within what is left of its deadline
        (``received``: when it came in; with less than ``HAND_ON_MIN_S`` left it is answered
        ``unavailable`` as before).  A request relayed here goes back to its origin instead,
        which asks the next replica (``_relay``)."""
        if conn.closed:
            return
        if time.perf_counter() - received > self.request_timeout_s - HAND_ON_MIN_S:
            conn.reply(self._failure(request.rid, exc))
            return
        self.handed_on += 1
        principal: Principal = conn.context or SERVICE
        loop = asyncio.get_running_loop()
        loop.call_soon(self._relay, conn, group, request, principal, received)

    # -- small requests ---------------------------------------------------------------------------
    def _unsubscribe(self, conn: Connection, r: Unsubscribe) -> Reply:
        local = self.subscriptions.stop(conn, r.sub_id) or self.inboxes.stop(conn, r.sub_id)
        if self.follow.stop_stream(conn, r.sub_id) or local:  # (an inbox may be both)
            return Unsubscribed(r.rid, r.sub_id)
        return self._error(error(r.rid, "not_found", f"no subscription {r.sub_id} here"))

    def _mark_read(self, conn: Connection, r: MarkRead) -> Reply:
        cmd = commands.MarkRead(r.session_id, r.user_id, r.seq, self._actor(conn))
        return self._submit(conn, r.rid, r.session_id, cmd, r)

    def _list_sessions(self, conn: Connection, r: ListSessions) -> Reply:
        sessions, cursor = self.state.list_sessions(r.user_id, r.cursor, r.limit)
        here = SessionList(r.rid, sessions, cursor)
        return self._list_everywhere(conn, r, here, merge_sessions)

    def _list_everywhere(
        self,
        conn: Connection,
        r: ListSessions | ListAgents,
        here: SessionList | AgentList,
        merge: Callable[[int, int, list[Any]], Response],
    ) -> Reply:
        """``here`` (this node's page), merged with the same page of the nodes that hold the
        groups not hosted here (``Relay.gather``), if any."""
        host = self.node.driver.host
        hosted = frozenset(g for g in range(self.groups) if g in host)
        if len(hosted) == self.groups or isinstance(cast(object, conn), PeerConn):
            return here

        def done(answers: list[Response]) -> None:
            odd = [a for a in answers if type(a) is not type(here)]
            if not odd:
                conn.reply(merge(r.rid, r.limit, [here, *answers]))
            elif isinstance(odd[0], Error):
                conn.reply(odd[0])
            else:
                conn.reply(self._error(error(r.rid, "internal", "unexpected answer")))

        principal: Principal = conn.context or SERVICE
        self.relay.gather(r, principal, hosted, self.groups, done)
        return None

    def _ping(self, conn: Connection, r: Ping) -> Reply:
        return Pong(r.rid)

    def _get_routes(self, conn: Connection, r: GetRoutes) -> Reply:
        # (a group not hosted here: its leader as its replicas last told the relay)
        leaders = [self.node.group_leader(g) or self.relay.leader_of(g) for g in range(self.groups)]
        replicas = [list(self.node.replicas(g)) for g in range(self.groups)]
        version = self.node.driver.stats.soft_state_changes
        return Routes(r.rid, version, leaders, dict(self.router.addresses), replicas)

    def on_writable(self, conn: Connection) -> None:
        self.subscriptions.on_writable(conn)
        self.inboxes.on_writable(conn)
        self.follow.on_writable(conn)

    def on_close(self, conn: Connection) -> None:
        timer = self._expiries.pop(conn, None)
        if timer is not None:
            timer.cancel()
        self._counting.pop(conn, None)
        self.subscriptions.on_close(conn)
        self.inboxes.on_close(conn)
        self.follow.on_close(conn)

    def close_subscriptions(self, message: str) -> None:
        """Tell every subscriber this node is going away (they resubscribe elsewhere)."""
        self.subscriptions.close_all("shutdown", message)
        self.inboxes.close_all(message)
        self.follow.close_all("shutdown", message)

    def _subscribe_inbox(self, conn: Connection, r: SubscribeInbox) -> Reply:
        """The user's sessions of this node's groups, and of the others from their replicas
        (``ctxstore.relay``); relayed here: of the groups the origin asked for."""
        refused = self.inboxes.admit(conn) or self.follow.inboxes.admit(conn)
        if refused is not None:
            return self._error(error(r.rid, *refused))
        sub_id = next(self._sub_ids)
        peer = cast(object, conn)
        groups = peer.groups if isinstance(peer, PeerConn) else None
        if groups is None and not isinstance(peer, PeerConn):
            host = self.node.driver.host
            hosted = frozenset(g for g in range(self.groups) if g in host)
            if len(hosted) < self.groups:
                principal: Principal = conn.context or SERVICE
                self.follow.subscribe_inbox(conn, sub_id, r, principal, hosted, self.groups)
                return None
        entries, truncated = self.inboxes.snapshot(r.user_id, groups)
        conn.reply(InboxSnapshot(r.rid, sub_id, entries, truncated))
        self.inboxes.start(conn, sub_id, r.user_id, groups)
        return None

    # -- agents (ctxstore/agents/; docs/agents.md) ------------------------------------------------
    # Writes go through the agent's group (``group_of(agent_id)``); ``get_agent`` reads after
    # that group's barrier; ``list_agents`` reads this node's applied state (every group is
    # replicated here), like ``list_sessions``.
    def _put_agent(self, conn: Connection, r: CreateAgent | UpdateAgent) -> Reply:
        bad = check_agent(r.agent)
        if bad is not None:
            return self._error(error(r.rid, "bad_request", f"{bad[0]}: {bad[1]}"))
        cmd = commands.PutAgent(records.agent_from_wire(r.agent), type(r) is CreateAgent)
        return self._submit(conn, r.rid, r.agent.id, cmd, r)

    def _disable_agent(self, conn: Connection, r: DisableAgent) -> Reply:
        return self._submit(conn, r.rid, r.agent_id, commands.DisableAgent(r.agent_id), r)

    def _list_agents(self, conn: Connection, r: ListAgents) -> Reply:
        agents, cursor = self.state.list_agents(r.cursor, r.limit)
        here = AgentList(r.rid, [records.agent_to_wire(a) for a in agents], cursor)
        return self._list_everywhere(conn, r, here, merge_agents)

    def _get_agent(self, conn: Connection, r: GetAgent) -> Reply:
        def serve() -> None:
            agent = self.state.get_agent(r.agent_id)
            if agent is None:
                conn.reply(self._error(error(r.rid, "not_found", f"no agent {r.agent_id!r}")))
            else:
                conn.reply(AgentInfo(r.rid, records.agent_to_wire(agent)))

        return self._after_barrier(conn, r, group_of(r.agent_id, self.groups), serve)

    # -- writes ---------------------------------------------------------------------------------
    def _append(self, conn: Connection, r: Append) -> Reply:
        if self.archive.overloaded:
            return self._error(
                error(r.rid, "unavailable", "this node's archive is behind; retry shortly")
            )
        queue = self._counting.get(conn)
        if queue is not None:  # behind a message counted off the loop: keep the order
            queue.append(r)
            return None
        if not offload(r.content, r.parts) or not self._counted(r):
            return self._append_counted(conn, r, *self._count(r))
        self._counting[conn] = deque([r])
        asyncio.get_running_loop().create_task(self._count_off_loop(conn))
        return None

    def _counted(self, r: Append) -> bool:
        """Whether this append is counted: its session has a context window (as this node
        knows it), and the client did not count it (a structured one: for its parts)."""
        if r.token_count is not None and r.parts is None:
            return False
        return context.window_tokenizer(self.state, r.session_id) is not None

    def _count(self, r: Append) -> tuple[int | None, list[int] | None]:
        """The message's tokens (the client's count wins) and its parts' (ctxstore/tokens.py),
        by the session's tokenizer, for a session with a context window; else the client's
        count (or none)."""
        tokenizer = context.window_tokenizer(self.state, r.session_id)
        if tokenizer is None or (r.token_count is not None and r.parts is None):
            return r.token_count, None
        counter = self.counters.get(tokenizer)
        started = time.perf_counter()
        tokens, per_part = counter.message(r.content, r.parts)
        self.count_seconds += time.perf_counter() - started
        self.messages_counted += 1
        return (tokens if r.token_count is None else r.token_count), (
            per_part if r.parts is not None else None
        )

    async def _count_off_loop(self, conn: Connection) -> None:
        queue = self._counting[conn]
        try:
            while queue:
                r = queue[0]
                if offload(r.content, r.parts) and self._counted(r):
                    self.counted_off_loop += 1
                    counted = await asyncio.to_thread(self._count, r)
                else:
                    counted = self._count(r)
                if self._counting.get(conn) is not queue:
                    return  # the connection closed meanwhile
                queue.popleft()
                refused = self._append_counted(conn, r, *counted)
                if isinstance(refused, Error):
                    conn.reply(refused)
        except Exception:  # a bug: answer what waits, or its client waits for nothing
            logger.exception("counting tokens failed")
            for r in queue:
                conn.reply(self._error(error(r.rid, "internal", "internal error")))
        finally:
            if self._counting.get(conn) is queue:
                del self._counting[conn]

    def _append_counted(
        self, conn: Connection, r: Append, tokens: int | None, part_tokens: list[int] | None
    ) -> Reply:
        sender, sender_id, actor = r.sender, r.sender_id, self._actor(conn)
        if actor is not None:  # the token says who sends (a user as user, an agent as agent)
            sender, sender_id = actor.role, actor.sub  # type: ignore[assignment]
        role = r.role if r.role is not None else SENDER_ROLES[sender][0]
        if role not in SENDER_ROLES[sender]:  # the token's sender may not write this role
            allowed = " or ".join(SENDER_ROLES[sender])
            message = f"role: a {sender} writes role {allowed}"
            return self._error(error(r.rid, "bad_request", message, field="role"))
        parts = records.encode_parts(r.parts)  # checked by wire.framing: encoded once, here
        cmid = r.client_msg_id  # dedupe's fingerprint, once here rather than on every replica:
        printed = None if cmid is None else fingerprint(
            sender, sender_id, r.kind, r.content, r.metadata, role, parts
        )  # fmt: skip
        cmd = commands.Append(
            r.session_id, sender, sender_id, r.kind, r.content, r.metadata,
            cmid, r.expected_seq, tokens, self.clock_ms(), role, parts,  # type: ignore[arg-type]
            part_tokens, r.if_version, actor, printed,
        )  # fmt: skip
        data = commands.encode_command(cmd)
        if len(data) > MESSAGE_BYTES_MAX:  # the payload may be over: measure it
            size = payload_bytes(records.StoredMessage(
                r.session_id, 0, r.sender, r.sender_id, r.kind, r.content, r.metadata,
                r.client_msg_id, 0, r.token_count, role, parts,  # type: ignore[arg-type]
            ))  # fmt: skip
            if size > MESSAGE_BYTES_MAX:
                message = (
                    f"the message's content, parts and metadata are {size} bytes "
                    f"(UTF-8 and msgpack) > {MESSAGE_BYTES_MAX}"
                )
                e = error(r.rid, "too_large", message, bytes=size, limit=MESSAGE_BYTES_MAX)
                return self._error(e)
        return self._submit_data(conn, r.rid, r.session_id, data, r, append=True)

    def _configure(self, conn: Connection, r: SetContextConfig) -> Reply:
        """Propose the configuration with the counts of the hot tail's messages when it opens
        the window or changes its tokenizer (counted here, on a thread when long)."""
        actor = self._actor(conn)
        if actor is not None and not self._may_touch(r.session_id, actor):
            return self._forbidden(r.rid)  # (before counting another's messages)
        tokenizer = r.tokenizer or self.counters.default
        tail, opening = context.tail_to_count(
            self.state, r.session_id, tokenizer, self.window_records_max
        )
        if not tail:
            cmd = replace(context.configure(r, self.counters, []), actor=actor)
            return self._submit(conn, r.rid, r.session_id, cmd, r)

        async def count_then_submit() -> Response | None:
            counter = self.counters.get(tokenizer)
            if context.tail_chars(tail) > OFFLOAD_CHARS:
                self.counted_off_loop += len(tail)
                counts = await asyncio.to_thread(context.count_tail, counter, tail, opening)
            else:
                counts = context.count_tail(counter, tail, opening)
            self.messages_counted += len(tail)
            cmd = replace(context.configure(r, self.counters, counts), actor=actor)
            refused = self._submit(conn, r.rid, r.session_id, cmd, r)
            return refused if isinstance(refused, Error) else None

        task = asyncio.get_running_loop().create_task(count_then_submit())
        task.add_done_callback(lambda t: self._answer_task(conn, r.rid, t))
        return None

    def _answer_task(self, conn: Connection, rid: int, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is not None or task.result() is not None:
            conn.reply(self._task_answer(rid, task))

    def _compact(self, conn: Connection, r: Compact) -> Reply:
        tokenizer = context.window_tokenizer(self.state, r.session_id)
        messages, per_part = context.replacement(
            r.replacement, r.session_id, self.clock_ms(), tokenizer, self.counters
        )
        cmd = commands.Compact(
            r.session_id, r.from_seq, r.to_seq, messages, per_part, r.if_version, self._actor(conn)
        )
        return self._submit(conn, r.rid, r.session_id, cmd, r)

    def _create(self, conn: Connection, r: CreateSession) -> Reply:
        sid = r.session_id if r.session_id is not None else uuid.uuid4().hex
        cmd = commands.CreateSession(
            sid, r.user_id, r.agent_id, r.metadata, self.clock_ms(), self._actor(conn)
        )
        return self._submit(conn, r.rid, sid, cmd, r)

    def _submit(
        self, conn: Connection, rid: int, sid: str, cmd: commands.Command, request: Request
    ) -> Reply:
        return self._submit_data(conn, rid, sid, commands.encode_command(cmd), request)

    def _submit_data(
        self,
        conn: Connection,
        rid: int,
        sid: str,
        data: bytes,
        request: Request,
        append: bool = False,  # data: an encoded commands.Append (the router may batch it)
    ) -> Reply:
        received = time.perf_counter()
        group = group_of(sid, self.groups)

        def done(result: Any, exc: BaseException | None) -> None:  # maybe inside a driver pass
            if isinstance(exc, GroupMoved):  # (never proposed here: safe to send on)
                self._hand_on(conn, group, request, received, exc)
                return
            try:
                response = self._answer(rid, result, exc, request)
                conn.reply(response)
            except Exception:  # a bug: still answer, or the client waits for nothing
                logger.exception("answering request %d failed", rid)
                if conn.core.awaits_answer(rid):
                    conn.reply(self._error(error(rid, "internal", "internal error")))
                return
            if (
                self.on_append_latency is not None
                and isinstance(request, Append)
                and not isinstance(cast(object, conn), PeerConn)  # (measured at its origin)
            ):
                ok = not isinstance(response, Error)
                self.on_append_latency(time.perf_counter() - received, ok)

        self.router.submit_then(group, data, done, append)
        return None

    def _answer(
        self, rid: int, result: Any, exc: BaseException | None, request: Request
    ) -> Response:
        if exc is not None:
            return self._failure(rid, exc)
        match result:
            case commands.Appended(seq, inserted_at, deduped):
                return Appended(rid, seq, inserted_at, deduped)
            case commands.SessionCreated(session, _):
                return SessionInfo(rid, session)
            case commands.ReadMarked(seq):
                assert isinstance(request, MarkRead)
                return ReadMarked(rid, request.session_id, request.user_id, seq)
            case commands.ContextChanged(version, tokens, needs, first_seq):
                assert isinstance(request, SetContextConfig | Compact)
                return ContextChanged(rid, request.session_id, version, tokens, needs, first_seq)
            case commands.AgentSaved(agent):
                return AgentInfo(rid, records.agent_to_wire(agent))
            case commands.Rejected(code, message, details):
                return self._error(error(rid, code, message, **details))
        logger.error("unexpected result %r", result)
        return self._error(error(rid, "internal", "unexpected result"))

    def _failure(self, rid: int, exc: BaseException) -> Error:
        if isinstance(exc, RouteError):
            code = exc.code if exc.code in _ROUTE_CODES else "internal"
            return self._error(error(rid, code, exc.message))  # type: ignore[arg-type]
        logger.error("request %d failed: %r", rid, exc)
        return self._error(error(rid, "internal", "internal error"))

    # -- reads ------------------------------------------------------------------------------------
    def _after_barrier(
        self, conn: Connection, request: Request, group: int, serve: Callable[[], None]
    ) -> Reply:
        """``serve`` once a ReadIndex barrier of ``group`` passed (then this node's state holds
        every write acknowledged before the request); an error answer if it does not, or the
        request handed on if the group moved away meanwhile (``_hand_on``)."""
        rid, received = request.rid, time.perf_counter()

        def done(_: object, exc: BaseException | None) -> None:
            if isinstance(exc, GroupMoved):
                self._hand_on(conn, group, request, received, exc)
            elif exc is not None:
                conn.reply(self._failure(rid, exc))
            else:
                serve()

        # Called back in the driver's pass that serves the barrier (no loop iteration after it).
        self.router.barrier_then(group, done)
        return None

    def _session_read(
        self, conn: Connection, request: Request, sid: str, serve: Callable[[], None]
    ) -> Reply:
        """``serve`` after the barrier of the session's group, if the connection's principal
        may read the session (``forbidden`` otherwise, whether or not it exists)."""
        rid = request.rid

        def allowed() -> None:
            actor = self._actor(conn)
            if actor is not None and not self.state.owned_by(sid, actor.role, actor.sub):
                conn.reply(self._forbidden(rid))
            else:
                serve()

        return self._after_barrier(conn, request, group_of(sid, self.groups), allowed)

    def _read_request(self, conn: Connection, r: Read) -> Reply:
        return self._session_read(conn, r, r.session_id, lambda: self._serve_read(conn, r))

    def _serve_read(self, conn: Connection, r: Read) -> None:
        rid = r.rid
        match self.history.read_tail(r.session_id, r.after_seq, r.limit, self.read_bytes_max):
            case Page(messages, _, last_seq):
                conn.reply(Messages(rid, records.messages_to_wire(messages), last_seq))
            case TailMiss.NEEDS_READ:  # older than the tail: the archive, off the loop
                task = asyncio.get_running_loop().create_task(self._read(r))
                task.add_done_callback(lambda t: conn.reply(self._task_answer(rid, t)))
            case TailMiss.UNKNOWN_SESSION:
                conn.reply(self._not_found(rid, r.session_id))

    def _get_session(self, conn: Connection, r: GetSession) -> Reply:
        def serve() -> None:
            session = self.state.get_session(r.session_id)
            if session is None:
                conn.reply(self._not_found(r.rid, r.session_id))
            else:
                conn.reply(SessionInfo(r.rid, session))

        return self._session_read(conn, r, r.session_id, serve)

    def _subscribe_request(self, conn: Connection, r: Subscribe) -> Reply:
        refused = self.subscriptions.admit(conn)
        if refused is not None:
            return self._error(error(r.rid, *refused))
        return self._session_read(conn, r, r.session_id, lambda: self._subscribe(conn, r))

    def _get_context_request(self, conn: Connection, r: GetContext) -> Reply:
        return self._session_read(conn, r, r.session_id, lambda: self._get_context(conn, r))

    def _subscribe(self, conn: Connection, r: Subscribe) -> None:
        if conn.closed:
            return
        last_seq = self.state.last_seq(r.session_id)
        if last_seq is None:
            conn.reply(self._not_found(r.rid, r.session_id))
            return
        if r.after_seq > last_seq:
            message = f"after_seq {r.after_seq} is beyond the session's last_seq {last_seq}"
            conn.reply(self._error(error(r.rid, "bad_request", message, last_seq=last_seq)))
            return
        sub_id = next(self._sub_ids)
        conn.reply(Subscribed(r.rid, sub_id, last_seq))
        group = group_of(r.session_id, self.groups)
        self.subscriptions.start(
            conn, sub_id, r.session_id, group, r.after_seq, last_seq, r.context_events,
            r.stream_chunks,
        )  # fmt: skip

    def _get_context(self, conn: Connection, r: GetContext) -> None:
        kept = self.replies.get(self.state, r.rid, r.session_id)
        if kept is not None:  # the window has not changed since it was last answered
            conn.reply(kept)
            return
        plan = context.plan(self.state, r)
        if plan is None:
            conn.reply(self._not_found(r.rid, r.session_id))
            return
        found = context.from_memory(self.state, self.window_cache, plan)
        if found is not None:
            conn.reply(self.replies.keep(plan, context.answer(r.rid, plan, found)))
            return
        task = asyncio.get_running_loop().create_task(self._context_from_history(r, plan))
        task.add_done_callback(lambda t: conn.reply(self._task_answer(r.rid, t)))

    async def _context_from_history(self, r: GetContext, plan: context.Plan) -> Response:
        try:
            async with asyncio.timeout(self.request_timeout_s):
                found = await context.from_history(
                    self.history, self.window_cache, plan, self.read_bytes_max
                )
        except HistoryUnavailable as e:
            return self._error(error(r.rid, "unavailable", str(e)))
        except TimeoutError:
            return self._error(error(r.rid, "timeout", "the archive did not answer in time"))
        return context.answer(r.rid, plan, found)

    async def _read(self, r: Read) -> Response:
        try:
            async with asyncio.timeout(self.request_timeout_s):
                page = await self.history.read(
                    r.session_id, r.after_seq, r.limit, self.read_bytes_max
                )
        except HistoryUnavailable as e:
            return self._error(error(r.rid, "unavailable", str(e)))
        except TimeoutError:
            return self._error(error(r.rid, "timeout", "the archive did not answer in time"))
        if page is None:
            return self._not_found(r.rid, r.session_id)
        return Messages(r.rid, records.messages_to_wire(page.messages), page.last_seq)

    def _task_answer(self, rid: int, task: asyncio.Task[Response]) -> Response:
        if task.cancelled():
            return self._error(error(rid, "unavailable", "the read was cancelled"))
        exc = task.exception()
        if exc is not None:
            return self._failure(rid, exc)
        return task.result()

    def _not_found(self, rid: int, session_id: str) -> Error:
        return self._error(error(rid, "not_found", f"no session {session_id!r}"))

    def _error(self, e: Error) -> Error:
        self.errors[e.code] = self.errors.get(e.code, 0) + 1
        if e.code == "forbidden":
            self.verifier.refuse("forbidden")
        return e


def merge_sessions(rid: int, limit: int, pages: list[SessionList]) -> SessionList:
    """One page of sessions from the same page (same cursor and limit) of several nodes that
    together hold every group: the first ``limit`` ids of their union (each node's page holds
    every id of it among its own first ``limit``), the next cursor if any is left."""
    found = {s.id: s for page in pages for s in page.sessions}
    ids = sorted(found)
    more = len(ids) > limit or any(page.next_cursor is not None for page in pages)
    ids = ids[:limit]
    return SessionList(rid, [found[i] for i in ids], ids[-1] if more and ids else None)


def merge_agents(rid: int, limit: int, pages: list[AgentList]) -> AgentList:
    """``merge_sessions`` for agents."""
    found = {a.id: a for page in pages for a in page.agents}
    ids = sorted(found)
    more = len(ids) > limit or any(page.next_cursor is not None for page in pages)
    ids = ids[:limit]
    return AgentList(rid, [found[i] for i in ids], ids[-1] if more and ids else None)


_HANDLERS: dict[type[Request], Callable[[Service, Connection, Any], Reply]] = {
    Append: Service._append,
    Read: Service._read_request,
    GetContext: Service._get_context_request,
    SetContextConfig: Service._configure,
    Compact: Service._compact,
    GetSession: Service._get_session,
    Subscribe: Service._subscribe_request,
    Unsubscribe: Service._unsubscribe,
    SubscribeInbox: Service._subscribe_inbox,
    CreateSession: Service._create,
    MarkRead: Service._mark_read,
    ListSessions: Service._list_sessions,
    Ping: Service._ping,
    GetRoutes: Service._get_routes,
    CreateAgent: Service._put_agent,
    UpdateAgent: Service._put_agent,
    GetAgent: Service._get_agent,
    ListAgents: Service._list_agents,
    DisableAgent: Service._disable_agent,
}
"""Each request type's handler (``Hello`` is the connection's, answered by ``on_hello``): it
answers at once (its ``Reply``) or later through ``conn.reply`` (returning None)."""
check(
    set(_HANDLERS) == set(get_args(Request)) - {Hello},
    "every request type but hello has one handler in server._HANDLERS",
)
