"""The bench's clients of a node's HTTP port (``--via ws|ws-json|http``, docs/web.md).

The load (``load.Worker``) drives them exactly as it drives ``wire.client.Client`` (the
``LoadClient`` methods it calls); only the transport differs:

- ``WsClient``: one WebSocket to ``/v1/ws`` (wsproto), subprotocol ``ctxstore.v1.msgpack``
  (binary messages, each a native message body) or ``ctxstore.v1.json`` (text, the JSON
  shapes); requests pipelined with ``rid``s as on the native port, answers matched by ``rid``;
  the writes pause with the socket's (``append_nowait`` then returns None, as the native one
  does).  A lost connection fails its requests ``unavailable`` (retryable); the next call
  connects again.
- ``HttpClient``: the HTTP/JSON API (h11) over keep-alive connections, one request at a time
  each (HTTP/1.1 answers in order): a call takes an idle connection or opens one, so there are
  as many as requests in flight.  An error answer becomes the ``ClientError`` of its ``code``.
  The API has no routing table: ``get_routes`` and ``ping`` go to the node's native port.

Each call is answered within ``timeout_s`` or fails ``timeout`` (retryable), as the native
client's do.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any, Final, Literal, Protocol, TypeVar
from urllib.parse import quote

import h11
import msgspec
import wsproto
import wsproto.events as ws_events

from wire.client import Client, ClientError, expect_response
from wire.protocol import (
    PROTOCOL_VERSION,
    Append,
    Appended,
    Error,
    GetRoutes,
    Hello,
    Message,
    Messages,
    Ping,
    Pong,
    Push,
    Read,
    Request,
    Response,
    Routes,
    Welcome,
)
from wire.web_codec import (
    JSON,
    MSGPACK,
    SERVER_MESSAGE_TWINS,
    from_json_object,
    json_request,
    json_twin,
)

Via = Literal["native", "ws", "ws-json", "http", "wt"]
VIAS: Final[tuple[str, ...]] = ("native", "ws", "ws-json", "http", "wt")  # wt: bench/wtclient.py
CLIENT_NAME: Final = "ctxstore-bench"
READ_BYTES: Final = 256 * 1024
R = TypeVar("R", bound=msgspec.Struct)


class LoadClient(Protocol):
    """What the load calls on a client of one node (``wire.client.Client`` is one)."""

    @property
    def target(self) -> object | None:
        """Not None while the client's connection to its node is usable (as far as known)."""

    async def ping(self) -> Pong: ...

    async def get_routes(self) -> Routes: ...

    async def append(
        self, session_id: str, content: str, *, client_msg_id: str | None = None
    ) -> Appended: ...

    def append_nowait(
        self, session_id: str, content: str, *, client_msg_id: str | None = None
    ) -> asyncio.Future[Response] | None: ...

    async def read(self, session_id: str, after_seq: int = 0, limit: int = 100) -> Messages: ...

    async def close(self) -> None: ...


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def unavailable(what: str) -> ClientError:
    return ClientError("unavailable", what, True)


# -- WebSocket ------------------------------------------------------------------------------------
_msgpack_encoder: Final = msgspec.msgpack.Encoder()
_msgpack_decoder: Final = msgspec.msgpack.Decoder(Response | Push)
_json_decoder: Final = msgspec.json.Decoder(SERVER_MESSAGE_TWINS)


