"""The HTTP/JSON API under ``/v1`` on the node's HTTP port (docs/web.md §7).

    POST /v1/sessions                       create_session    GET /v1/sessions/{id}  get_session
    GET  /v1/users/{id}/sessions            list_sessions     POST .../{id}/read     mark_read
    POST /v1/sessions/{id}/messages         append            GET .../{id}/messages  read
    GET  /v1/sessions/{id}/events           subscribe (SSE)   GET /v1/openapi.json
    GET  /v1/users/{id}/inbox/events        subscribe_inbox (SSE)
    GET  /v1/transports                     this node's WebSocket and WebTransport (no token)
    POST /v1/agents                         create_agent      GET /v1/agents         list_agents
    POST /v1/agents/update                  update_agent      GET /v1/agents/{id}    get_agent
    POST /v1/agents/{id}/disable            disable_agent

The HTTP port (``ctxstore.ops``, h11) hands every other ``/v1/`` request, its body read (at
most ``body_bytes_max``, the native frame limit), to ``HttpApi.handle``.  A request becomes
one native request, served by the client port's ``Service`` through a native connection of its
own (``wire.aio.Connection``, like a WebSocket's, ``ctxstore.web``): its Hello carries the
``Authorization: Bearer`` token, and it counts against the client connection bounds while the
request is in flight.  So the checks, the answers and the error codes are the native ones.

Rules of this module:
- The JSON shapes are derived from the native Structs (``wire.protocol``), as the WebSocket's
  (``wire.web_codec.json_twin``): a request body holds the request's fields but the ``rid`` and the
  path's ids (fields that may be null may be left out); a query holds the named fields (with
  the documented defaults); an answer is the response's fields but the ``rid``.  A body is
  decoded with its twin, then the native core validates the native request again (ids in the
  path, metadata limits), answering ``bad_request`` naming the field.
- An error is the native ``Error`` without its ``rid`` (``{"code", "message", "retryable",
  "details"}``) with the status of ``STATUS`` (503 and 429 with ``Retry-After``).
- Server-Sent Events (``web_sse``) take the socket over from the HTTP port, as the WebSocket
  upgrade does.
- CORS: an ``Origin`` of ``cors_origins`` (``*``: any) gets ``Access-Control-Allow-Origin``
  and a preflight ``OPTIONS`` is answered 204; no other origin gets CORS headers (a preflight
  from one is answered 403).
"""

from __future__ import annotations

import logging
import re
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, Union, get_args, get_origin
from urllib.parse import parse_qsl, unquote, urlencode

import h11
import msgspec
import msgspec.msgpack
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from wire.aio import Connection, Server
from wire.protocol import (
    PROTOCOL_VERSION,
    AgentInfo,
    AgentList,
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
    GetSession,
    InboxSnapshot,
    ListAgents,
    ListSessions,
    MarkRead,
    Messages,
    Push,
    Read,
    ReadMarked,
    Response,
    SessionInfo,
    SessionList,
    SetContextConfig,
    Subscribe,
    Subscribed,
    SubscribeInbox,
    UpdateAgent,
    Welcome,
    error,
)
from wire.web_codec import bodies, encode_json, frame_of_items, twin_type

from .web_pipe import Pipe
from .web_transports import PATH as TRANSPORTS_PATH
from .web_transports import WebTransportAdvert, transports

logger = logging.getLogger(__name__)

PREFIX: Final = b"/v1/"
STATUS: Final[dict[str, int]] = {
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "rate_limited": 429,
    "internal": 500,
    "unavailable": 503,
    "timeout": 504,
}
"""The HTTP status of each error code."""
RETRY_AFTER_S: Final = 1  # the Retry-After of a 503 or 429
CLIENT_NAME: Final = "http"
HELLO_RID: Final = 1
RID: Final = 2  # the rid of the one request of an exchange
CORS_ALLOW_HEADERS: Final = "authorization, content-type, last-event-id"
CORS_MAX_AGE_S: Final = 600

