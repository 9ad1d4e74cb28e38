"""Authorization on the web gateway (ctxstore/web.py, web_http.py with --auth jwt): the table
of every operation x role x own/other session over WebSockets whose token comes in each way a
client may give it, the HTTP statuses, tokens kept out of the logs, the refusal metrics."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import pytest

from bench.nodestats import parse_metrics
from wire.protocol import (
    PROTOCOL_VERSION,
    CreateSession,
    Error,
    Hello,
    MessageEvent,
    Ping,
    Subscribe,
    Welcome,
)
from wire.web_codec import JSON

from .test_auth_service import (
    AUTH,
    EXPECTED,
    OPERATIONS,
    PRINCIPALS,
    append,
    code,
    setup,
    token,
)
from .test_ops import fetch, run
from .test_web import web_node
from .test_web_http import Events, call
from .wsclient import WsClient

RIDS = itertools.count(2)


async def ws_as(address: tuple[str, int], tok: str, how: str) -> WsClient:
    """A WebSocket whose token is in the Hello, the Authorization header or the query."""
    if how == "hello":
        return await WsClient.open(address, [JSON], token=tok)
    if how == "header":
        headers = [("authorization", f"Bearer {tok}")]
        return await WsClient.open(address, [JSON], headers=headers)
    return await WsClient.open(address, [JSON], path=f"/v1/ws?token={tok}")


async def ask(ws: WsClient, request: object) -> str:
    rid = request.rid = next(RIDS)  # type: ignore[attr-defined]
    await ws.send(request)  # type: ignore[arg-type]
    while getattr(answer := await ws.recv(), "rid", None) != rid:  # (skip pushes)
        pass
    return code(answer)  # type: ignore[arg-type]


def test_the_table_holds_on_websockets_with_the_token_given_every_way(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def main() -> None:
        async with web_node(tmp_path, extra=AUTH) as w:
            svc = await ws_as(w.address, token("svc", "service"), "hello")
            for request in setup():
                assert await ask(svc, request) == "ok", request
            await svc.close()
            failures = []
            ways = itertools.cycle(["hello", "header", "query"])
            for (op, role), (own, other) in sorted(EXPECTED.items()):
                tok = token(PRINCIPALS[role], role)
                ws = await ws_as(w.address, tok, next(ways))
                for sid, u, a, expected in (
                    ("own", "alice", "bot", own),
                    ("other", "bob", "bot2", other),
                ):
                    got = await ask(ws, OPERATIONS[op](sid, u, a))
                    if got != expected:
                        failures.append(f"{op} by {role} on {sid}: {got}, not {expected}")
                await ws.close()
            assert not failures, "\n".join(failures)
            # No token anywhere: the Hello is refused.
            ws = await WsClient.open(w.address, [JSON], hello=False)
            refused = await ws.request(Hello(1, PROTOCOL_VERSION, "t", None))
            assert isinstance(refused, Error) and refused.code == "unauthorized"
            metrics = parse_metrics((await fetch(w.address, "/metrics")).body.decode())
            assert metrics['ctxstore_auth_refusals_total{reason="missing"}'] == 1
            assert metrics['ctxstore_auth_refusals_total{reason="forbidden"}'] > 20

    run(main())
    tokens_seen = [r.getMessage() for r in caplog.records if "eyJ" in r.getMessage()]
    assert not tokens_seen  # (a JWT starts with eyJ: base64 of '{"')


def test_http_answers_401_without_a_token_and_403_for_another_users_session(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with web_node(tmp_path, extra=AUTH) as w:
            alice = {"authorization": f"Bearer {token('alice', 'user')}"}
            body = {"user_id": "alice", "agent_id": "bot", "metadata": {}, "session_id": "s1"}
            r = await call(w.address, "POST", "/v1/sessions", body, **alice)
            assert r.status == 200, r.body
            body = {"user_id": "bob", "agent_id": "bot", "metadata": {}, "session_id": "s2"}
            assert (await call(w.address, "POST", "/v1/sessions", body, **alice)).status == 403
            assert (await call(w.address, "GET", "/v1/sessions/s1", **alice)).status == 200
            assert (await call(w.address, "GET", "/v1/sessions/s1")).status == 401
            bob = {"authorization": f"Bearer {token('bob', 'user')}"}
            forbidden = await call(w.address, "GET", "/v1/sessions/s1", **bob)
            missing = await call(w.address, "GET", "/v1/sessions/nowhere", **bob)
            assert forbidden.status == missing.status == 403
            assert forbidden.body == missing.body  # never tells whether it exists

    run(main())


def test_event_streams_take_the_token_from_the_query(tmp_path: Path) -> None:
    async def main() -> None:
        async with web_node(tmp_path, extra=AUTH) as w:
            alice = token("alice", "user")
            body = {"user_id": "alice", "agent_id": "bot", "metadata": {}, "session_id": "s1"}
            auth = {"authorization": f"Bearer {alice}"}
            assert (await call(w.address, "POST", "/v1/sessions", body, **auth)).status == 200
            e = await Events.open(w.address, f"/v1/sessions/s1/events?token={alice}&after_seq=0")
            assert e.status == 200 and (await e.next())[1] == "subscribed"
            await e.close()
            e = await Events.open(w.address, f"/v1/users/alice/inbox/events?token={alice}")
            assert e.status == 200
            await e.close()
            bob = token("bob", "user")
            e = await Events.open(w.address, f"/v1/sessions/s1/events?token={bob}")
            assert e.status == 403
            e = await Events.open(w.address, "/v1/sessions/s1/events?after_seq=0")
            assert e.status == 401

    run(main())


def test_a_websocket_refreshes_its_token_with_a_second_hello(tmp_path: Path) -> None:
    """The token of the upgrade request (a browser's ``?token=``) expires in 2 s; a second
    Hello carrying a new one keeps the WebSocket and its subscription going past it; without
    one the WebSocket ends with the goodbye ``unauthorized``."""

    async def main() -> None:
        async with web_node(tmp_path, extra={**AUTH, "auth_jwt_leeway_s": 0.0}) as w:
            svc = await ws_as(w.address, token("svc", "service"), "hello")
            assert await ask(svc, CreateSession(0, "alice", "bot", {}, "s")) == "ok"
            first = token("alice", "user", ttl_s=2)
            ws = await WsClient.open(w.address, [JSON], path=f"/v1/ws?token={first}")
            assert await ask(ws, Subscribe(0, "s", 0)) == "ok"
            # a refresh carries its own token: the upgrade's does not stand for it
            assert await ask(ws, Hello(0, PROTOCOL_VERSION, "t", None)) == "unauthorized"
            assert await ask(ws, Hello(0, PROTOCOL_VERSION, "t", token("bob", "user"))) == (
                "forbidden"
            )
            rid = next(RIDS)
            await ws.send(Hello(rid, PROTOCOL_VERSION, "t", token("alice", "user", ttl_s=60)))
            welcome = await ws.recv()
            assert isinstance(welcome, Welcome) and welcome.rid == rid
            assert welcome.expires_in_ms is not None and welcome.expires_in_ms > 50_000
            await ws.pump(2.5)  # past the first token's expiry
            assert await ask(svc, append("s", "user", "alice")) == "ok"
            while not isinstance(event := await ws.recv(), MessageEvent):
                pass
            assert [m.content for m in event.messages] == ["hi"]
            assert await ask(ws, Ping(0)) == "ok"
            await ws.close()
            # no refresh: the WebSocket ends at the expiry
            short = token("alice", "user", ttl_s=2)
            ws = await WsClient.open(w.address, [JSON], path=f"/v1/ws?token={short}")
            assert await ask(ws, Subscribe(0, "s", 0)) == "ok"
            end = await ws.closed(5)
            assert end.code == 1008 and "expired" in end.reason
            await svc.close()

    run(main())
