"""The client-facing service: native protocol requests (``wire``) on a ``Node``.

- Writes (``CreateSession``, ``Append``, ``MarkRead``) become commands stamped with this node's
  clock, go to the session's group through the ``Router`` (proposed here or forwarded to the
  leader) and are answered with the state machine's result once applied: an ack means the
  command is committed on a quorum and applied.
- Reads (``GetSession``, ``Read``) first pass a ReadIndex barrier of the session's group (any
  replica may serve it), so a read sees every write acknowledged before it was sent, whichever
  node acknowledged it.  ``ListSessions`` reads this node's applied state (all groups are
  replicated here): it may lag a write acknowledged by another node by a replication delay.
- Answers never block the loop and need no task per request: the router's futures call back.
- Errors: domain refusals carry the state machine's code (``not_found``, ``conflict``,
  ``bad_request``); a request that cannot reach a leader in time is ``unavailable``
  (retryable); one whose outcome is unknown is ``timeout`` (retry with the same
  ``client_msg_id``).  Input limits are the wire's (the schema, and metadata at most
  ``METADATA_BYTES_MAX`` encoded, checked by ``wire.framing`` before a request reaches us).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from wire.aio import BaseHandler, Connection, Reply
from wire.protocol import (
    Append,
    Appended,
    CreateSession,
    Error,
    GetRoutes,
    GetSession,
    ListSessions,
    MarkRead,
    Messages,
    Ping,
    Pong,
    Read,
    ReadMarked,
    Request,
    Response,
    Routes,
    SessionInfo,
    SessionList,
    error,
)

from . import commands
from .node import Node
from .placement import group_of
from .router import RouteError

logger = logging.getLogger(__name__)

READ_BYTES_MAX = 2 * 1024 * 1024  # a Messages answer stops adding messages past this
_encode = msgspec.msgpack.Encoder().encode


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Service(BaseHandler):
    def __init__(self, node: Node, clock_ms: Callable[[], int] = now_ms) -> None:
        s = node.settings
        super().__init__(s.node_id, s.cluster_id, s.tokens or None)
        self.node = node
        self.state = node.state
        self.router = node.router
        self.groups = s.groups
        self.clock_ms = clock_ms
        self.requests = 0
        self.errors: dict[str, int] = {}
        self.on_append_latency: Callable[[float, bool], None] | None = None  # seconds, ok

    def on_request(self, conn: Connection, request: Request) -> Reply:
        self.requests += 1
        match request:
            case Append():
                return self._append(conn, request)
            case Read():
                return self._after_barrier(conn, request.rid, request.session_id, request)
            case GetSession():
                return self._after_barrier(conn, request.rid, request.session_id, request)
            case CreateSession():
                return self._create(conn, request)
            case MarkRead():
                cmd = commands.MarkRead(request.session_id, request.user_id, request.seq)
                return self._submit(conn, request.rid, request.session_id, cmd, request)
            case ListSessions():
                sessions, cursor = self.state.list_sessions(
                    request.user_id, request.cursor, request.limit
                )
                return SessionList(request.rid, sessions, cursor)
            case Ping():
                return Pong(request.rid)
            case GetRoutes():
                leaders = [self.node.host.leader(g) for g in range(self.groups)]
                version = self.node.driver.stats.soft_state_changes
                return Routes(request.rid, version, leaders, dict(self.router.addresses))
        return self._error(error(request.rid, "bad_request", "unsupported request"))

    # -- writes ---------------------------------------------------------------------------------
    def _append(self, conn: Connection, r: Append) -> Reply:
        cmd = commands.Append(
            r.session_id, r.sender, r.sender_id, r.kind, r.content, r.metadata,
            r.client_msg_id, r.expected_seq, r.token_count, self.clock_ms(),
        )  # fmt: skip
        return self._submit(conn, r.rid, r.session_id, cmd, r)

    def _create(self, conn: Connection, r: CreateSession) -> Reply:
        sid = r.session_id if r.session_id is not None else uuid.uuid4().hex
        cmd = commands.CreateSession(sid, r.user_id, r.agent_id, r.metadata, self.clock_ms())
        return self._submit(conn, r.rid, sid, cmd, r)

    def _submit(
        self, conn: Connection, rid: int, sid: str, cmd: commands.Command, request: Request
    ) -> Reply:
        received = time.perf_counter()
        fut = self.router.submit(group_of(sid, self.groups), commands.encode_command(cmd))

        def done(f: asyncio.Future[Any]) -> None:
            response = self._answer(rid, f, request)
            conn.reply(response)
            if self.on_append_latency is not None and isinstance(request, Append):
                ok = not isinstance(response, Error)
                self.on_append_latency(time.perf_counter() - received, ok)

        fut.add_done_callback(done)
        return None

    def _answer(self, rid: int, f: asyncio.Future[Any], request: Request) -> Response:
        if f.cancelled():
            return self._error(error(rid, "timeout", "outcome unknown"))
        exc = f.exception()
        if exc is not None:
            return self._failure(rid, exc)
        result = f.result()
        match result:
            case commands.Appended(seq, inserted_at, deduped):
                return Appended(rid, seq, inserted_at, deduped)
            case commands.SessionCreated(session, _):
                return SessionInfo(rid, session)
            case commands.ReadMarked(seq):
                assert isinstance(request, MarkRead)
                return ReadMarked(rid, request.session_id, request.user_id, seq)
            case commands.Rejected(code, message, details):
                return self._error(error(rid, code, message, **details))
        logger.error("unexpected result %r", result)
        return self._error(error(rid, "internal", "unexpected result"))

    def _failure(self, rid: int, exc: BaseException) -> Error:
        if isinstance(exc, RouteError):
            code = exc.code if exc.code in ("unavailable", "timeout") else "internal"
            return self._error(error(rid, code, exc.message))  # type: ignore[arg-type]
        logger.error("request %d failed: %r", rid, exc)
        return self._error(error(rid, "internal", "internal error"))

    # -- reads ------------------------------------------------------------------------------------
    def _after_barrier(
        self, conn: Connection, rid: int, sid: str, request: Read | GetSession
    ) -> Reply:
        fut = self.router.barrier(group_of(sid, self.groups))

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                conn.reply(self._error(error(rid, "timeout", "read barrier timed out")))
            elif (exc := f.exception()) is not None:
                conn.reply(self._failure(rid, exc))
            else:
                conn.reply(self._serve_read(request))

        fut.add_done_callback(done)
        return None

    def _serve_read(self, r: Read | GetSession) -> Response:
        if isinstance(r, GetSession):
            session = self.state.get_session(r.session_id)
            if session is None:
                return self._error(error(r.rid, "not_found", f"no session {r.session_id!r}"))
            return SessionInfo(r.rid, session)
        result = self.state.read(r.session_id, r.after_seq, r.limit)
        if result is None:
            return self._error(error(r.rid, "not_found", f"no session {r.session_id!r}"))
        if r.after_seq + 1 < result.first_seq and r.after_seq < result.last_seq:
            return self._error(
                error(
                    r.rid,
                    "not_found",
                    f"messages {r.after_seq + 1}..{result.first_seq - 1} are no longer held in "
                    "memory (the on-disk archive comes with a later version)",
                    first_seq=result.first_seq,
                    last_seq=result.last_seq,
                )
            )
        messages = result.messages
        size = 0
        for i, m in enumerate(messages):  # stay well inside one frame: the client reads on
            size += len(m.content.encode()) + len(_encode(m.metadata)) + 128
            if size > READ_BYTES_MAX and i > 0:
                messages = messages[:i]
                break
        return Messages(r.rid, messages, result.last_seq)

    def _error(self, e: Error) -> Error:
        self.errors[e.code] = self.errors.get(e.code, 0) + 1
        return e