_server_message_decoder: Final = msgspec.msgpack.Decoder(Response | Push)
_PUSHES: Final = get_args(Push)


# -- the shapes --------------------------------------------------------------------------------
def _optional(tp: Any) -> bool:
    origin = get_origin(tp)
    return (origin is Union or origin is types.UnionType) and type(None) in get_args(tp)


def http_twin(
    cls: type[Any],
    drop: Sequence[str],
    name: str,
    *,
    defaults: dict[str, Any] | None = None,
    omissible: bool = False,
) -> type[msgspec.Struct]:
    """A JSON object Struct of the fields of ``cls`` but ``drop``, with their types and limits
    (``wire.web_codec.twin_type``); with ``omissible``, a field that may be null may be left out;
    ``defaults``: the documented defaults of query parameters."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields: list[Any] = []
    for n in cls.__struct_fields__:
        if n in drop:
            continue
        tp = twin_type(hints[n])
        if defaults is not None and n in defaults:
            fields.append((n, tp, defaults[n]))
        elif omissible and _optional(tp):
            fields.append((n, tp, None))
        else:
            fields.append((n, tp))
    return msgspec.defstruct(
        name, fields, kw_only=True, forbid_unknown_fields=omissible or defaults is not None,
        module=__name__,
    )  # fmt: skip


_answer_twins: dict[type[Any], type[msgspec.Struct]] = {}


def answer_twin(cls: type[Any]) -> type[msgspec.Struct]:
    """The JSON body of a native response or push: its fields but the ``rid``/``sub_id``."""
    twin = _answer_twins.get(cls)
    if twin is None:
        twin = http_twin(cls, ("rid", "sub_id"), f"{cls.__name__}Answer")
        _answer_twins[cls] = twin
    return twin


def answer_json(message: Response | Push) -> bytes:
    """The JSON body of a native response or push."""
    return encode_json(msgspec.convert(message, answer_twin(type(message)), from_attributes=True))


# -- the routes --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Route:
    method: bytes
    pattern: str  # "/v1/sessions/{session_id}": each {name} is one path segment, a field
    request: type[Any]  # the native request it becomes
    answer: type[Any]  # the native response of a success (of a stream: its first event)
    summary: str
    body: type[msgspec.Struct] | None = None  # its JSON body (POST)
    query: type[msgspec.Struct] | None = None  # its query parameters (GET)
    stream: bool = False  # answered with Server-Sent Events (web_sse)
    regex: re.Pattern[str] = field(init=False)
    params: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        params = tuple(re.findall(r"{(\w+)}", self.pattern))
        regex = re.compile("^" + re.sub(r"{\w+}", "([^/]+)", self.pattern) + "$")
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "regex", regex)


def _body(cls: type[Any], path: Sequence[str]) -> type[msgspec.Struct]:
    return http_twin(cls, ("rid", *path), f"{cls.__name__}Body", omissible=True)


def _query(cls: type[Any], name: str, keep: Sequence[str], **defaults: Any) -> type[msgspec.Struct]:
    drop = [n for n in cls.__struct_fields__ if n not in keep]
    return http_twin(cls, drop, name, defaults=defaults)


def _routes() -> list[Route]:
    sid = ("session_id",)
    return [
        Route(b"POST", "/v1/sessions", CreateSession, SessionInfo,
              "Create a session (or get it again)", body=_body(CreateSession, ())),
        Route(b"GET", "/v1/sessions/{session_id}", GetSession, SessionInfo, "Get a session"),
        Route(b"GET", "/v1/users/{user_id}/sessions", ListSessions, SessionList,
              "List a user's sessions, ordered by id",
              query=_query(ListSessions, "ListSessionsQuery", ("cursor", "limit"), cursor=None,
                           limit=100)),
        Route(b"POST", "/v1/sessions/{session_id}/messages", Append, Appended,
              "Append a message", body=_body(Append, sid)),
        Route(b"GET", "/v1/sessions/{session_id}/messages", Read, Messages,
              "Read a page of messages after a seq",
              query=_query(Read, "ReadQuery", ("after_seq", "limit"), after_seq=0, limit=100)),
        Route(b"POST", "/v1/sessions/{session_id}/read", MarkRead, ReadMarked,
              "Move a user's read cursor forward", body=_body(MarkRead, sid)),
        Route(b"GET", "/v1/sessions/{session_id}/events", Subscribe, Subscribed,
              "Follow a session: Server-Sent Events", stream=True,
              query=_query(Subscribe, "EventsQuery",
                           ("after_seq", "context_events", "stream_chunks"),
                           after_seq=0, context_events=False, stream_chunks=False)),
        Route(b"GET", "/v1/sessions/{session_id}/context", GetContext, Context,
              "Get the session's context window"),
        Route(b"POST", "/v1/sessions/{session_id}/context/config", SetContextConfig,
              ContextChanged, "Configure the session's context window",
              body=_body(SetContextConfig, sid)),
        Route(b"POST", "/v1/sessions/{session_id}/context/compact", Compact, ContextChanged,
              "Replace a range of the context window", body=_body(Compact, sid)),
        Route(b"GET", "/v1/users/{user_id}/inbox/events", SubscribeInbox, InboxSnapshot,
              "Follow a user's inbox: Server-Sent Events", stream=True),
        # agents (docs/agents.md)
        Route(b"POST", "/v1/agents", CreateAgent, AgentInfo, "Register an agent",
              body=_body(CreateAgent, ())),
        Route(b"POST", "/v1/agents/update", UpdateAgent, AgentInfo,
              "Replace a registered agent's fields", body=_body(UpdateAgent, ())),
        Route(b"GET", "/v1/agents", ListAgents, AgentList, "List the agents, ordered by id",
              query=_query(ListAgents, "ListAgentsQuery", ("cursor", "limit"), cursor=None,
                           limit=100)),
        Route(b"GET", "/v1/agents/{agent_id}", GetAgent, AgentInfo, "Get an agent"),
        Route(b"POST", "/v1/agents/{agent_id}/disable", DisableAgent, AgentInfo,
              "Stop calling an agent", body=_body(DisableAgent, ("agent_id",))),
    ]  # fmt: skip


# -- the HTTP connection -------------------------------------------------------------------------
class HttpHost(Protocol):
    """What the API needs of the HTTP connection (``ops.OpsConnection``)."""

    h11: h11.Connection
    on_lost: Callable[[], None] | None

    def answer(
        self, status: int, ctype: str, body: bytes, headers: list[tuple[str, str]], close: bool
    ) -> None: ...

    def detach(self) -> tuple[Any, bytes]: ...

    def extra_info(self, name: str) -> Any: ...


def header(request: h11.Request, name: bytes) -> bytes | None:
    for n, v in request.headers:
        if n == name:
            return bytes(v)
    return None


class HttpApi:
    """The ``/v1`` routes of one HTTP port."""

    def __init__(self, clients: Server, cors_origins: Sequence[str] = ()) -> None:
        from .web_openapi import openapi_document
        from .web_sse import SseLimits

        self.clients = clients
        self.body_bytes_max = clients.max_frame_bytes
        self.cors_origins = frozenset(cors_origins)
        self.routes = _routes()
        self.sse_limits = SseLimits()
        self.streams: set[Any] = set()  # the open event streams (web_sse.EventStream)
        self.requests = 0
        self.errors: dict[int, int] = {}  # by status
        self.openapi = encode_json(openapi_document(self.routes))
        self.webtransport: WebTransportAdvert | None = None  # the HTTP/3 listener's (web_h3)

    # CORS ----------------------------------------------------------------------------------------
    def cors(self, request: h11.Request) -> list[tuple[str, str]]:
        """The CORS headers of an answer to ``request`` (none for an origin not allowed)."""
        origin = header(request, b"origin")
        if origin is None or not self.cors_origins:
            return []
        text = origin.decode("latin-1")
        if "*" not in self.cors_origins and text not in self.cors_origins:
            return []
        return [
            ("access-control-allow-origin", text),
            ("access-control-expose-headers", "retry-after"),
            ("vary", "origin"),
        ]

    # answers -------------------------------------------------------------------------------------
    def reply_error(
        self, http: HttpHost, request: h11.Request, code: str, message: str,
        *, status: int | None = None, close: bool = False, extra: Sequence[tuple[str, str]] = (),
        **details: Any,
    ) -> None:  # fmt: skip
        e = error(0, code, message, **details)  # type: ignore[arg-type]
        self._send_error(http, request, e, status, close, extra)

    def _send_error(
        self, http: HttpHost, request: h11.Request, e: Error, status: int | None = None,
        close: bool = False, extra: Sequence[tuple[str, str]] = (),
    ) -> None:  # fmt: skip
        status = status or STATUS.get(e.code, 500)
        self.errors[status] = self.errors.get(status, 0) + 1
        headers = [*self.cors(request), *extra]
        if status in (429, 503):
            headers.append(("retry-after", str(RETRY_AFTER_S)))
        if status == 401:
            headers.append(("www-authenticate", "Bearer"))
        http.answer(status, "application/json", answer_json(e), headers, close)

    def reply_message(self, http: HttpHost, request: h11.Request, message: Response) -> None:
        if isinstance(message, Error):
            self._send_error(http, request, message)
            return
        http.answer(200, "application/json", answer_json(message), self.cors(request), False)

    # requests ------------------------------------------------------------------------------------
    def handle(self, http: HttpHost, request: h11.Request, body: bytes) -> None:
        """Answer one ``/v1/`` request (its body read): now, later, or as an event stream."""
        self.requests += 1
        try:
            self._handle(http, request, body)
        except Exception:  # a bug: this request fails, the connection and the node go on
            logger.exception("HTTP API: %r failed", request.target.partition(b"?")[0])
            self.reply_error(http, request, "internal", "internal error", close=True)

    def _handle(self, http: HttpHost, request: h11.Request, body: bytes) -> None:
        target = bytes(request.target)
        raw_path, _, raw_query = target.partition(b"?")
        path = raw_path.decode("latin-1")
        if request.method == b"OPTIONS":
            self._preflight(http, request)
            return
        if raw_path == b"/v1/openapi.json" and request.method == b"GET":
            http.answer(200, "application/json", self.openapi, self.cors(request), False)
            return
        if raw_path == TRANSPORTS_PATH and request.method == b"GET":
            # public (web_transports): any origin may read it, it takes no token
            body = encode_json(transports(self.webtransport))
            anyone = [("access-control-allow-origin", "*")]
            http.answer(200, "application/json", body, anyone, False)
            return
        matched = [(r, m) for r in self.routes if (m := r.regex.match(path)) is not None]
        if not matched:
            self.reply_error(http, request, "not_found", f"no route {path}")
            return
        route_match = next(((r, m) for r, m in matched if r.method == request.method), None)
        if route_match is None:
            allow = ", ".join(sorted({r.method.decode() for r, _ in matched}))
            message = f"{request.method.decode('latin-1')} {path}: only {allow}"
            self.reply_error(
                http, request, "bad_request", message, status=405, extra=[("allow", allow)]
            )
            return
        route, m = route_match
        if body and route.body is None:
            self.reply_error(http, request, "bad_request", "this request takes no body")
            return
        try:
            token = bearer_token(request)
        except _BadAuthorization as e:
            self.reply_error(http, request, "unauthorized", str(e))
            return
        if route.stream and token is None:  # a browser's EventSource cannot set a header
            token, raw_query = query_token(raw_query)
        try:
            values = self._values(route, m, raw_query, body)
        except _BadInput as e:
            if e.field is None:
                self.reply_error(http, request, "bad_request", str(e))
            else:
                self.reply_error(http, request, "bad_request", str(e), field=e.field)
            return
        if route.stream:
            from .web_sse import start_stream

            start_stream(self, http, request, route, values, token)
            return
        items = native_items(route.request, values)
        Exchange(self, http, request, items, token)

    def _preflight(self, http: HttpHost, request: h11.Request) -> None:
        cors = self.cors(request)
        if not cors:
            message = "CORS: this origin is not allowed (--web-cors-origin)"
            self.reply_error(http, request, "forbidden", message)
            return
        cors += [
            ("access-control-allow-methods", "GET, POST, OPTIONS"),
            ("access-control-allow-headers", CORS_ALLOW_HEADERS),
            ("access-control-max-age", str(CORS_MAX_AGE_S)),
        ]
        http.answer(204, "text/plain", b"", cors, False)

    def _values(
        self, route: Route, m: re.Match[str], raw_query: bytes, body: bytes
    ) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, raw in zip(route.params, m.groups(), strict=True):
            try:
                values[name] = unquote(raw, errors="strict")
            except UnicodeDecodeError:
                raise _BadInput(f"{name}: not UTF-8 once percent-decoded") from None
        if route.query is not None:
            values.update(decode_query(route.query, raw_query))
        elif raw_query:
            raise _BadInput("this request takes no query parameters")
        if route.body is not None:
            try:
                obj = msgspec.json.decode(body, type=route.body)
            except (msgspec.DecodeError, RecursionError) as e:
                raise _BadInput(f"the body: {e}", field_of(str(e))) from None
            values.update(msgspec.structs.asdict(obj))
        return values


class _BadAuthorization(Exception):
    """An Authorization header that is not ``Bearer <token>`` (answered 401)."""


def bearer_token(request: h11.Request) -> str | None:
    """The request's Bearer token, None if it gives no Authorization header."""
    value = header(request, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _BadAuthorization("Authorization must be 'Bearer <token>'")
    return token.strip()


class _BadInput(Exception):
    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field  # the details.field of the answer


_AT_FIELD: Final = re.compile(r" - at `\$\.(\w+)")
_ROOT_FIELD: Final = re.compile(r"^Object (?:missing required|contains unknown) field `(\w+)`$")


def field_of(message: str) -> str | None:
    """The body's top-level field a msgspec error is about (as the native core names it:
    ``policy`` for ``$.policy.limit``), None if it names none."""
    m = _AT_FIELD.search(message) or _ROOT_FIELD.match(message)
    return None if m is None else m.group(1)


def query_token(raw: bytes) -> tuple[str | None, bytes]:
    """The ``token`` query parameter of an event stream (docs/auth.md), and the query without
    it; the query as it is when it has none (or cannot be parsed: ``decode_query`` says why)."""
    if b"token=" not in raw:
        return None, raw
    try:
        pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, max_num_fields=64)
    except ValueError:
        return None, raw
    tokens = [v for k, v in pairs if k == "token"]
    rest = urlencode([(k, v) for k, v in pairs if k != "token"]).encode("latin-1")
    return (tokens[-1] or None) if tokens else None, rest


