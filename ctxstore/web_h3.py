"""The HTTP/3 listener (``--h3 HOST:PORT``, UDP; docs/web.md §8), built with aioquic.

One ``H3Server`` per node, on the node's event loop, beside the HTTP/1.1 port (``ctxstore.ops``)
whose routes it serves again over QUIC:

- the HTTP/JSON API under ``/v1`` (``web_http.HttpApi``: each request served by a native
  connection of its own, exactly as over HTTP/1.1), its event streams too (``web_sse``: the
  request's stream is handed over, as an HTTP/1.1 socket is);
- ``/health/*``, ``/metrics``, the demo page and ``/static/*`` (``ops.OpsServer.answer``);
- **WebTransport** at ``/v1/wt`` (``webtransport.WtSession``), the WebSocket protocol over QUIC
  streams.

The HTTP/1.1 port advertises this listener with ``Alt-Svc: h3=":PORT"``.

Rules of this module:
- QUIC, TLS 1.3 and HTTP/3 are aioquic's (its anti-amplification limit on unvalidated
  addresses, its congestion control, connection migration); nothing of them is written here.
- Bounded: at most ``connections_max`` QUIC connections per node (a new one past it is closed
  with ``CONNECTION_REFUSED``), ``streams_max`` streams a peer may have open per connection (each
  direction; QUIC's stream limit), ``sessions_max`` WebTransport sessions per connection, the
  idle timeout (QUIC's, ``idle_timeout_s``); a request's body at most the native frame limit
  (413); each request and each session is a native client connection (its bounds).
- Nothing a peer sends raises out of this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl

import h11
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, H3Event, HeadersReceived, WebTransportStreamDataReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.events import (
    ConnectionTerminated,
    QuicEvent,
    StopSendingReceived,
    StreamReset,
)
from aioquic.quic.packet import QuicErrorCode
from cryptography import x509
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from wire.aio import Server
from wire.web_codec import JSON, SUBPROTOCOLS

from .web import credential
from .web_transports import WebTransportAdvert
from .webtransport import PATH as WT_PATH
from .webtransport import SessionHost, WtSession, release_stream

if TYPE_CHECKING:
    from .ops import OpsServer
    from .web_http import HttpApi

logger = logging.getLogger(__name__)

SERVER_NAME: Final = "ctxstore"
H3_NO_ERROR: Final = 0x100
H3_REQUEST_CANCELLED: Final = 0x10C
DATAGRAM_FRAME_BYTES: Final = 65536  # announced (WebTransport needs HTTP datagrams); unused


@dataclass(frozen=True)
class H3Limits:
    connections_max: int = 1024  # QUIC connections per node
    streams_max: int = 128  # streams a peer may have open per connection, each direction
    sessions_max: int = 16  # WebTransport sessions per connection
    idle_timeout_s: float = 60.0  # QUIC's: a connection silent this long is gone
    retry: bool = False  # QUIC Retry: a client proves its address before any state is kept


def configuration(cert: str, key: str, limits: H3Limits) -> QuicConfiguration:
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=H3_ALPN,
        idle_timeout=limits.idle_timeout_s,
        max_datagram_frame_size=DATAGRAM_FRAME_BYTES,
    )
    config.load_cert_chain(cert, key)
    return config


class H3Server:
    """The listener, its connections and their counters (``serve_h3``)."""

    def __init__(self, ops: OpsServer, api: HttpApi, clients: Server, limits: H3Limits) -> None:
        self.ops = ops
        self.api = api
        self.clients = clients
        self.limits = limits
        self.connections: set[H3Protocol] = set()
        self.sessions: set[WtSession] = set()
        self.quic: QuicServer | None = None
        self.certificate: x509.Certificate | None = None  # the leaf it serves (as loaded)
        self.connections_total = 0
        self.refused = 0
        self.streams = 0  # streams the peers opened (requests, WebTransport streams)
        self.streams_opened = 0  # streams the server opened (subscriptions, goodbyes)
        self.packets_lost = 0  # packets the server's loss detection declared lost
        self.requests = 0  # HTTP/3 requests (not the WebTransport CONNECTs)
        self.sessions_total = 0
        self.session_closes: dict[int, int] = {}
        self.messages_received = 0
        self.messages_sent = 0

    @property
    def address(self) -> tuple[str, int]:
        assert self.quic is not None and self.quic._transport is not None
        host, port = self.quic._transport.get_extra_info("sockname")[:2]
        return host, port

    def stat(self, what: str, n: int) -> None:
        if what == "streams":
            self.streams += n
        elif what == "streams_opened":
            self.streams_opened += n
        elif what == "closes":
            self.session_closes[n] = self.session_closes.get(n, 0) + 1

    def close(self) -> None:
        """Close every session (the native goodbye ``unavailable``) and connection, stop."""
        for session in list(self.sessions):
            session.inner.close("unavailable", "the node is shutting down")
        for conn in list(self.connections):
            conn.transmit()  # the goodbyes and the sessions' close first (best effort: once)
            conn.close(QuicErrorCode.NO_ERROR, "the node is shutting down")
        if self.quic is not None:
            self.quic.close()


class _Request:
    __slots__ = ("body", "headers", "too_large")

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers
        self.body = bytearray()
        self.too_large = False


class H3Protocol(QuicConnectionProtocol, SessionHost):
    """One QUIC connection: HTTP/3 requests and WebTransport sessions."""

    def __init__(self, quic: QuicConnection, stream_handler: Any = None, *, server: H3Server):
        super().__init__(quic, stream_handler)
        self.server = server
        self.quic = quic
        limits = server.limits
        quic._local_max_streams_bidi.value = limits.streams_max  # (QUIC's stream limit)
        quic._local_max_streams_uni.value = limits.streams_max
        self.h3 = H3Connection(quic, enable_webtransport=True)
        self.requests: dict[int, _Request] = {}
        self.exchanges: dict[int, H3Exchange] = {}
        self.sessions: dict[int, WtSession] = {}
        self.event_streams: dict[int, _H3StreamTransport] = {}  # Server-Sent Events
        self.terminated = False
        self.first = True  # no datagram received yet (then: refused, forgotten or counted)
        self._keepalive: asyncio.TimerHandle | None = None
        loss = quic._loss
        counted = loss._on_packets_lost

        def on_packets_lost(**kw: Any) -> None:  # (aioquic keeps no count of its own)
            if kw.get("congestion_event", True):
                packets = kw["packets"] = list(kw["packets"])
                server.packets_lost += len(packets)
            counted(**kw)

        loss._on_packets_lost = on_packets_lost  # type: ignore[method-assign]

    # QuicConnectionProtocol ------------------------------------------------------------------
    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        if not self.first:
            super().datagram_received(data, addr)
            return
        self.first = False
        self._quic.receive_datagram(data, addr, now=self._loop.time())  # type: ignore[arg-type]
        server = self.server
        if self._quic._state is QuicConnectionState.FIRSTFLIGHT:
            self._forget()  # nothing in its first datagram decrypted: no client, no state kept
            return
        if len(server.connections) >= server.limits.connections_max:
            server.refused += 1  # refused in its handshake (the first flight closes it)
            self.close(QuicErrorCode.CONNECTION_REFUSED, "too many connections to this node")
            return
        server.connections.add(self)
        server.connections_total += 1
        self._keepalive = self._loop.call_later(server.limits.idle_timeout_s / 3, self._ping)
        self._process_events()
        self.transmit()

    def _ping(self) -> None:
        """While it carries a session or an event stream, a connection is pinged (its answer
        keeps both ends' idle timers from closing a quiet subscriber's connection)."""
        self._keepalive = None
        if self.terminated:
            return
        if self.sessions or self.event_streams:
            self._quic.send_ping(0)
            self.transmit()
        self._keepalive = self._loop.call_later(self.server.limits.idle_timeout_s / 3, self._ping)

    def _forget(self) -> None:
        self.terminated = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._connection_terminated_handler()  # (the listener forgets its connection ids)

    def transmit(self) -> None:
        super().transmit()
        for session in list(self.sessions.values()):
            session.check_flow()  # (acknowledgements shrink what is unacknowledged)
        for stream in list(self.event_streams.values()):
            stream.check_flow()

    def quic_event_received(self, event: QuicEvent) -> None:
        try:
            if isinstance(event, ConnectionTerminated):
                self._terminated()
                return
            if isinstance(event, StreamReset):
                self._stream_reset(event.stream_id)
            elif isinstance(event, StopSendingReceived):  # the client reads no more of it
                with contextlib.suppress(Exception):
                    self.quic.reset_stream(event.stream_id, H3_REQUEST_CANCELLED)
                self._stream_reset(event.stream_id)
            for h3_event in self.h3.handle_event(event):
                self._h3_event(h3_event)
        except Exception:  # a bug: this connection ends, the node goes on
            logger.exception("HTTP/3: failed on input")
            self.close(QuicErrorCode.INTERNAL_ERROR, "internal error")

    def _h3_event(self, event: H3Event) -> None:
        if isinstance(event, WebTransportStreamDataReceived):
            session = self.sessions.get(event.session_id)
            if session is not None:
                session.stream_data(event.stream_id, event.data, event.stream_ended)
            else:  # a stream of no session (closed): end it
                release_stream(self.quic, event.stream_id)
        elif isinstance(event, HeadersReceived):
            self._headers(event.stream_id, event.headers, event.stream_ended)
        elif isinstance(event, DataReceived):
            self._data(event.stream_id, event.data, event.stream_ended)

    def _stream_reset(self, stream_id: int) -> None:
        self.requests.pop(stream_id, None)
        exchange = self.exchanges.pop(stream_id, None)
        if exchange is not None:
            exchange.lost()
        session = self.sessions.get(stream_id)
        if session is not None:
            session.peer_closed()
        events = self.event_streams.get(stream_id)
        if events is not None:
            events.lost()

    def _terminated(self) -> None:
        if self.terminated:
            return
        self.terminated = True
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        self.server.connections.discard(self)
        for session in list(self.sessions.values()):
            session.peer_closed()
        for exchange in list(self.exchanges.values()):
            exchange.lost()
        self.exchanges.clear()
        for events in list(self.event_streams.values()):
            events.lost()
        self.requests.clear()

    # HTTP/3 requests ------------------------------------------------------------------------------
    def _headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        if stream_id in self.sessions:  # (trailers of a session's CONNECT: nothing to do)
            return
        pseudo = {n: v for n, v in headers if n.startswith(b":")}
        if pseudo.get(b":method") == b"CONNECT":
            self._connect(stream_id, pseudo, headers)
            return
        self.server.streams += 1
        request = _Request(headers)
        self.requests[stream_id] = request
        if ended:
            self._dispatch(stream_id)

    def _data(self, stream_id: int, data: bytes, ended: bool) -> None:
        session = self.sessions.get(stream_id)
        if session is not None:  # capsules on a session's CONNECT stream
            if ended:  # the client closed the session
                session.peer_closed()
                self.quic.send_stream_data(stream_id, b"", end_stream=True)
            return
        request = self.requests.get(stream_id)
        if request is None:
            return
        if not request.too_large:
            if len(request.body) + len(data) > self.server.api.body_bytes_max:
                request.too_large = True
                request.body = bytearray()
            else:
                request.body += data
        if ended:
            self._dispatch(stream_id)

    def _dispatch(self, stream_id: int) -> None:
        request = self.requests.pop(stream_id)
        self.server.requests += 1
        exchange = H3Exchange(self, stream_id)
        pseudo = {n: v for n, v in request.headers if n.startswith(b":")}
        method = pseudo.get(b":method", b"GET")
        target = pseudo.get(b":path", b"/")
        authority = pseudo.get(b":authority", b"localhost")
        regular = [(n, v) for n, v in request.headers if not n.startswith(b":") and n != b"host"]
        try:
            h11_request = h11.Request(
                method=method, target=target, headers=[(b"host", authority), *regular]
            )
        except h11.LocalProtocolError as e:
            exchange.answer(400, "application/json", _error_body(400, str(e)), [], True)
            return
        path = target.split(b"?", 1)[0]
        api = self.server.api
        if path.startswith(b"/v1/"):
            if request.too_large:
                message = f"a request body of more than {api.body_bytes_max} bytes"
                api.reply_error(exchange, h11_request, "too_large", message,
                                limit=api.body_bytes_max)  # fmt: skip
                return
            if path == b"/v1/ws":
                message = "WebSockets are served over HTTP/1.1; over HTTP/3: WebTransport at /v1/wt"
                api.reply_error(exchange, h11_request, "not_found", message)
                return
            self.exchanges[stream_id] = exchange
            api.handle(exchange, h11_request, bytes(request.body))
            return
        if method not in (b"GET", b"HEAD"):
            exchange.answer(405, "application/json", _error_body(405), [("allow", "GET, HEAD")],
                            True)  # fmt: skip
            return
        status, ctype, body = self.server.ops.answer(target)
        exchange.head = method == b"HEAD"
        exchange.answer(status, ctype, body, [], True)

    # WebTransport -------------------------------------------------------------------------------
    def _connect(
        self, stream_id: int, pseudo: dict[bytes, bytes], headers: list[tuple[bytes, bytes]]
    ) -> None:
        target = pseudo.get(b":path", b"")
        path, _, query = target.partition(b"?")
        if pseudo.get(b":protocol") != b"webtransport" or path.decode("latin-1") != WT_PATH:
            self._refuse_connect(stream_id, 404, "only WebTransport at /v1/wt takes CONNECT")
            return
        params = dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))
        subprotocol = params.get("protocol", JSON)
        if subprotocol not in SUBPROTOCOLS:
            message = f"protocol: {SUBPROTOCOLS[0]} or {SUBPROTOCOLS[1]}, not {subprotocol!r}"
            self._refuse_connect(stream_id, 400, message)
            return
        if not self.server.clients.listening:
            self._refuse_connect(stream_id, 503, "the node is shutting down")
            return
        if len(self.sessions) >= self.server.limits.sessions_max:
            message = f"at most {self.server.limits.sessions_max} sessions per connection"
            self._refuse_connect(stream_id, 429, message)
            return
        self.h3.send_headers(
            stream_id,
            [
                (b":status", b"200"),
                (b"server", SERVER_NAME.encode()),
                (b"sec-webtransport-http3-draft", b"draft02"),
                (b"wt-protocol", subprotocol.encode()),
            ],
        )
        session = WtSession(self, stream_id, self.server.clients, subprotocol, self.server.stat)
        # a token on the CONNECT (Authorization: Bearer, or ?token=) stands for a Hello that
        # carries none, as on a WebSocket's upgrade (docs/auth.md)
        regular = [(n, v) for n, v in headers if not n.startswith(b":") and n != b"host"]
        with contextlib.suppress(h11.LocalProtocolError):
            upgrade = h11.Request(method=b"GET", target=target, headers=[(b"host", b"h"), *regular])
            session.inner.credential = credential(upgrade)
        self.sessions[stream_id] = session
        self.server.sessions.add(session)
        self.server.sessions_total += 1
        session.start()
        self.transmit_soon()

    def _refuse_connect(self, stream_id: int, status: int, message: str) -> None:
        self.server.api.errors[status] = self.server.api.errors.get(status, 0) + 1
        headers = [(b":status", str(status).encode()), (b"content-type", b"application/json")]
        if status in (429, 503):
            headers.append((b"retry-after", b"1"))
        self.h3.send_headers(stream_id, headers)
        self.h3.send_data(stream_id, _error_body(status, message), end_stream=True)
        # and it reads no more of it: a client that leaves its side open would keep one of its
        # streams_max (as for a closed session, ``send_capsule_and_end``)
        with contextlib.suppress(Exception):
            self.quic.stop_stream(stream_id, H3_NO_ERROR)
        self.transmit_soon()

    # SessionHost --------------------------------------------------------------------------------
    def create_wt_stream(self, session_id: int, unidirectional: bool) -> int:
        return self.h3.create_webtransport_stream(session_id, is_unidirectional=unidirectional)

    def send_capsule_and_end(self, session_id: int, data: bytes) -> None:
        if not self.terminated:
            self.h3.send_data(session_id, data, end_stream=True)
            # and asks the client to stop sending on it, should it not end its side itself
            # (the stream would keep one of the client's streams_max until then)
            with contextlib.suppress(Exception):
                self.quic.stop_stream(session_id, H3_NO_ERROR)
            self.transmit_soon()

    def transmit_soon(self) -> None:
        if not self.terminated:
            self._transmit_soon()

    def peer_address(self) -> Any:
        paths = self.quic._network_paths
        return paths[0].addr if paths else None

    def session_ended(self, session: WtSession) -> None:
        self.sessions.pop(session.session_id, None)
        self.server.sessions.discard(session)
        self.server.messages_received += session.messages_received
        self.server.messages_sent += session.messages_sent


def _error_body(status: int, message: str | None = None) -> bytes:
    import msgspec

    phrase = http.HTTPStatus(status).phrase
    return msgspec.json.encode(
        {"code": phrase.lower().replace(" ", "_"), "message": message or phrase}
    )


HOP_BY_HOP: Final = frozenset({b"connection", b"transfer-encoding", b"keep-alive"})


class _H3Codec(h11.Connection):
    """What an event stream (``web_sse``) asks of h11, on an HTTP/3 request stream: each
    response event is sent as HTTP/3 frames at once (and no bytes are returned to write)."""

    def __init__(self, proto: H3Protocol, stream_id: int) -> None:
        super().__init__(h11.SERVER)
        self.proto = proto
        self.stream_id = stream_id
        self.ended = False

    def send(self, event: Any) -> Any:  # (h11 overloads it: bytes, or None)
        proto, sid = self.proto, self.stream_id
        if self.ended or proto.terminated:
            return b""
        if isinstance(event, h11.Response):
            head = [(b":status", str(event.status_code).encode()), (b"server", b"ctxstore")]
            head += [(n, v) for n, v in event.headers if n not in HOP_BY_HOP]
            proto.h3.send_headers(sid, head)
        elif isinstance(event, h11.Data):
            proto.h3.send_data(sid, bytes(event.data), end_stream=False)
        elif isinstance(event, h11.EndOfMessage):
            self.ended = True
            proto.h3.send_data(sid, b"", end_stream=True)
        proto.transmit_soon()
        return b""


class _H3StreamTransport(asyncio.Transport):
    """An HTTP/3 request stream as the transport of an event stream (``web_sse.EventStream``):
    its write buffer is the stream's unacknowledged bytes (the protocol's writer pauses over
    the high-water mark), closing it ends the stream, aborting it resets it."""

    def __init__(self, proto: H3Protocol, stream_id: int, codec: _H3Codec) -> None:
        super().__init__()
        self.proto = proto
        self.stream_id = stream_id
        self.codec = codec
        self.protocol: asyncio.BaseProtocol | None = None
        self.high = 1024 * 1024
        self.low = self.high // 4
        self.paused = False
        self.closing = False
        self.gone = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass  # (the codec sent it)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.codec.send(h11.EndOfMessage())
        asyncio.get_running_loop().call_soon(self.lost)

    def abort(self) -> None:
        if not self.gone and not self.proto.terminated:
            with contextlib.suppress(Exception):
                self.proto.quic.reset_stream(self.stream_id, H3_REQUEST_CANCELLED)
            self.proto.transmit_soon()
        self.closing = True
        self.lost()

    def get_write_buffer_size(self) -> int:
        stream = self.proto.quic._streams.get(self.stream_id)
        return 0 if stream is None else len(stream.sender._buffer)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = 64 * 1024 if high is None else high
        self.low = self.high // 4 if low is None else low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.low, self.high

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.proto.peer_address() if name == "peername" else default

    def pause_reading(self) -> None:
        pass  # nothing is read after the request

    def resume_reading(self) -> None:
        pass

    def check_flow(self) -> None:
        if self.gone or not isinstance(self.protocol, asyncio.Protocol):
            return
        size = self.get_write_buffer_size()
        if not self.paused and size > self.high:
            self.paused = True
            self.protocol.pause_writing()
        elif self.paused and size <= self.low:
            self.paused = False
            self.protocol.resume_writing()

    def lost(self) -> None:
        """The stream is over (ended, reset, or the connection gone): the protocol learns it."""
        if self.gone:
            return
        self.gone = True
        self.proto.event_streams.pop(self.stream_id, None)
        if self.protocol is not None:
            self.protocol.connection_lost(None)


class H3Exchange:
    """One HTTP/3 request as the API's ``HttpHost``: its answer is the stream's response, or
    (an event stream) the stream is handed over (``detach``)."""

    def __init__(self, proto: H3Protocol, stream_id: int) -> None:
        self.proto = proto
        self.stream_id = stream_id
        self.h11: h11.Connection = _H3Codec(proto, stream_id)
        self.on_lost: Any = None
        self.head = False
        self.done = False

    def answer(
        self, status: int, ctype: str, body: bytes, headers: list[tuple[str, str]], close: bool
    ) -> None:
        if self.done:
            return
        self.done = True
        self.proto.exchanges.pop(self.stream_id, None)
        if self.proto.terminated:
            return
        head = [
            (b":status", str(status).encode()),
            (b"server", SERVER_NAME.encode()),
            (b"content-type", ctype.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            *((n.lower().encode(), v.encode()) for n, v in headers),
        ]
        h3 = self.proto.h3
        h3.send_headers(self.stream_id, head, end_stream=self.head)
        if not self.head:
            h3.send_data(self.stream_id, body, end_stream=True)
        self.proto.transmit_soon()

    def detach(self) -> tuple[Any, bytes]:
        """Hand the stream over to an event stream (``web_sse``)."""
        self.done = True
        self.on_lost = None
        self.proto.exchanges.pop(self.stream_id, None)
        codec = self.h11
        assert isinstance(codec, _H3Codec)
        transport = _H3StreamTransport(self.proto, self.stream_id, codec)
        self.proto.event_streams[self.stream_id] = transport
        return transport, b""

    def extra_info(self, name: str) -> Any:
        return self.proto.peer_address() if name == "peername" else None

    def lost(self) -> None:
        self.done = True
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()


async def serve_h3(
    ops: OpsServer,
    api: HttpApi,
    clients: Server,
    host: str,
    port: int,
    cert: str,
    key: str,
    limits: H3Limits | None = None,
) -> H3Server:
    """Listen on UDP ``host:port`` (0: any free port, see ``H3Server.address``)."""
    limits = limits or H3Limits()
    server = H3Server(ops, api, clients, limits)
    config = configuration(cert, key, limits)

    def create_protocol(quic: QuicConnection, stream_handler: Any = None) -> H3Protocol:
        return H3Protocol(quic, stream_handler, server=server)

    server.quic = await serve(
        host, port, configuration=config, create_protocol=create_protocol, retry=limits.retry
    )
    server.certificate = config.certificate
    return server


class H3Collector(Collector):
    """The HTTP/3 listener's metrics (registered with the node's ``NodeMetrics``)."""

    def __init__(self, server: H3Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        s = self.server
        yield GaugeMetricFamily(
            "ctxstore_quic_connections", "Open QUIC connections (HTTP/3).",
            value=len(s.connections),
        )  # fmt: skip
        yield CounterMetricFamily(
            "ctxstore_quic_connections_total", "QUIC connections accepted.",
            value=s.connections_total,
        )  # fmt: skip
        yield CounterMetricFamily(
            "ctxstore_quic_connections_refused_total",
            "QUIC connections refused (over h3_connections_max).", value=s.refused,
        )  # fmt: skip
        streams = CounterMetricFamily(
            "ctxstore_quic_streams_total", "QUIC streams by who opened them.",
            labels=["opener"],
        )  # fmt: skip
        streams.add_metric(["client"], s.streams)
        streams.add_metric(["server"], s.streams_opened)
        yield streams
        yield CounterMetricFamily(
            "ctxstore_quic_packets_lost_total",
            "Packets the server's QUIC loss detection declared lost (then resent).",
            value=s.packets_lost,
        )  # fmt: skip
        yield CounterMetricFamily(
            "ctxstore_h3_requests_total", "HTTP/3 requests (not WebTransport sessions).",
            value=s.requests,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "ctxstore_wt_sessions", "Open WebTransport sessions.", value=len(s.sessions)
        )
        yield CounterMetricFamily(
            "ctxstore_wt_sessions_total", "WebTransport sessions accepted.",
            value=s.sessions_total,
        )  # fmt: skip
        closes = CounterMetricFamily(
            "ctxstore_wt_closes_total", "WebTransport sessions closed by the server, by code.",
            labels=["code"],
        )  # fmt: skip
        for code, n in sorted(s.session_closes.items()):
            closes.add_metric([str(code)], n)
        yield closes


__all__ = [
    "H3Collector",
    "H3Exchange",
    "H3Limits",
    "H3Protocol",
    "H3Server",
    "attach_h3",
    "serve_h3",
]


async def attach_h3(
    ops: OpsServer,
    clients: Server,
    host: str,
    port: int,
    cert: str,
    key: str,
    limits: H3Limits | None = None,
) -> H3Server:
    """Serve ``ops``'s routes over HTTP/3 on UDP ``host:port`` too: its metrics, its Alt-Svc,
    closed with it.  A certificate or key that cannot be loaded is a ``ValueError`` naming it."""
    from .ops import NodeSource

    assert ops.api is not None, "the HTTP port serves no API (no client server)"
    for what, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ValueError(f"{what} {path}: {e.strerror}") from None
    try:
        configuration(cert, key, limits or H3Limits())
    except Exception as e:  # not PEM, not a key, a key that does not fit
        raise ValueError(f"tls_cert {cert} / tls_key {key}: cannot load: {e}") from None
    server = await serve_h3(ops, ops.api, clients, host, port, cert, key, limits)
    ops.h3 = server
    ops.alt_svc = f'h3=":{server.address[1]}"; ma=86400'
    assert server.certificate is not None
    ops.api.webtransport = WebTransportAdvert(server.address[1], WT_PATH, server.certificate)
    if isinstance(ops.source, NodeSource):
        ops.source.metrics.registry.register(H3Collector(server))
    previous = ops.on_close

    def on_close() -> None:
        server.close()
        previous()

    ops.on_close = on_close
    return server
