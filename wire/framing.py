"""The native binary protocol's framing and connection states, sans I/O (design §4.1).

A frame is a 4-byte big-endian unsigned length N, then N bytes of msgpack: one message of
``protocol.Request`` (client -> server), or of ``protocol.Response`` or ``protocol.Push``
(server -> client).
``ServerConnection`` and ``ClientConnection`` are the two ends of one connection: bytes go in
through ``receive_data`` (``None``: end of stream), events come out of ``next_event``, messages
go in through ``send`` and leave as bytes through ``data_to_send``.  No I/O, no clock.

Rules of this file:
- Both ends walk the same ``TRANSITIONS`` over what they send and what they receive.  An input
  the table does not list is an error: a remote one is a ``ProtocolError`` event, a local one
  raises ``LocalProtocolError`` and changes nothing.
- A declared length is compared with the limit of the state before its body is buffered (a
  server accepts at most ``HELLO_FRAME_BYTES_MAX`` before the Hello); the receive buffer is
  compacted in place, once per wait for more bytes.
- A well-framed request that fails the schema is a ``BadRequest``: the server has already queued
  a ``bad_request`` Error naming the field, and the connection goes on.  So is a request whose
  ``rid`` is readable but whose body nests deeper than the decoder goes, and an ``Append`` or
  ``CreateSession`` whose metadata is over ``METADATA_BYTES_MAX`` or ``METADATA_DEPTH_MAX``, or
  whose metadata or parts hold what JSON cannot (a non-string map key, a msgpack extension).
  Anything else that is broken (oversize frame, undecodable msgpack, an unreadable ``rid``, a
  first frame that is not a valid Hello, a frame the table does not allow) is a
  ``ProtocolError``.  It is sticky: the
  buffer is dropped, later input is ignored, ``next_event`` returns it again, ``send`` discards,
  and a server has queued ``Error{rid: 0}``: write ``data_to_send()``, then close.
- A server holds the frames that follow a Hello unparsed until the Welcome is sent, so no
  request is handled before the Hello is accepted (the token checked).  From protocol version
  4 (``REHELLO_VERSION``) a client may send another Hello, of the same version, on the open
  connection (a token refreshed): it is a request like any other, answered ``Welcome`` or an
  ``Error`` that leaves the connection open; nothing is held behind it.
- An ``Error`` with ``rid`` 0 is the server's last word on a connection, so requests use rids
  >= 1 (a request with rid 0 is a protocol error).
- A server answers each request exactly once, in any order (``rid`` matches them); the number of
  unanswered requests is ``in_flight``, and ``in_flight_bytes`` their charges: each its frame
  bytes plus the ``answer_reserve`` of its type (none by default).
- Pushes (subscription events) flow only while OPEN, interleaved with responses in any order;
  they answer no request and leave the in-flight accounting alone.  A push is never cut to fit:
  one over ``max_frame_bytes`` raises ``too_large`` so the server splits its batch.
- ``goodbye`` is the server's deliberate last word (a graceful shutdown): ``Error{rid: 0}``
  with the code's ``retryable``, then MUST_CLOSE.  To a client any ``Error{rid: 0}`` is a
  ``ProtocolError`` carrying that code and ``retryable``.
"""

from __future__ import annotations

import enum
import re
import struct
from typing import Any, Final, cast, get_args

import msgspec
import msgspec.msgpack

from .errors import LocalProtocolError
from .parts import PartError, check_parts
from .protocol import (
    FRAME_BYTES_MAX,
    METADATA_BYTES_MAX,
    METADATA_DEPTH_MAX,
    PROTOCOL_VERSIONS,
    REHELLO_VERSION,
    RETRYABLE,
    Append,
    Compact,
    CreateSession,
    Error,
    ErrorCode,
    Hello,
    Push,
    Request,
    Response,
    Welcome,
)

HEADER: Final = struct.Struct(">I")
HELLO_FRAME_BYTES_MAX: Final = 16 * 1024
"""Limit of a server's first frame (a Hello), before the client is known."""
FRAME_BYTES_CEILING: Final = 2**32 - 1  # what 4 length bytes can declare
SUPPORTED_VERSIONS: Final = PROTOCOL_VERSIONS


