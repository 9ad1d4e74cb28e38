"""The asyncio server of the native binary protocol: sockets around ``framing.ServerConnection``.

``serve(handler, host, port)`` listens; each TCP connection is a ``Connection`` that feeds bytes
to its sans-IO core and hands requests to the handler:

- ``handler.on_hello(conn, hello)`` decides the handshake: answer ``conn.welcome(...)``, or an
  ``Error`` (``unauthorized`` for a bad token), after which the connection closes.  Frames that
  follow the Hello are held unread until the Welcome is sent.  A second Hello on the open
  connection (protocol version 4: a token refreshed) goes to ``on_hello`` too, in its turn
  among the requests (``conn.greeted`` tells it from the first), and an ``Error`` answering
  it leaves the connection open.
- ``handler.on_request(conn, request)`` answers a request in one of three ways: return the
  ``Response`` now; return ``None`` and call ``conn.reply(response)`` later, from any callback
  of the event loop (the way to answer without a task per request); or return an awaitable,
  which the connection runs as a task.  A handler that raises a ``WireError`` answers with an
  Error of its code; any other exception answers ``internal``.
- ``handler.on_close(conn)`` once the connection is gone; later replies are discarded.
- Subscriptions: a handler answers ``Subscribe`` with ``conn.reply(Subscribed(...))`` *before*
  its first ``conn.push(event)`` (so the client knows the ``sub_id``), pushes while
  ``conn.writable``, and waits for ``handler.on_writable(conn)`` (the transport drained below
  its low-water mark) before it pushes the next batch; ``conn.backlog_bytes`` says how much is
  still unwritten.  A push over the frame limit raises ``LocalProtocolError("too_large")``.

Rules of this module:
- Responses go out in the order they are ready, each matched to its request by ``rid``.
  Everything replied during one loop iteration leaves in one ``transport.write``.
- Bounded memory, per connection and per server (the node): a request in flight is charged its
  frame bytes plus a reserve for its answer (an upper bound: ``ANSWER_BYTES_MAX`` by request
  type, at most a whole frame), until it is answered; a connection whose writer is paused
  (above ``write_buffer_high_bytes``) is charged what it has not written yet.  At most
  ``max_in_flight`` requests are unanswered on a connection; when a connection's charges reach
  ``pending_bytes_max``, or all connections' reach ``node_pending_bytes_max``, or its writer is
  paused, it stops handing out requests and stops reading.  It resumes once half its bounds are
  free and the writer has drained; connections stopped by the node's bound wait in a queue and
  are woken in turn when the node is below half of it (while others hold it with answers their
  clients never read, until those are read or closed: the idle timeout).  So a client that
  sends requests and never reads holds at most about ``pending_bytes_max`` plus the writer's
  high-water mark, and all of them ``node_pending_bytes_max`` plus a high-water mark each.
- Bounded connections: at most ``connections_max`` (and ``connections_per_source_max`` from one
  address); one more is told ``Error{rid: 0, code: "unavailable"}`` and closed.  An open
  connection that is idle (nothing in flight, no subscription, nothing received and no last
  answer sent) for ``idle_timeout_s`` is told ``Error{rid: 0, code: "unavailable"}`` and
  closed.  One whose writer stays paused (its client reads nothing) for
  ``write_stall_timeout_s`` is aborted: it gives back what it holds of the node's bound to the
  connections whose clients do read.
- A protocol error (or a refused Hello) writes the queued Error, then closes.  A handshake that
  does not finish within ``hello_timeout_s`` is aborted.
- A peer that half-closes gets its remaining answers before the connection closes.
- Pushes share the write path of the responses (one write per loop iteration) and are
  discarded once the connection is closing.  ``close(code, message)`` (``Server.close`` too)
  first queues the goodbye ``Error{rid: 0}``: a graceful shutdown is ``close("unavailable",
  "node shutting down")``, which a client sees as a retryable error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Collection
from typing import Any, Protocol, cast

import msgspec

from .errors import LocalProtocolError, WireError
from .flow import CountedLog, set_reading
from .framing import (
    HEADER,
    REQUEST_TYPES,
    BadRequest,
    ConnectionClosed,
    ProtocolError,
    RequestReceived,
    ServerConnection,
    State,
)
from .protocol import (
    FRAME_BYTES_MAX,
    METADATA_BYTES_MAX,
    READ_BYTES_MAX,
    REHELLO_VERSION,
    Append,
    Compact,
    CreateSession,
    Error,
    ErrorCode,
    GetRoutes,
    GetSession,
    Hello,
    InboxSnapshot,
    MarkRead,
    Ping,
    Push,
    Read,
    Request,
    Response,
    SetContextConfig,
    Subscribe,
    Subscribed,
    SubscriptionClosed,
    Unsubscribe,
    Unsubscribed,
    Welcome,
    error,
)

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

Reply = Response | Awaitable[Response] | None
"""What a handler returns: the answer, an awaitable of it, or None (``conn.reply`` later)."""

SMALL_ANSWER_BYTES_MAX = 4 * 1024
"""An upper bound of the frame of a small answer (an ``Error`` included)."""
ANSWER_BYTES_MAX: dict[type[Any], int] = {
    Hello: SMALL_ANSWER_BYTES_MAX,
    Ping: SMALL_ANSWER_BYTES_MAX,
    Append: SMALL_ANSWER_BYTES_MAX,
    MarkRead: SMALL_ANSWER_BYTES_MAX,
    Subscribe: SMALL_ANSWER_BYTES_MAX,  # its pushes are flow-controlled on their own
    Unsubscribe: SMALL_ANSWER_BYTES_MAX,
    GetSession: METADATA_BYTES_MAX + SMALL_ANSWER_BYTES_MAX,  # a session and its metadata
    CreateSession: METADATA_BYTES_MAX + SMALL_ANSWER_BYTES_MAX,
    GetRoutes: 64 * 1024,  # 4 096 groups at most
    Read: READ_BYTES_MAX + SMALL_ANSWER_BYTES_MAX,  # the server's byte budget of a read answer
    SetContextConfig: SMALL_ANSWER_BYTES_MAX,
    Compact: SMALL_ANSWER_BYTES_MAX,
    # GetContext: a whole frame (a window holds up to StateLimits.window_bytes_max of messages)
}
"""The reserve charged for the answer of a request in flight, by request type, at most a whole
frame; any other (``list_sessions``, ``subscribe_inbox``) is charged a whole frame, which bounds
every answer (a larger one becomes ``too_large``)."""
_SUBSCRIPTION_ANSWERS: frozenset[type[Any]] = frozenset({Subscribed, InboxSnapshot, Unsubscribed})


class Handler(Protocol):
    def on_hello(self, conn: Connection, hello: Hello) -> Reply: ...

    def on_request(self, conn: Connection, request: Request) -> Reply: ...

    def on_close(self, conn: Connection) -> None: ...

    def on_writable(self, conn: Connection) -> None: ...


class BaseHandler:
    """Accepts a Hello whose token is one of ``tokens`` (any Hello when ``tokens`` is None);
    subclasses answer requests."""

    def __init__(
        self, node_id: int = 0, cluster_id: str = "", tokens: Collection[str] | None = None
    ) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self._tokens = None if tokens is None else [t.encode() for t in tokens]

    def on_hello(self, conn: Connection, hello: Hello) -> Reply:
        if self._tokens is not None:
            given = (hello.token or "").encode()
            if not any(hmac.compare_digest(given, token) for token in self._tokens):
                return error(hello.rid, "unauthorized", "missing or invalid token")
        return conn.welcome(self.node_id, self.cluster_id)

    def on_request(self, conn: Connection, request: Request) -> Reply:
        return error(request.rid, "bad_request", f"{type(request).__name__} is not supported")

    def on_close(self, conn: Connection) -> None:
        pass

    def on_writable(self, conn: Connection) -> None:
        """The transport wants more: push the next batch (called on ``resume_writing``)."""


class Server:
    """A listening socket and its connections (returned by ``serve``)."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_frame_bytes: int,
        max_in_flight: int,
        pending_bytes_max: int,
        node_pending_bytes_max: int,
        write_buffer_high_bytes: int,
        hello_timeout_s: float,
        idle_timeout_s: float,
        write_stall_timeout_s: float,
        connections_max: int,
        connections_per_source_max: int,
        requests_per_pass: int = 0,
    ) -> None:
        frame = max_frame_bytes + HEADER.size
        if max_in_flight < 1 or pending_bytes_max < 2 * frame:
            raise ValueError("max_in_flight >= 1 and pending_bytes_max >= two frames")
        if requests_per_pass < 0:
            raise ValueError("requests_per_pass >= 0 (0: no bound)")
        if node_pending_bytes_max < pending_bytes_max:
            raise ValueError("node_pending_bytes_max >= pending_bytes_max")
        if connections_max < 1 or connections_per_source_max < 1:
            raise ValueError("connections_max and connections_per_source_max >= 1")
        self.handler = handler
        self.max_frame_bytes = max_frame_bytes
        self.max_in_flight = max_in_flight
        self.pending_bytes_max = pending_bytes_max
        self.node_pending_bytes_max = node_pending_bytes_max
        self.write_buffer_high_bytes = write_buffer_high_bytes
        self.hello_timeout_s = hello_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.write_stall_timeout_s = write_stall_timeout_s
        self.connections_max = connections_max
        self.connections_per_source_max = min(connections_per_source_max, connections_max)
        self.requests_per_pass = requests_per_pass
        """Requests one connection hands to the handler in one loop iteration at most (0: all
        it has read); the rest wait for the next iteration, with reading paused meanwhile, so
        that one connection's burst does not make every other connection's request wait
        behind it."""
        self.connections: set[Connection] = set()
        self.pending_bytes = 0
        """All connections' charges: requests in flight and the unwritten bytes of paused
        writers (the node's bound is on this)."""
        self.refused = CountedLog(logger, logging.WARNING)  # connections closed at once: over
        # connections_max or connections_per_source_max (refused.count: how many)
        self.idle_closed = 0  # connections closed after idle_timeout_s
        self.stalled_closed = 0  # connections aborted after write_stall_timeout_s
        self.answer_reserve = {t: min(frame, ANSWER_BYTES_MAX.get(t, frame)) for t in REQUEST_TYPES}
        self._per_source: dict[str, int] = {}
        self._waiting: deque[Connection] = deque()  # stopped by node_pending_bytes_max
        self._wake_scheduled = False
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "not listening"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def waiting(self) -> int:
        """Connections stopped by ``node_pending_bytes_max``, waiting for their turn."""
        return len(self._waiting)

    @property
    def listening(self) -> bool:
        """Whether new connections are accepted (until ``stop_listening`` or ``close``)."""
        return self._server is not None and self._server.is_serving()

    def stop_listening(self) -> None:
        """Accept no more connections; the open ones go on (a graceful shutdown's first step)."""
        if self._server is not None:
            self._server.close()

    def close(self, code: ErrorCode | None = None, message: str = "") -> None:
        """Stop listening and close every connection (queued answers are still written);
        with a ``code``, each gets the goodbye ``Error{rid: 0, code, message}`` first."""
        self.stop_listening()
        for conn in list(self.connections):
            conn.close(code, message)

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        await self.wait_closed()

    def _make_connection(self) -> Connection:
        return Connection(self)

    # the node-wide bounds ------------------------------------------------------------------------

    def _admit(self, conn: Connection, source: str) -> str | None:
        """Count ``conn`` in; or why not (over a connection bound)."""
        if len(self.connections) >= self.connections_max:
            return f"too many connections (this node's limit: {self.connections_max})"
        count = self._per_source.get(source, 0)
        if count >= self.connections_per_source_max:
            return (
                f"too many connections from {source} "
                f"(this node's limit: {self.connections_per_source_max})"
            )
        self._per_source[source] = count + 1
        self.connections.add(conn)
        return None

    def _forget(self, conn: Connection, source: str) -> None:
        self.connections.discard(conn)
        count = self._per_source.pop(source, 0) - 1
        if count > 0:
            self._per_source[source] = count

    def _wait(self, conn: Connection) -> None:
        """``conn`` stopped at the node's bound: wake it in turn once the node is below half."""
        if not conn._waiting:
            conn._waiting = True
            self._waiting.append(conn)

    def _release(self, size: int) -> None:
        self.pending_bytes -= size
        if (
            self._waiting
            and not self._wake_scheduled
            and self.pending_bytes <= self.node_pending_bytes_max // 2
        ):
            self._wake_scheduled = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        """Hand the waiting connections their turn, oldest first, while the node has room (one
        that stops at the bound again queues at the back)."""
        self._wake_scheduled = False
        waiting = self._waiting
        for _ in range(len(waiting)):
            if self.pending_bytes >= self.node_pending_bytes_max:
                break
            conn = waiting.popleft()
            conn._waiting = False
            if conn._blocked:
                conn._pump()


