"""Helpers that keep the wire tests short: connections wired back to back, frame builders, a
runner for asyncio tests."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Collection, Coroutine
from typing import Any

import msgspec
import uvloop

from wire.aio import BaseHandler, Connection, Reply
from wire.framing import (
    ClientConnection,
    ClientEvent,
    ConnectionClosed,
    ProtocolError,
    ServerConnection,
    ServerEvent,
)
from wire.protocol import (
    FRAME_BYTES_MAX,
    Append,
    Appended,
    CreateSession,
    Error,
    GetSession,
    Hello,
    ListSessions,
    MarkRead,
    Message,
    Messages,
    Ping,
    Pong,
    Push,
    Read,
    ReadMarked,
    Request,
    Response,
    Session,
    SessionInfo,
    SessionList,
    Welcome,
    error,
)

LOOPS = [uvloop.new_event_loop, asyncio.new_event_loop]
LOOP_IDS = ["uvloop", "asyncio"]
_encoder = msgspec.msgpack.Encoder()
_response_decoder = msgspec.msgpack.Decoder(Response)
_server_message_decoder = msgspec.msgpack.Decoder(Response | Push)


def frame(body: bytes) -> bytes:
    """A raw frame around ``body``."""
    return struct.pack(">I", len(body)) + body


def raw(value: Any) -> bytes:
    """The frame of any msgpack-able value (lists stand for messages: tag first)."""
    return frame(_encoder.encode(value))


def hello(rid: int = 1, token: str | None = None) -> Hello:
    return Hello(rid, 1, "test", token)


def welcome(rid: int = 1, max_frame_bytes: int = FRAME_BYTES_MAX) -> Welcome:
    return Welcome(rid, 7, "cluster-test", 1, max_frame_bytes)


def drain(conn: ServerConnection | ClientConnection) -> list[Any]:
    """Every event available now; stops after a sticky one (ProtocolError, ConnectionClosed)."""
    events: list[Any] = []
    for _ in range(100_000):
        event = conn.next_event()
        if event is None:
            return events
        events.append(event)
        if isinstance(event, ProtocolError | ConnectionClosed):
            return events
    raise AssertionError("next_event never returned None")


def responses(data: bytes | bytearray) -> list[Response]:
    """Decode a server's output, frame by frame."""
    out: list[Response] = []
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        out.append(_response_decoder.decode(bytes(data[pos + 4 : pos + 4 + n])))
        pos += 4 + n
    assert pos == len(data), "trailing bytes"
    return out


def server_messages(data: bytes | bytearray) -> list[Response | Push]:
    """Decode a server's output (responses and pushes), frame by frame."""
    out: list[Response | Push] = []
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        out.append(_server_message_decoder.decode(bytes(data[pos + 4 : pos + 4 + n])))
        pos += 4 + n
    assert pos == len(data), "trailing bytes"
    return out


def open_server(max_frame_bytes: int = FRAME_BYTES_MAX) -> ServerConnection:
    """A server connection past its handshake (its output drained)."""
    server = ServerConnection(max_frame_bytes)
    server.receive_data(frame(_encoder.encode(hello())))
    assert len(drain(server)) == 1
    server.send(welcome(max_frame_bytes=max_frame_bytes))
    server.data_to_send()
    return server


def open_client(max_frame_bytes: int = FRAME_BYTES_MAX) -> ClientConnection:
    """A client connection past its handshake (its output drained)."""
    client = ClientConnection()
    client.send(hello())
    client.receive_data(frame(_encoder.encode(welcome(max_frame_bytes=max_frame_bytes))))
    assert len(drain(client)) == 1
    client.data_to_send()
    return client


class Pair:
    """A client and a server connection back to back; bytes move only when told to."""

    def __init__(self, max_frame_bytes: int = FRAME_BYTES_MAX) -> None:
        self.client = ClientConnection()
        self.server = ServerConnection(max_frame_bytes)

    def send(self, *requests: Request) -> list[ServerEvent]:
        for request in requests:
            self.client.send(request)
        self.server.receive_data(self.client.data_to_send())
        return drain(self.server)

    def answer(self, *answers: Response) -> list[ClientEvent]:
        for response in answers:
            self.server.send(response)
        self.client.receive_data(self.server.data_to_send())
        return drain(self.client)

    def handshake(self) -> Pair:
        assert len(self.send(hello())) == 1
        assert len(self.answer(welcome(max_frame_bytes=self.server.max_frame_bytes))) == 1
        return self


