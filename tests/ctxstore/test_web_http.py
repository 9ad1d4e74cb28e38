"""The HTTP/JSON API and its Server-Sent Events under ``/v1`` (``ctxstore/web_http.py``,
``web_sse.py``, ``web_openapi.py``) against a real node on loopback sockets; the client is raw
HTTP/1.1 bytes with h11 parsing the answers (``test_ops.Wire``)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import h11
import msgspec
import pytest

from bench.nodestats import parse_metrics
from ctxstore.launcher import LocalCluster
from ctxstore.web_http import answer_twin
from wire.protocol import (
    Appended,
    Context,
    ContextChanged,
    Error,
    Messages,
    ReadMarked,
    SessionInfo,
    SessionList,
)

from .test_ops import Answer, Wire, run
from .test_web import web_node

FAST = ["--tick-ms", "20", "--groups", "8"]


def http(method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> bytes:
    raw = b"" if body is None else body if isinstance(body, bytes) else msgspec.json.encode(body)
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
    return (head + "\r\n").encode() + raw


async def call(
    address: tuple[str, int], method: str, path: str, body: Any = None, **headers: str
) -> Answer:
    w = await Wire.open(address)
    try:
        await w.write(
            http(method, path, body, {k.replace("_", "-"): v for k, v in headers.items()})
        )
        return await w.answer(method.encode())
    finally:
        with contextlib.suppress(ConnectionResetError):  # closed with a body left unread
            await w.close()


def message(content: str, **kw: Any) -> dict[str, Any]:
    return {"sender": "user", "sender_id": "u1", "kind": "text", "content": content,
            "metadata": {}, **kw}  # fmt: skip


TOOL_CALL: dict[str, Any] = {
    "type": "tool-weather", "toolCallId": "call-1", "state": "output-available",
    "input": {"city": "Paris"}, "output": {"celsius": 21},
}  # fmt: skip
PARTS: list[dict[str, Any]] = [
    {"type": "reasoning", "text": "The user wants the weather: call the tool."},
    TOOL_CALL,
    {"type": "text", "text": "It is 21 degrees in Paris."},
]


def structured(parts: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    """An agent's append body with ``parts`` (no content)."""
    return {"sender": "agent", "sender_id": "a1", "kind": "text", "content": "", "metadata": {},
            "parts": parts, **kw}  # fmt: skip


def summary(content: str, **kw: Any) -> dict[str, Any]:
    """A compaction's replacement message (NewMessage: every key given)."""
    return {"role": "system", "kind": "summary", "content": content, "parts": None,
            "metadata": {}, "token_count": None, **kw}  # fmt: skip


def decoded(answer: Answer, native: type[Any]) -> Any:
    """The body decoded with the type the OpenAPI document's schema was generated from."""
    return msgspec.json.decode(answer.body, type=answer_twin(native))


