"""The webhook client's connections: HTTP/1.1 on h11 and HTTP/2 on h2, both sans-IO protocol
objects driven by asyncio streams here (no hand-written HTTP).

Rules of this file:
- A connection carries requests whose response body is read as it streams (``Response.body``),
  and closed (``aclose``) once done with, read or not: closing it ends the request (an
  HTTP/1.1 connection not read to its end is closed, an HTTP/2 stream forgotten and its
  unread data's flow-control window given back).
  Each wait for the response has the caller's idle deadline (an ``IdleWatch``: no timer per
  read); the whole call is bounded by the caller (``asyncio.timeout``).  What one read brings
  is handed on as one piece (the chunks of a chunked body, the DATA frames of a stream).
- HTTP/1.1: one request at a time; the connection is handed back for keep-alive only when both
  sides reached DONE (h11), else closed.
- HTTP/2: many streams on one connection; a reader task feeds h2 and routes its events to the
  streams; the received data is acknowledged as the caller consumes it (flow control), and the
  request body waits for the peer's window.  The first connection error is sticky: every open
  stream fails with it, and the connection is retired (style.md 8).  ``GOAWAY`` retires the
  connection for new streams; streams above its ``last_stream_id`` fail (retryable), the others
  finish.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11

READ_BYTES: int = 64 * 1024
RESPONSE_HEADERS_BYTES_MAX: int = 64 * 1024
IDLE_SLACK_S: float = 0.001  # a loop timer may fire this early


class HttpError(Exception):
    """A call that failed below HTTP semantics (connect, TLS, reset, protocol, timeout)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Response:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.headers = headers
        self.body = Body(_empty(), _nothing)

    def header(self, name: bytes) -> str:
        for k, v in self.headers:
            if k.lower() == name:
                return v.decode("latin-1")
        return ""


class Body:
    """A response's body: the pieces as they come (``async for``), then ``aclose``, which ends
    the request whether or not it was read.  (An async generator closed before its first step
    never runs its ``finally``: a body left unread, an error answer's, kept its HTTP/1.1
    connection busy and open, with its idle timer, or its HTTP/2 stream, for good.)"""

    __slots__ = ("_pieces", "_unread")

    def __init__(self, pieces: AsyncGenerator[bytes, None], unread: Callable[[], None]) -> None:
        self._pieces = pieces
        self._unread: Callable[[], None] | None = unread  # what ends it, until a read starts

    def __aiter__(self) -> Body:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        self._unread = None  # (the generator's ``finally`` ends it from its first step on)
        return self._pieces.__anext__()

    async def aclose(self) -> None:
        unread, self._unread = self._unread, None
        if unread is not None:
            unread()
        await self._pieces.aclose()


