"""The Python client of the native binary protocol (design §4.1; docs/protocol.md).

    client = await connect(["10.0.0.1:7400", "10.0.0.2:7400"], token="...")
    session = (await client.create_session("u1", "agent-1")).session
    ack = await client.append_with_retry(session.id, "hello")
    await client.close()

Rules of this module:
- One TCP connection at a time, shared by every call: each request gets a fresh ``rid`` and a
  future; responses complete them in whatever order they arrive.  Requests made during one loop
  iteration leave in one ``transport.write``; while the socket's write buffer is above its
  high-water mark, new requests wait.
- Every failure raises ``ClientError`` with a stable code.  The first error of a connection is
  sticky: every request in flight on it fails with a retryable ``unavailable``, the connection
  is retired, and the next call connects to the next target (round robin; after a whole round
  fails, a jittered exponential backoff), at most ``connect_attempts`` tries per call.
- Failover on answers, not only on broken connections: a node that answers ``unavailable`` or
  ``timeout`` (``MOVE_ON_ERRORS``; e.g. "group 7 has no leader" from a node cut off from its
  peers), lets a request time out, closes a subscription as ``unavailable``/``shutdown``, or
  whose connection fails, is **suspect** for a jittered ``suspect_s`` / 2 .. ``suspect_s``
  (5 s).  If another target is not suspect, the next call connects there (the caller still
  gets the error: retrying is its decision; ``append_with_retry`` and subscriptions do it), the
  requests in flight on the node left keep their answers, its subscriptions resume on the new
  connection, and it closes once they are answered.  Reconnecting tries targets that are not
  suspect first; when all are, it stays on the open connection, if any, or tries the one whose
  suspicion ends first.  The happy path of a request (``append_nowait`` included) pays one
  type check of its answer.
- A request unanswered after ``timeout_s`` fails with ``timeout`` (retryable; its outcome is
  unknown).  An append is safe to retry with the same ``client_msg_id``: ``append_with_retry``
  picks one and retries retryable errors, a bounded number of times.
- A server's goodbye (``Error{rid: 0}``, e.g. ``unavailable`` "node shutting down") fails the
  requests in flight with a retryable ``unavailable`` naming it (``_Connection.goodbye`` keeps
  it, with its ``retryable``).
- Subscriptions (``subscribe``, ``subscribe_inbox``) share the connection.  Pushes are routed
  by ``sub_id`` to the subscription registered when its ``Subscribed`` (``InboxSnapshot``)
  arrived; pushes of unknown subscriptions (e.g. after an unsubscribe) are dropped and counted
  (``pushes_dropped``).  Each subscription queues at most ``queue_max`` items (a push may
  overshoot by its own size); while any queue is full the connection stops reading, which
  holds back the server (its ``writable`` turns false) and **also delays the responses of other
  calls on this connection**, until the queue drains below half.
- A subscription resumes by itself: when its connection fails, the client moves to another
  node, or the server closes it (``slow_consumer``, ``shutdown``, ``unavailable``), it drops
  what it had queued and not yet yielded and subscribes again from the last seq it yielded,
  through the usual reconnect (next target, backoff, bounded attempts).  It checks the order
  of what it yields and raises ``internal`` on a seq that is not the next one: duplicates are
  a server bug, not filtered.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import random
import socket
import uuid
from collections import deque
from collections.abc import Callable, Generator
from typing import Any, Generic, Protocol, Self, TypeVar, cast

import msgspec

from .errors import ClientError, LocalProtocolError
from .flow import set_reading
from .framing import ClientConnection, ProtocolError, PushReceived, ResponseReceived
from .protocol import (
    FRAME_BYTES_MAX,
    PROTOCOL_VERSION,
    Append,
    Appended,
    CreateSession,
    Error,
    GapEvent,
    GetRoutes,
    GetSession,
    Hello,
    InboxDelta,
    InboxSnapshot,
    ListSessions,
    MarkRead,
    Message,
    MessageEvent,
    Messages,
    Metadata,
    Ping,
    Pong,
    Push,
    Read,
    ReadMarked,
    Request,
    Response,
    Routes,
    Sender,
    SessionInfo,
    SessionList,
    Subscribe,
    Subscribed,
    SubscribeInbox,
    SubscriptionClosed,
    Unsubscribe,
    Unsubscribed,
    Welcome,
)

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

R = TypeVar("R", bound=msgspec.Struct)
T = TypeVar("T")
Address = tuple[str, int]

NON_RETRYABLE_REFUSALS = frozenset({"bad_request", "unauthorized", "forbidden"})
"""Handshake answers that no other node would answer differently: ``connect`` raises them."""

MOVE_ON_ERRORS = frozenset({"unavailable", "timeout"})
"""Error answers that say more about the node than about the request (no leader reachable from
there, no quorum, shutting down, overloaded; no answer from the leader in time): the node is
suspected and the next call goes to another target.  Retrying there is safe: a read changes
nothing, an append is retried with its ``client_msg_id``."""
MOVE_ON_CLOSINGS = frozenset({"unavailable", "shutdown"})
"""``SubscriptionClosed`` reasons that suspect the node the same way."""


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


class PushSink(Protocol):
    """What a connection routes one subscription's pushes to (``_Connection.sinks``)."""

    def subscribed(self, conn: _Connection, response: Subscribed | InboxSnapshot) -> None:
        """Registered under ``response.sub_id``; called before any push of it is delivered."""

    def deliver(self, push: Push) -> None:
        """One push of this subscription (after a ``SubscriptionClosed``: unregistered)."""

    def connection_lost(self, error: ClientError) -> None:
        """The connection failed (the sink is unregistered)."""