class InFlight:
    """Requests in flight by ``rid`` with their deadlines (in sending order, all with the same
    timeout: one timer for the oldest); one that outlives it fails ``timeout``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.futures: dict[int, asyncio.Future[Response]] = {}
        self.deadlines: collections.deque[tuple[float, int]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, rid: int, future: asyncio.Future[Response]) -> None:
        self.futures[rid] = future
        self.deadlines.append((time.monotonic() + self.timeout_s, rid))
        if self.timer is None:
            self.timer = self.loop.call_at(self.loop.time() + self.timeout_s, self.expire)

    def pop(self, rid: int) -> asyncio.Future[Response] | None:
        return self.futures.pop(rid, None)

    def expire(self) -> None:
        self.timer = None
        t = time.monotonic()
        deadlines, futures = self.deadlines, self.futures
        while deadlines and (deadlines[0][0] <= t or deadlines[0][1] not in futures):
            _, rid = deadlines.popleft()
            future = futures.pop(rid, None)
            if future is not None and not future.done():
                future.set_exception(ClientError("timeout", "no answer in time", True))
        if deadlines:
            self.timer = self.loop.call_at(self.loop.time() + deadlines[0][0] - t, self.expire)

    def fail_all(self, error: ClientError) -> None:
        if self.timer is not None:
            self.timer.cancel()
        futures, self.futures = self.futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(error)


class _WsConnection(asyncio.Protocol):
    """One WebSocket: the handshake, then requests in flight (``InFlight``)."""

    def __init__(self, address: str, subprotocol: str, timeout_s: float) -> None:
        self.address = address
        self.subprotocol = subprotocol
        self.json = subprotocol == JSON
        self.ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        self.loop = asyncio.get_running_loop()
        self.accepted: asyncio.Future[None] = self.loop.create_future()
        self.calls = InFlight(self.loop, timeout_s)
        self.error: ClientError | None = None
        self._writable: asyncio.Future[None] | None = None  # set while writes are paused
        self.transport: asyncio.Transport | None = None
        self.parts: list[Any] = []  # bytes or str  # of a message not finished

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        host = self.address
        request = ws_events.Request(host=host, target="/v1/ws", subprotocols=[self.subprotocol])
        self.transport.write(self.ws.send(request))  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        try:
            self.ws.receive_data(data)
            for event in self.ws.events():
                self.event(event)
        except (wsproto.utilities.RemoteProtocolError, msgspec.DecodeError) as e:
            self.fail(unavailable(f"ws {self.address}: {e}"))

    def event(self, event: ws_events.Event) -> None:
        if isinstance(event, ws_events.Message):
            self.parts.append(event.data)
            if event.message_finished:
                parts, self.parts = self.parts, []
                self.message(parts[0] if len(parts) == 1 else parts[0][:0].join(parts))
        elif isinstance(event, ws_events.AcceptConnection):
            if not self.accepted.done():
                self.accepted.set_result(None)
        elif isinstance(event, ws_events.Ping):
            self.write(event.response())
        elif isinstance(event, ws_events.CloseConnection):
            with contextlib.suppress(wsproto.utilities.LocalProtocolError):
                self.write(event.response())
            self.fail(unavailable(f"ws {self.address} closed {event.code}: {event.reason}"))
        elif isinstance(event, ws_events.RejectConnection | ws_events.RejectData):
            self.fail(unavailable(f"ws {self.address}: upgrade refused"))

    def message(self, data: Any) -> None:
        if self.json:
            response: Any = from_json_object(_json_decoder.decode(data))
        else:
            response = _msgpack_decoder.decode(data)
        rid = getattr(response, "rid", None)
        if rid is None:
            return  # a push: the bench subscribes to nothing
        if rid == 0 and type(response) is Error:  # the goodbye
            self.fail(ClientError.from_error(response))
            return
        future = self.calls.pop(rid)
        if future is not None and not future.done():
            future.set_result(response)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(unavailable(f"ws {self.address}: connection lost ({exc})"))

    # requests
    def write(self, event: ws_events.Event) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.ws.send(event))

    def request(self, request: Request) -> asyncio.Future[Response]:
        future: asyncio.Future[Response] = self.loop.create_future()
        if self.error is not None:
            future.set_exception(self.error)
            return future
        self.calls.add(request.rid, future)
        if self.json:
            self.write(ws_events.TextMessage(data=json_request(request).decode()))
        else:
            self.write(ws_events.BytesMessage(data=_msgpack_encoder.encode(request)))
        return future

    def fail(self, error: ClientError) -> None:
        if self.error is not None:
            return
        self.error = error
        if not self.accepted.done():
            self.accepted.set_exception(error)
            self.accepted.exception()  # retrieved: whoever awaits it sees it
        self.calls.fail_all(error)
        self.resume_writing()
        if self.transport is not None:
            self.transport.close()


class WsClient:
    """A client of one node's ``/v1/ws`` (``LoadClient``)."""

    def __init__(self, address: str, subprotocol: str, token: str | None, timeout_s: float) -> None:
        assert subprotocol in (JSON, MSGPACK)
        self.address = address
        self.subprotocol = subprotocol
        self.token = token
        self.timeout_s = timeout_s
        self.conn: _WsConnection | None = None
        self.connecting: asyncio.Task[_WsConnection] | None = None
        self.rid = 0
        self.closed = False

    @property
    def target(self) -> object | None:
        conn = self.conn
        return None if conn is None or conn.error is not None else self.address

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    async def _open(self) -> _WsConnection:
        host, port = host_port(self.address)
        loop = asyncio.get_running_loop()
        conn: _WsConnection | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _WsConnection(self.address, self.subprotocol, self.timeout_s),
                    host,
                    port,
                )
                await conn.accepted
                hello = Hello(self.next_rid(), PROTOCOL_VERSION, CLIENT_NAME, self.token)
                expect_response(await conn.request(hello), Welcome, "Hello")
        except BaseException:
            if conn is not None:
                conn.fail(unavailable("the handshake failed"))
            raise
        return conn

    async def _connect(self) -> _WsConnection:
        try:
            return await self._open()
        except OSError as e:
            raise unavailable(f"ws {self.address}: {e}") from None
        except TimeoutError:
            raise unavailable(f"ws {self.address}: no handshake in {self.timeout_s} s") from None

    async def connection(self) -> _WsConnection:
        if self.closed:
            raise unavailable("the client is closed")
        conn = self.conn
        if conn is not None and conn.error is None:
            return conn
        if self.connecting is None:
            self.connecting = asyncio.ensure_future(self._connect())
        try:
            self.conn = await asyncio.shield(self.connecting)
        finally:
            self.connecting = None
        return self.conn

    async def call(self, request: Request, expect: type[R]) -> R:
        conn = self.conn
        if conn is None or conn.error is not None:
            conn = await self.connection()
        if conn._writable is not None:
            await conn._writable
        response = await conn.request(request)
        return expect_response(response, expect, type(request).__name__)

    async def ping(self) -> Pong:
        return await self.call(Ping(self.next_rid()), Pong)

    async def get_routes(self) -> Routes:
        return await self.call(GetRoutes(self.next_rid()), Routes)

    def append_request(self, session_id: str, content: str, client_msg_id: str | None) -> Append:
        return Append(
            self.next_rid(), session_id, "user", "", "text", content, {}, client_msg_id, None, None
        )

    async def append(
        self, session_id: str, content: str, *, client_msg_id: str | None = None
    ) -> Appended:
        return await self.call(self.append_request(session_id, content, client_msg_id), Appended)

    def append_nowait(
        self, session_id: str, content: str, *, client_msg_id: str | None = None
    ) -> asyncio.Future[Response] | None:
        conn = self.conn
        if conn is None or conn.error is not None or conn._writable is not None:
            return None
        return conn.request(self.append_request(session_id, content, client_msg_id))

    async def read(self, session_id: str, after_seq: int = 0, limit: int = 100) -> Messages:
        return await self.call(Read(self.next_rid(), session_id, after_seq, limit), Messages)

    async def close(self) -> None:
        self.closed = True
        if self.connecting is not None:
            self.connecting.cancel()
            with contextlib.suppress(BaseException):
                await self.connecting
        if self.conn is not None:
            self.conn.write(ws_events.CloseConnection(code=1000))
            self.conn.fail(ClientError("unavailable", "the client is closed", False))


