"""The WebSocket protocol at ``GET /v1/ws`` on the node's HTTP port (docs/web.md).

The HTTP port (``ctxstore.ops``, h11) hands a ``/v1/ws`` request to ``WebGateway.upgrade``,
which does the handshake with wsproto and, once it has answered 101, takes the socket over:
the transport's protocol becomes a ``WebSocket`` on the same event loop.

A ``WebSocket`` carries one native connection (``wire.aio.Connection`` of the client port's
``Server``, served by the same ``Service``): each WebSocket message is one native frame's body
(``wire.web_codec`` converts JSON), and the native connection writes into a ``web_pipe.Pipe``, a
transport whose frames the WebSocket sends one per message.  So every rule of the
native port holds as it is: the Hello and its token, rids, sub_ids, pushes, error codes, the
bounds on requests in flight and on bytes held per connection and per node, the connection
caps, the idle, hello and write-stall timeouts, the goodbye.  A token on the upgrade request
(``Authorization: Bearer``, or the ``token`` query parameter a browser's WebSocket must use)
stands for a Hello that carries none (``credential``; docs/auth.md).

Rules of this module:
- One subprotocol per connection, chosen by the client: ``ctxstore.v1.json`` (text messages
  only) or ``ctxstore.v1.msgpack`` (binary messages only).  A request offering neither is
  refused ``400`` before the upgrade; a message of the other kind closes with 1003.
- A message is bounded before it is buffered: the first (the Hello) by
  ``HELLO_FRAME_BYTES_MAX``, the others by the native frame limit; over it, the native
  goodbye (``too_large``) and close 1009.  Fragments are joined up to that bound.
- The close code follows the native connection's last word (``CLOSE_CODES``): the goodbye's
  code, its message as the reason.  Invalid UTF-8 in a text message closes with 1007 and a
  broken WebSocket frame with 1002 (wsproto's verdicts, RFC 6455 §8.1, §7.4.1).
- Reading stops while the native connection says so (its bounds) and while the socket's
  writer is paused (so pings cannot make unread pongs pile up).
- Keepalive: a ping every ``ping_interval_s``; a peer from which nothing (a message, a pong)
  arrived for ``idle_timeout_s`` while we were reading is closed (1001).  Pings are not
  requests: the native idle timeout (nothing in flight, no subscription) still applies.
- What the native connection aborts (a client that reads nothing for the write-stall
  timeout, or sends no Hello in time) is closed with 1008 and cut off ``close_timeout_s``
  later if the close cannot be written; so is any close the peer does not let through.
- Nothing a peer sends raises out of this module; a peer's close is answered and the socket
  closed (answers still in flight are dropped, as on a native connection that is cut).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import parse_qs

import h11
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from wsproto import ConnectionType
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    TextMessage,
)
from wsproto.events import Request as WsRequest
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from wire.aio import Connection, Server
from wire.framing import HELLO_FRAME_BYTES_MAX, State
from wire.web_codec import (
    JSON,
    SUBPROTOCOLS,
    Undecodable,
    bodies,
    frame_of_body,
    frame_of_json,
    goodbye_of,
    json_text,
)

from .web_pipe import Pipe

logger = logging.getLogger(__name__)

PATH = b"/v1/ws"
CLOSE_CODES: dict[str, int] = {
    "unavailable": 1001,  # going away: shutdown, idle, over a connection cap (retryable)
    "too_large": 1009,  # a message over the limit
    "internal": 1011,
}
"""The close code after the native goodbye ``Error{rid: 0, code}``; any other code: 1008."""
POLICY = 1008


def goodbye_close(goodbye: tuple[str, str] | None) -> tuple[int, str]:
    """The close code and reason of a session whose native connection closed: its goodbye's
    (``code``, ``message``), or none (a refused Hello: its Error went out with its rid)."""
    if goodbye is None:
        return POLICY, "closed by the server"
    code, message = goodbye
    return CLOSE_CODES.get(code, POLICY), message


def cut_off_reason(inner: Connection) -> str:
    """Why a native connection was aborted: no Hello in time, or a client reading nothing."""
    if inner.core.state in (State.IDLE, State.GREETING):
        return "no completed handshake in time"
    return "slow consumer: the client reads nothing of what it is sent"


INTERNAL = 1011
UNSUPPORTED_DATA = 1003
GOING_AWAY = 1001


@dataclass(frozen=True)
class WebLimits:
    ping_interval_s: float = 30.0
    idle_timeout_s: float = 90.0  # nothing received (a pong included) for this long: closed
    close_timeout_s: float = 5.0  # a close not written within this: the socket is cut off


class HttpConnection(Protocol):
    """What the upgrade needs of the HTTP connection (``ops.OpsConnection``)."""

    def respond(
        self, status: int, body: dict[str, Any], headers: list[tuple[str, str]]
    ) -> None: ...

    def detach(self) -> tuple[asyncio.Transport, bytes]: ...


class WebGateway:
    """The WebSockets of one HTTP port: upgrades, the open connections, their counters."""

    def __init__(self, clients: Server, limits: WebLimits | None = None) -> None:
        self.clients = clients
        self.limits = limits or WebLimits()
        self.connections: set[WebSocket] = set()
        self.upgrades = 0
        self.refused = 0  # upgrade requests answered 400/426/503
        self.closes: Counter[int] = Counter()  # close codes sent or received
        self.messages_received = 0
        self.messages_sent = 0

    def upgrade(self, http: HttpConnection, request: h11.Request) -> None:
        """Answer ``request`` (a GET of ``PATH``): 101 and a ``WebSocket``, or a refusal."""
        if not self.clients.listening:  # the node is shutting down, as on the native port
            body = {"error": "unavailable", "message": "the node is shutting down"}
            http.respond(503, body, [("retry-after", "1")])
            self.refused += 1
            return
        handshake = H11Handshake(ConnectionType.SERVER)
        try:
            handshake.initiate_upgrade_connection(list(request.headers), request.target)
        except RemoteProtocolError as e:  # not a WebSocket upgrade (wsproto's verdict)
            hint = e.event_hint
            status = getattr(hint, "status_code", 400)
            extra = [(n.decode(), v.decode()) for n, v in getattr(hint, "headers", [])]
            self._refuse(http, status, str(e), extra)
            return
        except ValueError as e:  # a header wsproto cannot decode (not ASCII, a bad host name)
            self._refuse(http, 400, f"undecodable upgrade request: {e}", [])
            return
        upgrade = next(handshake.events())
        assert isinstance(upgrade, WsRequest)
        chosen = next((p for p in upgrade.subprotocols if p in SUBPROTOCOLS), None)
        if chosen is None:
            message = (
                f"Sec-WebSocket-Protocol must offer {SUBPROTOCOLS[0]} or {SUBPROTOCOLS[1]}"
                f" (offered: {', '.join(upgrade.subprotocols) or 'none'})"
            )
            self._refuse(http, 400, message, [])
            return
        accept = handshake.send(AcceptConnection(subprotocol=chosen))
        ws = handshake.connection
        assert ws is not None
        transport, trailing = http.detach()
        transport.write(accept)
        conn = WebSocket(self, transport, ws, chosen)
        conn.inner.credential = credential(request)
        self.connections.add(conn)
        self.upgrades += 1
        transport.set_protocol(conn)
        conn.start(trailing)

    def _refuse(
        self, http: HttpConnection, status: int, message: str, extra: list[tuple[str, str]]
    ) -> None:
        self.refused += 1
        body = {"error": "bad_request", "message": message, "subprotocols": list(SUBPROTOCOLS)}
        http.respond(status, body, extra)

    def close(self) -> None:
        """Close every WebSocket (1001 after the native goodbye ``unavailable``)."""
        for conn in list(self.connections):
            conn.inner.close("unavailable", "the node is shutting down")


def credential(request: h11.Request) -> str | None:
    """The token an upgrade request carries: ``Authorization: Bearer T`` or, for a browser's
    WebSocket (which cannot set headers), the ``token`` query parameter; the native Hello's
    own token wins (docs/auth.md).  Never logged: the target is logged without its query."""
    for name, value in request.headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    _, _, query = request.target.partition(b"?")
    if query:
        values = parse_qs(query.decode("latin-1"), max_num_fields=32).get("token")
        if values:
            return values[-1]
    return None


class WebSocket(asyncio.Protocol):
    """One upgraded connection: the socket's protocol, around a native ``Connection``."""

    def __init__(
        self, gateway: WebGateway, transport: asyncio.Transport, ws: WsConnection, subprotocol: str
    ) -> None:
        self.gateway = gateway
        self.transport = transport
        self.ws = ws
        self.json = subprotocol == JSON
        self.subprotocol = subprotocol
        self.inner = Connection(gateway.clients)
        self.tunnel = Pipe(self, transport, transport.get_extra_info)
        self._loop = asyncio.get_running_loop()
        self._message = bytearray()  # the message being received (its fragments so far)
        self._frames = bytearray()  # native frames to hand to ``inner`` after this read
        self._messages = 0  # complete messages received
        self._message_bytes_max = gateway.clients.max_frame_bytes
        self._last_received = self._loop.time()
        self._inner_reading = True  # what ``inner`` wants (its bounds)
        self._write_paused = False  # the socket's writer is above its high-water mark
        self._reading_paused = False  # for either reason
        self._closed = False  # our close sent (or the socket gone): nothing more is written
        self._goodbye: tuple[str, str] | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._cutoff: asyncio.TimerHandle | None = None

    def start(self, trailing: bytes) -> None:
        self.inner.connection_made(self.tunnel)
        self._keepalive = self._loop.call_later(
            self.gateway.limits.ping_interval_s, self._keepalive_check
        )
        if trailing:
            self.data_received(trailing)

    # asyncio.Protocol (the socket) --------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.ws.state is ConnectionState.CLOSED:
            return
        self._last_received = self._loop.time()
        try:
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Message):
                    if not self._closed:
                        self._on_data(event)
                    continue
                self._hand_frames()
                if isinstance(event, Ping):
                    self._send(event.response())
                elif isinstance(event, CloseConnection):
                    self._on_close(event)
                # Pong: it was received (above); nothing else to do
            self._hand_frames()
        except Exception:  # a bug: this connection ends, the node goes on
            logger.exception("WebSocket %s: failed on input", self.inner.peername)
            self.close(INTERNAL, "internal error")

    def eof_received(self) -> bool:
        return False  # the socket closes: connection_lost

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()  # (pongs are ours to write: no more pings are read meanwhile)
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._keepalive, self._cutoff):
            if timer is not None:
                timer.cancel()
        self._keepalive = self._cutoff = None
        self.gateway.connections.discard(self)
        if not self._closed:
            self.gateway.closes[1006] += 1  # no close sent or received (RFC 6455 §7.1.5)
        self._closed = True
        self.inner.connection_lost(exc)

    # the read path -------------------------------------------------------------------------------
    def _on_data(self, event: Message[Any]) -> None:
        if self.json is not isinstance(event, TextMessage):
            self._fail(UNSUPPORTED_DATA, f"{self.subprotocol} takes only "
                       f"{'text' if self.json else 'binary'} messages")  # fmt: skip
            return
        chunk = event.data.encode() if self.json else event.data
        limit = HELLO_FRAME_BYTES_MAX if self._messages == 0 else self._message_bytes_max
        size = len(self._message) + len(chunk)
        if size > limit:
            self._hand_frames()
            message = f"a message of more than {limit} bytes (so far {size})"
            self.inner.close("too_large", message)
            return
        self._message += chunk
        if not event.message_finished:
            return
        self._messages += 1
        self.gateway.messages_received += 1
        body, self._message = self._message, bytearray()
        try:
            self._frames += frame_of_json(body) if self.json else frame_of_body(body)
        except Undecodable as e:
            self._hand_frames()
            self.inner.close("bad_request", str(e))

    def _hand_frames(self) -> None:
        """Give the native connection the requests of this read, in one go."""
        if self._frames:
            frames, self._frames = self._frames, bytearray()
            self.inner.data_received(frames)  # type: ignore[arg-type]  # (bytes-like)

    def _on_close(self, event: CloseConnection) -> None:
        if self.ws.state is ConnectionState.OPEN:  # wsproto found the peer's data broken
            self._send(CloseConnection(event.code, event.reason))
        else:
            self.gateway.closes[event.code] += 1  # the peer's close (or its answer to ours)
            self._send(event.response())  # answered, if it was the peer's
        self._closed = True
        self._close_socket()

    # the write path -----------------------------------------------------------------------------
    def write_frames(self, data: bytes | bytearray | memoryview) -> None:
        """The native connection's output: one WebSocket message per frame."""
        if self._closed:
            return
        ws = self.ws
        out = bytearray()
        for body in bodies(data):
            goodbye = goodbye_of(body)
            if goodbye is not None:
                self._goodbye = goodbye
            if self.json:
                try:
                    text = json_text(body)
                except Exception:  # a bug: never drop a message silently
                    logger.exception("WebSocket %s: cannot encode as JSON", self.inner.peername)
                    self.transport.write(out)
                    self.close(INTERNAL, "internal error: a message has no JSON form")
                    return
                out += ws.send(TextMessage(text))
            else:
                out += ws.send(BytesMessage(cast(bytes, body)))
            self.gateway.messages_sent += 1
        self.transport.write(out)

    def _send(self, event: Ping | Pong | CloseConnection) -> None:
        if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self.transport.write(self.ws.send(event))
            if isinstance(event, CloseConnection):
                self.gateway.closes[event.code] += 1

    def close(self, code: int, reason: str) -> None:
        """Send our close (once), then close the socket."""
        if not self._closed:
            self._closed = True
            self._send(CloseConnection(code, reason))
        self._close_socket()

    def _fail(self, code: int, reason: str) -> None:
        logger.debug("closing WebSocket %s: %d %s", self.inner.peername, code, reason)
        self.close(code, reason)

    def close_after_goodbye(self) -> None:
        """The native connection closes: our close code follows its last word."""
        self.close(*goodbye_close(self._goodbye))

    def cut_off(self) -> None:
        """The native connection aborts: the client sends no Hello or reads nothing."""
        self.close(POLICY, cut_off_reason(self.inner))

    def _close_socket(self) -> None:
        self.transport.close()
        if self._cutoff is None:
            self._cutoff = self._loop.call_later(
                self.gateway.limits.close_timeout_s, self.transport.abort
            )

    # the pipe's owner (``web_pipe.PipeOwner``) --------------------------------------------------
    def pipe_closed(self) -> None:
        self.close_after_goodbye()

    def pipe_aborted(self) -> None:
        self.cut_off()

    @property
    def pipe_closing(self) -> bool:
        return self._closed

    def set_reading(self, reading: bool) -> None:
        """What the native connection wants (it stops reading at its bounds)."""
        self._inner_reading = reading
        self._update_reading()

    def _update_reading(self) -> None:
        paused = self._write_paused or not self._inner_reading
        if paused is self._reading_paused or self._closed:
            return
        self._reading_paused = paused
        if paused:
            self.transport.pause_reading()
        else:
            self._last_received = self._loop.time()  # silence while paused was ours
            self.transport.resume_reading()

    def _keepalive_check(self) -> None:
        self._keepalive = None
        if self._closed:
            return
        limits = self.gateway.limits
        now = self._loop.time()
        if self._reading_paused:
            self._last_received = now
        if now - self._last_received > limits.idle_timeout_s:
            self.close(GOING_AWAY, f"nothing received for {limits.idle_timeout_s:g} s")
            return
        self._send(Ping())
        self._keepalive = self._loop.call_later(limits.ping_interval_s, self._keepalive_check)