class IdleWatch:
    """An idle deadline without a timer per wait: ``wait()`` and ``woke()`` around each wait
    (one clock read), and one loop timer per ``idle_s`` that calls ``expire`` once a single
    wait has lasted ``idle_s``.  (``asyncio.wait_for`` around each read cost a task and a
    timer per chunk.)  Time between waits, while the reader works, is not idle."""

    __slots__ = ("_expire", "_handle", "_loop", "expired", "idle_s", "since")

    def __init__(self, idle_s: float, expire: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self.idle_s = idle_s
        self.since: float | None = None  # when the wait in progress began
        self.expired = False
        self._expire = expire
        self._handle = self._loop.call_later(idle_s, self._check)

    def wait(self) -> None:
        self.since = self._loop.time()

    def woke(self) -> None:
        self.since = None

    def cancel(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        now = self._loop.time()
        since = self.since
        if since is not None and now - since >= self.idle_s - IDLE_SLACK_S:
            self.expired = True
            self._expire()
            return
        at = (now if since is None else since) + self.idle_s
        self._handle = self._loop.call_at(at, self._check)


def _nothing() -> None:
    pass


async def _empty() -> AsyncGenerator[bytes, None]:
    nothing: tuple[bytes, ...] = ()
    for chunk in nothing:
        yield chunk


class Connection(abc.ABC):
    """What a pool holds: ``request`` and whether it can take another one now."""

    closed: bool = False
    http_version: str = ""

    @abc.abstractmethod
    async def request(
        self, target: str, headers: list[tuple[bytes, bytes]], body: bytes, idle_s: float
    ) -> Response:
        """Send one request; its response, whose body streams (``idle_s`` between chunks)."""

    @abc.abstractmethod
    def available(self) -> bool:
        """Whether it can take another request now."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close it; what is in flight on it fails."""


# -- HTTP/1.1 --------------------------------------------------------------------------------------
class H1Connection(Connection):
    http_version = "1.1"

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        authority: str,
        release: Any,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.authority = authority.encode()
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=RESPONSE_HEADERS_BYTES_MAX)
        self.busy = False
        self._release = release  # called with self when the connection may be reused
        self._watch: IdleWatch | None = None  # of the request in flight

    def available(self) -> bool:
        return not self.closed and not self.busy

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()

    async def request(
        self, target: str, headers: list[tuple[bytes, bytes]], body: bytes, idle_s: float
    ) -> Response:
        assert not self.busy and not self.closed
        self.busy = True
        self._watch = IdleWatch(idle_s, self._idle)
        try:
            req = h11.Request(
                method="POST",
                target=target.encode(),
                headers=[(b"host", self.authority), *headers,
                         (b"content-length", str(len(body)).encode())],
            )  # fmt: skip
            out = self.h11.send(req) or b""
            out += self.h11.send(h11.Data(data=body)) or b""
            out += self.h11.send(h11.EndOfMessage()) or b""
            self.writer.write(out)
            await self.writer.drain()
            event = await self._next()
            while isinstance(event, h11.InformationalResponse):
                event = await self._next()
            if not isinstance(event, h11.Response):
                raise HttpError("protocol", f"expected a response, got {type(event).__name__}")
        except BaseException:
            self._watch.cancel()
            self.close()
            raise
        response = Response(event.status_code, list(event.headers))
        response.body = Body(self._body(), self._unread)
        return response

    def _unread(self) -> None:
        """The response's body is closed unread: the connection cannot carry another."""
        if self._watch is not None:
            self._watch.cancel()
        self.busy = False
        self.close()

    def _idle(self) -> None:
        assert self._watch is not None
        idle_s = self._watch.idle_s
        self.reader.set_exception(HttpError("idle_timeout", f"no byte for {idle_s:g} s"))

    def _event(self) -> Any:
        try:
            return self.h11.next_event()
        except h11.RemoteProtocolError as e:
            raise HttpError("protocol", f"HTTP/1.1: {e}") from None

    async def _next(self) -> Any:
        watch = self._watch
        assert watch is not None
        while True:
            event = self._event()
            if event is not h11.NEED_DATA:
                return event
            watch.wait()
            try:
                data = await self.reader.read(READ_BYTES)
            except OSError as e:
                raise HttpError("connection", f"read failed: {e}") from None
            finally:
                watch.woke()
            self.h11.receive_data(data)  # b"": the end of the stream

    async def _body(self) -> AsyncGenerator[bytes, None]:
        done = False
        pending: Any = None  # an event read past the last Data of a read
        try:
            while True:
                event = pending if pending is not None else await self._next()
                pending = None
                if isinstance(event, h11.Data):
                    pieces = [event.data]
                    while type(nxt := self._event()) is h11.Data:  # what this read brought
                        pieces.append(nxt.data)
                    if nxt is not h11.NEED_DATA:
                        pending = nxt
                    yield bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)
                elif isinstance(event, h11.EndOfMessage):
                    done = True
                    return
                elif isinstance(event, h11.ConnectionClosed):
                    raise HttpError("connection", "the connection closed mid-response")
                else:
                    raise HttpError("protocol", f"unexpected {type(event).__name__}")
        finally:
            if self._watch is not None:
                self._watch.cancel()
            self.busy = False
            if (
                done
                and self.h11.our_state is h11.DONE
                and self.h11.their_state is h11.DONE
                and not self.closed
            ):
                self.h11.start_next_cycle()
                self._release(self)
            else:
                self.close()