class _Connection(asyncio.Protocol):
    """One TCP connection of a ``Client``: the sans-IO core, the futures of its requests and
    the sinks of its subscriptions."""

    def __init__(
        self,
        target: Address,
        max_frame_bytes: int,
        timeout_s: float,
        next_rid: Callable[[], int],
        on_trouble: Callable[[_Connection], None] | None = None,
    ) -> None:
        self.target = target
        self.core = ClientConnection(max_frame_bytes)
        self.error: ClientError | None = None  # sticky: set once, the connection is retired
        self.goodbye: ProtocolError | None = None  # what broke it, when the protocol did
        self.first_bytes = b""  # the server's first bytes: a stranger's tell it is not ctxstore
        self.pending: dict[int, asyncio.Future[Response]] = {}
        self.sinks: dict[int, PushSink] = {}  # sub_id -> where its pushes go
        self.pushes_dropped = 0  # pushes of no registered subscription
        self._next_rid = next_rid
        self._on_trouble = on_trouble  # told of MOVE_ON_* answers, timeouts and failures
        self._subscribing: dict[int, PushSink] = {}  # rid -> sink, of subscribes in flight
        self._holders: set[object] = set()  # sinks whose queue is full: events wait unread
        self._reading_paused = False
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._deadlines: deque[tuple[float, int]] = deque()  # (deadline, rid), in send order
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self._writable: asyncio.Future[None] | None = None  # set while writing is paused

    # requests ------------------------------------------------------------------------------------

    def request(self, request: Request, sink: PushSink | None = None) -> asyncio.Future[Response]:
        """Queue ``request``; its future completes with the response (an ``Error`` included).
        ``sink``: for a subscribe, registered (``sink.subscribed``) as its answer arrives."""
        if self.error is not None:
            raise self.error
        try:
            self.core.send(request)
        except LocalProtocolError as e:
            raise ClientError(e.code, e.message, False) from None
        rid = request.rid
        future: asyncio.Future[Response] = self._loop.create_future()
        pending = self.pending
        pending[rid] = future
        if sink is not None:
            self._subscribing[rid] = sink
        deadlines = self._deadlines
        while deadlines and deadlines[0][1] not in pending:
            deadlines.popleft()  # answered already: keep the queue near the number in flight
        deadline = self._loop.time() + self._timeout_s
        deadlines.append((deadline, rid))
        if self._timer is None or deadline < self._timer_at:  # earlier: the timeout changed
            self._arm(deadline)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def unsubscribe_quietly(self, sub_id: int) -> None:
        """Send ``Unsubscribe`` and forget it (its answer, or failure, is dropped)."""
        if self.error is not None:
            return
        try:
            future = self.request(Unsubscribe(self._next_rid(), sub_id))
        except ClientError:
            return
        future.add_done_callback(_drop_outcome)

    def unregister(self, sub_id: int) -> PushSink | None:
        """Stop routing ``sub_id``'s pushes (later ones are dropped and counted)."""
        sink = self.sinks.pop(sub_id, None)
        if sink is not None:
            self.release(sink)
        return sink

    def hold(self, sink: object) -> None:
        """``sink``'s queue is full: stop reading until every holder has released."""
        if self.error is None:
            self._holders.add(sink)
            self._set_reading(False)

    def release(self, sink: object) -> None:
        if sink not in self._holders:
            return
        self._holders.discard(sink)
        if not self._holders and self.error is None:
            self._set_reading(True)
            self._loop.call_soon(self._process)  # the events that waited in the core

    def _set_reading(self, reading: bool) -> None:
        self._reading_paused = set_reading(self._transport, self._reading_paused, reading)

    async def wait_writable(self) -> None:
        while self._writable is not None and self.error is None:
            await asyncio.shield(self._writable)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self.core.data_to_send()
        if data and self._transport is not None and self.error is None:
            self._transport.write(data)

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(deadline, self._expire)
        self._timer_at = deadline

    def _expire(self) -> None:
        """Fail the requests whose deadline passed (the queue is in send order; deadlines
        grow with it while the timeout stays the same)."""
        self._timer = None
        now = self._loop.time()
        deadlines = self._deadlines
        pending = self.pending
        expired = False
        while deadlines and deadlines[0][0] <= now:
            _, rid = deadlines.popleft()
            self._subscribing.pop(rid, None)
            future = pending.pop(rid, None)
            if future is not None and not future.done():
                expired = True
                future.set_exception(
                    ClientError("timeout", f"no answer within {self._timeout_s} s", True)
                )
        if deadlines:
            self._arm(max(deadlines[0][0], now))
        if expired and self._on_trouble is not None:
            self._on_trouble(self)

    # asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.first_bytes:
            self.first_bytes = bytes(data[:32])
        self.core.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        self.core.receive_data(None)
        self._process(force=True)  # nothing more comes: hand out what is left, then fail
        return False

    def _process(self, force: bool = False) -> None:
        """Turn the bytes received into answers and pushes; stops while a sink holds."""
        core = self.core
        while force or not self._holders:
            if self.error is not None:
                return
            event = core.next_event()
            if event is None:
                return
            if type(event) is ResponseReceived:
                self._on_response(event.response)
            elif type(event) is PushReceived:
                self._on_push(event.push)
            elif type(event) is ProtocolError:
                self.goodbye = event
                self.fail(f"{event.code}: {event.message}")
            else:
                self.fail("closed by the server")

    def _on_response(self, response: Response) -> None:
        if type(response) is Error:
            self._on_error(response)
        rid = response.rid
        future = self.pending.pop(rid, None)
        sink = self._subscribing.pop(rid, None) if self._subscribing else None
        if type(response) is Subscribed or type(response) is InboxSnapshot:
            if sink is not None and future is not None and not future.done():
                self.sinks[response.sub_id] = sink
                sink.subscribed(self, response)
            else:  # nobody waits for it any more (timed out, cancelled): end it
                self.unsubscribe_quietly(response.sub_id)
        if future is not None and not future.done():
            future.set_result(response)

    def _on_error(self, error: Error) -> None:
        """Tell the client of an answer that suspects the node, before the caller sees it (and
        retries)."""
        if error.code in MOVE_ON_ERRORS and self._on_trouble is not None:
            self._on_trouble(self)

    def _on_push(self, push: Push) -> None:
        sinks = self.sinks
        sink = sinks.get(push.sub_id)
        if sink is None:
            self.pushes_dropped += 1
            return
        if type(push) is SubscriptionClosed:
            del sinks[push.sub_id]
            self.release(sink)
            if push.reason in MOVE_ON_CLOSINGS and self._on_trouble is not None:
                self._on_trouble(self)  # before the sink resumes
        sink.deliver(push)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail("connection lost" if exc is None else f"connection lost: {exc}")

    # the sticky error ----------------------------------------------------------------------------

    def fail(self, reason: str, retryable: bool = True, suspect: bool = True) -> None:
        """Close the connection for good: every request in flight fails with ``unavailable``.
        ``suspect``: a failure of the node's (the client avoids it for a while), not a close
        of the client's own."""
        if self.error is None:
            host, port = self.target
            self.error = ClientError("unavailable", f"{host}:{port}: {reason}", retryable)
            if retryable and suspect and self._on_trouble is not None:
                self._on_trouble(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(self.error)
        self._subscribing.clear()
        self._holders.clear()
        sinks, self.sinks = self.sinks, {}
        for sink in sinks.values():
            try:
                sink.connection_lost(self.error)
            except Exception:
                logger.exception("a subscription failed to handle the lost connection")
        self.resume_writing()
        if self._transport is not None:
            self._transport.close()

    def retire(self, reason: str) -> None:
        """The client moved to another connection: the subscriptions here end now (each is
        told its connection was lost, so it resumes on the client's current connection); the
        requests in flight keep their chance of an answer until ``fail``."""
        host, port = self.target
        lost = ClientError("unavailable", f"{host}:{port}: {reason}", True)
        sinks, self.sinks = self.sinks, {}
        for sub_id, sink in sinks.items():
            self.unsubscribe_quietly(sub_id)
            try:
                sink.connection_lost(lost)
            except Exception:
                logger.exception("a subscription failed to handle the move")


def _drop_outcome(future: asyncio.Future[Response]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so never reported


class Client:
    """A connection to a ctxstore cluster (see ``connect``).  Safe to share between tasks."""

    def __init__(
        self,
        targets: list[Address],
        *,
        token: str | None,
        client_name: str,
        timeout_s: float,
        connect_timeout_s: float,
        connect_attempts: int,
        backoff_min_s: float,
        backoff_max_s: float,
        max_frame_bytes: int,
        suspect_s: float = 5.0,
    ) -> None:
        if timeout_s <= 0 or connect_timeout_s <= 0 or suspect_s <= 0 or connect_attempts < 1:
            raise ValueError("timeouts must be positive and connect_attempts >= 1")
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ValueError("0 < backoff_min_s <= backoff_max_s")
        self.targets = targets
        self.token = token
        self.client_name = client_name
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.connect_attempts = connect_attempts
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.max_frame_bytes = max_frame_bytes
        self.suspect_s = suspect_s
        self.welcome: Welcome | None = None  # of the current connection
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        # The current connection while the client moves away from it (``_conn`` is None then):
        # kept if no other target answers, retired once another does.
        self._leaving: _Connection | None = None
        self._retired: set[_Connection] = set()  # closed once their requests are answered
        self._suspects: dict[Address, float] = {}  # target -> loop time until which it is avoided
        self._next_target = 0
        self._rid = 0
        self._closed = False
        self._rng = random.Random()
        self._pushes_dropped = 0  # by connections retired

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

    async def append(
        self,
        session_id: str,
        content: str,
        sender: Sender = "user",
        sender_id: str = "",
        kind: str = "text",
        metadata: Metadata | None = None,
        client_msg_id: str | None = None,
        expected_seq: int | None = None,
        token_count: int | None = None,
    ) -> Appended:
        """Append one message.  On a retryable error the outcome is unknown: send it again
        with the same ``client_msg_id`` (or use ``append_with_retry``)."""
        request = self._append_request(
            session_id, content, sender, sender_id, kind, metadata, client_msg_id, expected_seq,
            token_count,
        )  # fmt: skip
        return await self._call(request, Appended)

    def append_nowait(
        self,
        session_id: str,
        content: str,
        sender: Sender = "user",
        sender_id: str = "",
        kind: str = "text",
        metadata: Metadata | None = None,
        client_msg_id: str | None = None,
        expected_seq: int | None = None,
        token_count: int | None = None,
    ) -> asyncio.Future[Response] | None:
        """``append`` for callers that pipeline without a coroutine per request (a load
        generator, a bridge): queues the append on the open connection and returns the future
        of its response, ``Appended`` or ``Error`` (a value here, not raised; a failed
        connection fails the future with ``ClientError``).  None, with nothing sent, when there
        is no open connection or its writes are paused by backpressure: ``await append(...)``
        connects and waits instead.  Raises ``ClientError`` for a request that cannot be sent
        (too large)."""
        conn = self._conn
        if conn is None or conn.error is not None or conn._writable is not None:
            return None
        request = self._append_request(
            session_id, content, sender, sender_id, kind, metadata, client_msg_id, expected_seq,
            token_count,
        )  # fmt: skip
        return conn.request(request)

    async def append_with_retry(
        self,
        session_id: str,
        content: str,
        sender: Sender = "user",
        sender_id: str = "",
        kind: str = "text",
        metadata: Metadata | None = None,
        client_msg_id: str | None = None,
        expected_seq: int | None = None,
        token_count: int | None = None,
        *,
        attempts: int = 5,
    ) -> Appended:
        """``append`` with a ``client_msg_id`` (a fresh one unless given), sent again on
        retryable errors with jittered backoff, at most ``attempts`` times.  A resend the server
        has already applied returns the original ``seq`` with ``deduped``."""
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        msg_id = client_msg_id or new_client_msg_id()
        backoff_s = self.backoff_min_s
        for attempt in range(attempts):
            try:
                return await self.append(
                    session_id,
                    content,
                    sender,
                    sender_id,
                    kind,
                    metadata,
                    msg_id,
                    expected_seq,
                    token_count,
                )
            except ClientError as e:
                if not e.retryable or attempt + 1 >= attempts or self._closed:
                    raise
                logger.debug("append %s: %s; retrying", msg_id, e)
            await asyncio.sleep(self._rng.uniform(backoff_s / 2, backoff_s))
            backoff_s = min(backoff_s * 2, self.backoff_max_s)
        raise AssertionError("unreachable")

    async def read(self, session_id: str, after_seq: int = 0, limit: int = 100) -> Messages:
        return await self._call(Read(self._next_rid(), session_id, after_seq, limit), Messages)

    async def mark_read(self, session_id: str, user_id: str, seq: int) -> ReadMarked:
        return await self._call(MarkRead(self._next_rid(), session_id, user_id, seq), ReadMarked)

    async def ping(self) -> Pong:
        return await self._call(Ping(self._next_rid()), Pong)

    async def get_routes(self) -> Routes:
        """Which node leads each group, and the client addresses of the nodes known."""
        return await self._call(GetRoutes(self._next_rid()), Routes)

    def subscribe(
        self, session_id: str, after_seq: int = 0, *, queue_max: int = 10_000
    ) -> Subscription:
        """Follow a session: an async iterator of every ``Message`` with ``seq > after_seq``
        (and ``GapEvent`` for those that will not come), in order, then the live ones; it
        resumes by itself after a failure.  ``await client.subscribe(...)``, ``async with
        client.subscribe(...) as sub`` or the first ``async for`` step sends the Subscribe and
        waits for ``Subscribed``; they raise ``ClientError`` if it fails (``not_found``: no such
        session)."""
        return Subscription(self, session_id, after_seq, queue_max)

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
            if isinstance(sink, _Follower):
                sink._end()
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

    def _append_request(
        self,
        session_id: str,
        content: str,
        sender: Sender,
        sender_id: str,
        kind: str,
        metadata: Metadata | None,
        client_msg_id: str | None,
        expected_seq: int | None,
        token_count: int | None,
    ) -> Append:
        return Append(
            self._next_rid(), session_id, sender, sender_id, kind, content, metadata or {},
            client_msg_id, expected_seq, token_count,
        )  # fmt: skip

    def _next_rid(self) -> int:
        self._rid += 1
        return self._rid

    async def _call(self, request: Request, expect: type[R], sink: PushSink | None = None) -> R:
        conn = self._conn
        if conn is None or conn.error is not None:
            conn = await self._connection()
        if conn._writable is not None:
            await conn.wait_writable()
        response = await conn.request(request, sink)
        return expect_response(response, expect, type(request).__name__)

    async def _connection(self) -> _Connection:
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

    def _connected(self, task: asyncio.Task[_Connection]) -> None:
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

    async def _reconnect(self) -> _Connection:
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

    def _trouble(self, conn: _Connection) -> None:
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

    def _retire(self, conn: _Connection) -> None:
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

    async def _open(self, target: Address) -> _Connection:
        """Connect to ``target`` and complete the handshake."""
        loop = asyncio.get_running_loop()
        conn = _Connection(
            target, self.max_frame_bytes, self.connect_timeout_s, self._next_rid, self._trouble
        )
        host, port = target
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: conn, host, port), self.connect_timeout_s
            )
        except (OSError, TimeoutError) as e:
            raise ClientError("unavailable", f"{host}:{port}: {e or type(e).__name__}") from None
        hello = Hello(self._next_rid(), PROTOCOL_VERSION, self.client_name, self.token)
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
        conn._timeout_s = self.timeout_s
        self.welcome = answer
        return conn


