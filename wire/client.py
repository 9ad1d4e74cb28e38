"""The Python client of the native binary protocol (design §4.1; docs/protocol.md §9).

    client = await connect(["10.0.0.1:7400", "10.0.0.2:7400"], token="...")
    session = (await client.create_session("u1", "agent-1")).session
    ack = await client.append_with_retry(session.id, "hello")
    await client.close()

``Client`` (this file) picks the node and owns the current connection; ``client_connection``
is one connection (requests, timeouts, the sticky error, push routing); ``subscription`` the
subscriptions that resume by themselves.

Rules of this file:
- One connection at a time, shared by every call; every failure raises ``ClientError`` with a
  stable code.  A call on no open connection connects to the next target (round robin; after a
  whole round fails, a jittered exponential backoff), at most ``connect_attempts`` tries.
- A node that answers ``MOVE_ON_ERRORS``, lets a request time out, closes a subscription as
  ``MOVE_ON_CLOSINGS`` or whose connection fails is **suspect** for a jittered ``suspect_s`` / 2
  .. ``suspect_s``.  If another target is not suspect, the next call connects there (the caller
  still gets its error: retrying is its decision); the connection left keeps its requests in
  flight until they are answered, and its subscriptions resume on the new one.  When every
  target is suspect, the client stays on the open connection, if any.
- An append is safe to retry with the same ``client_msg_id``: ``append_with_retry`` picks one
  and retries retryable errors, at most ``append_attempts`` times.  The append's arguments are
  written once, in ``append_message``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import random
import uuid
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import msgspec

from .client_connection import MOVE_ON_CLOSINGS, MOVE_ON_ERRORS, Address, Connection, PushSink
from .errors import ClientError
from .protocol import (
    FRAME_BYTES_MAX,
    PROTOCOL_VERSION,
    REHELLO_VERSION,
    Agent,
    AgentInfo,
    AgentList,
    AgentProtocol,
    Append,
    Appended,
    Compact,
    Context,
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
    ListAgents,
    ListSessions,
    MarkRead,
    Messages,
    Metadata,
    NewMessage,
    Part,
    Ping,
    Policy,
    Pong,
    Read,
    ReadMarked,
    Request,
    Response,
    Role,
    Routes,
    Sender,
    SessionInfo,
    SessionList,
    SetContextConfig,
    Tokenizer,
    Unsubscribe,
    Unsubscribed,
    UpdateAgent,
    Welcome,
)
from .subscription import Follower, InboxSubscription, Subscription

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

R = TypeVar("R", bound=msgspec.Struct)
T = TypeVar("T")
C = TypeVar("C")
P = ParamSpec("P")

Token = str | Callable[[], str | None] | None
"""A client token, or a function giving one for each new connection and for each refresh of
an open connection's token before it expires (a JWT minted again)."""

REFRESH_AHEAD_S = 60.0
"""A connection's token is refreshed this long before it expires (or with a quarter of its
life left, if that is shorter)."""
REFRESH_EXTENDS_S = 0.5
"""A refresh that moves the expiry by less than this did not get a new token: no more
refreshes on that connection (it is closed at the expiry, and the client connects again)."""

NON_RETRYABLE_REFUSALS = frozenset({"bad_request", "unauthorized", "forbidden"})
"""Handshake answers that no other node would answer differently: ``connect`` raises them."""


