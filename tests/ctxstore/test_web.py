"""The WebSocket protocol at ``/v1/ws`` (``ctxstore/web.py``) against a real node.

A single-node cluster in-process, its client ``Server`` and HTTP port on loopback sockets; the
client is wsproto over asyncio streams (``wsclient.py``), and raw bytes where the test needs
to break the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from wsproto.events import BytesMessage, CloseConnection, TextMessage
from wsproto.events import Ping as Ping_

from bench.nodestats import parse_metrics
from ctxstore.config import Settings
from ctxstore.node import Node
from ctxstore.ops import OpsServer, serve_ops
from ctxstore.server import Service
from ctxstore.web import WebLimits
from wire.aio import Server, serve
from wire.client import connect
from wire.framing import REQUEST_TYPES
from wire.protocol import (
    Append,
    Appended,
    Compact,
    Context,
    ContextChanged,
    ContextEvent,
    CreateSession,
    Error,
    GetContext,
    Hello,
    MessageEvent,
    Messages,
    NewMessage,
    Ping,
    Pong,
    Read,
    SessionInfo,
    SetContextConfig,
    SkipParts,
    Subscribe,
    Subscribed,
    SubscriptionClosed,
    Welcome,
)
from wire.web_codec import JSON, MSGPACK

from .test_ops import Wire, fetch, run
from .wsclient import Refused, WsClient

TEST_SECRET = "a-test-cluster-secret"  # auth on needs a secret of our own

JUNK_JSON = [
    '{"type":', '{"rid": 1e400}', '{"type": "append", "rid": 9, "metadata": [[[[]]]]}', "[]",
    '"x"', "{}", "\x00", '{"type": "hello", "rid": 1, "protocol_version": 1}',
]  # fmt: skip
REQUEST_FIELDS = {t.__struct_config__.tag: t.__struct_fields__ for t in REQUEST_TYPES}
VALUES: list[Any] = [None, 0, 1, -1, 2**63, 1.5, True, "", "x", "s1", "user", [], {}, {"a": [1]}]


def random_request(rng: random.Random) -> dict[str, Any]:
    """A request object of a real type whose fields have random values (some left out)."""
    tag = rng.choice(list(REQUEST_FIELDS))
    obj: dict[str, Any] = {"type": tag, "rid": rng.randint(1, 50)}
    for name in REQUEST_FIELDS[tag][1:]:
        if rng.random() < 0.9:
            obj[name] = rng.choice(VALUES)
    return obj


BOTH = pytest.mark.parametrize("subprotocol", [JSON, MSGPACK])


@dataclass
class Web:
    node: Node
    clients: Server
    ops: OpsServer

    @property
    def address(self) -> tuple[str, int]:
        return self.ops.address

    async def open(self, subprotocol: str = JSON, **kw: Any) -> WsClient:
        return await WsClient.open(self.address, [subprotocol], **kw)


@contextlib.asynccontextmanager
async def web_node(
    tmp_path: Path,
    web: WebLimits | None = None,
    tokens: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    **bounds: Any,
) -> AsyncIterator[Web]:
    settings = Settings(
        data_dir=str(tmp_path / "n1"), listen="127.0.0.1:0", peer_listen="127.0.0.1:0",
        groups=4, tick_ms=10, tokens=tokens or [], **({"secret": TEST_SECRET} if tokens else {}),
        **(extra or {}),
    )  # fmt: skip
    node = Node(settings)
    await node.start()
    clients = await serve(Service(node), "127.0.0.1", 0, **bounds)
    service = clients.handler
    assert isinstance(service, Service)
    ops = await serve_ops(node, service, "127.0.0.1", 0, clients=clients, web_limits=web)
    try:
        assert await node.wait_leaders(10)
        yield Web(node, clients, ops)
    finally:
        ops.close()
        clients.close()
        await ops.wait_closed()
        await clients.wait_closed()
        await node.stop()


def append(rid: int, sid: str, content: str, **kw: Any) -> Append:
    return Append(rid, sid, "user", "u1", "text", content, {}, kw.get("msg_id"), None, None)


# -- the handshake ---------------------------------------------------------------------------------
def test_the_upgrade_needs_one_of_the_two_subprotocols(tmp_path: Path) -> None:
    async def main() -> None:
        async with web_node(tmp_path) as w:
            for offered in ([], ["chat", "ctxstore.v2.json"]):
                with pytest.raises(Refused) as refused:
                    await WsClient.open(w.address, offered, hello=False)
                assert refused.value.status == 400
                body = msgspec.json.decode(refused.value.body)
                assert body["error"] == "bad_request"
                assert JSON in body["message"] and MSGPACK in body["message"]
                assert body["subprotocols"] == [JSON, MSGPACK]
            for subprotocol in (JSON, MSGPACK):  # the first one offered that is served
                c = await WsClient.open(w.address, ["chat", subprotocol, JSON], hello=False)
                assert c.subprotocol == subprotocol
                await c.close()
            # Not an upgrade at all: wsproto's verdict, as JSON; HEAD is not allowed.
            answer = await fetch(w.address, "/v1/ws")
            assert answer.status == 400 and "Upgrade" in answer.json()["message"]
            assert (await fetch(w.address, "/v1/ws", "HEAD")).status == 405
            # Headers wsproto cannot decode: refused, not a crash of the port.
            upgrade = (
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            )
            for extra in ("Sec-WebSocket-Protocol: ctxstore.v1.json, \xff\r\n", "X: y\r\n"):
                wire = await Wire.open(w.address)
                host = "\xe9\xff" if extra.startswith("X") else "t"
                head = f"GET /v1/ws HTTP/1.1\r\nHost: {host}\r\n{upgrade}{extra}\r\n"
                await wire.write(head.encode("latin-1"))
                answer = await wire.answer()
                assert answer.status == 400 and "undecodable" in answer.json()["message"]
                await wire.close()
            assert w.ops.gateway is not None and w.ops.gateway.refused == 5

    run(main())


@BOTH
def test_sessions_appends_reads_and_live_pushes(tmp_path: Path, subprotocol: str) -> None:
    async def main() -> None:
        async with web_node(tmp_path) as w:
            writer = await w.open(subprotocol)
            reader = await w.open(subprotocol)
            created = await writer.request(CreateSession(2, "u1", "a1", {"k": [1, None]}, "s1"))
            assert isinstance(created, SessionInfo) and created.session.metadata == {"k": [1, None]}
            first = await writer.request(append(3, "s1", "héllo ☃"))
            assert isinstance(first, Appended) and first.seq == 1
            subscribed = await reader.request(Subscribe(2, "s1", 0))
            assert subscribed == Subscribed(2, 1, 1)
            replay = await reader.recv()
            assert isinstance(replay, MessageEvent) and replay.messages[0].content == "héllo ☃"
            for i in range(2, 6):  # live: each append reaches the subscriber
                assert isinstance(await writer.request(append(10 + i, "s1", f"m{i}")), Appended)
                live = await reader.recv()
                assert isinstance(live, MessageEvent) and live.sub_id == 1
                assert [m.seq for m in live.messages] == [i]
            page = await writer.request(Read(20, "s1", 2, 10))
            assert isinstance(page, Messages) and [m.seq for m in page.messages] == [3, 4, 5]
            assert page.last_seq == 5
            missing = await writer.request(Read(21, "nope", 0, 10))
            assert isinstance(missing, Error) and missing.code == "not_found"
            await writer.close()
            await reader.close()

    run(main())


@BOTH
def test_structured_messages_and_the_context_window(tmp_path: Path, subprotocol: str) -> None:
    parts: list[dict[str, Any]] = [
        {"type": "reasoning", "text": "Call the weather tool."},
        {"type": "tool-weather", "toolCallId": "c1", "state": "output-available",
         "input": {"city": "Paris"}, "output": {"celsius": 21}},
        {"type": "text", "text": "It is 21 degrees."},
    ]  # fmt: skip

    async def main() -> None:
        async with web_node(tmp_path) as w:
            c = await w.open(subprotocol)
            follower = await w.open(subprotocol)
            await c.request(CreateSession(2, "u1", "a1", {}, "s1"))
            assert await follower.request(Subscribe(2, "s1", 0, True)) == Subscribed(2, 1, 0)
            for i in range(3):
                assert isinstance(await c.request(append(3 + i, "s1", f"q{i}")), Appended)
            agent = Append(6, "s1", "agent", "a1", "text", "", {}, None, None, None, None, parts)
            assert isinstance(await c.request(agent), Appended)
            changed = await c.request(SetContextConfig(7, "s1", 1000, 0.5, SkipParts(["tool-"], 3),
                                                       None))  # fmt: skip
            assert isinstance(changed, ContextChanged) and changed.window_first_seq == 2
            window = await c.request(GetContext(8, "s1"))
            assert isinstance(window, Context), window
            assert [m.seq for m in window.messages] == [2, 3, 4]
            assert window.messages[-1].role == "assistant"
            assert window.messages[-1].parts == [parts[0], parts[2]]  # the tool part skipped
            assert window.config is not None and window.config.policy == SkipParts(["tool-"], 3)
            summary = NewMessage("system", "summary", "q1 and q2", None, {}, None)
            stale = await c.request(Compact(9, "s1", 2, 3, [summary], window.version - 1))
            assert isinstance(stale, Error) and stale.code == "conflict"
            assert stale.details == {"version": window.version}
            done = await c.request(Compact(10, "s1", 2, 3, [summary], window.version))
            assert isinstance(done, ContextChanged) and done.version > window.version
            window = await c.request(GetContext(11, "s1"))
            assert isinstance(window, Context)
            assert [(m.seq, m.content) for m in window.messages] == [(0, "q1 and q2"), (4, "")]
            pushes: list[Any] = []
            while (
                not pushes
                or not isinstance(pushes[-1], ContextEvent)
                or (pushes[-1].reason != "compacted")
            ):
                pushes.append(await follower.recv())
                assert len(pushes) <= 10, pushes
            events = [p for p in pushes if isinstance(p, ContextEvent)]
            # configuring last 3 trims seq 1 from the window: two events
            assert [e.reason for e in events] == ["configured", "trimmed", "compacted"]
            assert events[-1].version == done.version
            seqs = [m.seq for p in pushes if isinstance(p, MessageEvent) for m in p.messages]
            assert seqs == [1, 2, 3, 4]
            await c.close()
            await follower.close()

    run(main())


def test_the_json_shapes_of_parts_and_policies_and_a_version_1_hello(tmp_path: Path) -> None:
    async def main() -> None:
        async with web_node(tmp_path) as w:
            c = await w.open(JSON, hello=False)
            welcome = await c.request(Hello(1, 2, "t", None))
            assert isinstance(welcome, Welcome) and welcome.protocol_version == 2
            await c.request(CreateSession(2, "u1", "a1", {}, "s1"))
            head = '"type": "append", "session_id": "s1", "sender": "agent", "sender_id": "a1"'
            rest = '"kind": "text", "content": "", "metadata": {}, "client_msg_id": null'
            guards = '"expected_seq": null, "token_count": null, "role": null'
            await c.send_text(
                f'{{"rid": 3, {head}, {rest}, {guards}, '
                '"parts": [{"type": "text", "text": "hi"}, {"type": "text"}]}'
            )
            bad = await c.recv()
            assert isinstance(bad, Error) and bad.code == "bad_request"
            assert bad.details["field"] == "parts[1].text", bad
            await c.send_text(
                f'{{"rid": 4, {head}, {rest}, {guards}, '
                '"parts": [{"type": "data-chart", "data": [1, 2]}]}'
            )
            assert isinstance(await c.recv(), Appended)
            await c.send_text(
                '{"type": "set_context_config", "rid": 5, "session_id": "s1", '
                '"token_budget": 50, "trigger_ratio": 1.0, '
                '"policy": {"type": "last_n", "limit": 5}, "tokenizer": null}'
            )
            assert isinstance(await c.recv(), ContextChanged)
            await c.send_text('{"type": "get_context", "rid": 6, "session_id": "s1"}')
            text = await c.recv_raw()
            assert isinstance(text, str)
            window = msgspec.json.decode(text)
            assert window["config"]["policy"] == {"type": "last_n", "limit": 5}
            assert window["messages"][0]["parts"] == [{"type": "data-chart", "data": [1, 2]}]
            await c.send_text(
                '{"type": "set_context_config", "rid": 7, "session_id": "s1", '
                '"token_budget": 50, "trigger_ratio": 1.0, '
                '"policy": {"type": "last_n"}, "tokenizer": null}'
            )
            bad = await c.recv()
            assert isinstance(bad, Error) and "limit" in bad.message, bad
            await c.close()
            # A version-1 client: welcomed as such, its requests without the new fields served
            # as before (it ignores the fields appended to what it receives).
            old = await w.open(JSON, hello=False)
            welcome = await old.request(Hello(1, 1, "old", None))
            assert isinstance(welcome, Welcome) and welcome.protocol_version == 1
            await old.send_text(
                f'{{"rid": 2, {head.replace("agent", "user")}, '
                '"kind": "text", "content": "v1", "metadata": {}, '
                '"client_msg_id": null, "expected_seq": null, "token_count": null}'
            )
            assert isinstance(await old.recv(), Appended)
            await old.send_text(
                '{"type": "subscribe", "rid": 3, "session_id": "s1", "after_seq": 1}'
            )
            assert isinstance(await old.recv(), Subscribed)
            replay = await old.recv()
            assert isinstance(replay, MessageEvent)
            assert [(m.content, m.role) for m in replay.messages] == [("v1", "user")]
            await old.close()

    run(main())


@BOTH
def test_pipelined_appends_are_all_answered_by_rid(tmp_path: Path, subprotocol: str) -> None:
    async def main() -> None:
        async with web_node(tmp_path) as w:
            c = await w.open(subprotocol)
            await c.request(CreateSession(2, "u1", "a1", {}, "s1"))
            n = 300
            for i in range(n):
                await c.send(append(100 + i, "s1", f"m{i}", msg_id=f"id{i}"))
            answers = [await c.recv() for _ in range(n)]
            assert all(isinstance(a, Appended) for a in answers)
            seqs = {a.rid: a.seq for a in answers if isinstance(a, Appended)}
            assert sorted(seqs) == list(range(100, 100 + n))
            assert sorted(seqs.values()) == list(range(1, n + 1))

    run(main())


def test_the_client_closes_and_the_server_answers_its_close(tmp_path: Path) -> None:
    async def main() -> None:
        async with web_node(tmp_path) as w:
            c = await w.open(JSON)
            await c.request(CreateSession(2, "u1", "a1", {}, "s1"))
            assert isinstance(await c.request(Subscribe(3, "s1", 0)), Subscribed)
            assert w.node.subscriptions.count == 1
            await c.send_raw(c.ws.send(CloseConnection(1000, "bye")))
            closed = await c.closed()
            assert (closed.code, closed.reason) == (1000, "bye")  # echoed
            assert await c.reader.read() == b""  # then the server closes the socket
            for _ in range(50):
                if not w.clients.connections:
                    break
                await asyncio.sleep(0.02)
            assert not w.clients.connections and w.node.subscriptions.count == 0

    run(main())


# -- bad input -------------------------------------------------------------------------------------
def test_bad_json_requests_are_answered_for_their_rid_and_the_socket_stays(tmp_path: Path) -> None:
    async def main() -> None:
        async with web_node(tmp_path) as w:
            c = await w.open(JSON)
            cases = {
                '{"type": "nope", "rid": 5}': ("type", "unknown request type 'nope'"),
                '{"rid": 6}': ("type", "unknown request type ''"),
                '{"type": "read", "rid": 7, "session_id": "s"}': ("after_seq", "missing"),
                '{"type": "read", "rid": 8, "session_id": "", "after_seq": 0, "limit": 1}': (
                    "session_id",
                    "length >= 1",
                ),
                '{"type": "ping", "rid": 9, "extra": 1}': (None, "too many fields"),
            }
            for text, (field, words) in cases.items():
                await c.send_text(text)
                e = await c.recv()
                assert isinstance(e, Error) and e.code == "bad_request", (text, e)
                assert e.rid == msgspec.json.decode(text)["rid"]
                assert words in e.message and e.details.get("field") == field, (text, e)
            assert await c.request(Ping(10)) == Pong(10)  # still open
            # No readable rid: the goodbye, then close (as on the native port).
            deep = '{"type": "ping", "rid": 11, "x": ' + "[" * 5000 + "]" * 5000 + "}"
            for text in ("{not json", "[1, 2]", '{"type": "ping"}', deep):
                c = await w.open(JSON)
                await c.send_text(text)
                goodbye = await c.recv()
                assert isinstance(goodbye, Error) and goodbye.rid == 0, (text, goodbye)
                assert goodbye.code == "bad_request"
                closed = await c.closed()
                assert closed.code == 1008 and closed.reason == goodbye.message

    run(main())


def test_the_first_message_must_be_the_hello_and_the_token_is_checked(tmp_path: Path) -> None:
    async def main() -> None:
        async with web_node(tmp_path, tokens=["secret"]) as w:
            c = await w.open(JSON, hello=False)
            await c.send(Ping(1))
            goodbye = await c.recv()
            assert isinstance(goodbye, Error) and goodbye.rid == 0
            assert "hello" in goodbye.message
            assert (await c.closed()).code == 1008
            for token in (None, "wrong"):
                c = await w.open(MSGPACK, hello=False)
                refused = await c.request(Hello(3, 1, "t", token))
                assert isinstance(refused, Error) and refused.code == "unauthorized"
                assert refused.rid == 3
                assert (await c.closed()).code == 1008
            c = await w.open(MSGPACK, token="secret")
            assert await c.request(Ping(2)) == Pong(2)

    run(main())


@BOTH
def test_an_oversize_message_is_closed_1009(tmp_path: Path, subprotocol: str) -> None:
    async def main() -> None:
        async with web_node(tmp_path, max_frame_bytes=64 * 1024) as w:
            # before the Hello: 16 KiB at most
            c = await w.open(subprotocol, hello=False)
            if c.json:
                await c.send_text("x" * 20_000)
            else:
                await c.send_bytes(b"x" * 20_000)
            goodbye = await c.recv()
            assert isinstance(goodbye, Error) and goodbye.code == "too_large"
            assert (await c.closed()).code == 1009
            # after it, the frame limit: in fragments too
            c = await w.open(subprotocol)
            assert w.ops.gateway is not None
            part: Any = "x" * 30_000 if c.json else b"x" * 30_000
            kind = TextMessage if c.json else BytesMessage
            for _ in range(3):
                await c.send_raw(c.ws.send(kind(part, message_finished=False)))
            closed = await c.closed()
            assert closed.code == 1009 and "more than 65536 bytes" in closed.reason

    run(main())


def test_invalid_utf8_and_the_wrong_kind_of_message_close_the_socket(tmp_path: Path) -> None:
    async def main() -> None:
        async with web_node(tmp_path) as w:
            c = await w.open(JSON)
            # a text frame (opcode 1), masked with a zero key, holding invalid UTF-8
            payload = b'{"type": "ping", "rid": 2, "x": "\xff"}'
            await c.send_raw(bytes([0x81, 0x80 | len(payload), 0, 0, 0, 0]) + payload)
            assert (await c.closed()).code == 1007
            c = await w.open(JSON)
            await c.send_raw(bytes([0x81, 2]) + b"{}")  # unmasked: a client must mask
            assert (await c.closed()).code == 1002
            c = await w.open(JSON)
            await c.send_bytes(msgspec.msgpack.encode(Ping(2)))
            closed = await c.closed()
            assert closed.code == 1003 and "text" in closed.reason
            c = await w.open(MSGPACK)
            await c.send_text("{}")
            assert (await c.closed()).code == 1003
            # invalid UTF-8 inside msgpack: undecodable, as on the native port
            c = await w.open(MSGPACK)
            await c.send_bytes(b"\x92\xa4ping\x02"[:1] + b"\xa4p\xffng\x02")
            goodbye = await c.recv()
            assert isinstance(goodbye, Error) and goodbye.rid == 0
            assert (await c.closed()).code == 1008

    run(main())


@BOTH
def test_a_conversation_fed_one_byte_at_a_time(tmp_path: Path, subprotocol: str) -> None:
    async def main() -> None:
        async with web_node(tmp_path) as w:
            c = await w.open(subprotocol, hello=False)
            writes = [
                Hello(1, 1, "bytewise", None),
                CreateSession(2, "u1", "a1", {}, "s1"),
                append(3, "s1", "one"),
            ]
            # The read after the append's answer: requests in flight at once may be answered
            # in any order (docs/protocol.md §4), a read before a write it was sent beside.
            answers = []
            for script in (writes, [Read(4, "s1", 0, 10)]):
                raw = bytearray()
                for request in script:  # each as two fragments
                    if c.json:
                        from wire.web_codec import json_request

                        text = json_request(request).decode()
                        raw += c.ws.send(TextMessage(text[:5], message_finished=False))
                        raw += c.ws.send(TextMessage(text[5:]))
                    else:
                        data = msgspec.msgpack.encode(request)
                        raw += c.ws.send(BytesMessage(data[:3], message_finished=False))
                        raw += c.ws.send(BytesMessage(data[3:]))
                for i in range(len(raw)):
                    await c.send_raw(raw[i : i + 1])
                answers += [await c.recv() for _ in script]
            assert [a.rid for a in answers] == [1, 2, 3, 4]  # type: ignore[union-attr]
            page = answers[3]
            assert isinstance(page, Messages) and page.messages[0].content == "one"

    run(main())


def test_a_client_that_never_reads_is_bounded_and_dropped(tmp_path: Path) -> None:
    async def main() -> None:
        web = WebLimits(close_timeout_s=0.5)
        pending_max = 16 * 1024 * 1024
        bounds = {"write_stall_timeout_s": 1.0, "pending_bytes_max": pending_max}
        async with web_node(tmp_path, web, **bounds) as w:
            c = await w.open(MSGPACK)
            await c.request(CreateSession(2, "u1", "a1", {}, "s1"))
            body = "y" * 500_000
            for i in range(20):  # 10 MB of history
                assert isinstance(await c.request(append(10 + i, "s1", body)), Appended)
            await c.close()
            # A client with a small receive buffer that asks for it all, again and again.
            sleepy = await w.open(MSGPACK, rcvbuf_bytes=16 * 1024)
            writer = sleepy.writer
            for i in range(200):
                await sleepy.send(Read(2 + i, "s1", 0, 5))
            gateway = w.ops.gateway
            assert gateway is not None
            high = 0
            for _ in range(40):
                await asyncio.sleep(0.05)
                for conn in gateway.connections:
                    high = max(high, conn.transport.get_write_buffer_size())
            # Bounded as a native connection: the answers of the requests in flight at most
            # (pending_bytes_max), plus the write buffer's high-water mark (1 MiB).
            assert 4 * 1024 * 1024 < high < pending_max + 1024 * 1024
            assert w.clients.pending_bytes < pending_max + 1024 * 1024
            await asyncio.sleep(1.0)  # the stall timeout, then the close timeout
            for _ in range(40):
                if not gateway.connections:
                    break
                await asyncio.sleep(0.05)
            assert not gateway.connections
            assert w.clients.stalled_closed == 1
            assert w.clients.pending_bytes == 0 and not w.clients.connections
            writer.close()
            # The node still serves.
            c2 = await w.open(JSON)
            assert await c2.request(Ping(2)) == Pong(2)

    run(main())


def test_a_client_that_floods_pings_and_reads_nothing_is_bounded(tmp_path: Path) -> None:
    """Pongs are written by the WebSocket itself: while its writer is paused it reads no more
    (as a native connection stops reading), so unread pongs cannot pile up."""

    async def main() -> None:
        async with web_node(tmp_path) as w:
            c = await w.open(MSGPACK, rcvbuf_bytes=16 * 1024)
            ping = c.ws.send(Ping_(b"p" * 125))
            flood = asyncio.ensure_future(c.send_raw(ping * 400_000))  # 51 MB of pings
            gateway = w.ops.gateway
            assert gateway is not None
            high = 0
            for _ in range(40):
                await asyncio.sleep(0.05)
                for conn in gateway.connections:
                    high = max(high, conn.transport.get_write_buffer_size())
            assert not flood.done()  # the node stopped reading: the client's writes wait
            assert 0 < high < 4 * 1024 * 1024
            flood.cancel()

    run(main())


def test_the_node_survives_malformed_frames_and_http_requests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        rng = random.Random(18)
        async with web_node(tmp_path) as w:

            async def garbage(i: int) -> None:
                kind = 0 if i % 2 == 0 else 1 + i // 2 % 3  # half HTTP, half WebSocket
                if kind == 0:  # HTTP: a mangled upgrade request
                    head = bytearray(
                        b"GET /v1/ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: ctxstore.v1.json"
                        b"\r\n\r\n"
                    )
                    for _ in range(rng.randint(1, 4)):
                        head[rng.randrange(len(head))] = rng.randrange(256)
                    reader, writer = await asyncio.open_connection(*w.address)
                    writer.write(bytes(head) + rng.randbytes(rng.randint(0, 64)))
                else:
                    c = await w.open(JSON if kind == 1 else MSGPACK, hello=kind != 3)
                    writer = c.writer
                    reader = c.reader
                    if kind == 1:  # requests with random values, then JSON-ish junk
                        for _ in range(rng.randint(0, 5)):
                            await c.send_text(msgspec.json.encode(random_request(rng)).decode())
                        text = rng.choice(JUNK_JSON)
                        await c.send_text(text + rng.choice(["", "}", "]]"]))
                    else:  # msgpack requests with random values, random frames and bytes
                        for _ in range(rng.randint(0, 5) if kind == 2 else 0):
                            fields = random_request(rng)
                            await c.send_bytes(msgspec.msgpack.encode(list(fields.values())))
                        await c.send_raw(rng.randbytes(rng.randint(1, 40)))
                        await c.send_bytes(rng.randbytes(rng.randint(0, 40)))
                with contextlib.suppress(OSError):
                    writer.write_eof()  # the node must close: nothing more is coming
                    while await asyncio.wait_for(reader.read(65536), 5):
                        pass
                writer.close()

            for start in range(0, 10_000, 50):  # 5 000 HTTP requests, 5 000 WebSockets
                await asyncio.gather(*(garbage(i) for i in range(start, start + 50)))
            c = await w.open(MSGPACK)
            assert await c.request(Ping(2)) == Pong(2)
            assert (await fetch(w.address, "/health/live")).status == 200
            assert w.ops.gateway is not None and w.ops.gateway.closes[1011] == 0
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]

    run(main(), timeout_s=240)


# -- the port's other duties, keepalive, shutdown --------------------------------------------------
def test_health_and_metrics_on_the_same_port_count_the_websockets(tmp_path: Path) -> None:
    async def main() -> None:
        async with web_node(tmp_path) as w:
            c = await w.open(JSON)
            d = await w.open(MSGPACK)
            assert await c.request(Ping(2)) == Pong(2)
            assert (await fetch(w.address, "/health/ready")).status == 200
            answer = await fetch(w.address, "/metrics")
            m = parse_metrics(answer.body.decode())
            assert m['ctxstore_web_connections{subprotocol="ctxstore.v1.json"}'] == 1
            assert m['ctxstore_web_connections{subprotocol="ctxstore.v1.msgpack"}'] == 1
            assert m["ctxstore_web_upgrades_total"] == 2
            assert m["ctxstore_web_messages_received_total"] == 3  # two Hellos, a ping
            assert m["ctxstore_client_connections"] == 2  # the native bounds count them
            await d.close()
            await asyncio.sleep(0.1)
            m = parse_metrics((await fetch(w.address, "/metrics")).body.decode())
            assert m['ctxstore_web_closes_total{code="1000"}'] >= 1

    run(main())


def test_websockets_count_against_the_client_connection_cap(tmp_path: Path) -> None:
    async def main() -> None:
        async with web_node(tmp_path, connections_max=2) as w:
            native = await connect("{}:{}".format(*w.clients.address))
            first = await w.open(MSGPACK)
            second = await w.open(JSON, hello=False)  # the 101 comes, then the refusal
            goodbye = await second.recv()
            assert isinstance(goodbye, Error) and goodbye.rid == 0
            assert goodbye.code == "unavailable" and "too many connections" in goodbye.message
            assert (await second.closed()).code == 1001
            assert await first.request(Ping(2)) == Pong(2)
            await native.close()

    run(main())


def test_no_hello_in_time_is_closed_1008(tmp_path: Path) -> None:
    async def main() -> None:
        async with web_node(tmp_path, hello_timeout_s=0.3) as w:
            c = await w.open(JSON, hello=False)
            closed = await c.closed()
            assert closed.code == 1008 and "handshake" in closed.reason

    run(main())


def test_pings_keep_a_reading_peer_and_a_silent_one_is_closed(tmp_path: Path) -> None:
    async def main() -> None:
        web = WebLimits(ping_interval_s=0.1, idle_timeout_s=0.45)
        async with web_node(tmp_path, web) as w:
            alive = await w.open(JSON)
            silent = await w.open(JSON)
            await alive.pump(1.2)  # reads, and answers the pings
            assert alive.pings >= 5
            assert await alive.request(Ping(2)) == Pong(2)
            closed = await silent.closed()
            assert closed.code == 1001 and "nothing received" in closed.reason

    run(main())


@BOTH
def test_shutdown_says_goodbye_then_closes_1001(tmp_path: Path, subprotocol: str) -> None:
    async def main() -> None:
        async with web_node(tmp_path) as w:
            c = await w.open(subprotocol)
            await c.request(CreateSession(2, "u1", "a1", {}, "s1"))
            assert isinstance(await c.request(Subscribe(3, "s1", 0)), Subscribed)
            service = w.clients.handler
            assert isinstance(service, Service)
            service.close_subscriptions("the node is shutting down")
            w.clients.close("unavailable", "the node is shutting down")
            closed_sub = await c.recv()
            assert isinstance(closed_sub, SubscriptionClosed) and closed_sub.reason == "shutdown"
            goodbye = await c.recv()
            assert isinstance(goodbye, Error) and goodbye.rid == 0
            assert goodbye.code == "unavailable" and goodbye.retryable
            closed = await c.closed()
            assert closed.code == 1001 and closed.reason == "the node is shutting down"
            # The client port no longer listens: nor does /v1/ws (health still answers).
            with pytest.raises(Refused) as refused:
                await w.open(subprotocol)
            assert refused.value.status == 503
            assert msgspec.json.decode(refused.value.body)["error"] == "unavailable"
            assert (await fetch(w.address, "/health/live")).status == 200

    run(main())


def test_cluster_up_serves_websockets_and_sigterm_closes_them_1001(tmp_path: Path) -> None:
    from .test_cli import ClusterUp

    async def main(up: ClusterUp) -> None:
        (node,) = up.started()["nodes"]
        host, port = node["ops"].rsplit(":", 1)
        assert node["ws"] == f"ws://{host}:{port}/v1/ws"
        c = None
        for _ in range(100):  # the line is printed once the node listens; ready is later
            with contextlib.suppress(OSError, Refused):
                c = await WsClient.open((host, int(port)), [JSON])
                break
            await asyncio.sleep(0.1)
        assert c is not None
        assert await c.request(Ping(2)) == Pong(2)
        up.process.send_signal(signal.SIGINT)  # cluster up stops its nodes with SIGTERM
        goodbye = await c.recv()
        assert isinstance(goodbye, Error) and goodbye.rid == 0 and goodbye.code == "unavailable"
        closed = await c.closed()
        assert closed.code == 1001

    with ClusterUp(tmp_path, "--base-port", "0") as up:
        run(main(up))
        up.wait()
    assert up.process.returncode == 0


def test_the_idle_timeout_must_exceed_the_ping_interval() -> None:
    from ctxstore.config import ConfigError, load

    with pytest.raises(ConfigError, match="web_idle_timeout_s"):
        load(flags={"web_ping_interval_s": "30", "web_idle_timeout_s": "30"}, environ={})
    s = load(environ={"CTXSTORE_WEB_PING_INTERVAL_S": "5", "CTXSTORE_WEB_IDLE_TIMEOUT_S": "12"})
    assert (s.web_ping_interval_s, s.web_idle_timeout_s) == (5.0, 12.0)