class WebCollector(Collector):
    """The WebSockets' metrics (registered with the node's ``NodeMetrics``)."""

    def __init__(self, gateway: WebGateway) -> None:
        self.gateway = gateway

    def collect(self) -> Iterator[Any]:
        g = self.gateway
        open_ = GaugeMetricFamily(
            "ctxstore_web_connections", "Open WebSocket connections.", labels=["subprotocol"]
        )
        counts = Counter(c.subprotocol for c in g.connections)
        for name in SUBPROTOCOLS:
            open_.add_metric([name], counts[name])
        yield open_
        yield CounterMetricFamily(
            "ctxstore_web_upgrades_total", "WebSocket upgrades accepted.", value=g.upgrades
        )
        yield CounterMetricFamily(
            "ctxstore_web_upgrades_refused_total",
            "WebSocket upgrade requests refused (no supported subprotocol, bad handshake).",
            value=g.refused,
        )
        closes = CounterMetricFamily(
            "ctxstore_web_closes_total",
            "WebSocket closes by code (sent or received; 1006: no closing handshake).",
            labels=["code"],
        )
        for code, n in sorted(g.closes.items()):
            closes.add_metric([str(code)], n)
        yield closes
        yield CounterMetricFamily(
            "ctxstore_web_messages_received_total",
            "WebSocket messages received.",
            value=g.messages_received,
        )
        yield CounterMetricFamily(
            "ctxstore_web_messages_sent_total", "WebSocket messages sent.", value=g.messages_sent
        )


__all__ = ["CLOSE_CODES", "PATH", "WebCollector", "WebGateway", "WebLimits", "WebSocket"]
