"""Server-Sent Events of the HTTP API (docs/web.md §7.4): a native subscription as a stream.

``GET /v1/sessions/{id}/events`` and ``GET /v1/users/{id}/inbox/events`` take the socket over
from the HTTP port (``ops.OpsConnection.detach``, as the WebSocket upgrade does): the socket's
protocol becomes an ``EventStream``, which carries one native connection (``wire.aio``, served
by the same ``Service``) that sends the Hello and the ``subscribe`` (``subscribe_inbox``), and
turns what it is answered into the response:

- ``subscribed`` (``inbox_snapshot``): ``200 text/event-stream``, then ``retry:``, then an
  ``event: subscribed`` (``event: snapshot``); an ``error``: its status and JSON, no stream.
- each message of a ``message_event``: an event with ``id: <seq>`` and the message as ``data``
  (event type ``message``); a ``gap_event``: ``event: gap`` with ``id: <to_seq>``; an
  ``inbox_delta``: ``event: delta``; a ``context_event`` (``?context_events=true``):
  ``event: context``; a ``stream_chunk`` (``?stream_chunks=true``): ``event: chunk``;
  ``subscription_closed``: ``event: closed``, then the
  stream ends (EventSource reconnects, with ``Last-Event-ID``: the last seq it got).
- a goodbye ``error`` (the node shuts down): ``event: error``, then the stream ends.

Rules of this module:
- ``Last-Event-ID`` (a seq) overrides the ``after_seq`` of the query: a reconnect resumes.
- Flow control and bounds are the native subscription's: the socket's writer pausing pauses the
  native connection's pushes, a subscriber too far behind is closed ``slow_consumer``, one that
  reads nothing is cut off after the client write-stall timeout; the stream is a client
  connection (``client_connections_max``).
- A comment (``: keepalive``) every ``keepalive_s`` while the socket's buffer is empty.
- Nothing is read from the client after the request (what it sends is discarded); its close
  ends the subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import h11
import msgspec

from wire.aio import Connection
from wire.protocol import (
    ChunkEvent,
    ContextEvent,
    Error,
    GapEvent,
    InboxDelta,
    InboxSnapshot,
    Message,
    MessageEvent,
    Subscribe,
    Subscribed,
    SubscriptionClosed,
    Welcome,
    error,
)
from wire.web_codec import bodies, encode_json, frame_of_items, json_twin

from .web_http import (
    RID,
    _server_message_decoder,
    answer_json,
    header,
    hello_items,
    native_items,
)
from .web_pipe import Pipe

if TYPE_CHECKING:
    from .web_http import HttpApi, HttpHost, Route

logger = logging.getLogger(__name__)
_MESSAGE = json_twin(Message)


@dataclass(frozen=True)
class SseLimits:
    keepalive_s: float = 15.0  # a comment while the stream is otherwise quiet
    retry_ms: int = 1000  # the reconnect delay the stream asks EventSource for
    close_timeout_s: float = 5.0  # an end not written within this: the socket is cut off


def start_stream(
    api: HttpApi,
    http: HttpHost,
    request: h11.Request,
    route: Route,
    values: dict[str, Any],
    token: Any,
) -> None:
    """Answer ``request`` with an event stream (or the error the subscription gets)."""
    if route.request is Subscribe:
        last_id = header(request, b"last-event-id")
        if last_id is not None:
            text = last_id.decode("latin-1").strip()
            if not text.isdigit() or len(text) > 19:
                message = f"Last-Event-ID must be a seq (an integer >= 0), not {text!r}"
                api.reply_error(http, request, "bad_request", message)
                return
            values["after_seq"] = int(text)
    items = native_items(route.request, values)
    h = http.h11
    transport, _ = http.detach()
    stream = EventStream(api, transport, h, request)
    transport.set_protocol(stream)
    stream.start(items, token)


class EventStream(asyncio.Protocol):
    """One event stream: the socket's protocol, around a native connection."""

    def __init__(
        self, api: HttpApi, transport: asyncio.Transport, h: h11.Connection, request: h11.Request
    ) -> None:
        self.api = api
        self.transport = transport
        self.h11 = h
        self.request = request
        self.limits = api.sse_limits
        self.on_lost: Any = None
        self.inner = Connection(api.clients)
        self._loop = asyncio.get_running_loop()
        self.started = False  # the 200 and its headers sent
        self.closed = False  # the end (or an error answer) sent, or the socket gone
        self.events = 0
        self._keepalive: asyncio.TimerHandle | None = None
        self._cutoff: asyncio.TimerHandle | None = None

    def start(self, items: list[Any], token: Any) -> None:
        self.api.streams.add(self)
        self.inner.connection_made(Pipe(self, self.transport, self.extra_info))
        if self.closed:
            return
        frames = frame_of_items(hello_items(token)) + frame_of_items(items)
        self.inner.data_received(frames)  # type: ignore[arg-type]  # (bytes-like)

    def extra_info(self, name: str) -> Any:
        return self.transport.get_extra_info(name)

    # asyncio.Protocol (the socket) ---------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        pass  # nothing is read after the request

    def eof_received(self) -> bool:
        return False  # the client is gone: connection_lost

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._keepalive, self._cutoff):
            if timer is not None:
                timer.cancel()
        self._keepalive = self._cutoff = None
        self.closed = True
        self.api.streams.discard(self)
        self.inner.connection_lost(exc)

    # the pipe's owner (what the native connection writes) ----------------------------------------
    def write_frames(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        out = bytearray()
        end = False
        for body in bodies(data):
            message = _server_message_decoder.decode(body)
            match message:
                case Welcome():
                    continue
                case Subscribed() | InboxSnapshot() if not self.started:
                    self._head()
                    out += f"retry: {self.limits.retry_ms}\n\n".encode()
                    name = b"subscribed" if type(message) is Subscribed else b"snapshot"
                    out += _event(None, name, answer_json(message))
                case Error() if not self.started:
                    self.api.reply_message(self, self.request, message)
                    return
                case MessageEvent(messages=messages):
                    for m in messages:
                        twin = msgspec.convert(m, _MESSAGE, from_attributes=True)
                        out += _event(m.seq, None, encode_json(twin))
                case GapEvent():
                    out += _event(message.to_seq, b"gap", answer_json(message))
                case InboxDelta():
                    out += _event(None, b"delta", answer_json(message))
                case ContextEvent():  # asked for with ?context_events=true
                    out += _event(None, b"context", answer_json(message))
                case ChunkEvent():  # asked for with ?stream_chunks=true (docs/agents.md)
                    out += _event(None, b"chunk", answer_json(message))
                case SubscriptionClosed():
                    out += _event(None, b"closed", answer_json(message))
                    end = True
                case Error():  # the goodbye: the node shuts down
                    out += _event(None, b"error", answer_json(message))
                    end = True
                case _:
                    logger.error("event stream: unexpected %s", type(message).__name__)
                    end = True
            self.events += 1
        self._write(out)
        if end:
            self.end()

    def pipe_closed(self) -> None:
        self.end()

    def pipe_aborted(self) -> None:
        """The native connection aborts: a client that reads nothing (or no Hello in time)."""
        self.closed = True
        self.transport.abort()

    def set_reading(self, reading: bool) -> None:
        pass  # (nothing is read: the native connection has its one request)

    @property
    def pipe_closing(self) -> bool:
        return self.closed

    # HttpHost (an error answer instead of the stream) --------------------------------------------
    def answer(
        self, status: int, ctype: str, body: bytes, headers: list[tuple[str, str]], close: bool
    ) -> None:
        if self.closed or self.started:
            return
        head = [("content-type", ctype), ("content-length", str(len(body))),
                ("cache-control", "no-store"), *headers, ("connection", "close")]  # fmt: skip
        try:
            reason = HTTPStatus(status).phrase.encode()
            out = self.h11.send(h11.Response(status_code=status, headers=head, reason=reason))
            out = (out or b"") + (self.h11.send(h11.Data(data=body)) or b"")
            out += self.h11.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            out = b""
        self.transport.write(out)
        self._close()

    def detach(self) -> tuple[Any, bytes]:
        raise AssertionError("an event stream is already detached")

    # the stream ----------------------------------------------------------------------------------
    def _head(self) -> None:
        self.started = True
        headers = [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-store"),
            ("x-accel-buffering", "no"),
            *self.api.cors(self.request),
        ]
        response = h11.Response(status_code=200, headers=headers, reason=b"OK")
        self.transport.write(self.h11.send(response) or b"")
        self._keepalive = self._loop.call_later(self.limits.keepalive_s, self._keepalive_tick)

    def _write(self, data: bytes | bytearray) -> None:
        if data and self.started and not self.closed:
            self.transport.write(self.h11.send(h11.Data(data=bytes(data))) or b"")

    def _keepalive_tick(self) -> None:
        self._keepalive = None
        if self.closed:
            return
        if self.transport.get_write_buffer_size() == 0:
            self._write(b": keepalive\n\n")
        self._keepalive = self._loop.call_later(self.limits.keepalive_s, self._keepalive_tick)

    def end(self) -> None:
        """End the stream (its last chunk), then close the socket."""
        if self.closed:
            return
        if not self.started:  # closed by the server before an answer (a connection bound)
            self.api.reply_message(
                self, self.request, error(RID, "unavailable", "closed by the server")
            )
            return
        with contextlib.suppress(h11.LocalProtocolError):
            self.transport.write(self.h11.send(h11.EndOfMessage()) or b"")
        self._close()

    def _close(self) -> None:
        self.closed = True
        self.transport.close()
        if self._cutoff is None:
            self._cutoff = self._loop.call_later(self.limits.close_timeout_s, self.transport.abort)


def _event(event_id: int | None, name: bytes | None, data: bytes) -> bytes:
    out = b""
    if event_id is not None:
        out += b"id: %d\n" % event_id
    if name is not None:
        out += b"event: " + name + b"\n"
    return out + b"data: " + data + b"\n\n"


__all__ = ["EventStream", "SseLimits", "start_stream"]