# -- subscriptions ---------------------------------------------------------------------------------


class _Follower(abc.ABC, Generic[T]):
    """A subscription that resumes by itself: the queue between the connection and the
    iterator, the hold on the connection while the queue is full, and the resume loop.

    States: subscribed (``_conn`` set) -> lost (``_lost``: the connection failed or the server
    closed it; the next ``__anext__`` subscribes again) -> subscribed ...; ended by ``close``
    (``_closed``) or by an error the iterator raises (``_error``, sticky)."""

    def __init__(self, client: Client, queue_max: int) -> None:
        if queue_max < 1:
            raise ValueError("queue_max must be >= 1")
        self.client = client
        self.queue_max = queue_max
        self.sub_id: int | None = None  # of the current server-side subscription
        self.resumes = 0  # successful re-subscriptions
        self._conn: _Connection | None = None
        self._queue: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._holding = False
        self._lost: ClientError | None = None
        self._error: ClientError | None = None
        self._closed = False
        self._begun = False  # the first Subscribe was sent
        self._fruitless = 0  # resumes since an item was yielded (or a subscription held)
        self._started_at = 0.0

    # what the subclasses say --------------------------------------------------------------------

    @abc.abstractmethod
    def _request(self, rid: int) -> Request:
        """The request that starts (or resumes) the subscription."""

    @abc.abstractmethod
    def _expect(self) -> type[Subscribed] | type[InboxSnapshot]:
        """The type of its answer."""

    @abc.abstractmethod
    def _accept(self, push: Push) -> None:
        """Queue the items of ``push`` (not a ``SubscriptionClosed``)."""

    def _check(self, item: T) -> None:
        """Called as ``item`` is yielded; raises ``ClientError`` if it is out of order."""

    # PushSink ------------------------------------------------------------------------------------

    def subscribed(self, conn: _Connection, response: Subscribed | InboxSnapshot) -> None:
        if self._closed or self._error is not None:  # ended while the subscribe was in flight
            conn.unregister(response.sub_id)
            conn.unsubscribe_quietly(response.sub_id)
            return
        self._conn = conn
        self.sub_id = response.sub_id
        self._lost = None
        self._started_at = conn._loop.time()

    def deliver(self, push: Push) -> None:
        if type(push) is SubscriptionClosed:
            if push.reason == "not_found":
                self._detach()  # the server has ended it: no Unsubscribe
                self._fail(ClientError("not_found", push.message, False))
            else:
                reason = f"closed by the server: {push.reason}: {push.message}"
                self._drop(ClientError("unavailable", reason, True))
            return
        self._accept(push)
        conn = self._conn
        if not self._holding and conn is not None and len(self._queue) >= self.queue_max:
            self._holding = True
            conn.hold(self)
        self._wake()

    def connection_lost(self, error: ClientError) -> None:
        self._drop(error)

    # the iterator --------------------------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, Self]:
        return self._begin().__await__()

    async def _begin(self) -> Self:
        await self._ensure_started()
        return self

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        if not self._begun:
            await self._ensure_started()
        for _ in range(1_000_000):  # each turn yields, waits or resumes: a bound, not a limit
            if self._closed:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            queue = self._queue
            if queue:
                item = queue.popleft()
                try:
                    self._check(item)
                except ClientError as e:
                    self._fail(e)
                    raise
                self._fruitless = 0
                if self._holding and 2 * len(queue) < self.queue_max:
                    self._holding = False
                    if self._conn is not None:
                        self._conn.release(self)
                return item
            if self._lost is not None:
                await self._resume()
                continue
            assert self._waiter is None, "one consumer at a time"
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        raise AssertionError("the subscription loop did not settle")

    async def close(self) -> None:
        """End the iteration and unsubscribe (when connected; the answer is awaited, errors are
        ignored).  Items queued and not yet yielded are dropped."""
        if self._closed:
            return
        conn, sub_id = self._conn, self.sub_id
        self._end()
        if conn is not None and conn.error is None and sub_id is not None:
            with contextlib.suppress(ClientError):
                await conn.request(Unsubscribe(self.client._next_rid(), sub_id))

    async def __aenter__(self) -> Self:
        await self._ensure_started()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # the machinery -------------------------------------------------------------------------------

    async def _ensure_started(self) -> None:
        """The first Subscribe, once.  A retryable failure is a loss like any other (the
        iterator resumes); another ends the subscription and is raised."""
        if self._begun or self._closed:
            return
        self._begun = True
        try:
            await self._start()
        except ClientError as e:
            if e.retryable and not self.client._closed:
                self._lost = e
                self._started_at = asyncio.get_running_loop().time()
                return
            self._fail(e)
            raise
        except BaseException:
            self._begun = False  # cancelled: a late answer is unsubscribed by the connection
            raise

    async def _start(self) -> None:
        """One Subscribe (through the client's usual connect); raises ``ClientError``."""
        await self.client._call(self._request(self.client._next_rid()), self._expect(), self)

    async def _resume(self) -> None:
        """Subscribe again, with backoff, at most ``connect_attempts`` times in a row; fails the
        subscription when that does not work or when it keeps being lost without progress."""
        client = self.client
        last = self._lost
        assert last is not None
        if not last.retryable:
            self._fail(last)
            return
        if asyncio.get_running_loop().time() - self._started_at >= client.timeout_s:
            self._fruitless = 0  # it held for a while: not a loop of failures
        if self._fruitless >= client.connect_attempts:
            self._fail(
                ClientError(
                    "unavailable",
                    f"lost {self._fruitless} times in a row without progress: {last.message}",
                    True,
                )
            )
            return
        backoff_s = client.backoff_min_s * 2 ** min(self._fruitless, 16)
        for attempt in range(client.connect_attempts):
            if attempt or self._fruitless:
                backoff_s = min(backoff_s, client.backoff_max_s)
                await asyncio.sleep(client._rng.uniform(backoff_s / 2, backoff_s))
                backoff_s *= 2
            if self._closed or self._error is not None:
                return
            try:
                await self._start()
            except ClientError as e:
                if not e.retryable or client._closed:
                    self._fail(e)
                    return
                last = e
                continue
            self.resumes += 1
            self._fruitless += 1
            return
        self._fail(
            ClientError(
                "unavailable",
                f"no resume in {client.connect_attempts} attempts; last: {last.message}",
                True,
            )
        )

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _detach(self) -> None:
        """Leave the connection: unregister, release the hold."""
        conn = self._conn
        self._conn = None
        if conn is not None and self.sub_id is not None and conn.sinks.get(self.sub_id) is self:
            del conn.sinks[self.sub_id]
        if self._holding:
            self._holding = False
            if conn is not None:
                conn.release(self)

    def _drop(self, why: ClientError) -> None:
        """The server side is gone: forget what was queued, subscribe again when next read."""
        self._detach()
        self._queue.clear()
        if not self._closed and self._error is None:
            self._lost = why
        self._wake()

    def _fail(self, error: ClientError) -> None:
        """End with ``error`` (raised by the iterator from now on); unsubscribe if connected."""
        conn, sub_id = self._conn, self.sub_id
        self._detach()
        self._queue.clear()
        self._lost = None
        if self._error is None:
            self._error = error
        if conn is not None and sub_id is not None:
            conn.unsubscribe_quietly(sub_id)
        self._wake()

    def _end(self) -> None:
        self._detach()
        self._queue.clear()
        self._lost = None
        self._closed = True
        self._wake()