class State(enum.Enum):
    IDLE = "idle"  # nothing sent (client) / received (server) yet
    GREETING = "greeting"  # Hello on its way; Welcome or refusal pending
    OPEN = "open"
    MUST_CLOSE = "must_close"  # Hello refused or protocol broken: write what is queued, close

    __hash__ = object.__hash__  # the table is looked up per message; Enum's hash is Python code


class Input(enum.Enum):
    HELLO = "hello"
    WELCOME = "welcome"
    REFUSAL = "refusal"  # an Error answering the Hello
    GOODBYE = "goodbye"  # an Error with rid 0: the server is closing the connection
    REQUEST = "request"  # any request but Hello
    RESPONSE = "response"  # any response but Welcome, Errors included
    PUSH = "push"  # a subscription event (server -> client), answering no request

    __hash__ = object.__hash__


# (state, input sent or received) -> next state.  Every other pair is an error.
TRANSITIONS: Final[dict[tuple[State, Input], State]] = {
    (State.IDLE, Input.HELLO): State.GREETING,
    (State.IDLE, Input.GOODBYE): State.MUST_CLOSE,
    (State.GREETING, Input.REQUEST): State.GREETING,  # pipelined; the server holds them
    (State.GREETING, Input.WELCOME): State.OPEN,
    (State.GREETING, Input.REFUSAL): State.MUST_CLOSE,
    (State.GREETING, Input.GOODBYE): State.MUST_CLOSE,
    (State.OPEN, Input.REQUEST): State.OPEN,
    (State.OPEN, Input.HELLO): State.OPEN,  # a token refreshed (version 4; checked in the core)
    (State.OPEN, Input.WELCOME): State.OPEN,
    (State.OPEN, Input.RESPONSE): State.OPEN,
    (State.OPEN, Input.PUSH): State.OPEN,  # only once open: a push before the Welcome is an error
    (State.OPEN, Input.GOODBYE): State.MUST_CLOSE,
}

REQUEST_TYPES: Final[tuple[type[Any], ...]] = get_args(Request)
PUSH_TYPES: Final[tuple[type[Any], ...]] = get_args(Push)
_INPUT_OF: Final[dict[type[Any], Input]] = (
    {t: Input.REQUEST for t in REQUEST_TYPES}
    | {t: Input.PUSH for t in PUSH_TYPES}
    | {Hello: Input.HELLO, Welcome: Input.WELCOME}
)
_REQUEST_BY_TAG: Final[dict[str, type[Any]]] = {t.__struct_config__.tag: t for t in REQUEST_TYPES}


def input_of(message: Request | Response | Push, state: State) -> Input:
    """What ``message`` is to the table in ``state``."""
    kind = _INPUT_OF.get(type(message), Input.RESPONSE)
    if kind is Input.RESPONSE and type(message) is Error:
        if message.rid == 0:
            return Input.GOODBYE
        if state is State.GREETING:
            return Input.REFUSAL
    return kind


# -- events ----------------------------------------------------------------------------------------


class RequestReceived(msgspec.Struct, frozen=True):
    request: Request


class BadRequest(msgspec.Struct, frozen=True):
    """A well-framed request failed the schema; ``error`` (already queued) names the field."""

    rid: int
    error: Error


class ResponseReceived(msgspec.Struct, frozen=True):
    response: Response


class PushReceived(msgspec.Struct, frozen=True):
    """A subscription event (``push.sub_id`` names the subscription)."""

    push: Push


class ProtocolError(msgspec.Struct, frozen=True):
    """The peer broke the protocol (or, to a client, the server said goodbye): close.

    ``retryable``: a server's goodbye says whether the requests it leaves unanswered may
    succeed elsewhere (true for a shutdown); false when this side detected the breakage."""

    code: ErrorCode
    message: str
    retryable: bool = False


class ConnectionClosed(msgspec.Struct, frozen=True):
    """The peer ended its stream (any partial frame is discarded)."""


CONNECTION_CLOSED: Final = ConnectionClosed()

ServerEvent = RequestReceived | BadRequest | ProtocolError | ConnectionClosed
ClientEvent = ResponseReceived | PushReceived | ProtocolError | ConnectionClosed

# -- codecs, built once ----------------------------------------------------------------------------