def parse_targets(targets: str | list[str]) -> list[Address]:
    """``"host:port"``, ``"h1:p1,h2:p2"`` or a list of ``"host:port"`` (``[v6]:port`` too)."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    out: list[Address] = []
    for item in items:
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"target {item!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError("no targets")
    return out


def _first_frame_is_ours(data: bytes) -> bool:
    """Whether a server's first bytes can start a Welcome or a goodbye ``Error``: a small frame
    whose body is a msgpack array (an HTTP server's ``HTTP/1.1 400`` is not)."""
    if len(data) < 5:
        return True  # too little to tell
    return int.from_bytes(data[:4]) <= FRAME_BYTES_MAX and (
        0x90 <= data[4] <= 0x9F or data[4] in (0xDC, 0xDD)
    )


def expect_response(response: Response, expect: type[R], asked: str) -> R:
    """``response`` if it is an ``expect``; raises ``ClientError`` for an ``Error`` (its code)
    or for any other answer to the request ``asked`` (``internal``).  What every call does with
    its answer; for callers of ``append_nowait`` too."""
    if type(response) is expect:
        return cast(R, response)
    if type(response) is Error:
        raise ClientError.from_error(response)
    raise ClientError("internal", f"{type(response).__name__} answered {asked}", False)


def new_client_msg_id() -> str:
    return uuid.uuid4().hex


def append_message(
    session_id: str,
    content: str,
    sender: Sender = "user",
    sender_id: str = "",
    kind: str = "text",
    metadata: Metadata | None = None,
    client_msg_id: str | None = None,
    expected_seq: int | None = None,
    token_count: int | None = None,
    role: Role | None = None,
    parts: list[Part] | None = None,
    if_version: int | None = None,
) -> Append:
    """The arguments of ``Client.append``, ``append_nowait`` and ``append_with_retry``: an
    ``Append`` whose ``rid`` the client sets as it sends it.  A structured message gives
    ``parts`` (AI SDK UI-message parts, wire/parts.py) and an empty ``content``."""
    return Append(
        0, session_id, sender, sender_id, kind, content, metadata or {}, client_msg_id,
        expected_seq, token_count, role, parts, if_version,
    )  # fmt: skip


def agent(
    agent_id: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    timeout_ms: int = 120_000,
    idle_timeout_ms: int = 30_000,
    debounce_ms: int = 500,
    history: str = "all",
    max_attempts: int = 5,
    status: str = "active",
    protocol: AgentProtocol = "auto",
) -> Agent:
    """An ``Agent`` with the defaults of docs/agents.md, validated as a server would."""
    fields = {"id": agent_id, "url": url, "headers": headers or {}, "timeout_ms": timeout_ms,
              "idle_timeout_ms": idle_timeout_ms, "debounce_ms": debounce_ms, "history": history,
              "max_attempts": max_attempts, "status": status, "protocol": protocol}  # fmt: skip
    return msgspec.convert(fields, Agent)


def _called_as(
    build: Callable[P, Append],
) -> Callable[[Callable[[C, Append], T]], Callable[Concatenate[C, P], T]]:
    """A method called with ``build``'s arguments, given the request ``build`` returns.

    The method is generated with ``build``'s parameters spelled out, the way ``dataclasses``
    writes ``__init__``: a ``*args, **kwargs`` wrapper would double the cost of the call, on the
    path of every pipelined append."""
    signature = inspect.signature(build)
    params = signature.parameters.values()
    names = ", ".join(p.name for p in params)
    spelled = ", ".join(p.name if p.default is p.empty else f"{p.name}=_d_{p.name}" for p in params)

    def decorate(method: Callable[[C, Append], T]) -> Callable[Concatenate[C, P], T]:
        scope: dict[str, Any] = {"_method": method, "_build": build}
        scope.update((f"_d_{p.name}", p.default) for p in params if p.default is not p.empty)
        exec(f"def called(self, {spelled}):\n    return _method(self, _build({names}))", scope)
        called: Any = functools.update_wrapper(scope["called"], method)
        called.__signature__ = signature.replace(
            parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *params],
            return_annotation=inspect.signature(method).return_annotation,
        )
        return cast(Callable[Concatenate[C, P], T], called)

    return decorate