# -- HTTP/2 ----------------------------------------------------------------------------------------
class _Stream:
    __slots__ = ("data", "ended", "error", "headers", "wake", "window")

    def __init__(self) -> None:
        self.headers: asyncio.Future[list[tuple[bytes, bytes]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.data: deque[tuple[bytes, int]] = deque()
        self.ended = False
        self.error: HttpError | None = None
        self.wake = asyncio.Event()
        self.window = asyncio.Event()  # the peer opened its flow-control window


class H2Connection(Connection):
    http_version = "2"

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str,
        scheme: str, ended: Callable[[H2Connection], None] | None = None,
    ) -> None:  # fmt: skip
        self.reader, self.writer = reader, writer
        self.authority = authority.encode()
        self.scheme = scheme.encode()
        self._ended = ended  # called once its reader stopped (closed, failed, or the peer's end)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: RESPONSE_HEADERS_BYTES_MAX,
            },
        )
        self.streams: dict[int, _Stream] = {}
        self.error: HttpError | None = None  # sticky
        self.goaway = False
        self._capacity = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.h2.initiate_connection()
        self._flush()
        self._reader_task = asyncio.get_running_loop().create_task(self._read())

    def available(self) -> bool:
        return not self.closed and not self.goaway and self.error is None

    def has_capacity(self) -> bool:
        return self.h2.open_outbound_streams < self.h2.remote_settings.max_concurrent_streams

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._fail(HttpError("connection", "the connection was closed"))
        with contextlib.suppress(Exception):
            self.h2.close_connection()
            self._flush()
        self.writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def _fail(self, error: HttpError) -> None:
        if self.error is None:
            self.error = error
        for stream in self.streams.values():
            if stream.error is None and not stream.ended:
                stream.error = error
            if not stream.headers.done():
                stream.headers.set_exception(error)
            stream.wake.set()
            stream.window.set()
        self._capacity.set()

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(READ_BYTES)
                if not data:
                    raise HttpError("connection", "the connection closed")
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    raise HttpError("protocol", f"HTTP/2: {e}") from None
                for event in events:
                    self._on_event(event)
                self._flush()
        except HttpError as e:
            self._fail(e)
        except OSError as e:
            self._fail(HttpError("connection", f"read failed: {e}"))
        except asyncio.CancelledError:
            self._fail(HttpError("connection", "the connection was closed"))
            raise
        finally:
            self.closed = True
            self.writer.close()
            if self._ended is not None:
                self._ended(self)

    def _on_event(self, event: Any) -> None:
        stream = self.streams.get(getattr(event, "stream_id", 0) or 0)
        match event:
            case h2.events.ResponseReceived():
                if stream is not None and not stream.headers.done():
                    stream.headers.set_result(list(event.headers or []))
            case h2.events.DataReceived():
                if stream is not None:
                    stream.data.append((event.data or b"", event.flow_controlled_length or 0))
                    stream.wake.set()
                else:  # a stream we gave up on: give the window back
                    self.h2.acknowledge_received_data(
                        event.flow_controlled_length or 0, event.stream_id or 0
                    )
            case h2.events.StreamEnded():
                if stream is not None:
                    stream.ended = True
                    stream.wake.set()
            case h2.events.StreamReset():
                if stream is not None:
                    stream.error = HttpError("reset", f"stream reset ({event.error_code!r})")
                    if not stream.headers.done():
                        stream.headers.set_exception(stream.error)
                    stream.wake.set()
                    stream.window.set()
            case h2.events.WindowUpdated():
                for s in self.streams.values() if event.stream_id == 0 else (stream,):
                    if s is not None:
                        s.window.set()
            case h2.events.ConnectionTerminated():
                self.goaway = True
                last = event.last_stream_id or 0
                error = HttpError("goaway", f"GOAWAY ({event.error_code!r})")
                for sid, s in self.streams.items():
                    if sid > last and not s.ended:
                        s.error = error
                        if not s.headers.done():
                            s.headers.set_exception(error)
                        s.wake.set()
            case h2.events.RemoteSettingsChanged():
                self._capacity.set()

    async def request(
        self, target: str, headers: list[tuple[bytes, bytes]], body: bytes, idle_s: float
    ) -> Response:
        if self.error is not None:
            raise self.error
        while not self.has_capacity():
            self._capacity.clear()
            await self._capacity.wait()
            if self.error is not None:
                raise self.error
        sid = self.h2.get_next_available_stream_id()
        stream = self.streams[sid] = _Stream()
        head = [(b":method", b"POST"), (b":scheme", self.scheme), (b":authority", self.authority),
                (b":path", target.encode()), *headers,
                (b"content-length", str(len(body)).encode())]  # fmt: skip
        try:
            self.h2.send_headers(sid, head, end_stream=not body)
            self._flush()
            await self._send_body(sid, stream, body)
            try:
                response_headers = await asyncio.wait_for(asyncio.shield(stream.headers), idle_s)
            except TimeoutError:
                raise HttpError("idle_timeout", f"no response for {idle_s:g} s") from None
        except BaseException:
            self._forget(sid)
            raise
        status = 0
        rest = []
        for k, v in response_headers:
            if k == b":status":
                status = int(v)
            else:
                rest.append((k, v))
        response = Response(status, rest)
        response.body = Body(self._body(sid, stream, idle_s), lambda: self._forget(sid))
        return response

    async def _send_body(self, sid: int, stream: _Stream, body: bytes) -> None:
        view = memoryview(body)
        while view:
            if stream.error is not None:
                raise stream.error
            window = self.h2.local_flow_control_window(sid)
            size = min(window, self.h2.max_outbound_frame_size, len(view))
            if size <= 0:
                stream.window.clear()
                await stream.window.wait()
                continue
            end = size == len(view)
            self.h2.send_data(sid, bytes(view[:size]), end_stream=end)
            self._flush()
            view = view[size:]
        await self.writer.drain()

    async def _body(self, sid: int, stream: _Stream, idle_s: float) -> AsyncGenerator[bytes, None]:
        watch = IdleWatch(idle_s, stream.wake.set)
        try:
            while True:
                if stream.data:  # what came since the last wait, as one piece
                    pieces: list[bytes] = []
                    flow = 0
                    while stream.data:
                        data, n = stream.data.popleft()
                        pieces.append(data)
                        flow += n
                    if flow:
                        self.h2.acknowledge_received_data(flow, sid)
                        self._flush()
                    joined = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    if joined:
                        yield joined
                if stream.error is not None:
                    raise stream.error
                if stream.ended:
                    return
                if watch.expired:  # (the stream is reset as it is forgotten)
                    raise HttpError("idle_timeout", f"no byte for {idle_s:g} s")
                stream.wake.clear()
                watch.wait()
                try:
                    await stream.wake.wait()
                finally:
                    watch.woke()
        finally:
            watch.cancel()
            self._forget(sid)

    def _forget(self, sid: int) -> None:
        stream = self.streams.pop(sid, None)
        if stream is None:
            return
        if not self.closed:
            if not stream.ended and stream.error is None:
                with contextlib.suppress(Exception):
                    self.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            flow = sum(n for _, n in stream.data)  # received, never read: the window back
            if flow:
                with contextlib.suppress(Exception):
                    self.h2.acknowledge_received_data(flow, sid)
            self._flush()
        self._capacity.set()
        if self.goaway and not self.streams:
            self.close()


__all__ = ["Body", "Connection", "H1Connection", "H2Connection", "HttpError", "Response"]