_encoder: Final = msgspec.msgpack.Encoder()
_request_decoder: Final = msgspec.msgpack.Decoder(Request)
_server_message_decoder: Final = msgspec.msgpack.Decoder(Response | Push)  # one tagged union
_PATH: Final = re.compile(r"`\$\[(\d+)\]")
_UNDECODABLE: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
"""What a decoder raises for bytes that are not the message (msgspec lets an invalid UTF-8
string escape as ``UnicodeDecodeError``)."""
_RID_MAX: Final = 2**63 - 1


class _Broken(Exception):
    """Internal: the peer broke the protocol."""

    def __init__(self, code: ErrorCode, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.code: ErrorCode = code
        self.message = message
        self.retryable = retryable


def encode_frame(message: Request | Response | Push) -> bytes:
    """One message with its length prefix (for tests and tools; connections encode in place)."""
    buf = bytearray()
    _append_frame(buf, message)
    return bytes(buf)


def _append_frame(buf: bytearray, message: Request | Response | Push) -> int:
    """Append the frame of ``message`` to ``buf``; its body length.  Leaves ``buf`` as it was
    and raises ``LocalProtocolError`` if the message cannot be encoded."""
    start = len(buf)
    try:
        _encoder.encode_into(message, buf, start + HEADER.size)
    except (TypeError, ValueError, OverflowError) as e:
        del buf[start:]
        raise LocalProtocolError("internal", f"cannot encode {type(message).__name__}: {e}") from e
    length = len(buf) - start - HEADER.size
    if length > FRAME_BYTES_CEILING:
        del buf[start:]
        raise LocalProtocolError("too_large", f"a frame of {length} bytes")
    HEADER.pack_into(buf, start, length)
    return length


# -- the shared machinery --------------------------------------------------------------------------


class _Connection:
    def __init__(self, max_frame_bytes: int) -> None:
        if not 0 < max_frame_bytes <= FRAME_BYTES_CEILING:
            raise ValueError(f"max_frame_bytes must be in 1..{FRAME_BYTES_CEILING}")
        self.max_frame_bytes = max_frame_bytes
        self.state = State.IDLE
        self.error: ProtocolError | None = None
        self._buffer = bytearray()
        self._pos = 0
        self._eof = False
        self._out = bytearray()

    def receive_data(self, data: bytes | bytearray | memoryview | None) -> None:
        """Bytes from the peer; ``None`` means the peer ended its stream.  Ignored once the
        connection must close, and after the end of the stream."""
        if self._eof or self.state is State.MUST_CLOSE:
            return
        if data is None:
            self._eof = True
        else:
            self._buffer += data

    def data_to_send(self) -> bytearray:
        """The bytes queued since the last call (a buffer the caller now owns)."""
        out, self._out = self._out, bytearray()
        return out

    @property
    def bytes_to_send(self) -> int:
        """Bytes queued for ``data_to_send``."""
        return len(self._out)

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buffer) - self._pos

    def _append_within_limit(self, message: Request | Response | Push) -> int:
        """Queue ``message``'s frame; over ``max_frame_bytes`` nothing is queued and
        ``LocalProtocolError("too_large")`` is raised.  The frame's length."""
        out = self._out
        start = len(out)
        length = _append_frame(out, message)
        if length > self.max_frame_bytes:
            del out[start:]
            raise LocalProtocolError(
                "too_large",
                f"a {_tag(message)} of {length} bytes exceeds max_frame_bytes "
                f"({self.max_frame_bytes})",
            )
        return length

    def _frame_limit(self) -> int:
        return self.max_frame_bytes

    def _next_body(self) -> bytearray | None:
        """The next complete frame's body, or None until more bytes arrive."""
        buf = self._buffer
        pos = self._pos
        if len(buf) - pos < HEADER.size:
            self._compact()
            return None
        (length,) = HEADER.unpack_from(buf, pos)
        limit = self._frame_limit()
        if length > limit:
            raise _Broken("too_large", f"a frame of {length} bytes exceeds the limit of {limit}")
        end = pos + HEADER.size + length
        if len(buf) < end:
            self._compact()
            return None
        self._pos = end
        return buf[pos + HEADER.size : end]

    def _compact(self) -> None:
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0

    def _fail(self, broken: _Broken) -> ProtocolError:
        self.error = ProtocolError(broken.code, broken.message, broken.retryable)
        self.state = State.MUST_CLOSE
        self._buffer = bytearray()
        self._pos = 0
        return self.error

    def _step(self, message: Request | Response | Push) -> State:
        """The state after sending ``message``; raises if the table does not allow it."""
        after = TRANSITIONS.get((self.state, input_of(message, self.state)))
        if after is None:
            raise LocalProtocolError(
                "internal", f"cannot send {type(message).__name__} in state {self.state.value}"
            )
        return after