# -- HTTP -----------------------------------------------------------------------------------------
class _AppendedBody(msgspec.Struct):
    seq: int
    inserted_at: int
    deduped: bool


_MessagesBody: Final[Any] = msgspec.defstruct(
    "MessagesBody",
    [("messages", list[json_twin(Message)]), ("last_seq", int)],  # type: ignore[misc]
)


class _ErrorBody(msgspec.Struct):
    code: str
    message: str
    retryable: bool
    details: dict[str, Any] | None = None


_appended_decoder: Final = msgspec.json.Decoder(_AppendedBody)
_messages_decoder: Final = msgspec.json.Decoder(_MessagesBody)
_error_decoder: Final = msgspec.json.Decoder(_ErrorBody)
_json_encoder: Final = msgspec.json.Encoder()


class _HttpConnection:
    """One keep-alive connection: one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)

    async def exchange(self, request: h11.Request, body: bytes) -> tuple[int, bytes]:
        """The status and body of the answer to ``request``; raises ``OSError`` (or h11's
        errors) if the connection breaks; leaves it ready for the next request."""
        c = self.h11
        self.writer.write(
            c.send(request) + c.send(h11.Data(data=body)) + c.send(h11.EndOfMessage())
        )
        status, chunks = 0, []
        while True:
            event = c.next_event()
            if event is h11.NEED_DATA:
                data = await self.reader.read(READ_BYTES)
                if not data:
                    raise ConnectionResetError("the node closed the connection")
                c.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("the node closed the connection")
        if c.our_state is h11.DONE and c.their_state is h11.DONE:
            c.start_next_cycle()
        else:
            self.close()
        return status, b"".join(chunks)

    @property
    def reusable(self) -> bool:
        return self.h11.our_state is h11.IDLE and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """A client of one node's HTTP/JSON API (``LoadClient``); ``native``: its native port,
    for what the API does not serve (the routing table)."""

    def __init__(self, address: str, native: Client, token: str | None, timeout_s: float) -> None:
        self.address = address
        self.host, self.port = host_port(address)
        self.native = native
        self.timeout_s = timeout_s
        self.headers = [("host", address), ("content-type", "application/json")]
        if token is not None:
            self.headers.append(("authorization", f"Bearer {token}"))
        self.idle: list[_HttpConnection] = []
        self.busy: set[_HttpConnection] = set()
        self.refused = False
        self.closed = False

    @property
    def target(self) -> object | None:
        return None if self.refused else self.address

    async def ping(self) -> Pong:
        return await self.native.ping()

    async def get_routes(self) -> Routes:
        return await self.native.get_routes()

    async def call(self, method: str, path: str, body: bytes = b"") -> bytes:
        """The body of the 200 answer to ``method path``; ``ClientError`` otherwise."""
        if self.closed:
            raise unavailable("the client is closed")
        headers = [*self.headers, ("content-length", str(len(body)))]
        request = h11.Request(method=method, target=path, headers=headers)
        conn: _HttpConnection | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.idle:
                    conn = self.idle.pop()
                else:
                    try:
                        reader, writer = await asyncio.open_connection(self.host, self.port)
                    except OSError:
                        self.refused = True
                        raise
                    self.refused = False
                    conn = _HttpConnection(reader, writer)
                self.busy.add(conn)
                status, answer = await conn.exchange(request, body)
        except TimeoutError:
            if conn is not None:
                conn.close()
            raise ClientError("timeout", f"http {self.address}: no answer in time", True) from None
        except (OSError, h11.ProtocolError) as e:
            if conn is not None:
                conn.close()
            raise unavailable(f"http {self.address}: {e!r}") from None
        finally:
            if conn is not None:
                self.busy.discard(conn)
        if conn.reusable and not self.closed:
            self.idle.append(conn)
        if status != 200:
            try:
                error = _error_decoder.decode(answer)
            except msgspec.DecodeError:
                raise ClientError("internal", f"http {status}: {answer[:200]!r}", False) from None
            raise ClientError(error.code, error.message, error.retryable, error.details)  # type: ignore[arg-type]
        return answer

    async def append(
        self, session_id: str, content: str, *, client_msg_id: str | None = None
    ) -> Appended:
        body = _json_encoder.encode(
            {"sender": "user", "sender_id": "", "kind": "text", "content": content,
             "metadata": {}, "client_msg_id": client_msg_id}
        )  # fmt: skip
        answer = await self.call("POST", f"/v1/sessions/{quote(session_id)}/messages", body)
        a = _appended_decoder.decode(answer)
        return Appended(0, a.seq, a.inserted_at, a.deduped)

    def append_nowait(
        self, session_id: str, content: str, *, client_msg_id: str | None = None
    ) -> asyncio.Future[Response] | None:
        return None  # one request per connection: each append is a task of its own

    async def read(self, session_id: str, after_seq: int = 0, limit: int = 100) -> Messages:
        path = f"/v1/sessions/{quote(session_id)}/messages?after_seq={after_seq}&limit={limit}"
        body = _messages_decoder.decode(await self.call("GET", path))
        messages = [msgspec.convert(m, Message, from_attributes=True) for m in body.messages]
        return Messages(0, messages, body.last_seq)

    async def close(self) -> None:
        self.closed = True
        for conn in [*self.idle, *self.busy]:
            conn.close()
        self.idle.clear()
        await self.native.close()


__all__ = ["VIAS", "HttpClient", "LoadClient", "Via", "WsClient"]