class Subscription(_Follower[Message | GapEvent]):
    """A session followed in seq order: yields ``Message`` and ``GapEvent`` (see
    ``Client.subscribe``).  ``last_seq``: the seq of the last item yielded (a GapEvent's
    ``to_seq``); a resume subscribes again after it."""

    def __init__(self, client: Client, session_id: str, after_seq: int, queue_max: int) -> None:
        super().__init__(client, queue_max)
        self.session_id = session_id
        self.last_seq = after_seq
        self.start_last_seq: int | None = None  # Subscribed.last_seq of the latest subscribe

    def _request(self, rid: int) -> Request:
        return Subscribe(rid, self.session_id, self.last_seq)

    def _expect(self) -> type[Subscribed]:
        return Subscribed

    def subscribed(self, conn: _Connection, response: Subscribed | InboxSnapshot) -> None:
        super().subscribed(conn, response)
        if type(response) is Subscribed:
            self.start_last_seq = response.last_seq

    def _accept(self, push: Push) -> None:
        if type(push) is MessageEvent:
            self._queue.extend(push.messages)
        elif type(push) is GapEvent:
            self._queue.append(push)
        else:
            self._fail(ClientError("internal", f"{type(push).__name__} for a session", False))

    def _check(self, item: Message | GapEvent) -> None:
        expected = self.last_seq + 1
        if type(item) is Message:
            if item.seq != expected:
                raise _out_of_order(f"expected seq {expected}, got message {item.seq}")
            self.last_seq = item.seq
        else:
            assert type(item) is GapEvent
            if item.from_seq != expected or item.to_seq < item.from_seq:
                raise _out_of_order(
                    f"expected seq {expected}, got gap {item.from_seq}..{item.to_seq}"
                )
            self.last_seq = item.to_seq