# -- the server end --------------------------------------------------------------------------------


class ServerConnection(_Connection):
    """The server end of one connection."""

    def __init__(
        self,
        max_frame_bytes: int = FRAME_BYTES_MAX,
        supported_versions: frozenset[int] = SUPPORTED_VERSIONS,
        answer_reserve: dict[type[Any], int] | None = None,
    ) -> None:
        super().__init__(max_frame_bytes)
        self.supported_versions = supported_versions
        self.hello: Hello | None = None  # the client's Hello, once received
        self.in_flight_bytes = 0
        # request type -> bytes charged for its answer while it is in flight (wire.aio)
        self.answer_reserve: dict[type[Any], int] = dict.fromkeys(REQUEST_TYPES, 0)
        self.answer_reserve.update(answer_reserve or {})
        self._pending: dict[int, int] = {}  # rid -> charge, of unanswered requests

    @property
    def in_flight(self) -> int:
        """Requests received and not answered yet (the Hello included)."""
        return len(self._pending)

    def awaits_answer(self, rid: int) -> bool:
        """Whether the request ``rid`` is in flight (received, not answered)."""
        return rid in self._pending

    def _frame_limit(self) -> int:
        return HELLO_FRAME_BYTES_MAX if self.state is State.IDLE else self.max_frame_bytes

    def next_event(self) -> ServerEvent | None:
        """The next event, or None until more bytes arrive (or, while the Hello waits for its
        answer, until the Welcome is sent)."""
        while True:
            if self.error is not None:
                return self.error
            state = self.state
            if state is State.GREETING or state is State.MUST_CLOSE:
                return None
            try:
                body = self._next_body()
                if body is None:
                    return CONNECTION_CLOSED if self._eof else None
                event = self._on_body(body, state)
            except _Broken as e:
                error = self._fail(e)
                _append_frame(self._out, Error(0, e.code, e.message, False, {}))
                return error
            if event is not None:
                return event

    def _on_body(self, body: bytearray, state: State) -> ServerEvent | None:
        try:
            request: Request = _request_decoder.decode(body)
        except msgspec.ValidationError as e:
            return self._bad_request(body, e, state)
        except RecursionError:
            return self._too_deep(body, state)
        except _UNDECODABLE as e:
            raise _Broken("bad_request", f"undecodable frame: {e}") from None
        kind = Input.HELLO if type(request) is Hello else Input.REQUEST
        after = TRANSITIONS.get((state, kind))
        if after is None:
            if state is State.IDLE:
                raise _Broken("bad_request", f"the first frame must be hello, not {_tag(request)}")
            raise _Broken("bad_request", f"{_tag(request)} is not allowed once open")
        rid = request.rid
        if rid == 0:
            raise _Broken("bad_request", "rid: 0 is reserved (requests use rids >= 1)")
        if rid in self._pending:
            return self._answer_bad(rid, "rid", f"request {rid} is already in flight")
        if type(request) is Hello and state is State.OPEN:
            first = self.hello
            assert first is not None
            if first.protocol_version < REHELLO_VERSION:
                raise _Broken(
                    "bad_request",
                    f"a second hello needs protocol_version >= {REHELLO_VERSION} "
                    f"(this connection's is {first.protocol_version})",
                )
            if request.protocol_version != first.protocol_version:
                return self._answer_bad(
                    rid,
                    "protocol_version",
                    f"{request.protocol_version}: an open connection keeps its version "
                    f"({first.protocol_version})",
                )
            self.hello = request
        elif type(request) is Hello:
            if request.protocol_version not in self.supported_versions:
                raise _Broken(
                    "bad_request",
                    f"protocol_version: {request.protocol_version} is not supported "
                    f"(this server speaks {sorted(self.supported_versions)})",
                )
            self.hello = request
        elif isinstance(request, Append | CreateSession) and request.metadata:
            if len(body) > METADATA_BYTES_MAX:
                size = len(_encoder.encode(request.metadata))
                if size > METADATA_BYTES_MAX:
                    return self._answer_bad(
                        rid, "metadata", f"{size} bytes encoded exceeds {METADATA_BYTES_MAX}"
                    )
            fault = value_fault(request.metadata, METADATA_DEPTH_MAX, "metadata")
            if fault is not None:
                return self._answer_bad(rid, fault.path, fault.message)
        if type(request) is Append or type(request) is Compact:
            bad = check_body(request)
            if bad is not None:
                return self._answer_bad(rid, bad.path, bad.message)
        self.state = after
        charge = len(body) + self.answer_reserve[type(request)]
        self._pending[rid] = charge
        self.in_flight_bytes += charge
        return RequestReceived(request)

    def _bad_request(
        self, body: bytearray, exc: msgspec.ValidationError, state: State
    ) -> BadRequest:
        rid, field, message = describe_schema_error(body, exc)
        if state is State.IDLE:
            raise _Broken("bad_request", f"the first frame must be a valid hello: {message}")
        if not rid:
            raise _Broken("bad_request", f"no readable rid (>= 1): {message}")
        if rid in self._pending:
            return self._answer_bad(rid, "rid", f"request {rid} is already in flight")
        return self._answer_bad(rid, field, message)

    def _too_deep(self, body: bytearray, state: State) -> BadRequest:
        """A body nested deeper than the decoder goes: ``bad_request`` for its rid if readable."""
        _, _, rid = read_head(body)
        message = f"a value is nested too deeply (metadata: at most {METADATA_DEPTH_MAX} levels)"
        if state is State.IDLE or not rid:
            raise _Broken("bad_request", f"undecodable frame: {message}")
        if rid in self._pending:
            return self._answer_bad(rid, "rid", f"request {rid} is already in flight")
        return self._answer_bad(rid, None, message)

    def _answer_bad(self, rid: int, field: str | None, message: str) -> BadRequest:
        if field is not None and not message.startswith(f"{field}:"):
            message = f"{field}: {message}"
        details: dict[str, Any] = {} if field is None else {"field": field}
        error = Error(rid, "bad_request", message, False, details)
        _append_frame(self._out, error)
        return BadRequest(rid, error)

    def send(self, response: Response) -> None:
        """Queue the answer to the request ``response.rid``.

        Discarded once the connection must close.  Raises ``LocalProtocolError`` (nothing
        queued) if no such request is in flight, if the state does not allow the message, or if
        it cannot be encoded; a response over ``max_frame_bytes`` is replaced by a
        ``too_large`` Error."""
        if self.state is State.MUST_CLOSE:
            return
        rid = response.rid
        size = self._pending.get(rid)
        if size is None:
            raise LocalProtocolError("internal", f"no request {rid} in flight")
        after = self._step(response)
        if type(response) is Welcome:
            self._check_welcome(response)
        out = self._out
        start = len(out)
        length = _append_frame(out, response)
        if length > self.max_frame_bytes:
            del out[start:]
            response = _too_large_response(rid, length, self.max_frame_bytes)
            after = self._step(response)
            _append_frame(out, response)
        del self._pending[rid]
        self.in_flight_bytes -= size
        self.state = after

    def push(self, event: Push) -> int:
        """Queue a push; the bytes queued (its frame, the 4 length bytes included).

        Discarded (0) once the connection must close.  Raises ``LocalProtocolError`` (nothing
        queued) before the Welcome, for a ``sub_id`` < 1, for a value that cannot be encoded,
        and with ``too_large`` for a push over ``max_frame_bytes`` (split the batch)."""
        if self.state is State.MUST_CLOSE:
            return 0
        if type(event) not in PUSH_TYPES:
            raise LocalProtocolError("internal", f"{type(event).__name__} is not a push")
        if not 0 < event.sub_id <= _RID_MAX:
            raise LocalProtocolError("internal", f"sub_id: {event.sub_id} (pushes use >= 1)")
        after = self._step(event)
        length = self._append_within_limit(event)
        self.state = after
        return HEADER.size + length

    def goodbye(self, code: ErrorCode, message: str) -> None:
        """Queue the last word, ``Error{rid: 0}`` (``retryable`` per ``RETRYABLE``), and move to
        MUST_CLOSE: write ``data_to_send()``, then close.  Requests in flight stay unanswered.
        For a graceful shutdown: ``goodbye("unavailable", "node shutting down")``.  Nothing
        happens once the connection must close."""
        if self.state is State.MUST_CLOSE:
            return
        last = Error(0, code, message, code in RETRYABLE, {})
        after = self._step(last)
        _append_frame(self._out, last)
        self.state = after

    def _check_welcome(self, welcome: Welcome) -> None:
        if welcome.protocol_version not in self.supported_versions:
            raise LocalProtocolError("internal", "Welcome names an unsupported protocol_version")
        if welcome.max_frame_bytes != self.max_frame_bytes:
            raise LocalProtocolError(
                "internal",
                f"Welcome.max_frame_bytes {welcome.max_frame_bytes} != {self.max_frame_bytes}",
            )