class Events:
    """An SSE stream read with h11: ``next()`` gives ``(id, event, data)``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT)
        self.buffer = b""
        self.response: h11.Response | None = None
        self.body = b""
        self.ended = False

    @classmethod
    async def open(cls, address: tuple[str, int], path: str, **headers: str) -> Events:
        r, w = await asyncio.open_connection(*address)
        e = cls(r, w)
        hs = [("host", "t"), *((k.replace("_", "-"), v) for k, v in headers.items())]
        w.write(e.h11.send(h11.Request(method="GET", target=path, headers=hs)))
        w.write(e.h11.send(h11.EndOfMessage()))
        while e.response is None:
            await e._read()
        return e

    @property
    def status(self) -> int:
        assert self.response is not None
        return self.response.status_code

    async def _read(self) -> None:
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                data = await asyncio.wait_for(self.reader.read(65536), 10)
                self.h11.receive_data(data)
                if not data:
                    self.ended = True
                    return
            elif isinstance(event, h11.Response):
                self.response = event
                return
            elif isinstance(event, h11.Data):
                self.buffer += event.data
                self.body += event.data
                return
            else:
                self.ended = True
                return

    async def next(self) -> tuple[int | None, str, Any]:
        while True:
            while b"\n\n" not in self.buffer:
                if self.ended:
                    raise EOFError
                await self._read()
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            fields: dict[str, str] = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                fields[name] = value
            if "data" not in fields:
                continue  # retry:, a comment
            ident = int(fields["id"]) if "id" in fields else None
            return ident, fields.get("event", "message"), msgspec.json.decode(fields["data"])

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def api_node(tmp_path: Path, **kw: Any) -> AsyncIterator[tuple[str, int]]:
    async with web_node(tmp_path, **kw) as w:
        yield w.address


# -- the routes ----------------------------------------------------------------------------------
def test_every_route_answers_and_its_errors_have_their_status(tmp_path: Path) -> None:
    async def main() -> None:
        async with api_node(tmp_path) as a:
            body = {"user_id": "u1", "agent_id": "a1", "metadata": {"t": 1}, "session_id": "s1"}
            r = await call(a, "POST", "/v1/sessions", body)
            assert r.status == 200, r.body
            assert decoded(r, SessionInfo).session.id == "s1"
            r = await call(a, "POST", "/v1/sessions", {"user_id": "u1", "agent_id": "a1",
                                                       "metadata": {}})  # fmt: skip
            assert r.status == 200 and len(r.json()["session"]["id"]) == 32  # picked by the node
            r = await call(a, "GET", "/v1/sessions/s1")
            assert r.status == 200 and r.json()["session"]["metadata"] == {"t": 1}
            r = await call(a, "GET", "/v1/users/u1/sessions?limit=1")
            page = decoded(r, SessionList)
            assert r.status == 200 and len(page.sessions) == 1 and page.next_cursor is not None
            r = await call(a, "GET", f"/v1/users/u1/sessions?limit=5&cursor={page.next_cursor}")
            assert r.status == 200 and len(r.json()["sessions"]) == 1
            r = await call(a, "POST", "/v1/sessions/s1/messages", message("hi", client_msg_id="c1"))
            assert r.status == 200 and decoded(r, Appended).seq == 1
            r = await call(a, "POST", "/v1/sessions/s1/messages", message("hi", client_msg_id="c1"))
            assert r.status == 200 and r.json()["seq"] == 1 and r.json()["deduped"] is True
            r = await call(a, "POST", "/v1/sessions/s1/messages", message("2", expected_seq=1))
            assert r.status == 200 and r.json()["seq"] == 2
            r = await call(a, "POST", "/v1/sessions/s1/messages", message("x", expected_seq=1))
            assert r.status == 409 and r.json()["code"] == "conflict"
            assert r.json()["details"] == {"last_seq": 2}
            decoded(r, Error)
            r = await call(a, "GET", "/v1/sessions/s1/messages?after_seq=1&limit=10")
            assert r.status == 200 and [m.seq for m in decoded(r, Messages).messages] == [2]
            r = await call(a, "GET", "/v1/sessions/s1/messages")
            assert [m["content"] for m in r.json()["messages"]] == ["hi", "2"]
            r = await call(a, "POST", "/v1/sessions/s1/read", {"user_id": "u1", "seq": 2})
            assert r.status == 200 and decoded(r, ReadMarked).seq == 2
            # errors
            for method, path, body, status, code in [
                ("GET", "/v1/sessions/nope", None, 404, "not_found"),
                ("GET", "/v1/sessions/nope/messages", None, 404, "not_found"),
                ("POST", "/v1/sessions/nope/messages", message("x"), 404, "not_found"),
                ("GET", "/v1/nothing", None, 404, "not_found"),
                ("GET", "/v1/sessions/bad%20id", None, 400, "bad_request"),
                ("GET", "/v1/sessions/%ff", None, 400, "bad_request"),
                ("GET", "/v1/sessions/s1/messages?after_seq=%ff", None, 400, "bad_request"),
                ("GET", "/v1/sessions/s1/messages?limit=0", None, 400, "bad_request"),
                ("GET", "/v1/sessions/s1/messages?limit=x", None, 400, "bad_request"),
                ("GET", "/v1/sessions/s1/messages?extra=1", None, 400, "bad_request"),
                ("POST", "/v1/sessions/s1/messages", {"content": "x"}, 400, "bad_request"),
                ("POST", "/v1/sessions/s1/messages", b"{not json", 400, "bad_request"),
                ("POST", "/v1/sessions/s1/messages", message("x", what=1), 400, "bad_request"),
                ("POST", "/v1/sessions/s1/messages", message("x", expected_seq=-1), 400,
                 "bad_request"),
                ("DELETE", "/v1/sessions/s1", None, 405, "bad_request"),
                ("GET", "/v1/sessions/s1", b"{}", 400, "bad_request"),
            ]:  # fmt: skip
                r = await call(a, method, path, body)
                assert (r.status, r.json()["code"]) == (status, code), (method, path, r.body)
                assert set(r.json()) == {"code", "message", "retryable", "details"}
            w = await Wire.open(a)  # a declared body over the frame limit: answered at once
            await w.write(b"POST /v1/sessions/s1/messages HTTP/1.1\r\nHost: t\r\n"
                          b"Content-Length: 5000000\r\n\r\n{")  # fmt: skip
            r = await w.answer(b"POST")
            assert r.status == 413 and r.json()["details"] == {"limit": 4 << 20}
            assert await w.closed()
            r = await call(a, "POST", "/v1/sessions/s1/messages", message("x" * (1 << 20)))
            assert r.status == 413 and r.json()["code"] == "too_large"  # the native limit
            r = await call(a, "HEAD", "/v1/sessions/s1")
            assert r.status == 405 and r.body == b"" and r.headers["allow"] == "GET"
            r = await call(a, "GET", "/v1/sessions/s1")  # the port goes on
            assert r.status == 200
            metrics = parse_metrics((await call(a, "GET", "/metrics")).body.decode())
            assert metrics["ctxstore_http_api_requests_total"] >= 25
            assert metrics['ctxstore_http_api_errors_total{status="404"}'] >= 4

    run(main())


def test_keep_alive_and_pipelined_requests_are_answered_in_order(tmp_path: Path) -> None:
    async def main() -> None:
        async with api_node(tmp_path) as a:
            await call(a, "POST", "/v1/sessions", {"user_id": "u1", "agent_id": "a1",
                                                   "metadata": {}, "session_id": "s1"})  # fmt: skip
            w = await Wire.open(a)
            raw = b"".join(
                http("POST", "/v1/sessions/s1/messages", message(f"m{i}")) for i in range(20)
            )
            await w.write(raw + http("GET", "/health/live"))
            seqs = [(await w.answer(b"POST")).json()["seq"] for _ in range(20)]
            assert seqs == list(range(1, 21))
            assert (await w.answer()).json()["status"] == "live"
            await w.close()

    run(main())


def test_the_bearer_token_is_checked_as_the_hello_token(tmp_path: Path) -> None:
    async def main() -> None:
        async with api_node(tmp_path, tokens=["s3cret"]) as a:
            r = await call(a, "GET", "/v1/users/u1/sessions")
            assert r.status == 401 and r.json()["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
            r = await call(a, "GET", "/v1/users/u1/sessions", authorization="Bearer nope")
            assert r.status == 401
            r = await call(a, "GET", "/v1/users/u1/sessions", authorization="Basic s3cret")
            assert r.status == 401 and "'Bearer <token>'" in r.json()["message"]
            r = await call(a, "GET", "/v1/users/u1/sessions", authorization="Bearer s3cret")
            assert r.status == 200 and r.json() == {"sessions": [], "next_cursor": None}
            e = await Events.open(a, "/v1/users/u1/inbox/events")
            assert e.status == 401
            await e.close()

    run(main())


def test_requests_count_against_the_client_connection_cap(tmp_path: Path) -> None:
    async def main() -> None:
        async with api_node(tmp_path, connections_max=1) as a:
            e = await Events.open(a, "/v1/users/u1/inbox/events")
            assert e.status == 200
            r = await call(a, "GET", "/v1/users/u1/sessions")
            assert r.status == 503 and r.json()["code"] == "unavailable"
            assert r.headers["retry-after"] == "1" and r.json()["retryable"] is True
            await e.close()
            for _ in range(50):
                r = await call(a, "GET", "/v1/users/u1/sessions")
                if r.status == 200:
                    break
                await asyncio.sleep(0.05)
            assert r.status == 200

    run(main())


# -- context windows -----------------------------------------------------------------------------
def test_structured_messages_and_the_context_window_over_http(tmp_path: Path) -> None:
    async def main() -> None:
        async with api_node(tmp_path) as a:
            body = {"user_id": "u1", "agent_id": "a1", "metadata": {}, "session_id": "s1"}
            assert (await call(a, "POST", "/v1/sessions", body)).status == 200
            base = "/v1/sessions/s1"
            for i in range(1, 5):
                r = await call(a, "POST", f"{base}/messages", message(f"question {i}"))
                assert r.status == 200, r.body
            r = await call(a, "POST", f"{base}/messages", structured(PARTS))
            assert r.status == 200 and r.json()["seq"] == 5, r.body
            stored = decoded(await call(a, "GET", f"{base}/messages?after_seq=4"), Messages)
            (m,) = stored.messages
            assert (m.role, m.parts, m.content) == ("assistant", PARTS, "")
            assert m.token_count is None  # counted only for sessions with a window
            r = await call(a, "GET", f"{base}/context")  # never configured: no window
            assert r.status == 200, r.body
            window = decoded(r, Context)
            assert (window.messages, window.segments, window.version) == ([], [], 0)
            assert window.config is None and window.last_seq == 5
            # each policy shape, as JSON; the window's config is answered in the same shape
            # (a policy drops messages from the window for good: the tighter ones come last)
            policies: list[tuple[dict[str, Any], list[int]]] = [
                ({"type": "manual"}, [1, 2, 3, 4, 5]),
                ({"type": "token_budget"}, [1, 2, 3, 4, 5]),
                ({"type": "skip_parts", "types": ["reasoning", "tool-"]}, [1, 2, 3, 4, 5]),
                ({"type": "skip_parts", "types": ["tool-"], "limit": 4}, [2, 3, 4, 5]),
                ({"type": "last_n", "limit": 3}, [3, 4, 5]),
            ]
            for policy, seqs in policies:
                config = {"token_budget": 1000, "trigger_ratio": 0.5, "policy": policy}
                r = await call(a, "POST", f"{base}/context/config", config)
                assert r.status == 200, (policy, r.body)
                changed = decoded(r, ContextChanged)
                r = await call(a, "GET", f"{base}/context")
                got = r.json()
                assert got["config"] == {
                    **config,
                    "tokenizer": "o200k_base",
                    "policy": {"limit": None, **policy}
                    if policy["type"] == "skip_parts"
                    else policy,
                }
                assert [x["seq"] for x in got["messages"]] == seqs, policy
                assert got["version"] == changed.version
                assert got["window_first_seq"] == changed.window_first_seq == seqs[0]
                if policy["type"] == "manual":  # the first configuration opens the window
                    counts = [x["token_count"] for x in got["messages"]]
                    assert counts[-1] > 0 and got["token_count"] == sum(counts)
                if policy["type"] == "skip_parts" and "reasoning" in policy["types"]:
                    assert got["messages"][-1]["parts"] == [PARTS[2]]  # the message stays
            # a compaction of 3..4 guarded by a stale version: 409 naming the current one
            version = got["version"]
            compact = {"from_seq": 3, "to_seq": 4, "replacement": [summary("Two questions.")],
                       "if_version": version - 1}  # fmt: skip
            r = await call(a, "POST", f"{base}/context/compact", compact)
            assert r.status == 409 and r.json()["code"] == "conflict", r.body
            assert r.json()["details"] == {"version": version}
            r = await call(a, "POST", f"{base}/messages", message("x", if_version=version - 1))
            assert r.status == 409 and r.json()["details"] == {"version": version}
            r = await call(a, "POST", f"{base}/context/compact", {**compact, "if_version": version})
            assert r.status == 200, r.body
            assert decoded(r, ContextChanged).version > version
            got = (await call(a, "GET", f"{base}/context")).json()
            assert [(x["seq"], x["role"], x["content"]) for x in got["messages"]] == [
                (0, "system", "Two questions."), (5, "assistant", "")]  # fmt: skip
            assert [(g["from_seq"], g["to_seq"], g["compacted"]) for g in got["segments"]] == [
                (3, 4, True), (5, 5, False)]  # fmt: skip
            r = await call(a, "GET", f"{base}/messages")  # the history is never rewritten
            assert [x["seq"] for x in r.json()["messages"]] == [1, 2, 3, 4, 5]

    run(main())


def test_bad_parts_policies_and_replacements_are_400_naming_the_field(tmp_path: Path) -> None:
    async def main() -> None:
        async with api_node(tmp_path) as a:
            body = {"user_id": "u1", "agent_id": "a1", "metadata": {}, "session_id": "s1"}
            assert (await call(a, "POST", "/v1/sessions", body)).status == 200
            base = "/v1/sessions/s1"
            config = {"token_budget": 100, "trigger_ratio": 0.5, "policy": {"type": "manual"}}
            # where: in the message; details.field: that path, or its top-level field
            for path, body, where in [
                ("messages", structured([{"type": "video", "url": "x"}]), "parts[0].type"),
                ("messages", structured([PARTS[2], {"type": "text"}]), "parts[1].text"),
                ("messages", structured([{**TOOL_CALL, "state": "output-error"}]),
                 "parts[0].errorText"),
                ("messages", structured([PARTS[2]], content="both"), "content"),
                ("messages", message("x", role="assistant"), "role"),
                ("context/config", {**config, "token_budget": 0}, "token_budget"),
                ("context/config", {**config, "trigger_ratio": 1.5}, "trigger_ratio"),
                ("context/config", {**config, "policy": {"type": "last_n"}}, "limit"),
                ("context/config", {**config, "policy": {"type": "nope"}}, "policy"),
                ("context/compact", {"from_seq": 1, "to_seq": 1,
                                     "replacement": [summary("", parts=[{"type": "text"}])]},
                 "replacement[0].parts[0].text"),
                ("context/compact", {"from_seq": 1, "to_seq": 1,
                                     "replacement": [{"role": "system", "content": "s"}]},
                 "kind"),
            ]:  # fmt: skip
                r = await call(a, "POST", f"{base}/{path}", body)
                assert (r.status, r.json()["code"]) == (400, "bad_request"), (body, r.body)
                assert where in r.json()["message"], (where, r.body)
                field = {"limit": "policy", "kind": "replacement"}.get(where, where)
                assert r.json()["details"]["field"] == field, r.body
            got = (await call(a, "GET", f"{base}/context")).json()
            assert got["version"] == 0 and got["config"] is None  # nothing changed
            await call(a, "POST", f"{base}/messages", message("one"))
            compact = {"from_seq": 1, "to_seq": 1, "replacement": [summary("s")]}
            r = await call(a, "POST", f"{base}/context/compact", compact)
            assert r.status == 400, r.body  # no window before its first configuration
            r = await call(a, "POST", "/v1/sessions/nope/context/config", config)
            assert r.status == 404 and r.json()["code"] == "not_found"
            r = await call(a, "GET", "/v1/sessions/nope/context")
            assert r.status == 404
            r = await call(a, "GET", f"{base}/context", b"{}")
            assert r.status == 400  # takes no body

    run(main())


def test_context_events_on_the_session_stream(tmp_path: Path) -> None:
    async def main() -> None:
        async with api_node(tmp_path) as a:
            body = {"user_id": "u1", "agent_id": "a1", "metadata": {}, "session_id": "s1"}
            await call(a, "POST", "/v1/sessions", body)
            base = "/v1/sessions/s1"
            plain = await Events.open(a, f"{base}/events")
            e = await Events.open(a, f"{base}/events?context_events=true")
            assert (await e.next())[1] == (await plain.next())[1] == "subscribed"
            config = {"token_budget": 20, "trigger_ratio": 0.5, "policy": {"type": "manual"}}
            r = await call(a, "POST", f"{base}/context/config", config)
            assert r.status == 200, r.body
            assert await e.next() == (None, "context", {
                "reason": "configured", "version": 1, "token_count": 0,
                "needs_compaction": False, "window_first_seq": 1})  # fmt: skip
            over = "the second message goes well over ten tokens, the budget times its ratio"
            for text in ("hi", over):  # 1 + 14 tokens: over 20 x 0.5
                await call(a, "POST", f"{base}/messages", message(text))
            got = [await e.next() for _ in range(3)]
            assert [(ev, d.get("seq", d.get("reason"))) for _, ev, d in got] == [
                ("message", 1), ("message", 2), ("context", "needs_compaction")]  # fmt: skip
            version = got[2][2]["version"]
            compact = {"from_seq": 1, "to_seq": 2, "replacement": [summary("two")],
                       "if_version": version}  # fmt: skip
            r = await call(a, "POST", f"{base}/context/compact", compact)
            assert r.status == 200, r.body
            _, name, data = await e.next()
            assert (name, data["reason"], data["needs_compaction"]) == (
                "context",
                "compacted",
                False,
            )
            assert data["version"] == r.json()["version"]
            # without ?context_events: the messages only
            await call(a, "POST", f"{base}/messages", message("after"))
            assert [(await plain.next())[1] for _ in range(3)] == ["message"] * 3
            assert (await e.next())[0] == 3
            r = await call(a, "GET", f"{base}/events?context_events=maybe")
            assert r.status == 400
            await e.close()
            await plain.close()

    run(main())


# -- CORS and OpenAPI ----------------------------------------------------------------------------
def test_cors_is_answered_for_the_allowed_origins_only(tmp_path: Path) -> None:
    async def main() -> None:
        async with web_node(tmp_path) as w:
            a = w.address
            r = await call(a, "GET", "/v1/users/u1/sessions", origin="https://app.example")
            assert r.status == 200 and "access-control-allow-origin" not in r.headers
            r = await call(a, "OPTIONS", "/v1/sessions", origin="https://app.example")
            assert r.status == 403
            assert w.ops.api is not None
            w.ops.api.cors_origins = frozenset({"https://app.example"})
            r = await call(a, "OPTIONS", "/v1/sessions/s1/messages", origin="https://app.example",
                           access_control_request_method="POST")  # fmt: skip
            assert r.status == 204
            assert r.headers["access-control-allow-origin"] == "https://app.example"
            assert "authorization" in r.headers["access-control-allow-headers"]
            assert "POST" in r.headers["access-control-allow-methods"]
            r = await call(a, "GET", "/v1/users/u1/sessions", origin="https://app.example")
            assert r.headers["access-control-allow-origin"] == "https://app.example"
            r = await call(a, "GET", "/v1/sessions/x", origin="https://app.example")
            assert r.status == 404 and "access-control-allow-origin" in r.headers
            r = await call(a, "GET", "/v1/users/u1/sessions", origin="https://evil.example")
            assert "access-control-allow-origin" not in r.headers

    run(main())


def test_the_cors_origins_are_a_config_key() -> None:
    from ctxstore.config import ConfigError, load

    s = load(environ={"CTXSTORE_WEB_CORS_ORIGIN": "https://a.example,http://b:8080"})
    assert s.web_cors_origin == ["https://a.example", "http://b:8080"]
    assert load(flags={"web_cors_origin": ["*"]}).web_cors_origin == ["*"]
    with pytest.raises(ConfigError, match="web_cors_origin"):
        load(flags={"web_cors_origin": ["https://a.example/path"]})


def test_the_openapi_document_describes_the_real_answers(tmp_path: Path) -> None:
    async def main() -> None:
        async with api_node(tmp_path) as a:
            doc = (await call(a, "GET", "/v1/openapi.json")).json()
            assert doc["openapi"] == "3.1.0"
            schemas = doc["components"]["schemas"]

            def check_refs(obj: Any) -> None:
                if isinstance(obj, dict):
                    ref = obj.get("$ref")
                    if ref is not None:
                        assert ref.startswith("#/components/schemas/")
                        assert ref.rsplit("/", 1)[1] in schemas, ref
                    for v in obj.values():
                        check_refs(v)
                elif isinstance(obj, list):
                    for v in obj:
                        check_refs(v)

            check_refs(doc)
            ops = {(m, p): op for p, item in doc["paths"].items() for m, op in item.items()}
            assert {op["operationId"] for op in ops.values()} >= {
                "create_session", "get_session", "list_sessions", "append", "read", "mark_read",
                "subscribe", "subscribe_inbox", "set_context_config", "get_context", "compact",
            }  # fmt: skip
            # a real answer of each operation against its schema's required fields and types
            body = {"user_id": "u1", "agent_id": "a1", "metadata": {}, "session_id": "s1"}
            answers = {
                ("post", "/v1/sessions"): await call(a, "POST", "/v1/sessions", body),
                ("get", "/v1/sessions/{session_id}"): await call(a, "GET", "/v1/sessions/s1"),
                ("post", "/v1/sessions/{session_id}/messages"): await call(
                    a, "POST", "/v1/sessions/s1/messages", message("hi")),
                ("get", "/v1/sessions/{session_id}/messages"): await call(
                    a, "GET", "/v1/sessions/s1/messages"),
                ("post", "/v1/sessions/{session_id}/read"): await call(
                    a, "POST", "/v1/sessions/s1/read", {"user_id": "u1", "seq": 1}),
                ("get", "/v1/users/{user_id}/sessions"): await call(
                    a, "GET", "/v1/users/u1/sessions"),
                ("post", "/v1/sessions/{session_id}/context/config"): await call(
                    a, "POST", "/v1/sessions/s1/context/config",
                    {"token_budget": 100, "trigger_ratio": 0.5,
                     "policy": {"type": "skip_parts", "types": ["reasoning"]}}),
                ("post", "/v1/sessions/{session_id}/context/compact"): await call(
                    a, "POST", "/v1/sessions/s1/context/compact",
                    {"from_seq": 1, "to_seq": 1, "replacement": [summary("s", parts=None)]}),
            }  # fmt: skip
            r = await call(a, "POST", "/v1/sessions/s1/messages", structured(PARTS))
            assert r.status == 200, r.body
            answers[("get", "/v1/sessions/{session_id}/context")] = await call(
                a, "GET", "/v1/sessions/s1/context"
            )
            answers[("get", "/v1/sessions/{session_id}/messages")] = await call(
                a, "GET", "/v1/sessions/s1/messages"
            )  # with the structured message
            for (m, p), r in answers.items():
                assert r.status == 200, (m, p, r.body)
                schema = ops[(m, p)]["responses"]["200"]["content"]["application/json"]["schema"]
                conform(r.json(), schema, schemas)
            r = await call(a, "GET", "/v1/sessions/zz")
            err = ops[("get", "/v1/sessions/{session_id}")]["responses"]["404"]
            conform(r.json(), err["content"]["application/json"]["schema"], schemas)
            # parts are described part by part (a bad one does not conform), policies by type
            part = {"$ref": "#/components/schemas/Part"}
            for good in [
                *PARTS,
                {"type": "data-chart", "data": [1]},
                {"type": "step-start"},
                {**TOOL_CALL, "type": "dynamic-tool", "toolName": "weather"},
            ]:
                conform(good, part, schemas)
            for bad in [
                {"type": "video"},
                {"type": "text"},
                {"type": "text", "text": "", "x": 1},
                {**TOOL_CALL, "type": "dynamic-tool"},
                {**TOOL_CALL, "type": "tool-"},
            ]:
                with pytest.raises(AssertionError):
                    conform(bad, part, schemas)
            for name in ("AppendBody", "NewMessage", "Message"):
                (array, _null) = schemas[name]["properties"]["parts"]["anyOf"]
                assert array["items"] == part, name
            policy = schemas["SetContextConfigBody"]["properties"]["policy"]
            assert set(policy["discriminator"]["mapping"]) == {
                "last_n", "skip_parts", "token_budget", "manual"}  # fmt: skip
            conform({"type": "last_n", "limit": 5}, policy, schemas)
            with pytest.raises(AssertionError):
                conform({"type": "last_n"}, policy, schemas)
            events = ops[("get", "/v1/sessions/{session_id}/events")]
            assert "context_events" in {p["name"] for p in events["parameters"]}
            assert "`context`" in events["responses"]["200"]["description"]
            assert "ContextEventAnswer" in schemas

    run(main())


def conform(value: Any, schema: dict[str, Any], schemas: dict[str, Any]) -> None:
    """A small JSON Schema check (jsonschema is not installed): refs, types, required fields,
    no extra properties where the schema forbids them, anyOf."""
    if "$ref" in schema:
        conform(value, schemas[schema["$ref"].rsplit("/", 1)[1]], schemas)
        return
    if "anyOf" in schema:
        errors = []
        for option in schema["anyOf"]:
            try:
                conform(value, option, schemas)
                return
            except AssertionError as e:
                errors.append(e)
        raise AssertionError(f"{value!r} matches no option: {errors}")
    kinds: dict[str, Any] = {"object": dict, "array": list, "string": str, "integer": int,
                             "boolean": bool, "number": (int, float),
                             "null": type(None)}  # fmt: skip
    kind = schema.get("type")
    if kind is not None:
        assert isinstance(value, kinds[kind]), (value, schema)
    if "enum" in schema:
        assert value in schema["enum"]
    if "pattern" in schema:
        assert re.search(schema["pattern"], value), (value, schema)
    if isinstance(value, dict) and kind == "object":
        for name in schema.get("required", []):
            assert name in value, (name, value)
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), (value, props)
        for name, v in value.items():
            if name in props:
                conform(v, props[name], schemas)
    if isinstance(value, list) and "items" in schema:
        for v in value:
            conform(v, schema["items"], schemas)


# -- Server-Sent Events --------------------------------------------------------------------------
def test_session_events_replay_then_live_then_resume_by_last_event_id(tmp_path: Path) -> None:
    async def main() -> None:
        async with api_node(tmp_path) as a:
            await call(a, "POST", "/v1/sessions", {"user_id": "u1", "agent_id": "a1",
                                                   "metadata": {}, "session_id": "s1"})  # fmt: skip
            for i in range(1, 4):
                await call(a, "POST", "/v1/sessions/s1/messages", message(f"m{i}"))
            e = await Events.open(a, "/v1/sessions/s1/events?after_seq=1")
            assert e.status == 200
            assert e.response is not None
            assert dict(e.response.headers)[b"content-type"] == b"text/event-stream"
            assert e.response.reason == b"OK"
            assert await e.next() == (None, "subscribed", {"last_seq": 3})
            got = [await e.next() for _ in range(2)]
            assert [(i, ev, d["content"]) for i, ev, d in got] == [
                (2, "message", "m2"), (3, "message", "m3")]  # fmt: skip
            await call(a, "POST", "/v1/sessions/s1/messages", message("m4"))
            ident, _, data = await e.next()
            assert ident == 4 and data["content"] == "m4" and data["seq"] == 4
            await e.close()
            await call(a, "POST", "/v1/sessions/s1/messages", message("m5"))
            e = await Events.open(a, "/v1/sessions/s1/events?after_seq=0", last_event_id="4")
            assert (await e.next())[1] == "subscribed"
            assert (await e.next())[0] == 5
            await e.close()
            e = await Events.open(a, "/v1/sessions/nope/events")
            assert e.status == 404
            e = await Events.open(a, "/v1/sessions/s1/events", last_event_id="x")
            assert e.status == 400
            e = await Events.open(a, "/v1/sessions/s1/events?after_seq=99")
            assert e.status == 400

    run(main())


def test_curl_follows_a_session_and_resumes_by_last_event_id(tmp_path: Path) -> None:
    async def main() -> None:
        async with api_node(tmp_path) as a:
            body = {"user_id": "u1", "agent_id": "a1", "metadata": {}, "session_id": "s1"}
            await call(a, "POST", "/v1/sessions", body)
            for i in range(1, 4):
                await call(a, "POST", "/v1/sessions/s1/messages", message(f"m{i}"))
            url = f"http://{a[0]}:{a[1]}/v1/sessions/s1/events"
            curl = await asyncio.create_subprocess_exec(
                "curl", "-sN", "--max-time", "2", "-H", "Last-Event-ID: 1", url,
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, _ = await curl.communicate()
            ids = [line for line in out.decode().split("\n") if line.startswith("id: ")]
            assert ids == ["id: 2", "id: 3"], out

    assert shutil.which("curl"), "curl is needed (.ci/run installs it with apt-get)"
    run(main())


def test_an_event_stream_that_is_never_read_is_bounded_and_cut_off(tmp_path: Path) -> None:
    async def main() -> None:
        async with web_node(tmp_path, write_stall_timeout_s=1.0) as w:
            a = w.address
            body = {"user_id": "u1", "agent_id": "a1", "metadata": {}, "session_id": "s1"}
            await call(a, "POST", "/v1/sessions", body)
            for _ in range(20):  # 10 MB of history
                r = await call(a, "POST", "/v1/sessions/s1/messages", message("y" * 500_000))
                assert r.status == 200
            _reader, writer = await asyncio.open_connection(*a)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            writer.write(http("GET", "/v1/sessions/s1/events"))
            api = w.ops.api
            assert api is not None
            high = 0
            for _ in range(20):
                await asyncio.sleep(0.05)
                for stream in api.streams:
                    high = max(high, stream.transport.get_write_buffer_size())
            # The native subscription's flow control: pushes wait while the socket's buffer
            # is over its high-water mark (1 MiB), so about one batch (1 MiB) more at most.
            assert 0 < high < 3 * 1024 * 1024
            for _ in range(60):  # the write-stall timeout: cut off
                if not api.streams:
                    break
                await asyncio.sleep(0.05)
            assert not api.streams and w.clients.stalled_closed == 1
            assert w.clients.pending_bytes == 0 and not w.clients.connections
            writer.close()
            assert (await call(a, "GET", "/v1/sessions/s1")).status == 200

    run(main())


def test_inbox_events_are_a_snapshot_then_deltas(tmp_path: Path) -> None:
    async def main() -> None:
        async with api_node(tmp_path) as a:
            await call(a, "POST", "/v1/sessions", {"user_id": "u1", "agent_id": "a1",
                                                   "metadata": {}, "session_id": "s1"})  # fmt: skip
            e = await Events.open(a, "/v1/users/u1/inbox/events")
            _, name, snap = await e.next()
            assert name == "snapshot" and snap["truncated"] is False
            assert [x["session_id"] for x in snap["entries"]] == ["s1"]
            await call(a, "POST", "/v1/sessions/s1/messages", message("hello"))
            _, name, delta = await e.next()
            assert name == "delta" and delta["entries"][0]["last_seq"] == 1
            await e.close()

    run(main())


def test_the_node_survives_1000_malformed_http_requests(tmp_path: Path) -> None:
    async def main() -> None:
        rng = random.Random(18)
        pieces = [b"POST /v1/sessions HTTP/1.1\r\n", b"GET /v1/sessions/", b"\r\n", b"\x00",
                  b"Content-Length: 5\r\n", b"Content-Length: 99999999999\r\n", b"{", b"}",
                  b"Transfer-Encoding: chunked\r\n", b"zz\r\n", b"Host: t\r\n", b"%ff", b"?a=",
                  b"Last-Event-ID: -1\r\n", b"GET /v1/sessions/s1/events HTTP/1.0\r\n",
                  b"Authorization: Bearer\r\n", b'{"user_id": 1}', b"\xff\xfe"]  # fmt: skip
        async with web_node(tmp_path) as node:
            a = node.address

            async def one(i: int) -> None:
                raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
                with contextlib.suppress(OSError, asyncio.TimeoutError):
                    r, w = await asyncio.open_connection(*a)
                    w.write(raw)
                    if i % 2:
                        w.write_eof()
                    await w.drain()
                    await asyncio.wait_for(r.read(65536), 0.5)
                    w.close()

            for start in range(0, 1000, 50):
                await asyncio.gather(*(one(i) for i in range(start, start + 50)))
            # Well-formed HTTP with random routes, queries and bodies: answered, never a 500.
            values: list[Any] = [None, 0, -1, 2**64, 1.5, True, "", "s1", "u1", "user", [],
                                 {}, {"a": [1]}, "x" * 300]  # fmt: skip
            fields = ["user_id", "agent_id", "metadata", "session_id", "sender", "sender_id",
                      "kind", "content", "client_msg_id", "expected_seq", "seq"]  # fmt: skip
            paths = ["/v1/sessions", "/v1/sessions/s1", "/v1/sessions/s1/messages",
                     "/v1/sessions/s1/read", "/v1/users/u1/sessions", "/v1/sessions/s%201",
                     "/v1/sessions/s1/messages?after_seq=-1", "/v1/users/u1/sessions?limit=2",
                     "/v1/sessions/s1/messages?limit=5&limit=6", "/v1/x/y"]  # fmt: skip
            w = await Wire.open(a)
            for _ in range(200):
                method = rng.choice(["GET", "POST", "PUT", "OPTIONS"])
                body = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(0, 6))}
                sent = body if method == "POST" else None
                await w.write(http(method, rng.choice(paths), sent))
                r = await w.answer(method.encode())
                assert r.status in (200, 204, 400, 403, 404, 405, 409, 413), r.body
            await w.close()
            assert node.ops.api is not None and 500 not in node.ops.api.errors
            r = await call(a, "GET", "/v1/users/u1/sessions")
            assert r.status == 200

    run(main(), 120)


def test_session_events_resume_by_last_event_id_across_a_node_kill(tmp_path: Path) -> None:
    """Three real nodes; the stream's node is killed -9 mid-conversation; the reader resumes
    from another node with ``Last-Event-ID`` and gets every message once, in order."""

    async def main() -> None:
        cluster = LocalCluster(3, str(tmp_path), extra_args=FAST)
        await cluster.start()
        try:
            ops = {i: c.ops for i, c in cluster.children.items()}
            body = {"user_id": "u1", "agent_id": "a1", "metadata": {}, "session_id": "s1"}
            assert (await call(ops[2], "POST", "/v1/sessions", body)).status == 200
            seen: list[int] = []
            e = await Events.open(ops[1], "/v1/sessions/s1/events")
            assert (await e.next())[1] == "subscribed"
            sent = 0

            async def send(n: int, node: int) -> None:
                nonlocal sent
                for _ in range(n):
                    sent += 1
                    for _attempt in range(100):  # until acknowledged (same client_msg_id)
                        r = await call(ops[node], "POST", "/v1/sessions/s1/messages",
                                       message(f"m{sent}", client_msg_id=f"c{sent}"))  # fmt: skip
                        if r.status == 200:
                            break
                        assert r.status in (503, 504), r.body
                        await asyncio.sleep(0.1)

            await send(10, 2)
            while len(seen) < 10:
                ident, name, data = await e.next()
                assert name == "message" and ident == data["seq"]
                seen.append(ident)
            cluster.kill(1)
            await cluster.wait_exit(1)
            await e.close()
            await send(10, 3)
            e = await Events.open(ops[2], "/v1/sessions/s1/events", last_event_id=str(seen[-1]))
            assert e.status == 200
            assert (await e.next())[1] == "subscribed"
            while len(seen) < 20:
                ident, name, data = await e.next()
                assert name == "message" and data["content"] == f"m{ident}"
                seen.append(ident)
            assert seen == list(range(1, 21))
            await e.close()
        finally:
            await cluster.stop()

    run(main(), 150)


def test_an_errors_details_are_passed_whatever_their_names() -> None:
    """A native error's details are its own: keys that are also parameter names (status,
    close, code) neither break the answer nor change its status."""
    from ctxstore.web_http import HttpApi

    class Host:
        answers: list[tuple[int, bytes, list[tuple[str, str]], bool]] = []

        def answer(
            self, status: int, ctype: str, body: bytes, headers: list[tuple[str, str]], close: bool
        ) -> None:
            self.answers.append((status, body, headers, close))

    class Clients:
        max_frame_bytes = 4 << 20

    api = HttpApi(Clients())  # type: ignore[arg-type]
    host = Host()
    request = h11.Request(method="GET", target="/v1/sessions/s1", headers=[("host", "t")])
    e = Error(2, "unavailable", "busy", True, {"status": 200, "close": True, "code": "x",
                                               "extra": 1})  # fmt: skip
    api.reply_message(host, request, e)  # type: ignore[arg-type]
    ((status, body, headers, close),) = host.answers
    assert status == 503 and not close and ("retry-after", "1") in headers
    assert msgspec.json.decode(body)["details"] == {"status": 200, "close": True, "code": "x",
                                                    "extra": 1}  # fmt: skip


def test_at_the_http_connection_cap_a_request_in_flight_is_not_the_one_closed() -> None:
    """The HTTP port closes its quietest connection for a new one; a connection whose API
    request is still in flight is not quiet (closing it would lose an answer, maybe an ack)."""
    from ctxstore.ops import OpsConnection

    from .test_ops import fake_ops, fetch, get

    class SlowApi:
        body_bytes_max = 1024
        waiting: list[OpsConnection] = []

        def handle(self, http: OpsConnection, request: h11.Request, body: bytes) -> None:
            self.waiting.append(http)  # answered later

    async def main() -> None:
        async with fake_ops(connections_max=2) as (ops, _):
            api = SlowApi()
            ops.api = api  # type: ignore[assignment]
            asking = await Wire.open(ops.address)
            await asking.write(get("/v1/sessions/s1"))
            while not api.waiting:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)
            other = await Wire.open(ops.address)
            await other.write(get("/health/live"))
            assert (await other.answer()).status == 200
            await asyncio.sleep(0.01)
            assert (await fetch(ops.address, "/health/live")).status == 200  # one more
            assert await other.closed()  # the quietest that is not waiting for an answer
            api.waiting[0].answer(200, "application/json", b"{}", [], False)
            assert (await asking.answer()).body == b"{}"
            await asking.close()

    run(main())