async def serve(
    handler: Handler,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    sock: socket.socket | None = None,
    max_frame_bytes: int = FRAME_BYTES_MAX,
    max_in_flight: int = 1024,
    pending_bytes_max: int = 64 * 1024 * 1024,
    node_pending_bytes_max: int = 256 * 1024 * 1024,
    write_buffer_high_bytes: int = 1024 * 1024,
    hello_timeout_s: float = 10.0,
    idle_timeout_s: float = 300.0,
    write_stall_timeout_s: float = 60.0,
    connections_max: int = 4096,
    connections_per_source_max: int = 1024,
    requests_per_pass: int = 0,
    backlog: int = 1024,
) -> Server:
    """Listen on ``host:port`` (port 0: any free port, see ``Server.address``) or on ``sock``."""
    server = Server(
        handler,
        max_frame_bytes=max_frame_bytes,
        max_in_flight=max_in_flight,
        pending_bytes_max=pending_bytes_max,
        node_pending_bytes_max=node_pending_bytes_max,
        write_buffer_high_bytes=write_buffer_high_bytes,
        hello_timeout_s=hello_timeout_s,
        idle_timeout_s=idle_timeout_s,
        write_stall_timeout_s=write_stall_timeout_s,
        connections_max=connections_max,
        connections_per_source_max=connections_per_source_max,
        requests_per_pass=requests_per_pass,
    )
    loop = asyncio.get_running_loop()
    if sock is not None:
        server._server = await loop.create_server(
            server._make_connection, sock=sock, backlog=backlog
        )
    else:
        server._server = await loop.create_server(
            server._make_connection, host, port, backlog=backlog
        )
    return server