def _too_large_response(rid: int, length: int, limit: int) -> Error:
    return Error(
        rid,
        "too_large",
        f"the response ({length} bytes) exceeds max_frame_bytes ({limit})",
        False,
        {"max_frame_bytes": limit},
    )


def check_body(request: Append | Compact) -> PartError | None:
    """What is wrong with the message bodies of a request the schema passed: the parts
    (wire/parts.py), a body given both as ``content`` and ``parts``, or neither, a metadata
    map nested too deeply, or a ``role`` its ``sender`` may not write; None if nothing."""
    if type(request) is Append:
        if request.role is not None and request.role not in SENDER_ROLES[request.sender]:
            allowed = " or ".join(SENDER_ROLES[request.sender])
            return PartError("role", f"a {request.sender} writes role {allowed}")
        return _check_message_body(request.content, request.parts, "")
    assert type(request) is Compact
    for i, m in enumerate(request.replacement):
        where = f"replacement[{i}]."
        if m.metadata:
            fault = value_fault(m.metadata, METADATA_DEPTH_MAX, f"{where}metadata")
            if fault is not None:
                return fault
        bad = _check_message_body(m.content, m.parts, where)
        if bad is not None:
            return bad
    return None


SENDER_ROLES: Final[dict[str, tuple[str, ...]]] = {
    "user": ("user",),
    "agent": ("assistant", "tool"),
    "system": ("system", "user", "assistant", "tool"),
}
"""The roles a sender may write (``Append.role``); the first is its default."""