def decode_query(query_type: type[msgspec.Struct], raw: bytes) -> dict[str, Any]:
    """The query parameters as ``query_type`` (strings converted), or ``_BadInput``."""
    try:
        pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, errors="strict")
    except ValueError as e:
        raise _BadInput(f"the query: {e}") from None
    given: dict[str, str] = {}
    for name, value in pairs:
        if name in given:
            raise _BadInput(f"the query: {name} given twice")
        given[name] = value
    try:
        obj = msgspec.convert(given, query_type, strict=False)
    except msgspec.ValidationError as e:
        raise _BadInput(f"the query: {e}") from None
    return msgspec.structs.asdict(obj)


def native_items(request: type[Any], values: dict[str, Any]) -> list[Any]:
    """The native request's array (tag, rid, fields in schema order)."""
    tag = request.__struct_config__.tag
    fields = request.__struct_fields__
    defaults = dict(zip(fields[len(fields) - len(request.__struct_defaults__) :],
                        request.__struct_defaults__, strict=True))  # fmt: skip
    return [tag, RID, *(values[n] if n in values else defaults[n] for n in fields[1:])]


def hello_items(token: str | None) -> list[Any]:
    return ["hello", HELLO_RID, PROTOCOL_VERSION, CLIENT_NAME, token]