def _out_of_order(what: str) -> ClientError:
    return ClientError("internal", f"subscription out of order: {what}", False)


class InboxSubscription(_Follower[InboxSnapshot | InboxDelta]):
    """A user's inbox followed: yields an ``InboxSnapshot``, then ``InboxDelta``s (see
    ``Client.subscribe_inbox``); after a resume, a fresh ``InboxSnapshot``."""

    def __init__(self, client: Client, user_id: str, queue_max: int) -> None:
        super().__init__(client, queue_max)
        self.user_id = user_id

    def _request(self, rid: int) -> Request:
        return SubscribeInbox(rid, self.user_id)

    def _expect(self) -> type[InboxSnapshot]:
        return InboxSnapshot

    def subscribed(self, conn: _Connection, response: Subscribed | InboxSnapshot) -> None:
        super().subscribed(conn, response)
        if self._conn is conn and type(response) is InboxSnapshot:
            self._queue.append(response)  # the first item, before the deltas that follow
            self._wake()

    def _accept(self, push: Push) -> None:
        if type(push) is InboxDelta:
            self._queue.append(push)
        else:
            self._fail(ClientError("internal", f"{type(push).__name__} for an inbox", False))


async def connect(
    targets: str | list[str],
    token: str | None = None,
    client_name: str = "ctxstore-python",
    timeout_s: float = 10.0,
    *,
    connect_timeout_s: float = 5.0,
    connect_attempts: int | None = None,
    backoff_min_s: float = 0.05,
    backoff_max_s: float = 2.0,
    max_frame_bytes: int = FRAME_BYTES_MAX,
    suspect_s: float = 5.0,
) -> Client:
    """A client connected to the first target that answers (tried in the given order).

    ``timeout_s`` bounds each request; ``connect_timeout_s`` each connection and handshake;
    ``connect_attempts`` (default: twice the targets, at least 3) the tries of one call;
    ``suspect_s`` how long (jittered, ``suspect_s`` / 2 .. ``suspect_s``) a node that answered
    ``unavailable`` or ``timeout``, or failed, is avoided."""
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
    )
    await client._connection()
    return client


__all__ = [
    "Client",
    "ClientError",
    "InboxSubscription",
    "PushSink",
    "Subscription",
    "connect",
    "expect_response",
    "new_client_msg_id",
    "parse_targets",
]
