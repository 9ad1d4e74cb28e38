"""WebTransport sessions at ``/v1/wt`` on the HTTP/3 listener (docs/web.md §8).

A session (an extended CONNECT with ``:protocol: webtransport``, accepted by ``web_h3``) carries
one native connection (``wire.aio.Connection`` of the client port's ``Server``, served by the
same ``Service``), as a WebSocket does (``ctxstore.web``): each message the client sends is one
native frame's body (``wire.web_codec`` converts JSON), and the native connection writes into a
``web_pipe.Pipe`` whose frames this module sends on QUIC streams:

- the client opens **one bidirectional stream per request** (or several requests on one: each
  is answered on the stream it came on); the answer goes back on that stream, which the server
  ends once the client ended its side and every request of it is answered.
- the server opens **one unidirectional stream per subscription** (its first push opens it);
  every push of that ``sub_id`` goes on it, in order, so a packet lost on one subscription's
  stream never delays another's.  ``subscription_closed`` (or the ``unsubscribed`` answer) ends
  it.
- the goodbye (``Error{rid: 0}``) goes on a unidirectional stream of its own, then the session
  is closed (``CLOSE_WEBTRANSPORT_SESSION`` with the WebSocket close code of ``web.CLOSE_CODES``
  and the goodbye's message).

Framing on a stream: each message is a 4-byte big-endian length, then the message: the native
msgpack body (``?protocol=ctxstore.v1.msgpack``) or one JSON object (``ctxstore.v1.json``, the
default), exactly the WebSocket protocol's messages.

Rules of this module:
- The first message handed to the native connection is the ``hello``: messages that arrive on
  other streams before it are held (at most ``EARLY_MESSAGES_MAX``, ``HELLO_FRAME_BYTES_MAX``
  each), then handed after it.  A message is bounded before it is buffered: the hello by
  ``HELLO_FRAME_BYTES_MAX``, others by the native frame limit (goodbye ``too_large``).
- A request reusing the ``rid`` of one in flight is answered ``bad_request`` on its own stream
  (its answer could not be told apart otherwise).
- Flow control: the bytes sent and not yet acknowledged on the session's streams are its write
  buffer (``Pipe.flow``); over the native connection's high-water mark its writer pauses (so
  pushes pause and a reader that takes nothing is closed ``slow_consumer`` / cut off, as on a
  WebSocket).  While the native connection reads nothing (its bounds), messages received are
  held, at most ``HELD_BYTES_MAX`` (then the goodbye ``too_large``).
- Nothing a peer sends raises out of this module.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, get_args

import msgspec
from aioquic.buffer import encode_uint_var

from wire.aio import Connection, Server
from wire.framing import HEADER, HELLO_FRAME_BYTES_MAX, read_head
from wire.protocol import Push, error
from wire.web_codec import (
    JSON,
    MSGPACK,
    Undecodable,
    bodies,
    frame_of_body,
    frame_of_json,
    goodbye_of,
    json_text,
)

from .web import POLICY, cut_off_reason, goodbye_close
from .web_pipe import Pipe

if TYPE_CHECKING:
    from aioquic.quic.connection import QuicConnection

logger = logging.getLogger(__name__)

PATH: Final = "/v1/wt"
CLOSE_SESSION_CAPSULE: Final = 0x2843  # CLOSE_WEBTRANSPORT_SESSION
SESSION_GONE: Final = 0x170D7B68  # WT_SESSION_GONE: a stream of a session that is closed
EARLY_MESSAGES_MAX: Final = 64  # messages held before the hello
HELD_BYTES_MAX: Final = 16 * 1024 * 1024  # received while the native connection reads nothing
REASON_BYTES_MAX: Final = 1024
PUSH_TAGS: Final = frozenset(t.__struct_config__.tag for t in get_args(Push))
_head_decoder: Final = msgspec.msgpack.Decoder(list[msgspec.Raw])
_int_decoder: Final = msgspec.msgpack.Decoder(int)
_str_decoder: Final = msgspec.msgpack.Decoder(str)
_body_encoder: Final = msgspec.msgpack.Encoder()


def head_of(body: bytes | bytearray | memoryview) -> tuple[str, int | None, int | None]:
    """``(tag, first, second)`` of a native message body: its tag and first two fields when
    they are integers (a request's ``rid``; a response's ``rid`` and, for ``subscribed``, its
    ``sub_id``; a push's ``sub_id``); ``("", None, None)`` if it is not such an array."""
    try:
        items = _head_decoder.decode(body)
        tag = _str_decoder.decode(items[0]) if items else ""
    except (msgspec.DecodeError, IndexError):
        return "", None, None
    ints: list[int | None] = []
    for raw in items[1:3]:
        try:
            value = _int_decoder.decode(raw)
        except msgspec.DecodeError:
            value = None
        ints.append(value)
    ints += [None] * (2 - len(ints))
    return tag, ints[0], ints[1]


def release_stream(quic: QuicConnection, stream_id: int) -> None:
    """End both directions of a stream of a gone session (``WT_SESSION_GONE``)."""
    for end in (quic.stop_stream, quic.reset_stream):
        try:
            end(stream_id, SESSION_GONE)
        except Exception:  # that direction is not ours, or ended already
            continue


class SessionHost(abc.ABC):
    """What a session needs of its QUIC connection (``web_h3.H3Protocol``)."""

    quic: QuicConnection

    @abc.abstractmethod
    def create_wt_stream(self, session_id: int, unidirectional: bool) -> int:
        """Open a WebTransport stream of the session; its id."""

    @abc.abstractmethod
    def send_capsule_and_end(self, session_id: int, data: bytes) -> None:
        """Send a capsule on the session's CONNECT stream, then end that stream."""

    @abc.abstractmethod
    def transmit_soon(self) -> None:
        """Send what QUIC has queued, once in this loop pass."""

    @abc.abstractmethod
    def peer_address(self) -> Any:
        """The client's address now (it changes with a migration)."""

    @abc.abstractmethod
    def session_ended(self, session: WtSession) -> None:
        """Forget an ended session."""


class _InStream:
    __slots__ = ("buf", "early", "ended", "pending")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ended = False  # the client ended its side
        self.pending = 0  # requests of it not yet answered
        self.early = 0  # messages of it held until the hello is handed


class _Flow(asyncio.Transport):
    """The session's write buffer for the native connection (``Pipe.flow``): the bytes sent on
    its streams and not yet acknowledged."""

    def __init__(self, session: WtSession) -> None:
        super().__init__()
        self.session = session
        self.high = 1024 * 1024
        self.low = self.high // 4

    def get_write_buffer_size(self) -> int:
        return self.session.unacked_bytes()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = 64 * 1024 if high is None else high
        self.low = self.high // 4 if low is None else low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.low, self.high


class WtSession:
    """One WebTransport session: the pipe's owner, around a native ``Connection``."""

    def __init__(
        self,
        host: SessionHost,
        session_id: int,
        clients: Server,
        subprotocol: str,
        stats: Callable[[str, int], None],
    ) -> None:
        self.host = host
        self.session_id = session_id
        self.subprotocol = subprotocol
        self.json = subprotocol == JSON
        self.stats = stats
        self.inner = Connection(clients)
        self.flow = _Flow(self)
        self.pipe = Pipe(self, self.flow, self._extra_info)
        self._loop = asyncio.get_running_loop()
        self._frame_bytes_max = clients.max_frame_bytes
        self._in: dict[int, _InStream] = {}
        self._rid_stream: dict[int, int] = {}  # request in flight -> its stream
        self._sub_stream: dict[int, int] = {}  # subscription -> its unidirectional stream
        self._out: set[int] = set()  # our streams that may hold unacknowledged bytes
        self._hello_handed = False
        self._early: list[tuple[int, bytearray, int | None]] = []
        self._frames = bytearray()  # native frames to hand after this read
        self._held = bytearray()  # frames received while the native connection reads nothing
        self._inner_reading = True
        self._write_paused = False
        self.closed = False
        self._goodbye: tuple[str, str] | None = None
        self.messages_received = 0
        self.messages_sent = 0

    def start(self) -> None:
        self.inner.connection_made(self.pipe)

    def _extra_info(self, name: str) -> Any:
        return self.host.peer_address() if name == "peername" else None

    # the read path -------------------------------------------------------------------------------
    def stream_data(self, stream_id: int, data: bytes, ended: bool) -> None:
        if self.closed:
            return
        try:
            self._stream_data(stream_id, data, ended)
            self._hand()
        except Exception:  # a bug: this session ends, the node goes on
            logger.exception("WebTransport session %s: failed on input", self.inner.peername)
            self.close(1011, "internal error")

    def _stream_data(self, stream_id: int, data: bytes, ended: bool) -> None:
        if stream_id & 2:  # a unidirectional stream of the client's
            self._hand()
            self.inner.close("bad_request", "the client's unidirectional streams are not used")
            return
        st = self._in.get(stream_id)
        if st is None:
            st = self._in[stream_id] = _InStream()
            self.stats("streams", 1)
        st.buf += data
        buf = st.buf
        pos = 0
        while len(buf) - pos >= HEADER.size:
            (length,) = HEADER.unpack_from(buf, pos)
            limit = self._frame_bytes_max if self._hello_handed else HELLO_FRAME_BYTES_MAX
            if length > limit:
                self._hand()
                self.inner.close("too_large", f"a message of more than {limit} bytes ({length})")
                return
            end = pos + HEADER.size + length
            if len(buf) < end:
                break
            body = bytes(buf[pos + HEADER.size : end])
            pos = end
            self._message(stream_id, st, body)
            if self.closed or self.inner.closed:
                return
        if pos:
            del buf[:pos]
        if ended:
            st.ended = True
            if buf:
                self._hand()
                self.inner.close("bad_request", "a stream ended inside a message")
                return
            self._maybe_finish(stream_id, st)

    def _message(self, stream_id: int, st: _InStream, body: bytes) -> None:
        self.messages_received += 1
        try:
            frame = frame_of_json(body) if self.json else frame_of_body(body)
        except Undecodable as e:
            self._hand()
            self.inner.close("bad_request", str(e))
            return
        # (the core's own reading of a request's tag and rid: it answers a malformed request
        # on the rid read so, which is the stream the answer goes to)
        _, tag, rid = read_head(memoryview(frame)[HEADER.size :])
        if not self._hello_handed:
            if tag != "hello":
                if len(self._early) >= EARLY_MESSAGES_MAX:
                    self.inner.close("bad_request", "too many messages before the hello")
                    return
                self._early.append((stream_id, frame, rid))
                st.early += 1
                return
            self._hello_handed = True
            self._add(stream_id, st, frame, rid)
            early, self._early = self._early, []
            for sid, f, r in early:
                held = self._in[sid]
                held.early -= 1
                self._add(sid, held, f, r)
            for sid in {sid for sid, _, _ in early}:  # (one that ended meanwhile)
                held = self._in[sid]
                if sid != stream_id:
                    self._maybe_finish(sid, held)
            return
        self._add(stream_id, st, frame, rid)

    def _add(self, stream_id: int, st: _InStream, frame: bytearray, rid: int | None) -> None:
        if rid is not None:
            if rid in self._rid_stream:
                e = error(rid, "bad_request", f"rid {rid} is in flight already", field="rid")
                self._write(stream_id, _body_encoder.encode(e))
                return
            self._rid_stream[rid] = stream_id
            st.pending += 1
        self._frames += frame

    def _hand(self) -> None:
        """Give the native connection the requests of this read (or hold them)."""
        if not self._frames or self.inner.closed:
            self._frames = bytearray()
            return
        frames, self._frames = self._frames, bytearray()
        if not self._inner_reading or self._held:
            self._held += frames
            if len(self._held) > HELD_BYTES_MAX:
                self._held = bytearray()
                message = f"more than {HELD_BYTES_MAX} bytes sent while the server reads nothing"
                self.inner.close("too_large", message)
            return
        self.inner.data_received(frames)  # type: ignore[arg-type]  # (bytes-like)

    def _maybe_finish(self, stream_id: int, st: _InStream) -> None:
        if st.ended and st.pending == 0 and st.early == 0 and not st.buf:
            del self._in[stream_id]
            if not self.closed:
                self.host.quic.send_stream_data(stream_id, b"", end_stream=True)
                self.host.transmit_soon()

    # the write path -----------------------------------------------------------------------------
    def write_frames(self, data: bytes | bytearray | memoryview) -> None:
        """The native connection's output: each message to its stream."""
        if self.closed:
            return
        for body in bodies(data):
            tag, first, second = head_of(body)
            if tag in PUSH_TAGS and first is not None:
                sid = self._sub_stream.get(first)
                if sid is None:
                    sid = self._sub_stream[first] = self.host.create_wt_stream(
                        self.session_id, True
                    )
                    self._out.add(sid)
                    self.stats("streams_opened", 1)
                end = tag == "subscription_closed"
                self._write(sid, body, end)
                if end:
                    del self._sub_stream[first]
                continue
            goodbye = goodbye_of(body)
            if goodbye is not None:
                self._goodbye = goodbye
                sid = self.host.create_wt_stream(self.session_id, True)
                self._out.add(sid)
                self._write(sid, body, True)
                continue
            stream_id = None if first is None else self._rid_stream.pop(first, None)
            if stream_id is None:  # (an answer to no request of ours: a server bug)
                logger.error("WebTransport: an answer %r with no stream (rid %s)", tag, first)
                continue
            if tag == "unsubscribed" and second is not None:
                sub = self._sub_stream.pop(second, None)
                if sub is not None:
                    self.host.quic.send_stream_data(sub, b"", end_stream=True)
            self._write(stream_id, body)
            st = self._in.get(stream_id)
            if st is not None:
                st.pending -= 1
                self._maybe_finish(stream_id, st)
        self.check_flow()

    def _write(self, stream_id: int, body: bytes | memoryview, end: bool = False) -> None:
        if self.json:
            try:
                payload = json_text(memoryview(body)).encode()
            except Exception:  # a bug: never drop a message silently
                logger.exception("WebTransport %s: cannot encode as JSON", self.inner.peername)
                self.close(1011, "internal error: a message has no JSON form")
                return
        else:
            payload = bytes(body)
        self._out.add(stream_id)
        self.host.quic.send_stream_data(stream_id, HEADER.pack(len(payload)) + payload, end)
        self.messages_sent += 1
        self.host.transmit_soon()

    def unacked_bytes(self) -> int:
        streams = self.host.quic._streams
        total = 0
        for sid in list(self._out):
            stream = streams.get(sid)
            if stream is None or stream.sender.is_finished:
                self._out.discard(sid)
                continue
            total += len(stream.sender._buffer)
        return total

    def check_flow(self) -> None:
        """Pause or resume the native connection's writer by the unacknowledged bytes."""
        if self.closed:
            return
        size = self.unacked_bytes()
        if not self._write_paused and size > self.flow.high:
            self._write_paused = True
            self.inner.pause_writing()
        elif self._write_paused and size <= self.flow.low:
            self._write_paused = False
            self.inner.resume_writing()

    # the pipe's owner (``web_pipe.PipeOwner``) --------------------------------------------------
    def pipe_closed(self) -> None:
        self.close(*goodbye_close(self._goodbye))

    def pipe_aborted(self) -> None:
        self.close(POLICY, cut_off_reason(self.inner))

    @property
    def pipe_closing(self) -> bool:
        return self.closed

    def set_reading(self, reading: bool) -> None:
        self._inner_reading = reading
        if reading and self._held and not self.closed:
            held, self._held = self._held, bytearray()
            self.inner.data_received(held)  # type: ignore[arg-type]

    # closing ------------------------------------------------------------------------------------
    def close(self, code: int, reason: str) -> None:
        """Close the session (``CLOSE_WEBTRANSPORT_SESSION``), then the native connection."""
        if self.closed:
            return
        self.closed = True
        text = reason.encode()[:REASON_BYTES_MAX]
        payload = code.to_bytes(4, "big") + text
        capsule = encode_uint_var(CLOSE_SESSION_CAPSULE) + encode_uint_var(len(payload)) + payload
        try:
            self.host.send_capsule_and_end(self.session_id, capsule)
        except Exception:  # the connection is gone already
            logger.debug("WebTransport: cannot send the close", exc_info=True)
        self.stats("closes", code)
        self._ended()

    def peer_closed(self) -> None:
        """The client closed the session (or the QUIC connection is gone)."""
        if self.closed:
            return
        self.closed = True
        self._ended()

    def _ended(self) -> None:
        """Its streams end (their QUIC stream credit returns to the client), then it goes."""
        for sid in [*self._in, *self._sub_stream.values()]:
            release_stream(self.host.quic, sid)
        self._in.clear()
        self._sub_stream.clear()
        self._rid_stream.clear()
        self._early = []
        self._held = bytearray()
        self.host.session_ended(self)
        self._loop.call_soon(self._lose)

    def _lose(self) -> None:
        if not self.inner.closed:
            self.inner.connection_lost(None)


__all__ = [
    "MSGPACK",
    "PATH",
    "PUSH_TAGS",
    "SessionHost",
    "WtSession",
    "head_of",
    "release_stream",
]