def _check_message_body(content: str, parts: list[Any] | None, where: str) -> PartError | None:
    if parts is None:
        return None
    if content:
        return PartError(f"{where}content", "must be empty when parts are given")
    fault = value_fault(parts, METADATA_DEPTH_MAX, f"{where}parts", level=0)  # each map: 1
    if fault is not None:
        return fault
    try:
        check_parts(parts, f"{where}parts")
    except PartError as e:
        return e
    return None


def _tag(message: Request | Response | Push) -> str:
    return str(type(message).__struct_config__.tag)


def describe_schema_error(
    body: bytes | bytearray, exc: msgspec.ValidationError
) -> tuple[int | None, str | None, str]:
    """``(rid, field, message)`` for a request body that failed the schema: the rid if it can be
    read, and the field named by the struct's own field name (msgspec reports ``$[2]``)."""
    text = str(exc)
    length, tag, rid = read_head(body)
    if length is None:
        return None, None, text
    cls = _REQUEST_BY_TAG.get(tag) if tag is not None else None
    if tag is not None and cls is None:
        return rid, "type", f"type: unknown request type {tag!r}"
    if cls is None:
        return rid, "type", "type: the first element must be the request type (a string)"
    fields: tuple[str, ...] = cls.__struct_fields__
    match = _PATH.search(text)
    if match is not None:
        index = int(match.group(1)) - 1  # element 0 is the tag
        if 0 <= index < len(fields):
            detail = text.split(" - at ", 1)[0]
            return rid, fields[index], f"{fields[index]}: {detail}"
    if text.startswith("Expected `array` of at least length") and 1 <= length <= len(fields):
        missing = fields[length - 1]
        return rid, missing, f"{missing}: missing ({cls.__name__} has {len(fields)} fields)"
    if text.startswith("Expected `array` of at most length"):
        return rid, None, f"too many fields ({cls.__name__} has {len(fields)})"
    return rid, None, text