class Client:
    """A connection to a ctxstore cluster (see ``connect``).  Safe to share between tasks."""

    def __init__(
        self,
        targets: list[Address],
        *,
        token: Token,
        client_name: str,
        timeout_s: float,
        connect_timeout_s: float,
        connect_attempts: int,
        backoff_min_s: float,
        backoff_max_s: float,
        max_frame_bytes: int,
        suspect_s: float = 5.0,
        append_attempts: int = 5,
    ) -> None:
        if timeout_s <= 0 or connect_timeout_s <= 0 or suspect_s <= 0:
            raise ValueError("timeouts must be positive")
        if connect_attempts < 1 or append_attempts < 1:
            raise ValueError("connect_attempts and append_attempts must be >= 1")
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ValueError("0 < backoff_min_s <= backoff_max_s")
        self.targets = targets
        self.token = token
        self.client_name = client_name
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.connect_attempts = connect_attempts
        self.append_attempts = append_attempts  # the sends of one append_with_retry
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.max_frame_bytes = max_frame_bytes
        self.suspect_s = suspect_s
        self.welcome: Welcome | None = None  # of the current connection
        self._conn: Connection | None = None
        self._connecting: asyncio.Task[Connection] | None = None
        # The current connection while the client moves away from it (``_conn`` is None then):
        # kept if no other target answers, retired once another does.
        self._leaving: Connection | None = None
        self._retired: set[Connection] = set()  # closed once their requests are answered
        self._suspects: dict[Address, float] = {}  # target -> loop time until which it is avoided
        self._next_target = 0
        self._rid = 0
        self._closed = False
        self._rng = random.Random()
        self._pushes_dropped = 0  # by connections retired
        self._refreshing: set[asyncio.Task[None]] = set()

    @property
    def target(self) -> Address | None:
        """The address of the current connection."""
        conn = self._conn
        return None if conn is None or conn.error is not None else conn.target

    @property
    def pushes_dropped(self) -> int:
        """Pushes that arrived for no subscription of this client (e.g. after unsubscribing)."""
        conn = self._conn
        return self._pushes_dropped + (0 if conn is None else conn.pushes_dropped)

    # operations ----------------------------------------------------------------------------------

    async def create_session(
        self,
        user_id: str,
        agent_id: str,
        metadata: Metadata | None = None,
        session_id: str | None = None,
    ) -> SessionInfo:
        request = CreateSession(self._next_rid(), user_id, agent_id, metadata or {}, session_id)
        return await self._call(request, SessionInfo)

    async def get_session(self, session_id: str) -> SessionInfo:
        return await self._call(GetSession(self._next_rid(), session_id), SessionInfo)

    async def list_sessions(
        self, user_id: str, cursor: str | None = None, limit: int = 100
    ) -> SessionList:
        request = ListSessions(self._next_rid(), user_id, cursor, limit)
        return await self._call(request, SessionList)

    # -- agents (docs/agents.md) ------------------------------------------------------------------
    async def create_agent(self, agent: Agent) -> AgentInfo:
        """Register an agent (``conflict`` if its id is taken); ``agent(...)`` builds one."""
        return await self._call(CreateAgent(self._next_rid(), agent), AgentInfo)

    async def update_agent(self, agent: Agent) -> AgentInfo:
        return await self._call(UpdateAgent(self._next_rid(), agent), AgentInfo)

    async def get_agent(self, agent_id: str) -> AgentInfo:
        return await self._call(GetAgent(self._next_rid(), agent_id), AgentInfo)

    async def list_agents(self, cursor: str | None = None, limit: int = 100) -> AgentList:
        return await self._call(ListAgents(self._next_rid(), cursor, limit), AgentList)

    async def disable_agent(self, agent_id: str) -> AgentInfo:
        return await self._call(DisableAgent(self._next_rid(), agent_id), AgentInfo)

    @_called_as(append_message)
    async def append(self, request: Append) -> Appended:
        """Append one message.  On a retryable error the outcome is unknown: send it again
        with the same ``client_msg_id`` (or use ``append_with_retry``)."""
        request.rid = self._next_rid()
        return await self._call(request, Appended)

    @_called_as(append_message)
    def append_nowait(self, request: Append) -> asyncio.Future[Response] | None:
        """``append`` for callers that pipeline without a coroutine per request (a load
        generator, a bridge): queues the append on the open connection and returns the future
        of its response, ``Appended`` or ``Error`` (a value here, not raised; a failed
        connection fails the future with ``ClientError``).  None, with nothing sent, when there
        is no open connection or its writes are paused by backpressure: ``await append(...)``
        connects and waits instead.  Raises ``ClientError`` for a request that cannot be sent
        (too large)."""
        conn = self._conn
        if conn is None or conn.error is not None or conn.writing_paused is not None:
            return None
        request.rid = self._next_rid()
        return conn.request(request)

    @_called_as(append_message)
    async def append_with_retry(self, request: Append) -> Appended:
        """``append`` with a ``client_msg_id`` (a fresh one unless given), sent again on
        retryable errors with jittered backoff, at most ``append_attempts`` times (a client
        setting).  A resend the server has already applied returns the original ``seq`` with
        ``deduped``."""
        if request.client_msg_id is None:
            request.client_msg_id = new_client_msg_id()
        backoff_s = self.backoff_min_s
        for attempt in range(self.append_attempts):
            request.rid = self._next_rid()
            try:
                return await self._call(request, Appended)
            except ClientError as e:
                if not e.retryable or attempt + 1 >= self.append_attempts or self._closed:
                    raise
                logger.debug("append %s: %s; retrying", request.client_msg_id, e)
            await asyncio.sleep(self._rng.uniform(backoff_s / 2, backoff_s))
            backoff_s = min(backoff_s * 2, self.backoff_max_s)
        raise AssertionError("unreachable")

    async def read(self, session_id: str, after_seq: int = 0, limit: int = 100) -> Messages:
        return await self._call(Read(self._next_rid(), session_id, after_seq, limit), Messages)

    async def mark_read(self, session_id: str, user_id: str, seq: int) -> ReadMarked:
        return await self._call(MarkRead(self._next_rid(), session_id, user_id, seq), ReadMarked)

    async def set_context_config(
        self,
        session_id: str,
        token_budget: int,
        policy: Policy,
        trigger_ratio: float = 0.7,
        tokenizer: Tokenizer | None = None,
    ) -> ContextChanged:
        """Configure the session's context window (``LastN``, ``SkipParts``, ``TokenBudget``
        or ``Manual`` from wire.protocol); the policy applies at once."""
        request = SetContextConfig(
            self._next_rid(), session_id, token_budget, trigger_ratio, policy, tokenizer
        )
        return await self._call(request, ContextChanged)

    async def get_context(self, session_id: str) -> Context:
        """The session's context window: its messages as the policy shapes them, its token
        count, version, segments and whether it needs a compaction."""
        return await self._call(GetContext(self._next_rid(), session_id), Context)

    async def compact(
        self,
        session_id: str,
        from_seq: int,
        to_seq: int,
        replacement: list[NewMessage],
        if_version: int | None = None,
    ) -> ContextChanged:
        """Replace the window's messages ``from_seq..to_seq`` (whole segments) with
        ``replacement``; ``if_version``: only while the window is at that version
        (``ClientError`` ``conflict`` with ``details["version"]`` otherwise)."""
        request = Compact(self._next_rid(), session_id, from_seq, to_seq, replacement, if_version)
        return await self._call(request, ContextChanged)

    async def ping(self) -> Pong:
        return await self._call(Ping(self._next_rid()), Pong)

    async def get_routes(self) -> Routes:
        """Which node leads each group, the nodes holding each group (``replicas``; empty
        from an older server), and the client addresses of the nodes known."""
        return await self._call(GetRoutes(self._next_rid()), Routes)

    def subscribe(
        self,
        session_id: str,
        after_seq: int = 0,
        *,
        queue_max: int = 10_000,
        context_events: bool = False,
        stream_chunks: bool = False,
    ) -> Subscription:
        """Follow a session: an async iterator of every ``Message`` with ``seq > after_seq``
        (and ``GapEvent`` for those that will not come), in order, then the live ones; it
        resumes by itself after a failure.  ``await client.subscribe(...)``, ``async with
        client.subscribe(...) as sub`` or the first ``async for`` step sends the Subscribe and
        waits for ``Subscribed``; they raise ``ClientError`` if it fails (``not_found``: no such
        session).  ``context_events``: also yield a ``ContextEvent`` whenever the session's
        context window is compacted, trimmed or configured, or goes over its budget.
        ``stream_chunks``: also yield each ``ChunkEvent`` of the session's agent, live (not
        replayed on a resume)."""
        return Subscription(self, session_id, after_seq, queue_max, context_events, stream_chunks)

    def subscribe_inbox(self, user_id: str, *, queue_max: int = 10_000) -> InboxSubscription:
        """Follow a user's inbox: an async iterator of an ``InboxSnapshot``, then
        ``InboxDelta``s (a fresh snapshot after each resume).  Started like ``subscribe``."""
        return InboxSubscription(self, user_id, queue_max)

    async def unsubscribe(self, sub_id: int) -> Unsubscribed:
        """End the subscription ``sub_id`` of the current connection (its iterator, if any,
        ends); pushes still on their way are dropped."""
        conn = self._conn
        if conn is not None:
            sink = conn.unregister(sub_id)
            if isinstance(sink, Follower):
                sink.unsubscribed()
        return await self._call(Unsubscribe(self._next_rid(), sub_id), Unsubscribed)

    async def close(self) -> None:
        """Close the connection; calls in flight fail with ``unavailable`` (not retryable)."""
        self._closed = True
        connecting = self._connecting
        if connecting is not None:
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
        for conn in [self._conn, self._leaving, *self._retired]:
            if conn is not None:
                conn.fail("the client is closed", retryable=False)
        self._conn = self._leaving = None
        self._retired.clear()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # the call path -------------------------------------------------------------------------------

    def _next_rid(self) -> int:
        self._rid += 1
        return self._rid

    async def _call(self, request: Request, expect: type[R], sink: PushSink | None = None) -> R:
        conn = self._conn
        if conn is None or conn.error is not None:
            conn = await self._connection()
        if conn.writing_paused is not None:
            await conn.wait_writable()
        response = await conn.request(request, sink)
        return expect_response(response, expect, type(request).__name__)

    async def _connection(self) -> Connection:
        """The current connection, or a new one (one attempt at a time, shared by callers)."""
        if self._closed:
            raise ClientError("unavailable", "the client is closed", False)
        conn = self._conn
        if conn is not None and conn.error is None:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._reconnect())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, task: asyncio.Task[Connection]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:
            conn = task.result()
            olds = (self._conn, self._leaving)
            self._conn, self._leaving = conn, None
            for old in olds:
                if old is not None and old is not conn:
                    self._pushes_dropped += old.pushes_dropped
                    if old.error is None:
                        self._retire(old)

    async def _reconnect(self) -> Connection:
        """Try the targets round robin, those not suspect first, backing off after each failed
        round; the connection being left when no other target answers first."""
        n = len(self.targets)
        backoff_s = self.backoff_min_s
        last: ClientError | None = None
        for attempt in range(self.connect_attempts):
            target, suspect = self._pick_target()
            leaving = self._leaving
            if (
                leaving is not None
                and leaving.error is None
                and (suspect or leaving.target == target)
            ):
                return leaving  # every target is suspect: stay on the one that is open
            try:
                return await self._open(target)
            except ClientError as e:
                if not e.retryable:
                    raise
                last = e
                self._suspect(target)
                logger.debug("connecting to %s:%d failed: %s", *target, e)
            if (attempt + 1) % n == 0 and attempt + 1 < self.connect_attempts:
                await asyncio.sleep(self._rng.uniform(backoff_s / 2, backoff_s))
                backoff_s = min(backoff_s * 2, self.backoff_max_s)
        assert last is not None
        raise ClientError(
            "unavailable",
            f"no target answered in {self.connect_attempts} attempts; last: {last.message}",
            True,
        )

    # -- which node -------------------------------------------------------------------------------

    def _trouble(self, conn: Connection) -> None:
        """``conn``'s node answered ``MOVE_ON_ERRORS``, let a request time out or failed:
        avoid it for a while; if it is the current connection and another target is not
        suspect, the next call moves there (``_reconnect``; the requests in flight here keep
        their chance of an answer)."""
        self._suspect(conn.target)
        if conn is self._conn and conn.error is None and self._alternative(conn.target):
            logger.debug("moving away from %s:%d", *conn.target)
            self._conn, self._leaving = None, conn

    def _suspect(self, target: Address) -> None:
        now = asyncio.get_running_loop().time()
        self._suspects[target] = now + self._rng.uniform(self.suspect_s / 2, self.suspect_s)

    def _alternative(self, target: Address) -> bool:
        """Whether a target other than ``target`` is not suspect."""
        now = asyncio.get_running_loop().time()
        suspects = self._suspects
        return any(t != target and suspects.get(t, 0.0) <= now for t in self.targets)

    def _pick_target(self) -> tuple[Address, bool]:
        """The next target round robin that is not suspect (and False); if all are, the one
        whose suspicion ends first (so a round of failures still goes round), and True."""
        targets, suspects = self.targets, self._suspects
        now = asyncio.get_running_loop().time()
        n = len(targets)
        best = self._next_target % n
        for i in range(n):
            k = (self._next_target + i) % n
            until = suspects.get(targets[k], 0.0)
            if until <= now:
                self._next_target = k + 1
                return targets[k], False
            if until < suspects.get(targets[best], 0.0):
                best = k
        self._next_target = best + 1
        return targets[best], True

    def _retire(self, conn: Connection) -> None:
        """Leave ``conn`` for good: its subscriptions resume on the new connection now; it
        closes once the requests in flight on it are answered (each has its deadline, so at
        the latest after ``timeout_s``).  Nothing new is sent on it."""
        why = "the client moved to another node"
        conn.retire(why)
        futures = list(conn.pending.values())  # with the Unsubscribes ``retire`` sent
        left = len(futures)
        if not left:
            conn.fail(why, suspect=False)
            return
        self._retired.add(conn)

        def done(_: object) -> None:
            nonlocal left
            left -= 1
            if not left:
                self._retired.discard(conn)
                conn.fail(why, suspect=False)

        for future in futures:
            future.add_done_callback(done)

    async def _open(self, target: Address) -> Connection:
        """Connect to ``target`` and complete the handshake."""
        loop = asyncio.get_running_loop()
        conn = Connection(
            target, self.max_frame_bytes, self.connect_timeout_s, self._next_rid, self._trouble
        )
        host, port = target
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: conn, host, port), self.connect_timeout_s
            )
        except (OSError, TimeoutError) as e:
            raise ClientError("unavailable", f"{host}:{port}: {e or type(e).__name__}") from None
        token = self.token() if callable(self.token) else self.token
        hello = Hello(self._next_rid(), PROTOCOL_VERSION, self.client_name, token)
        try:
            answer = await conn.request(hello)
        except ClientError as e:
            conn.fail(f"handshake failed: {e.message}")
            goodbye = conn.goodbye
            if goodbye is not None and not _first_frame_is_ours(conn.first_bytes):
                raise ClientError(
                    "unavailable",
                    f"{host}:{port} does not speak the ctxstore protocol "
                    f"(it answered {conn.first_bytes[:16]!r})",
                ) from None
            if goodbye is not None and goodbye.code in NON_RETRYABLE_REFUSALS:
                raise ClientError(goodbye.code, goodbye.message, False) from None
            raise
        except BaseException:
            conn.fail("handshake cancelled")
            raise
        if type(answer) is not Welcome:
            conn.fail("handshake refused", retryable=False)
            if type(answer) is Error:
                raise ClientError.from_error(answer)
            raise ClientError("internal", f"{type(answer).__name__} answered Hello", False)
        conn.timeout_s = self.timeout_s
        self.welcome = answer
        self._refresh_later(conn, answer)
        return conn

    # the token's refresh -------------------------------------------------------------------------

    def _refresh_later(self, conn: Connection, welcome: Welcome) -> None:
        """With a token function, send ``conn`` a new token in a second Hello before the one
        ``welcome`` answered expires (protocol version 4; docs/auth.md): the node then keeps
        the connection, and its subscriptions, open past the first token's expiry."""
        left_ms = welcome.expires_in_ms
        if left_ms is None or not callable(self.token) or conn.error is not None:
            return
        if welcome.protocol_version < REHELLO_VERSION:
            return
        left_s = left_ms / 1000
        loop = asyncio.get_running_loop()
        expires = loop.time() + left_s
        delay_s = left_s - min(REFRESH_AHEAD_S, left_s / 4)
        conn.refresh = loop.call_later(delay_s, self._refresh, conn, expires)

    def _refresh(self, conn: Connection, expires: float) -> None:
        conn.refresh = None
        task = asyncio.ensure_future(self._refresh_now(conn, expires))
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def _refresh_now(self, conn: Connection, expires: float) -> None:
        loop = asyncio.get_running_loop()
        token = self.token
        assert callable(token)
        host, port = conn.target
        try:
            hello = Hello(self._next_rid(), PROTOCOL_VERSION, self.client_name, token())
            answer: Response | None = await conn.request(hello)
        except ClientError:
            return  # the connection is gone: the next call connects again, with a new token
        except Exception:
            logger.exception("the token function failed")
            answer = None
        if type(answer) is Welcome:
            if conn is self._conn:
                self.welcome = answer
            new_s = answer.expires_in_ms
            if new_s is None or loop.time() + new_s / 1000 > expires + REFRESH_EXTENDS_S:
                self._refresh_later(conn, answer)
            else:
                logger.warning(
                    "%s:%s: the token function gave a token that expires no later: the node "
                    "will close the connection when it expires",
                    host, port,
                )  # fmt: skip
            return
        left_s = expires - loop.time()
        why = f"{answer.code}: {answer.message}" if type(answer) is Error else "no token"
        logger.warning("%s:%s: refreshing the token failed (%s)", host, port, why)
        if left_s > 1.0 and conn.error is None:  # try again with half the time left
            conn.refresh = loop.call_later(left_s / 2, self._refresh, conn, expires)


