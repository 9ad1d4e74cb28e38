"""The ops HTTP port (design §4.2 last sentence, §6): health checks and Prometheus metrics.

    GET /health/live   200 {"status": "live", "node": N} while the event loop runs
    GET /health/ready  200 {"status": "ready", ...} once every local group has a known leader,
                       503 {"status": "not_ready", ...} before (and after a fatal WAL error)
    GET /metrics       the Prometheus text format (``metrics.NodeMetrics``)
    GET /v1/ws         the WebSocket protocol (``web.WebGateway``; docs/web.md)
    GET /, /static/*   the demo page and the browser client (``ctxstore.static``)
    /v1/...            the HTTP/JSON API and its event streams (``web_http.HttpApi``)
    GET /admin/postgres, POST /admin/postgres/backfill   with postgres_dsn (``pg/admin.py``)
    GET /admin/nodes, POST /admin/nodes/...   the cluster view and its changes, the POSTs
                       signed with the cluster's secret (``cluster_admin.py``)

HTTP/1.1 is h11's (sans-IO); ``OpsConnection`` is the thin asyncio protocol that owns the socket.
Rules of this module:
- GET and HEAD only (405 with ``Allow`` otherwise), except the paths of ``OpsServer.posts``
  and ``OpsServer.actions`` (POST only, no body, answered at once; an action gets the request
  target, its parameters in the query); unknown paths 404; no request bodies (413).
- ``OpsServer.handovers`` routes a path to a handler that takes the request and may take the
  connection over (``OpsConnection.detach``): the WebSocket upgrade; GET only.
  A request that declares a body is answered, then the connection closes.
- ``OpsServer.api`` takes every other ``/v1/`` request, any method, once its body is read (at
  most ``api.body_bytes_max``: a larger one is answered 413 and the connection closes); it
  answers with ``answer`` (at once or later: nothing else is parsed meanwhile) or detaches.
- Malformed input is answered 400 (431: a request head over ``header_bytes_max``), then the
  connection closes.  Nothing a client sends raises out of this module.
- Keep-alive and pipelining: requests are answered in order as they are parsed (answers are
  computed at once, on the loop: no task per request).  While the transport's write buffer is
  above ``write_buffer_high_bytes`` the connection stops parsing and reading.
- Bounded: at most ``connections_max`` connections, and one that completes no request within
  ``idle_timeout_s`` is closed.  A new connection always gets in: when all are taken, the one
  that has been quiet the longest (no request completed, or none since it opened; not one
  waiting for the API's answer, unless all are) is closed for it, so idle or stalled
  connections cannot keep a health check out (evictions are logged once per 10 s with a
  count).
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import h11
import msgspec
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from wire.aio import Server
from wire.flow import CountedLog

from . import cluster_admin
from .metrics import NodeMetrics, leader_counts
from .node import Node
from .server import Service
from .static import assets
from .web import PATH as WEB_SOCKET_PATH
from .web import WebCollector, WebGateway, WebLimits
from .web_http import PREFIX as API_PREFIX
from .web_http import HttpApi, HttpApiCollector

if TYPE_CHECKING:
    from .web_h3 import H3Server

logger = logging.getLogger(__name__)

JSON = "application/json"
Answer = tuple[int, str, bytes]  # status, content type, body
Handover = Callable[["OpsConnection", h11.Request], None]
"""Takes a request (answering it with ``respond``, or the socket with ``detach``)."""


@dataclass(frozen=True)
class OpsLimits:
    header_bytes_max: int = 16 * 1024  # request line + headers
    connections_max: int = 64
    idle_timeout_s: float = 30.0  # per connection, between the requests it completes
    write_buffer_high_bytes: int = 1024 * 1024


@dataclass(frozen=True)
class Readiness:
    groups: int
    groups_without_leader: int
    running: bool = True  # the node started and did not fail

    @property
    def ready(self) -> bool:
        return self.running and self.groups_without_leader == 0


class OpsSource(Protocol):
    """What the ops port reads: a ``NodeSource`` in a node, a fake in tests."""

    @property
    def node_id(self) -> int: ...

    def readiness(self) -> Readiness: ...

    def render_metrics(self) -> bytes: ...


class NodeSource:
    """A node, its service and its metrics as an ``OpsSource``."""

    def __init__(self, node: Node, service: Service, clients: Server | None = None) -> None:
        self.node = node
        self.metrics = NodeMetrics(node, service, clients)

    @property
    def node_id(self) -> int:
        return self.node.settings.node_id

    def readiness(self) -> Readiness:
        failed = self.node.failed
        groups, _, unknown = leader_counts(self.node)
        return Readiness(groups, unknown, running=failed is not None and not failed.done())

    def render_metrics(self) -> bytes:
        return self.metrics.render()


class OpsServer:
    """The listening socket and its connections (returned by ``serve_ops``)."""

    def __init__(self, source: OpsSource, limits: OpsLimits) -> None:
        self.source = source
        self.limits = limits
        self.connections: set[OpsConnection] = set()
        self.evicted = CountedLog(logger, logging.WARNING)  # quietest closed for a new one
        self.requests = 0
        self.bad_requests = 0  # malformed or oversized: answered 400/431, closed
        self.on_close: Callable[[], None] = lambda: None
        self.routes: dict[bytes, Callable[[], Answer]] = {
            b"/health/live": self._live,
            b"/health/ready": self._ready,
            b"/metrics": self._metrics,
        }
        self.handovers: dict[bytes, Handover] = {}
        self.posts: dict[bytes, Callable[[], Answer]] = {}  # operator actions (POST, no body)
        self.actions: dict[bytes, Callable[[bytes], Answer]] = {}  # the same, with a query
        self.gateway: WebGateway | None = None  # the WebSockets, if served
        self.api: HttpApi | None = None  # the HTTP/JSON API under /v1, if served
        self.alt_svc: str | None = None  # the Alt-Svc of every answer (the HTTP/3 listener)
        self.h3: H3Server | None = None  # the HTTP/3 listener, if any (web_h3.attach_h3)
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "not listening"
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    def close(self) -> None:
        """Stop listening and close every connection (what was answered is still written)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        self.on_close()
        self.on_close = lambda: None

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()

    def answer(
        self, target: bytes, routes: dict[bytes, Callable[[], Answer]] | None = None
    ) -> Answer:
        path = target.split(b"?", 1)[0]
        route = (self.routes if routes is None else routes).get(path)
        if route is None:
            return _error(404)
        try:
            return route()
        except Exception:
            logger.exception("ops: %s failed", path.decode("ascii", "replace"))
            return _error(500)

    def act(self, action: Callable[[bytes], Answer], target: bytes) -> Answer:
        try:
            return action(target)
        except Exception:
            logger.exception("ops: %s failed", target.split(b"?", 1)[0].decode("ascii", "replace"))
            return _error(500)

    def _live(self) -> Answer:
        return 200, JSON, msgspec.json.encode({"status": "live", "node": self.source.node_id})

    def _ready(self) -> Answer:
        r = self.source.readiness()
        body = {
            "status": "ready" if r.ready else "not_ready",
            "groups": r.groups,
            "groups_without_leader": r.groups_without_leader,
            "node": self.source.node_id,
        }
        return (200 if r.ready else 503), JSON, msgspec.json.encode(body)

    def _metrics(self) -> Answer:
        return 200, CONTENT_TYPE_PLAIN_0_0_4, self.source.render_metrics()