def read_head(
    body: bytes | bytearray | memoryview,
) -> tuple[int | None, str | None, int | None]:
    """``(length, tag, rid)`` of a request body read by hand from its first bytes: the array's
    length, then its first two elements if they are a string and an integer in ``1.._RID_MAX``
    (None for what is not there or not that), whatever follows them (a value nested too deeply
    for the decoder, say)."""
    end = len(body)
    if end == 0:
        return None, None, None
    lead = body[0]
    if 0x90 <= lead <= 0x9F:
        length, pos = lead & 0x0F, 1
    elif lead == 0xDC or lead == 0xDD:
        pos = 3 if lead == 0xDC else 5
        if end < pos:
            return None, None, None
        length = int.from_bytes(body[1:pos], "big")
    else:
        return None, None, None
    tag, pos = _read_str(body, pos) if length >= 1 else (None, -1)
    rid = _read_uint(body, pos) if length >= 2 and pos >= 0 else None
    if rid is not None and not 0 < rid <= _RID_MAX:
        rid = None
    return length, tag, rid


def _read_str(body: bytes | bytearray | memoryview, pos: int) -> tuple[str | None, int]:
    """The msgpack string at ``pos`` (None for a binary or undecodable one) and the position
    after it, or ``(None, -1)`` if no string or binary is there."""
    if pos >= len(body):
        return None, -1
    lead = body[pos]
    if 0xA0 <= lead <= 0xBF:
        size, start = lead & 0x1F, pos + 1
    elif 0xD9 <= lead <= 0xDB or 0xC4 <= lead <= 0xC6:
        start = pos + 1 + (1 << ((lead - 0xD9) if lead >= 0xD9 else (lead - 0xC4)))
        size = int.from_bytes(body[pos + 1 : start], "big")
    else:
        return None, -1
    end = start + size
    if end > len(body):
        return None, -1
    if lead < 0xA0 or 0xC4 <= lead <= 0xC6:
        return None, end
    try:
        return bytes(body[start:end]).decode(), end
    except UnicodeDecodeError:
        return None, end


def _read_uint(body: bytes | bytearray | memoryview, pos: int) -> int | None:
    """The non-negative msgpack integer at ``pos``, or None."""
    if pos >= len(body):
        return None
    lead = body[pos]
    if lead <= 0x7F:
        return lead
    if 0xCC <= lead <= 0xCF:
        end = pos + 1 + (1 << (lead - 0xCC))
        return int.from_bytes(body[pos + 1 : end], "big") if end <= len(body) else None
    return None


_SCALARS: Final = (str, int, float, bool, bytes, type(None))


def value_fault(value: object, levels_max: int, path: str, level: int = 1) -> PartError | None:
    """What is wrong with a decoded value a client stores (metadata, parts), or None.

    Nested more than ``levels_max`` levels (``value`` is at ``level``: a metadata map is level
    1, a list of parts 0 so that each part's map is 1; each map or array inside adds one): a
    fault at ``path`` itself.  A map key that is not a string, or a value msgpack has and JSON
    has not (an extension type; a timestamp is one): a fault at the path of the map or the
    value (``metadata.a[2].b``).  Stored, either would fail every JSON reader of the message
    (the web, Postgres, an agent's webhook), forever.  Binary is kept (JSON readers get
    base64)."""
    stack: list[tuple[object, int, str]] = [(value, level, path)]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, dict):
            if depth > levels_max:
                return PartError(path, f"nested deeper than {levels_max} levels")
            for key, child in item.items():
                if type(key) is not str:
                    return PartError(
                        where,
                        f"a map key must be a string, not {type(key).__name__} {_short(key)}",
                    )
                if not _plain(child):
                    stack.append((child, depth + 1, f"{where}.{key}"))
        elif isinstance(item, (list, tuple)):  # (a tuple of types: a union is slow compiled)
            if depth > levels_max:
                return PartError(path, f"nested deeper than {levels_max} levels")
            for i, child in enumerate(item):
                if not _plain(child):
                    stack.append((child, depth + 1, f"{where}[{i}]"))
        elif not isinstance(item, _SCALARS):
            return _scalar_fault(where, item)
    return None


