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
- A request unanswered after ``timeout_s`` fails with ``timeout`` (retryable; its outcome is
  unknown).  An append is safe to retry with the same ``client_msg_id``: ``append_with_retry``
  picks one and retries retryable errors, a bounded number of times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import uuid
from collections import deque
from typing import TypeVar, cast

import msgspec

from .errors import ClientError, LocalProtocolError
from .framing import ClientConnection, ProtocolError, ResponseReceived
from .protocol import (
    FRAME_BYTES_MAX,
    PROTOCOL_VERSION,
    Append,
    Appended,
    CreateSession,
    Error,
    GetRoutes,
    GetSession,
    Hello,
    ListSessions,
    MarkRead,
    Messages,
    Metadata,
    Ping,
    Pong,
    Read,
    ReadMarked,
    Request,
    Response,
    Routes,
    Sender,
    SessionInfo,
    SessionList,
    Welcome,
)

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

R = TypeVar("R", bound=msgspec.Struct)
Address = tuple[str, int]

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


def new_client_msg_id() -> str:
    return uuid.uuid4().hex


class _Connection(asyncio.Protocol):
    """One TCP connection of a ``Client``: the sans-IO core and the futures of its requests."""

    def __init__(self, target: Address, max_frame_bytes: int, timeout_s: float) -> None:
        self.target = target
        self.core = ClientConnection(max_frame_bytes)
        self.error: ClientError | None = None  # sticky: set once, the connection is retired
        self.goodbye: ProtocolError | None = None  # what broke it, when the protocol did
        self.pending: dict[int, asyncio.Future[Response]] = {}
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._deadlines: deque[tuple[float, int]] = deque()  # (deadline, rid), in send order
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._transport: asyncio.Transport | None = None
        self._flush_scheduled = False
        self._writable: asyncio.Future[None] | None = None  # set while writing is paused

    # requests ------------------------------------------------------------------------------------

    def request(self, request: Request) -> asyncio.Future[Response]:
        """Queue ``request``; its future completes with the response (an ``Error`` included)."""
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
        while deadlines and deadlines[0][0] <= now:
            _, rid = deadlines.popleft()
            future = pending.pop(rid, None)
            if future is not None and not future.done():
                future.set_exception(
                    ClientError("timeout", f"no answer within {self._timeout_s} s", True)
                )
        if deadlines:
            self._arm(max(deadlines[0][0], now))

    # asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        core = self.core
        core.receive_data(data)
        pending = self.pending
        while (event := core.next_event()) is not None:
            if type(event) is ResponseReceived:
                response = event.response
                future = pending.pop(response.rid, None)
                if future is not None and not future.done():
                    future.set_result(response)
                continue
            if type(event) is ProtocolError:
                self.goodbye = event
                self.fail(f"{event.code}: {event.message}")
            else:
                self.fail("closed by the server")
            return

    def eof_received(self) -> bool:
        self.core.receive_data(None)
        self.data_received(b"")
        return False

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

    def fail(self, reason: str, retryable: bool = True) -> None:
        """Retire the connection: every request in flight fails with ``unavailable``."""
        if self.error is None:
            host, port = self.target
            self.error = ClientError("unavailable", f"{host}:{port}: {reason}", retryable)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(self.error)
        self.resume_writing()
        if self._transport is not None:
            self._transport.close()


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
    ) -> None:
        if timeout_s <= 0 or connect_timeout_s <= 0 or connect_attempts < 1:
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
        self.welcome: Welcome | None = None  # of the current connection
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._next_target = 0
        self._rid = 0
        self._closed = False
        self._rng = random.Random()

    @property
    def target(self) -> Address | None:
        """The address of the current connection."""
        conn = self._conn
        return None if conn is None or conn.error is not None else conn.target

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
        request = Append(
            self._next_rid(),
            session_id,
            sender,
            sender_id,
            kind,
            content,
            metadata or {},
            client_msg_id,
            expected_seq,
            token_count,
        )
        return await self._call(request, Appended)

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

    async def close(self) -> None:
        """Close the connection; calls in flight fail with ``unavailable`` (not retryable)."""
        self._closed = True
        connecting = self._connecting
        if connecting is not None:
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
        if self._conn is not None:
            self._conn.fail("the client is closed", retryable=False)
            self._conn = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # the call path -------------------------------------------------------------------------------

    def _next_rid(self) -> int:
        self._rid += 1
        return self._rid

    async def _call(self, request: Request, expect: type[R]) -> R:
        conn = self._conn
        if conn is None or conn.error is not None:
            conn = await self._connection()
        if conn._writable is not None:
            await conn.wait_writable()
        response = await conn.request(request)
        if type(response) is expect:
            return cast(R, response)
        if type(response) is Error:
            raise ClientError.from_error(response)
        raise ClientError(
            "internal", f"{type(response).__name__} answered {type(request).__name__}", False
        )

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
            self._conn = task.result()

    async def _reconnect(self) -> _Connection:
        """Try the targets round robin, backing off after each failed round."""
        n = len(self.targets)
        backoff_s = self.backoff_min_s
        last: ClientError | None = None
        for attempt in range(self.connect_attempts):
            target = self.targets[self._next_target % n]
            self._next_target += 1
            try:
                return await self._open(target)
            except ClientError as e:
                if not e.retryable:
                    raise
                last = e
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

    async def _open(self, target: Address) -> _Connection:
        """Connect to ``target`` and complete the handshake."""
        loop = asyncio.get_running_loop()
        conn = _Connection(target, self.max_frame_bytes, self.connect_timeout_s)
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
) -> Client:
    """A client connected to the first target that answers (tried in the given order).

    ``timeout_s`` bounds each request; ``connect_timeout_s`` each connection and handshake;
    ``connect_attempts`` (default: twice the targets, at least 3) the tries of one call."""
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
    )
    await client._connection()
    return client


__all__ = ["Client", "ClientError", "connect", "new_client_msg_id", "parse_targets"]
