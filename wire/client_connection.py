"""One TCP connection of a ``wire.client.Client``: the sans-IO core (``framing.ClientConnection``)
over an asyncio transport, the futures of its requests and the sinks of its subscriptions.

Rules of this file:
- Each request gets a future; responses complete them in whatever order they arrive.  Requests
  made during one loop iteration leave in one ``transport.write``; while the socket's write
  buffer is above its high-water mark, ``writing_paused`` is set and callers wait on it.
- A request unanswered after ``timeout_s`` fails with a retryable ``timeout``.
- The first error is sticky (``fail``): every request in flight fails with it, every sink is
  told, the transport closes; nothing is sent after it.
- Pushes are routed by ``sub_id`` to the sink registered as its ``Subscribed``
  (``InboxSnapshot``) arrived; pushes of no sink are dropped and counted.  While any sink holds
  (its queue is full) the connection stops reading, until every holder has released.
- The owner (``on_trouble``) is told of what suspects the node: ``MOVE_ON_ERRORS`` answers,
  ``MOVE_ON_CLOSINGS`` closings, timeouts and failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import Protocol, cast

from .errors import ClientError, LocalProtocolError
from .flow import set_reading
from .framing import ClientConnection, ProtocolError, PushReceived, ResponseReceived
from .protocol import (
    Error,
    InboxSnapshot,
    Push,
    Request,
    Response,
    Subscribed,
    SubscriptionClosed,
    Unsubscribe,
)

logger = logging.getLogger("wire.client")
logger.addHandler(logging.NullHandler())

Address = tuple[str, int]

MOVE_ON_ERRORS = frozenset({"unavailable", "timeout"})
"""Error answers that say more about the node than about the request (no leader reachable from
there, no quorum, shutting down, overloaded; no answer from the leader in time): the node is
suspected and the next call goes to another target.  Retrying there is safe: a read changes
nothing, an append is retried with its ``client_msg_id``."""
MOVE_ON_CLOSINGS = frozenset({"unavailable", "shutdown"})
"""``SubscriptionClosed`` reasons that suspect the node the same way."""


class PushSink(Protocol):
    """What a connection routes one subscription's pushes to (``Connection.sinks``)."""

    def subscribed(self, conn: Connection, response: Subscribed | InboxSnapshot) -> None:
        """Registered under ``response.sub_id``; called before any push of it is delivered."""

    def deliver(self, push: Push) -> None:
        """One push of this subscription (after a ``SubscriptionClosed``: unregistered)."""

    def connection_lost(self, error: ClientError) -> None:
        """The connection failed (the sink is unregistered)."""


class Connection(asyncio.Protocol):
    """One TCP connection of a ``Client`` (see the rules above)."""

    def __init__(
        self,
        target: Address,
        max_frame_bytes: int,
        timeout_s: float,
        next_rid: Callable[[], int],
        on_trouble: Callable[[Connection], None] | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s  # of each request (the client sets it after the handshake)
        self.core = ClientConnection(max_frame_bytes)
        self.error: ClientError | None = None  # sticky: set once, the connection is retired
        self.goodbye: ProtocolError | None = None  # what broke it, when the protocol did
        self.first_bytes = b""  # the server's first bytes: a stranger's tell it is not ctxstore
        self.pending: dict[int, asyncio.Future[Response]] = {}
        self.sinks: dict[int, PushSink] = {}  # sub_id -> where its pushes go
        self.pushes_dropped = 0  # pushes of no registered subscription
        self.writing_paused: asyncio.Future[None] | None = None  # done as writing resumes
        self._next_rid = next_rid
        self._on_trouble = on_trouble  # told of MOVE_ON_* answers, timeouts and failures
        self._subscribing: dict[int, PushSink] = {}  # rid -> sink, of subscribes in flight
        self._holders: set[object] = set()  # sinks whose queue is full: events wait unread
        self._reading_paused = False
        self._loop = asyncio.get_running_loop()
        self._deadlines: deque[tuple[float, int]] = deque()  # (deadline, rid), in send order
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.refresh: asyncio.TimerHandle | None = None  # the token's next refresh (the client's)
        self._transport: asyncio.Transport | None = None
        self._flush_scheduled = False

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
        deadline = self._loop.time() + self.timeout_s
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
        while self.writing_paused is not None and self.error is None:
            await asyncio.shield(self.writing_paused)

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
                    ClientError("timeout", f"no answer within {self.timeout_s} s", True)
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
        if self.writing_paused is None:
            self.writing_paused = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self.writing_paused = self.writing_paused, None
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
        if self.refresh is not None:
            self.refresh.cancel()
            self.refresh = None
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