def _error(status: int) -> Answer:
    phrase = http.HTTPStatus(status).phrase
    return status, JSON, msgspec.json.encode({"error": phrase.lower(), "status": status})


def _fixed(answer: Answer) -> Callable[[], Answer]:
    return lambda: answer


class OpsConnection(asyncio.Protocol):
    def __init__(self, server: OpsServer) -> None:
        self.server = server
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=server.limits.header_bytes_max
        )
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._idle: asyncio.TimerHandle | None = None
        self.active_s = self._loop.time()  # when it opened or last completed a request
        self._write_paused = False
        self._closing = False
        self._api_request: h11.Request | None = None  # an API request whose body is read
        self._body = bytearray()
        self._awaiting = False  # the API answers the request later: parse nothing meanwhile
        self._api_head = False  # the request answered is a HEAD (its answer has no body)
        self._processing = False
        self.on_lost: Callable[[], None] | None = None  # the API's, while it answers

    # asyncio.Protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = t = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        server = self.server
        limits = server.limits
        if len(server.connections) >= limits.connections_max:
            # (one waiting for the API's answer is not quiet: closing it would lose the answer)
            quietest = min(server.connections, key=lambda c: (c._awaiting, c.active_s))
            server.connections.discard(quietest)
            server.evicted.note(
                f"ops: {limits.connections_max} connections open; closing the quietest"
            )
            quietest.abort()
        server.connections.add(self)
        high = limits.write_buffer_high_bytes
        t.set_write_buffer_limits(high=high, low=high // 4)
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self.h11.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        if not self._closing:
            self.h11.receive_data(b"")
            self._process()
        return True  # answer what was parsed; _process closes on ConnectionClosed

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._transport is not None and not self._closing:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()
            self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._idle is not None:
            self._idle.cancel()
        self.server.connections.discard(self)
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()

    def close(self) -> None:
        """Close once what was answered is written (within ``idle_timeout_s``)."""
        if self._closing:
            return
        self._closing = True
        if self._transport is not None:
            self._transport.close()
            self._arm_idle()  # a client that does not read the rest is cut off then

    # the protocol ------------------------------------------------------------------------------
    def _process(self) -> None:
        """Answer every complete request that is buffered, in order, up to the write bound.
        (Each turn consumes buffered bytes or returns: the loop ends with the buffer.)"""
        if self._processing:
            return
        self._processing = True
        try:
            self._process_events()
        finally:
            self._processing = False

    def _process_events(self) -> None:
        while not self._closing and not self._write_paused and not self._awaiting:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                self._bad_request(e.error_status_hint)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._request(event)
            elif isinstance(event, h11.Data):
                self._api_data(event.data)  # (only an API request's body comes)
            elif isinstance(event, h11.EndOfMessage):
                if self._api_request is not None:
                    self._api_call()
                else:
                    self._next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                self.close()

    def _request(self, request: h11.Request) -> None:
        self.server.requests += 1
        method = request.method
        has_body = any(
            (name == b"content-length" and value.strip() != b"0") or name == b"transfer-encoding"
            for name, value in request.headers
        )
        head_bytes = len(request.target) + sum(len(n) + len(v) + 4 for n, v in request.headers)
        if head_bytes > self.server.limits.header_bytes_max:  # h11 bounds only a partial head
            self._bad_request(431)
            return
        path = request.target.split(b"?", 1)[0]
        handover = self.server.handovers.get(path)
        api = self.server.api
        if handover is None and api is not None and path.startswith(API_PREFIX):
            self._api_begin(api, request)
            return
        if handover is not None and method == b"GET" and not has_body:
            handover(self, request)
            return
        action = self.server.actions.get(path)
        if action is not None and method == b"POST" and not has_body:
            status, ctype, body = self.server.act(action, request.target)
            self._respond(status, ctype, body, head=False, close=False, extra=[])
            return
        post = path in self.server.posts or action is not None
        if post and method == b"POST" and not has_body:
            status, ctype, body = self.server.answer(request.target, self.server.posts)
            self._respond(status, ctype, body, head=False, close=False, extra=[])
            return
        if post or method not in (b"GET", b"HEAD") or (handover is not None and method == b"HEAD"):
            status, ctype, body = _error(405)
        elif has_body:
            status, ctype, body = _error(413)
        else:
            status, ctype, body = self.server.answer(request.target)
        allow = "POST" if post else "GET" if handover is not None else "GET, HEAD"
        headers = [("allow", allow)] if status == 405 else []
        self._respond(status, ctype, body, head=method == b"HEAD", close=has_body, extra=headers)

    # the API (``web_http.HttpHost``) -----------------------------------------------------------
    def _api_begin(self, api: HttpApi, request: h11.Request) -> None:
        declared = next((v for n, v in request.headers if n == b"content-length"), b"0")
        if int(declared) > api.body_bytes_max:  # (h11 checked it is a number)
            self._api_too_large(api, request)
            return
        self._api_request = request
        self._body = bytearray()

    def _api_data(self, data: bytes) -> None:
        api, request = self.server.api, self._api_request
        if api is None or request is None:
            return
        if len(self._body) + len(data) > api.body_bytes_max:
            self._api_request = None
            self._api_too_large(api, request)
            return
        self._body += data

    def _api_too_large(self, api: HttpApi, request: h11.Request) -> None:
        message = f"a request body of more than {api.body_bytes_max} bytes"
        api.reply_error(self, request, "too_large", message, close=True, limit=api.body_bytes_max)

    def _api_call(self) -> None:
        api, request = self.server.api, self._api_request
        assert api is not None and request is not None
        body, self._api_request, self._body = bytes(self._body), None, bytearray()
        self._awaiting = True
        self._api_head = request.method == b"HEAD"
        if self._idle is not None:  # the API answers within the request deadline
            self._idle.cancel()
            self._idle = None
        api.handle(self, request, body)

    def answer(
        self, status: int, ctype: str, body: bytes, headers: list[tuple[str, str]], close: bool
    ) -> None:
        """Answer the API's request (now or later), then go on with the next."""
        if self._closing:
            return
        self._awaiting = False
        self._respond(status, ctype, body, head=self._api_head, close=close, extra=headers)
        self._api_head = False
        if self._api_request is None and self.h11.their_state is h11.DONE:
            self._next_cycle()
        self._process()

    def extra_info(self, name: str) -> Any:
        return None if self._transport is None else self._transport.get_extra_info(name)

    def respond(self, status: int, body: dict[str, Any], headers: list[tuple[str, str]]) -> None:
        """Answer a handed-over request with a JSON body, then close."""
        self._respond(status, JSON, msgspec.json.encode(body), close=True, extra=headers)

    def detach(self) -> tuple[asyncio.Transport, bytes]:
        """Give up the socket (to a handover): its transport and the bytes received after the
        request.  This connection is then forgotten."""
        assert self._transport is not None
        self._closing = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self.server.connections.discard(self)
        transport, self._transport = self._transport, None
        return transport, bytes(self.h11.trailing_data[0])

    def _next_cycle(self) -> None:
        if self.h11.our_state is h11.MUST_CLOSE:
            self.close()
        elif self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
            self._arm_idle()

    def _bad_request(self, status: int) -> None:
        self.server.bad_requests += 1
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            code, ctype, body = _error(status if status in (400, 431) else 400)
            self._respond(code, ctype, body, close=True)
        self.close()

    def _respond(
        self,
        status: int,
        ctype: str,
        body: bytes,
        *,
        head: bool = False,
        close: bool = False,
        extra: list[tuple[str, str]] | None = None,
    ) -> None:
        headers = [
            ("content-type", ctype),
            ("content-length", str(len(body))),
            ("cache-control", "no-store"),
            *(extra or []),
        ]
        if close:
            headers.append(("connection", "close"))
        if self.server.alt_svc is not None:
            headers.append(("alt-svc", self.server.alt_svc))
        reason = http.HTTPStatus(status).phrase.encode()
        try:
            out = [self.h11.send(h11.Response(status_code=status, headers=headers, reason=reason))]
            if not head:
                out.append(self.h11.send(h11.Data(data=body)))
            out.append(self.h11.send(h11.EndOfMessage()))
        except h11.LocalProtocolError as e:  # e.g. a request line h11 accepts but cannot answer
            logger.debug("ops: cannot answer: %s", e)
            self.close()
            return
        assert self._transport is not None
        self._transport.write(b"".join(chunk for chunk in out if chunk))
        if self.h11.our_state is h11.MUST_CLOSE:
            self.close()

    def abort(self) -> None:
        """Close at once, whatever is unwritten (to make room for a new connection)."""
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _arm_idle(self) -> None:
        self.active_s = self._loop.time()
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self._loop.call_later(self.server.limits.idle_timeout_s, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self._idle = None
        assert self._transport is not None
        if self._closing or self._transport.get_write_buffer_size() > 0:
            self._closing = True
            self._transport.abort()  # a client that does not read its answers
        else:
            self.close()


async def serve_source(
    source: OpsSource, host: str, port: int, limits: OpsLimits | None = None
) -> OpsServer:
    """Listen on ``host:port`` (port 0: any free port, see ``OpsServer.address``)."""
    server = OpsServer(source, limits or OpsLimits())
    loop = asyncio.get_running_loop()
    server._server = await loop.create_server(lambda: OpsConnection(server), host, port)
    return server


async def serve_ops(
    node: Node,
    service: Service,
    host: str,
    port: int,
    *,
    clients: Server | None = None,
    limits: OpsLimits | None = None,
    web_limits: WebLimits | None = None,
    cors_origins: Sequence[str] = (),
) -> OpsServer:
    """The ops port of a started node: ``clients`` is the client server (for its connection
    count, and the connections of the WebSockets at ``/v1/ws``, served only with it).
    Installs the metrics' hot-path hooks until the ops server closes."""
    source = NodeSource(node, service, clients)
    server = await serve_source(source, host, port, limits)
    cluster_admin.install(server, node)
    if node.postgres is not None:
        from .pg.admin import install

        install(server, node)
    source.metrics.attach()
    if clients is None:
        server.on_close = source.metrics.detach
        return server
    gateway = WebGateway(clients, web_limits)
    server.handovers[WEB_SOCKET_PATH] = gateway.upgrade
    for path, (ctype, body) in assets().items():  # the demo page and ctxstore.js
        server.routes[path] = _fixed((200, ctype, body))
    server.api = HttpApi(clients, cors_origins)
    source.metrics.registry.register(WebCollector(gateway))
    source.metrics.registry.register(HttpApiCollector(server.api))
    server.gateway = gateway

    def on_close() -> None:
        gateway.close()
        source.metrics.detach()

    server.on_close = on_close
    return server