def _plain(value: object) -> bool:
    """A scalar that needs no look (exact types first: a decoder makes nothing else)."""
    t = type(value)
    return t is str or t is int or t is float or t is bool or value is None


def _scalar_fault(where: str, value: object) -> PartError:
    if isinstance(value, msgspec.msgpack.Ext):
        what = f"a msgpack extension (type {value.code})"
    else:  # a msgpack timestamp decodes as a datetime
        what = f"a msgpack {type(value).__name__}"
    return PartError(where, f"{what} has no JSON form: store a string, a number or a map")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


# -- the client end --------------------------------------------------------------------------------


class ClientConnection(_Connection):
    """The client end of one connection.  ``max_frame_bytes`` bounds frames both ways until
    the Welcome; from then on the server's ``Welcome.max_frame_bytes`` does.  Responses come out
    as ``ResponseReceived``, pushes as ``PushReceived``."""

    def __init__(self, max_frame_bytes: int = FRAME_BYTES_MAX) -> None:
        super().__init__(max_frame_bytes)
        self.welcome: Welcome | None = None

    def send(self, request: Request) -> None:
        """Queue a request.  Discarded once the connection must close.  Raises
        ``LocalProtocolError`` (nothing queued) if the state does not allow it (the first must
        be a Hello), if it cannot be encoded, or if it exceeds ``max_frame_bytes``."""
        if self.state is State.MUST_CLOSE:
            return
        if request.rid <= 0:
            raise LocalProtocolError("bad_request", "rid: requests use rids >= 1")
        after = self._step(request)
        self._append_within_limit(request)
        self.state = after

    def next_event(self) -> ClientEvent | None:
        """The next event, or None until more bytes arrive."""
        if self.error is not None:
            return self.error
        if self.state is State.MUST_CLOSE:
            return None
        try:
            body = self._next_body()
            if body is None:
                return CONNECTION_CLOSED if self._eof else None
            return self._on_body(body)
        except _Broken as e:
            return self._fail(e)

    def _on_body(self, body: bytearray) -> ClientEvent:
        try:
            message: Response | Push = _server_message_decoder.decode(body)
        except _UNDECODABLE as e:
            raise _Broken("internal", f"undecodable response: {e}") from None
        state = self.state
        kind = input_of(message, state)
        if kind is Input.GOODBYE:
            assert type(message) is Error
            raise _Broken(message.code, message.message, message.retryable)
        after = TRANSITIONS.get((state, kind))
        if after is None:
            raise _Broken("internal", f"{_tag(message)} is not allowed in state {state.value}")
        if kind is Input.PUSH:
            push = cast(Push, message)
            if not 0 < push.sub_id <= _RID_MAX:
                raise _Broken("internal", f"{_tag(push)} with sub_id {push.sub_id}")
            return PushReceived(push)
        response = cast(Response, message)
        if type(response) is Welcome:
            if not 0 < response.max_frame_bytes <= FRAME_BYTES_CEILING:
                raise _Broken("internal", f"max_frame_bytes {response.max_frame_bytes}")
            self.welcome = response
            self.max_frame_bytes = response.max_frame_bytes
        self.state = after
        return ResponseReceived(response)


__all__ = [
    "CONNECTION_CLOSED",
    "HEADER",
    "HELLO_FRAME_BYTES_MAX",
    "METADATA_BYTES_MAX",
    "METADATA_DEPTH_MAX",
    "PUSH_TYPES",
    "SENDER_ROLES",
    "SUPPORTED_VERSIONS",
    "TRANSITIONS",
    "BadRequest",
    "ClientConnection",
    "ClientEvent",
    "ConnectionClosed",
    "Input",
    "ProtocolError",
    "PushReceived",
    "RequestReceived",
    "ResponseReceived",
    "ServerConnection",
    "ServerEvent",
    "State",
    "check_body",
    "describe_schema_error",
    "encode_frame",
    "input_of",
    "read_head",
    "value_fault",
]