class Connection(asyncio.Protocol):
    """One client connection.  ``context`` is the handler's to use."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.core = ServerConnection(server.max_frame_bytes, answer_reserve=server.answer_reserve)
        self.context: Any = None
        self.credential: str | None = None
        """A token the transport carried before the Hello (a WebSocket upgrade's
        ``Authorization`` header or ``token`` query parameter): the handler's to use when the
        Hello has none."""
        self.peername: Any = None
        self.closed = False
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Future[Response]] = set()
        self._resume_in_flight = server.max_in_flight // 2
        self._unwritten_charged = 0  # unwritten bytes charged (while the writer is paused)
        self._resume_pending_bytes = server.pending_bytes_max // 2
        self._waiting = False  # in the server's queue of connections stopped by its bound
        self.subscriptions: set[int] = set()  # sub_ids answered and not ended
        self._source = ""
        self._admitted = False
        self._active_at = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None  # armed while the writer is paused
        self._flush_bytes = server.write_buffer_high_bytes
        self._pumping = False
        self._blocked = False  # requests wait in the core (bound reached or Hello pending)
        self._reading_paused = False
        self._write_paused = False
        self._flush_scheduled = False
        self._pump_scheduled = False
        self._yielded = False  # stopped at requests_per_pass: the next iteration goes on
        self._closing = False
        self._peer_eof = False
        self._hello_timer: asyncio.TimerHandle | None = None

    # handler API ---------------------------------------------------------------------------------

    @property
    def hello(self) -> Hello | None:
        return self.core.hello

    @property
    def greeted(self) -> bool:
        """Whether the connection's first Hello was accepted (a Hello now is a second one)."""
        return self.core.state is State.OPEN

    def welcome(self, node_id: int, cluster_id: str, expires_in_ms: int | None = None) -> Welcome:
        """The Welcome answering this connection's (latest) Hello: the client's protocol
        version (the core accepted only a supported one); ``expires_in_ms``: how long its token
        has left (told to clients of ``REHELLO_VERSION`` on)."""
        hello = self.core.hello
        assert hello is not None, "no Hello received"
        version = hello.protocol_version
        if version < REHELLO_VERSION:
            expires_in_ms = None
        return Welcome(
            hello.rid, node_id, cluster_id, version, self.core.max_frame_bytes, expires_in_ms
        )

    def reply(self, response: Response) -> None:
        """Answer the request ``response.rid`` (discarded once the connection is closed)."""
        if self.closed or self._closing:
            return
        core = self.core
        charged = core.in_flight_bytes
        try:
            core.send(response)
        except LocalProtocolError as e:
            if not core.awaits_answer(response.rid):
                raise  # a handler bug: a second answer, or an answer to no request
            logger.error("cannot send %s: %s", type(response).__name__, e)
            core.send(error(response.rid, "internal", "the response could not be sent"))
        if core.in_flight == 0:  # its last answer: the idle time starts now, not at the request
            self._active_at = self._loop.time()
        server = self.server
        server.pending_bytes -= charged - core.in_flight_bytes
        if server._waiting:
            server._release(0)
        if type(response) in _SUBSCRIPTION_ANSWERS:
            self._follow_subscriptions(response)
        self._flush_soon()
        if core.bytes_to_send >= self._flush_bytes:
            self._flush()  # a batch is big enough: let the transport see it (and pause us)
        if core.state is State.MUST_CLOSE:
            self._close_after_flush()
        elif self._hello_timer is not None and core.state is State.OPEN:
            self._hello_timer.cancel()
            self._hello_timer = None
            self._idle_timer = self._loop.call_later(self.server.idle_timeout_s, self._idle_check)
        if self._blocked and not self._pumping and self._may_resume():
            # In the next iteration, not from here: a reply may be written from inside the
            # Raft driver's pass, which no new request may enter (docs/raft.md "Driver").
            self._pump_soon()
        elif self._peer_eof and core.in_flight == 0:
            self._close_after_flush()

    def _follow_subscriptions(self, response: Response) -> None:
        if type(response) is Unsubscribed:
            self.subscriptions.discard(response.sub_id)
        else:
            self.subscriptions.add(cast(Subscribed | InboxSnapshot, response).sub_id)

    def push(self, event: Push) -> int:
        """Queue a push (sent with the replies of this loop iteration); the bytes queued, or 0
        once the connection is closing or closed.  Raises ``LocalProtocolError``: ``too_large``
        for a push over the frame limit (nothing queued: split the batch), ``internal`` before
        the Welcome."""
        if self.closed or self._closing:
            return 0
        core = self.core
        size = core.push(event)
        if type(event) is SubscriptionClosed:
            self.subscriptions.discard(event.sub_id)
        if size:
            self._flush_soon()
            if core.bytes_to_send >= self._flush_bytes:
                self._flush()  # let the transport see a big batch (and pause us)
        return size

    @property
    def pending_bytes(self) -> int:
        """This connection's charges: its requests in flight (frames and answer reserves) and,
        while its writer is paused, its unwritten bytes."""
        return self.core.in_flight_bytes + self._unwritten_charged

    @property
    def backlog_bytes(self) -> int:
        """Bytes queued and not yet written to the socket: in the core and in the transport."""
        transport = self._transport
        buffered = 0 if transport is None or self.closed else transport.get_write_buffer_size()
        return self.core.bytes_to_send + buffered

    @property
    def writable(self) -> bool:
        """Whether pushing more is welcome: open, and the transport below its high-water mark
        (once False, ``handler.on_writable`` says when it is True again)."""
        return not (self.closed or self._closing or self._write_paused)

    def close(self, code: ErrorCode | None = None, message: str = "") -> None:
        """Close once the queued answers are written; with a ``code``, after the goodbye
        ``Error{rid: 0, code, message}`` (retryable per ``protocol.RETRYABLE``)."""
        if code is not None and not (self.closed or self._closing):
            self.core.goodbye(code, message)
        self._close_after_flush()

    # asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self._transport = transport
        self.peername = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server = self.server
        peer = self.peername
        self._source = str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
        refusal = server._admit(self, self._source)
        if refusal is not None:
            server.refused.note(f"refusing client connections: {refusal}")
            self.close("unavailable", refusal)
            return
        self._admitted = True
        high = server.write_buffer_high_bytes
        transport.set_write_buffer_limits(high=high, low=high // 4)
        self._hello_timer = self._loop.call_later(server.hello_timeout_s, self._hello_timeout)

    def data_received(self, data: bytes) -> None:
        self._active_at = self._loop.time()
        self.core.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        self.core.receive_data(None)
        self._pump()
        return True  # keep writing: the answers still in flight are due

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._stall_timer is None:
            self._stall_timer = self._loop.call_later(
                self.server.write_stall_timeout_s, self._write_stalled
            )

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._charge_unwritten(0)  # what is left is below the low-water mark
        if self._blocked and self._may_resume():
            self._pump()
        if not (self.closed or self._closing):
            try:
                self.server.handler.on_writable(self)
            except Exception:
                logger.exception("handler.on_writable failed")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for timer in (self._hello_timer, self._idle_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._hello_timer = self._idle_timer = self._stall_timer = None
        if self._waiting:  # (closed while stopped by the node's bound: its turn is void)
            self._waiting = False
            self.server._waiting.remove(self)
        self.server._release(self.pending_bytes)  # (what it holds: no more changes once closed)
        if not self._admitted:
            return
        self.server._forget(self, self._source)
        try:
            self.server.handler.on_close(self)
        except Exception:
            logger.exception("handler.on_close failed")

    # the read path -------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Hand the buffered requests to the handler, up to the bounds."""
        if self._pumping or self._yielded or self.closed or self._closing:
            return
        self._pumping = True
        core = self.core
        server = self.server
        per_pass = server.requests_per_pass
        handed = 0
        yielded = False
        max_in_flight = server.max_in_flight
        max_bytes = server.pending_bytes_max
        node_max_bytes = server.node_pending_bytes_max
        blocked = False
        try:
            while True:
                if (
                    self._write_paused
                    or core.in_flight >= max_in_flight
                    or core.in_flight_bytes + self._unwritten_charged >= max_bytes
                ):
                    blocked = True
                    break
                if server.pending_bytes >= node_max_bytes and core.state is State.OPEN:
                    # (a Hello always passes: a new client gets its Welcome, then waits)
                    blocked = True
                    server._wait(self)
                    break
                before = core.in_flight_bytes
                event = core.next_event()
                if event is None:
                    blocked = core.state is State.GREETING
                    break
                if type(event) is RequestReceived:
                    server.pending_bytes += core.in_flight_bytes - before
                    self._dispatch(event.request)
                    handed += 1
                    if handed == per_pass:  # (never with 0: no bound)
                        yielded = True
                        break
                elif type(event) is BadRequest:
                    logger.debug("%s: %s", self.peername, event.error.message)
                    self._flush_soon()
                elif type(event) is ProtocolError:
                    logger.info("closing %s: %s: %s", self.peername, event.code, event.message)
                    self._close_after_flush()
                    return
                else:
                    assert type(event) is ConnectionClosed
                    self._peer_eof = True
                    if core.in_flight == 0:
                        self._close_after_flush()
                        return
                    break
        finally:
            self._pumping = False
        self._blocked = blocked
        if yielded and not (self.closed or self._closing):
            self._yielded = True  # its turn again in the next iteration (``_pump_soon``)
            self._pump_soon()
            self._set_reading(False)
            return
        self._set_reading(not blocked)

    def _may_resume(self) -> bool:
        core = self.core
        return (
            not self._write_paused
            and core.state is not State.GREETING
            and core.in_flight <= self._resume_in_flight
            and self.pending_bytes <= self._resume_pending_bytes
        )

    def _set_reading(self, reading: bool) -> None:
        self._reading_paused = set_reading(self._transport, self._reading_paused, reading)

    def _dispatch(self, request: Request) -> None:
        handler = self.server.handler
        rid = request.rid
        try:
            if type(request) is Hello:
                answer = handler.on_hello(self, request)
            else:
                answer = handler.on_request(self, request)
        except Exception as e:
            self.reply(_error_for(rid, e))
            return
        if answer is None:
            return
        if isinstance(answer, msgspec.Struct):
            self.reply(answer)
            return
        task = asyncio.ensure_future(answer)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(rid, t))

    def _task_done(self, rid: int, task: asyncio.Future[Response]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            self.reply(error(rid, "unavailable", "the request was cancelled"))
            return
        exc = task.exception()
        self.reply(task.result() if exc is None else _error_for(rid, exc))

    # the write path ------------------------------------------------------------------------------

    def _pump_soon(self) -> None:
        if not self._pump_scheduled:
            self._pump_scheduled = True
            self._loop.call_soon(self._pump_scheduled_now)

    def _pump_scheduled_now(self) -> None:
        self._pump_scheduled = False
        if self._yielded:  # stopped at ``requests_per_pass``: the rest now
            self._yielded = False
            self._pump()
        elif self._blocked and self._may_resume():
            self._pump()

    def _flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False  # a flush still scheduled finds nothing and returns
        data = self.core.data_to_send()
        transport = self._transport
        if data and transport is not None and not self.closed:
            transport.write(data)
            if self._write_paused:  # (set by write itself, over the high-water mark)
                self._charge_unwritten(transport.get_write_buffer_size())

    def _charge_unwritten(self, size: int) -> None:
        """Charge ``size`` unwritten bytes (instead of what was charged for them before)."""
        delta = size - self._unwritten_charged
        if delta and not self.closed:
            self._unwritten_charged = size
            if delta > 0:
                self.server.pending_bytes += delta
            else:
                self.server._release(-delta)

    def _close_after_flush(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._flush()
        if self._transport is not None:
            self._transport.close()

    def _hello_timeout(self) -> None:
        self._hello_timer = None
        if self.core.state is not State.OPEN and not self.closed:
            logger.info("closing %s: no completed handshake in time", self.peername)
            if self._transport is not None:
                self._transport.abort()

    def _idle_check(self) -> None:
        """Close the connection if it is idle: nothing in flight, no subscription, nothing
        received and no last answer sent for ``idle_timeout_s`` (an answer closed right after it
        was made could be lost with the connection); otherwise look again when it could be."""
        self._idle_timer = None
        if self.closed or self._closing:
            return
        timeout_s = self.server.idle_timeout_s
        due = self._active_at + timeout_s
        now = self._loop.time()
        if self.core.in_flight or self.subscriptions or now < due:
            self._idle_timer = self._loop.call_at(max(due, now + timeout_s / 8), self._idle_check)
            return
        self.server.idle_closed += 1
        logger.debug("closing %s: idle for %g s", self.peername, timeout_s)
        if self.backlog_bytes and self._transport is not None:
            self._transport.abort()  # nor does it read what it was sent
            return
        self.close("unavailable", f"closing an idle connection (nothing for {timeout_s:g} s)")

    def _write_stalled(self) -> None:
        """The writer stayed paused for ``write_stall_timeout_s``: the client reads nothing of
        what it was sent, so nothing else would reach it either.  Abort."""
        self._stall_timer = None
        if self.closed or not self._write_paused or self._transport is None:
            return
        self.server.stalled_closed += 1
        logger.debug(
            "aborting %s: read nothing for %g s", self.peername, self.server.write_stall_timeout_s
        )
        self._transport.abort()


def _error_for(rid: int, exc: BaseException) -> Error:
    if isinstance(exc, WireError):
        return error(rid, exc.code, exc.message)
    logger.error("handler failed on request %d", rid, exc_info=exc)
    return error(rid, "internal", "internal error")


__all__ = ["BaseHandler", "Connection", "Handler", "Reply", "Server", "serve"]