def run(
    factory: Callable[[], Coroutine[Any, Any, None]],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop,
    timeout_s: float = 30.0,
) -> None:
    """Run a test coroutine with a hard timeout."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(asyncio.wait_for(factory(), timeout_s))


# -- asyncio ---------------------------------------------------------------------------------------


class StoreHandler(BaseHandler):
    """A tiny in-memory server: sessions, appends with dedupe by client_msg_id, reads.

    ``hold``: requests are kept in ``held`` unanswered until ``release``.  ``fail``: a queue of
    Errors to answer the next requests with.  ``seen`` records every request."""

    def __init__(self, tokens: Collection[str] | None = None) -> None:
        super().__init__(node_id=1, cluster_id="cluster-test", tokens=tokens)
        self.seen: list[Request] = []
        self.held: list[tuple[Connection, Request]] = []
        self.hold = False
        self.fail: list[tuple[str, bool]] = []  # (code, retryable)
        self.sessions: dict[str, Session] = {}
        self.messages: dict[str, list[Message]] = {}
        self.dedupe: dict[tuple[str, str], int] = {}
        self.closed: list[Connection] = []
        self.outstanding = 0
        self.max_outstanding = 0

    def on_request(self, conn: Connection, request: Request) -> Reply:
        self.seen.append(request)
        if self.hold:
            self.held.append((conn, request))
            self.outstanding += 1
            self.max_outstanding = max(self.max_outstanding, self.outstanding)
            return None
        return self.answer(request)

    def release(self, reverse: bool = False) -> None:
        held, self.held = self.held, []
        for conn, request in reversed(held) if reverse else held:
            self.outstanding -= 1
            conn.reply(self.answer(request))

    def on_close(self, conn: Connection) -> None:
        self.closed.append(conn)

    def answer(self, request: Request) -> Response:
        if self.fail:
            code, retryable = self.fail.pop(0)
            return Error(request.rid, code, "told to fail", retryable, {})  # type: ignore[arg-type]
        match request:
            case Ping(rid):
                return Pong(rid)
            case CreateSession(rid, user_id, agent_id, metadata, session_id):
                sid = session_id or f"s-{len(self.sessions) + 1}"
                session = Session(sid, user_id, agent_id, 1, metadata, 0)
                self.sessions.setdefault(sid, session)
                self.messages.setdefault(sid, [])
                return SessionInfo(rid, self.sessions[sid])
            case GetSession(rid, sid):
                if sid not in self.sessions:
                    return error(rid, "not_found", f"no session {sid}", session_id=sid)
                return SessionInfo(rid, self.session(sid))
            case ListSessions(rid, user_id, _, limit):
                found = [self.session(s) for s in sorted(self.sessions)]
                return SessionList(rid, [s for s in found if s.user_id == user_id][:limit], None)
            case Append():
                return self.append(request)
            case Read(rid, sid, after_seq, limit):
                found = [m for m in self.messages.get(sid, []) if m.seq > after_seq][:limit]
                return Messages(rid, found, len(self.messages.get(sid, [])))
            case MarkRead(rid, sid, user_id, seq):
                return ReadMarked(rid, sid, user_id, seq)
        return error(request.rid, "bad_request", "unexpected")

    def session(self, sid: str) -> Session:
        return msgspec.structs.replace(self.sessions[sid], last_seq=len(self.messages[sid]))

    def append(self, r: Append) -> Response:
        log = self.messages.setdefault(r.session_id, [])
        if r.client_msg_id is not None and (r.session_id, r.client_msg_id) in self.dedupe:
            return Appended(r.rid, self.dedupe[r.session_id, r.client_msg_id], 2, True)
        if r.expected_seq is not None and r.expected_seq != len(log):
            return error(r.rid, "conflict", "expected_seq", last_seq=len(log))
        seq = len(log) + 1
        log.append(
            Message(
                r.session_id,
                seq,
                r.sender,
                r.sender_id,
                r.kind,
                r.content,
                r.metadata,
                r.client_msg_id,
                2,
                r.token_count,
            )
        )
        if r.client_msg_id is not None:
            self.dedupe[r.session_id, r.client_msg_id] = seq
        return Appended(r.rid, seq, 2, False)


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


class RawClient:
    """A socket speaking the protocol through a ``ClientConnection``, or raw bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.core = ClientConnection()

    @classmethod
    async def open(cls, address: tuple[str, int], greet: bool = True) -> RawClient:
        reader, writer = await asyncio.open_connection(*address)
        client = cls(reader, writer)
        if greet:
            client.send(hello())
            [event] = await client.events(1)
            assert isinstance(event.response, Welcome), event
        return client

    def send(self, *requests: Request) -> None:
        for request in requests:
            self.core.send(request)
        self.writer.write(self.core.data_to_send())

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def events(self, n: int) -> list[ClientEvent]:
        """The next ``n`` events (fewer if the stream ends)."""
        events = drain(self.core)
        while len(events) < n:
            data = await self.reader.read(65536)
            self.core.receive_data(data or None)
            events += drain(self.core)
            if not data:
                break
        return events

    async def closed(self) -> bool:
        """True once the server closed the stream (after any bytes still in flight)."""
        while await self.reader.read(65536):
            pass
        return True

    def close(self) -> None:
        self.writer.close()