class Exchange:
    """One API request served by a native connection of its own: the Hello, the request, its
    answer; then the connection ends (as if its socket closed)."""

    def __init__(
        self, api: HttpApi, http: HttpHost, request: h11.Request, items: list[Any], token: Any
    ) -> None:
        self.api = api
        self.http = http
        self.request = request
        self.done = False
        self.inner = Connection(api.clients)
        http.on_lost = self.cancel
        self.inner.connection_made(Pipe(self, None, http.extra_info))
        if self.done:  # refused at once (over a connection bound)
            return
        try:
            frames = frame_of_items(hello_items(token)) + frame_of_items(items)
        except Exception as e:  # a value msgpack cannot hold (an integer too large)
            self._finish(error(RID, "bad_request", str(e)))
            return
        self.inner.data_received(frames)  # type: ignore[arg-type]  # (bytes-like)

    # the pipe's owner ----------------------------------------------------------------------------
    def write_frames(self, data: bytes | bytearray | memoryview) -> None:
        for body in bodies(data):
            message = _server_message_decoder.decode(body)
            if isinstance(message, _PUSHES):  # (no subscription here: a server bug)
                self._finish(error(RID, "internal", "unexpected push"))
            elif type(message) is not Welcome:
                self._finish(message)

    def pipe_closed(self) -> None:
        """The native connection closes (after its answer, or its goodbye)."""
        self._finish(error(RID, "unavailable", "the connection was closed by the server"))

    def pipe_aborted(self) -> None:
        self._finish(error(RID, "unavailable", "the connection was cut off by the server"))

    def set_reading(self, reading: bool) -> None:
        pass

    @property
    def pipe_closing(self) -> bool:
        return self.done

    # ----------------------------------------------------------------------------------------------
    def _finish(self, message: Response) -> None:
        if self.done:
            return
        self.done = True
        self.http.on_lost = None
        self.api.reply_message(self.http, self.request, message)
        loop = self.inner._loop
        loop.call_soon(self._end)

    def _end(self) -> None:
        if not self.inner.closed:
            self.inner.connection_lost(None)

    def cancel(self) -> None:
        """The HTTP connection is gone: the native connection goes too (its answer is lost)."""
        self.done = True
        self._end()


class HttpApiCollector(Collector):
    """The HTTP API's metrics (registered with the node's ``NodeMetrics``)."""

    def __init__(self, api: HttpApi) -> None:
        self.api = api

    def collect(self) -> Iterator[Any]:
        api = self.api
        yield CounterMetricFamily(
            "ctxstore_http_api_requests_total", "HTTP API requests (/v1, but /v1/ws).",
            value=api.requests,
        )  # fmt: skip
        errors = CounterMetricFamily(
            "ctxstore_http_api_errors_total", "HTTP API error answers by status.",
            labels=["status"],
        )  # fmt: skip
        for status, n in sorted(api.errors.items()):
            errors.add_metric([str(status)], n)
        yield errors
        yield GaugeMetricFamily(
            "ctxstore_http_api_event_streams", "Open Server-Sent Events streams.",
            value=len(api.streams),
        )  # fmt: skip


__all__ = [
    "PREFIX",
    "STATUS",
    "Exchange",
    "HttpApi",
    "HttpApiCollector",
    "HttpHost",
    "Route",
    "answer_json",
    "answer_twin",
    "http_twin",
]