async def connect(
    targets: str | list[str],
    token: Token = None,
    client_name: str = "ctxstore-python",
    timeout_s: float = 10.0,
    *,
    connect_timeout_s: float = 5.0,
    connect_attempts: int | None = None,
    backoff_min_s: float = 0.05,
    backoff_max_s: float = 2.0,
    max_frame_bytes: int = FRAME_BYTES_MAX,
    suspect_s: float = 5.0,
    append_attempts: int = 5,
) -> Client:
    """A client connected to the first target that answers (tried in the given order).

    ``timeout_s`` bounds each request; ``connect_timeout_s`` each connection and handshake;
    ``connect_attempts`` (default: twice the targets, at least 3) the tries of one call;
    ``suspect_s`` how long (jittered, ``suspect_s`` / 2 .. ``suspect_s``) a node that answered
    ``unavailable`` or ``timeout``, or failed, is avoided; ``append_attempts`` the sends of one
    ``append_with_retry``.  ``token``: the client token, or a function called for each
    connection's Hello and again before that connection's token expires (a second Hello on
    it: the connection and its subscriptions go on; ``REFRESH_AHEAD_S``), so a client keeps
    going past its tokens' expiries; one whose connection was closed at an expiry all the same
    connects again with a fresh token, its subscriptions resuming."""
    addresses = parse_targets(targets)
    client = Client(
        addresses,
        token=token,
        client_name=client_name,
        timeout_s=timeout_s,
        connect_timeout_s=connect_timeout_s,
        connect_attempts=connect_attempts or max(3, 2 * len(addresses)),
        backoff_min_s=backoff_min_s,
        backoff_max_s=backoff_max_s,
        max_frame_bytes=max_frame_bytes,
        suspect_s=suspect_s,
        append_attempts=append_attempts,
    )
    await client._connection()
    return client


__all__ = [
    "MOVE_ON_CLOSINGS",
    "MOVE_ON_ERRORS",
    "NON_RETRYABLE_REFUSALS",
    "Client",
    "ClientError",
    "InboxSubscription",
    "PushSink",
    "Subscription",
    "append_message",
    "connect",
    "expect_response",
    "new_client_msg_id",
    "parse_targets",
]
