"""The HTTP/3 listener and WebTransport (``ctxstore/web_h3.py``, ``webtransport.py``) against a
real node, with aioquic's own client (``h3client``): the HTTP API over HTTP/3, WebTransport
sessions with many subscriptions (one stream each), a lossy relay (a lost packet of one
subscription does not hold back another's), an address change keeping the subscriptions."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import random
import resource
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
import trustme
from aioquic.asyncio.client import connect
from cryptography.hazmat.primitives import serialization

from bench.nodestats import parse_metrics
from ctxstore.config import ConfigError, Settings
from ctxstore.tlscert import certificate_hash, generate
from ctxstore.web_h3 import H3Limits, H3Server, attach_h3
from ctxstore.webtransport import SessionHost, WtSession
from wire.client import connect as native_connect

from .h3client import (
    HEADER,
    H3Client,
    LossyRelay,
    _Incoming,
    client_configuration,
    h3_client,
)
from .test_ops import Wire, run
from .test_web import Web, web_node


@contextlib.asynccontextmanager
async def h3_node(
    tmp_path: Path,
    limits: H3Limits | None = None,
    tls: tuple[str, str] | None = None,
    tokens: list[str] | None = None,
    extra: dict[str, Any] | None = None,
    **bounds: Any,
) -> AsyncIterator[tuple[Web, H3Server]]:
    if tls is None:
        cert = generate(str(tmp_path / "tls"))
        tls = (cert.cert_path, cert.key_path)
    async with web_node(tmp_path, tokens=tokens, extra=extra, **bounds) as w:
        h3 = await attach_h3(w.ops, w.clients, "127.0.0.1", 0, *tls, limits)
        yield w, h3


def message(content: str, sender_id: str = "u1") -> dict[str, Any]:
    return {"sender": "user", "sender_id": sender_id, "kind": "text", "content": content,
            "metadata": {}}  # fmt: skip


async def create(writer: H3Client, session_id: str) -> None:
    body = {"user_id": "u1", "agent_id": "a", "metadata": {}, "session_id": session_id}
    r = await writer.request("POST", "/v1/sessions", body)
    assert r.status == 200, r.body


def subscribe(rid: int, session_id: str) -> dict[str, Any]:
    return {"type": "subscribe", "rid": rid, "session_id": session_id, "after_seq": 0,
            "context_events": False}  # fmt: skip


def hello(rid: int = 1) -> dict[str, Any]:
    return {"type": "hello", "rid": rid, "protocol_version": 2, "client_name": "t", "token": None}


def test_the_certificate_is_self_signed_ecdsa_for_at_most_14_days(tmp_path: Path) -> None:
    cert = generate(str(tmp_path))
    pem = Path(cert.cert_path).read_bytes()
    assert certificate_hash(pem) == cert.sha256 and len(cert.sha256) == 64
    from cryptography import x509

    c = x509.load_pem_x509_certificate(pem)
    assert (c.not_valid_after_utc - c.not_valid_before_utc).days <= 14
    assert (Path(cert.key_path).stat().st_mode & 0o777) == 0o600


def test_h3_needs_the_http_port_and_a_certificate() -> None:
    with pytest.raises(ConfigError, match="h3: needs http"):
        Settings(h3="127.0.0.1:7700", tls_cert="c", tls_key="k")
    with pytest.raises(ConfigError, match="h3: needs tls_cert"):
        Settings(h3="127.0.0.1:7700", http="127.0.0.1:7600")


def test_the_http_api_over_http3_and_alt_svc(tmp_path: Path) -> None:
    async def main() -> None:
        async with h3_node(tmp_path) as (w, h3), h3_client(h3.address) as c:
            await create(c, "s1")
            r = await c.request("GET", "/v1/sessions/s1")
            assert r.status == 200 and r.json()["session"]["id"] == "s1"
            for i in range(3):
                r = await c.request("POST", "/v1/sessions/s1/messages", message(f"m{i}"))
                assert r.status == 200 and r.json()["seq"] == i + 1
            r = await c.request("GET", "/v1/sessions/s1/messages?after_seq=1&limit=10")
            assert [m["content"] for m in r.json()["messages"]] == ["m1", "m2"]
            r = await c.request("GET", "/v1/sessions/nope")
            assert r.status == 404 and r.json()["code"] == "not_found"
            r = await c.request("POST", "/v1/sessions/s1/messages", {"sender": "user"})
            assert r.status == 400 and r.json()["details"]["field"]
            r = await c.request("GET", "/v1/ws")  # WebSockets: HTTP/1.1 (or /v1/wt)
            assert r.status == 404 and "WebTransport" in r.json()["message"]
            r = await c.request("GET", "/health/live")
            assert r.status == 200 and r.json()["status"] == "live"
            big = b"{" + b" " * (w.clients.max_frame_bytes + 10) + b"}"
            r = await c.request("POST", "/v1/sessions/s1/messages", big)
            assert r.status == 413
            metrics = parse_metrics((await c.request("GET", "/metrics")).body.decode())
            assert metrics["ctxstore_quic_connections"] == 1
            assert metrics["ctxstore_h3_requests_total"] >= 9
            # the HTTP/1.1 port advertises the listener
            wire = await Wire.open(w.ops.address)
            await wire.write(b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = await wire.answer(b"GET")
            await wire.close()
            assert answer.headers["alt-svc"] == f'h3=":{h3.address[1]}"; ma=86400'

    run(main())


def test_server_sent_events_over_http3(tmp_path: Path) -> None:
    async def main() -> None:
        async with h3_node(tmp_path) as (w, h3), h3_client(h3.address) as c:
            await create(c, "s1")
            for i in range(2):
                await c.request("POST", "/v1/sessions/s1/messages", message(f"m{i}"))
            stream = c.open_request("/v1/sessions/s1/events?after_seq=0")
            inc = c.incoming[stream]
            await c.wait_for(lambda: b"id: 2\n" in inc.body)
            head = dict(inc.headers)
            assert head[b":status"] == b"200" and head[b"content-type"] == b"text/event-stream"
            assert b"event: subscribed" in inc.body and b"transfer-encoding" not in head
            await c.request("POST", "/v1/sessions/s1/messages", message("live"))
            await c.wait_for(lambda: b"id: 3\n" in inc.body)
            assert b'"content":"live"' in inc.body and not inc.done.is_set()
            # Last-Event-ID resumes; an unknown session is an ordinary 404 before any stream
            again = c.open_request("/v1/sessions/s1/events", {"last-event-id": "2"})
            await c.wait_for(lambda: b"id: 3\n" in c.incoming[again].body)
            assert b"id: 2\n" not in c.incoming[again].body
            r = await c.request("GET", "/v1/sessions/nope/events")
            assert r.status == 404 and r.json()["code"] == "not_found"
            api = w.ops.api
            assert api is not None and len(api.streams) == 2  # (the API's event streams)
            # the client cancels a stream (reads no more of it): its subscription ends
            c._quic.stop_stream(stream, 0x10C)
            c.transmit()
            for _ in range(200):
                if len(api.streams) == 1:
                    break
                await asyncio.sleep(0.01)
            assert len(api.streams) == 1

    run(main())


async def _session(c: H3Client, protocol: str = "ctxstore.v1.json") -> int:
    session, status = await c.open_session(f"/v1/wt?protocol={protocol}")
    assert status == 200
    return session


def test_webtransport_many_subscriptions_one_stream_each(tmp_path: Path) -> None:
    async def main() -> None:
        async with h3_node(tmp_path) as (_, h3), h3_client(h3.address) as c, \
                h3_client(h3.address) as writer:  # fmt: skip
            session = await _session(c)
            # requests may come before the hello's answer, on streams of their own
            hello_stream = c.send(session, hello())
            n = 24
            subs: dict[str, int] = {}
            for i in range(n):
                await create(writer, f"s{i}")
            await c.wait_for(lambda: c.wt[hello_stream].messages)
            assert c.wt[hello_stream].messages[0]["type"] == "welcome"
            answers = await asyncio.gather(*(
                c.call(session, subscribe(10 + i, f"s{i}"))
                for i in range(n)
            ))  # fmt: skip
            for i, a in enumerate(answers):
                assert a["type"] == "subscribed" and a["rid"] == 10 + i
                subs[f"s{i}"] = a["sub_id"]
            for k in range(3):
                await asyncio.gather(*(
                    writer.request("POST", f"/v1/sessions/s{i}/messages", message(f"{i}-{k}"))
                    for i in range(n)
                ))  # fmt: skip

            def complete() -> bool:
                return all(len(c.pushes(s)) >= 3 for s in subs.values())

            await c.wait_for(complete)
            assert len(c.uni) == n  # one stream per subscription
            for i in range(n):
                pushes = c.pushes(subs[f"s{i}"])
                contents = [m["content"] for p in pushes for m in p["messages"]]
                assert contents == [f"{i}-{k}" for k in range(3)]
            # each push of a subscription on its stream, none on another's
            for stream in c.uni:
                assert len({p["sub_id"] for p in c.wt[stream].messages}) == 1
            # unsubscribe: answered on its own stream, the subscription's stream ends
            a = await c.call(session, {"type": "unsubscribe", "rid": 99, "sub_id": subs["s0"]})
            assert a == {"type": "unsubscribed", "rid": 99, "sub_id": subs["s0"]}
            first = next(s for s in c.uni if c.wt[s].messages[0]["sub_id"] == subs["s0"])
            await c.wait_for(lambda: c.wt[first].ended)
            # a request's stream ends once answered
            ping = c.send(session, {"type": "ping", "rid": 100})
            await c.wait_for(lambda: c.wt[ping].ended)
            assert c.wt[ping].messages == [{"type": "pong", "rid": 100}]
            # a bad request: bad_request on its stream, the session goes on
            a = await c.call(session, {"type": "read", "rid": 101, "session_id": "s1"})
            assert a["code"] == "bad_request"
            metrics = parse_metrics((await writer.request("GET", "/metrics")).body.decode())
            assert metrics["ctxstore_wt_sessions"] == 1
            assert metrics['ctxstore_quic_streams_total{opener="server"}'] >= n

    run(main())


def test_webtransport_msgpack_and_the_goodbye(tmp_path: Path) -> None:
    async def main() -> None:
        async with h3_node(tmp_path) as (_, h3), h3_client(h3.address) as c:
            session = await _session(c, "ctxstore.v1.msgpack")
            welcome = await c.call(session, ["hello", 1, 2, "t", None])
            assert welcome[0] == "welcome" and welcome[1] == 1
            assert await c.call(session, ["ping", 2]) == ["pong", 2]
            # a message that is not a request: the goodbye on a stream of its own, then close
            c.send(session, "not an array")
            await c.wait_for(lambda: c.uni and c.wt[c.uni[-1]].ended)
            goodbye = c.wt[c.uni[-1]].messages[0]
            assert goodbye[0] == "error" and goodbye[1] == 0 and goodbye[2] == "bad_request"
            await c.wait_for(lambda: c.incoming[session].done.is_set())
            assert not h3.sessions
            _, status = await c.open_session("/v1/wt?protocol=chat")
            assert status == 400

    run(main())


def test_requests_before_the_hello_and_malformed_ones_are_answered_on_their_streams(
    tmp_path: Path,
) -> None:
    """A request whose stream ends before the hello arrives waits for it and is answered on its
    stream (it was ended unanswered, then the session failed); a malformed request whose rid
    the node reads (a binary type, say) is answered ``bad_request`` on its stream too."""

    async def main() -> None:
        async with h3_node(tmp_path) as (_, h3), h3_client(h3.address) as c:
            session = await _session(c, "ctxstore.v1.msgpack")
            early = c.send(session, ["ping", 7])  # (sent, and ended, first)
            hello_stream = c.send(session, ["hello", 1, 2, "t", None])
            await c.wait_for(lambda: c.wt[hello_stream].messages and c.wt[early].ended)
            assert c.wt[early].messages == [["pong", 7]]
            assert c.wt[hello_stream].messages[0][0] == "welcome"
            bad = await c.call(session, [b"ping", 9])
            assert bad[:3] == ["error", 9, "bad_request"], bad
            assert await c.call(session, ["ping", 10]) == ["pong", 10]
            assert len(h3.sessions) == 1

    run(main())


def test_a_token_on_the_connect_stands_for_the_hellos(tmp_path: Path) -> None:
    """As on a WebSocket's upgrade (docs/auth.md): Authorization: Bearer or ?token= on the
    CONNECT serve a Hello without a token; a wrong one, or none, is refused."""

    async def main() -> None:
        async with h3_node(tmp_path, tokens=["secret"]) as (_, h3), h3_client(h3.address) as c:
            for path, headers, answer in (
                ("/v1/wt", {}, "error"),
                ("/v1/wt?token=wrong", {}, "error"),
                ("/v1/wt?token=secret", {}, "welcome"),
                ("/v1/wt", {"authorization": "Bearer secret"}, "welcome"),
            ):
                session, status = await c.open_session(path, headers)
                assert status == 200
                got = await c.call(session, hello())
                assert got["type"] == answer, (path, headers, got)
                if answer == "error":
                    assert got["code"] == "unauthorized"
            r = await c.request("GET", "/v1/sessions/x", headers={"authorization": "Bearer no"})
            assert r.status == 401

    run(main())


def test_a_second_hello_refreshes_the_token_of_a_session(tmp_path: Path) -> None:
    """A WebTransport session (a native connection) refreshes its 2 s token with a second
    hello on a stream of its own: its subscription receives after the first token expired."""
    from .test_auth_service import AUTH, token

    async def main() -> None:
        extra = {**AUTH, "auth_jwt_leeway_s": 0.0}
        async with h3_node(tmp_path, extra=extra) as (_, h3), h3_client(h3.address) as c:
            short = token("u1", "user", ttl_s=2)
            session, status = await c.open_session(f"/v1/wt?token={short}")
            assert status == 200
            first = await c.call(session, {**hello(), "protocol_version": 4})
            assert first["type"] == "welcome" and 0 < first["expires_in_ms"] <= 2000
            body = {"user_id": "u1", "agent_id": "a", "metadata": {}, "session_id": "s"}
            r = await c.request("POST", "/v1/sessions", body, headers={
                "authorization": f"Bearer {token('u1', 'user')}"})  # fmt: skip
            assert r.status == 200, r.body
            subscribed = await c.call(session, subscribe(2, "s"))
            assert subscribed["type"] == "subscribed"
            again = {**hello(3), "protocol_version": 4, "token": token("bob", "user")}
            refused = await c.call(session, again)
            assert (refused["type"], refused["code"]) == ("error", "forbidden")
            again = {**hello(4), "protocol_version": 4, "token": token("u1", "user", ttl_s=60)}
            welcome = await c.call(session, again)
            assert welcome["type"] == "welcome" and welcome["expires_in_ms"] > 50_000
            await asyncio.sleep(2.5)  # past the first token's expiry
            append = {"type": "append", "rid": 5, **message("after"), "client_msg_id": None,
                      "expected_seq": None, "token_count": None}  # fmt: skip
            append["session_id"] = "s"
            appended = await c.call(session, append)
            assert appended["type"] == "appended", appended
            [event] = await c.wait_for(lambda: c.pushes(subscribed["sub_id"]))
            assert [m["content"] for m in event["messages"]] == ["after"]
            assert c.terminated is None

    run(main())


def test_a_quiet_subscriber_is_kept_alive(tmp_path: Path) -> None:
    """A session that only listens sends nothing: the node's pings keep QUIC's idle timeout
    (here 1 s, the client's too) from closing it."""

    async def main() -> None:
        async with h3_node(tmp_path, H3Limits(idle_timeout_s=1.0)) as (_, h3):
            config = client_configuration()
            config.idle_timeout = 1.0
            async with connect(*h3.address, configuration=config, create_protocol=H3Client) as c:
                assert isinstance(c, H3Client)
                session = await _session(c)
                assert (await c.call(session, hello()))["type"] == "welcome"
                await asyncio.sleep(3)
                assert c.terminated is None and len(h3.sessions) == 1
                assert (await c.call(session, {"type": "ping", "rid": 2}))["type"] == "pong"

    run(main())


def test_a_node_shutting_down_says_goodbye_on_its_sessions(tmp_path: Path) -> None:
    async def main() -> None:
        async with h3_node(tmp_path) as (_, h3), h3_client(h3.address) as c:
            session = await _session(c)
            assert (await c.call(session, hello()))["type"] == "welcome"
            h3.close()
            await c.wait_for(lambda: c.uni and c.wt[c.uni[-1]].messages)
            goodbye = c.wt[c.uni[-1]].messages[0]
            assert (goodbye["rid"], goodbye["code"]) == (0, "unavailable")
            assert goodbye["retryable"] is True
            await c.wait_for(lambda: c.terminated is not None)

    run(main())


def test_a_lost_packet_of_one_subscription_does_not_delay_another(tmp_path: Path) -> None:
    """Over one TCP stream, what is sent after a lost segment waits for its retransmission;
    over WebTransport each subscription has its own QUIC stream: the relay drops the datagram
    holding subscription A's push, and B's push, sent after it, is delivered first."""

    async def main() -> None:
        async with h3_node(tmp_path) as (_, h3), h3_client(h3.address) as writer:
            relay = await LossyRelay.start(h3.address)
            try:
                async with h3_client(relay.address) as c:
                    session = await _session(c)
                    assert (await c.call(session, hello()))["type"] == "welcome"
                    subs = {}
                    for name in ("A", "B"):
                        await create(writer, name)
                        a = await c.call(session, subscribe(ord(name), name))
                        subs[name] = a["sub_id"]
                    # A's push fills datagrams, which the relay drops for 300 ms (its first
                    # sending and the retransmissions); B's push, small, is sent after it
                    loop = asyncio.get_running_loop()
                    relay.drop_large_until = loop.time() + 0.3
                    r = await writer.request("POST", "/v1/sessions/A/messages", message("x" * 3000))
                    assert r.status == 200
                    r = await writer.request("POST", "/v1/sessions/B/messages", message("b"))
                    assert r.status == 200
                    sent_b = loop.time()
                    await c.wait_for(lambda: c.pushes(subs["A"]) and c.pushes(subs["B"]))
                    assert relay.dropped_large, "the relay dropped A's push"
                    times = {}
                    for name in ("A", "B"):
                        stream = next(
                            s for s in c.uni if c.wt[s].messages[0]["sub_id"] == subs[name]
                        )
                        times[name] = c.wt[stream].times[0]
                    # B's push was not held back behind A's lost one
                    assert times["B"] - sent_b < 0.1 < times["A"] - sent_b, (times, sent_b)
                    assert c.pushes(subs["A"])[0]["messages"][0]["content"] == "x" * 3000
                    assert h3.packets_lost >= 1
                    body = (await writer.request("GET", "/metrics")).body.decode()
                    lost = parse_metrics(body)["ctxstore_quic_packets_lost_total"]
                    assert lost == h3.packets_lost >= 1
            finally:
                relay.close()

    run(main())


def test_a_session_that_acknowledges_nothing_is_paused_then_cut_off(tmp_path: Path) -> None:
    """Flow control as on a WebSocket (§8.1): the bytes sent on a session's streams and not
    acknowledged are its write buffer; over 1 MiB its native connection stops writing, and one
    that stays stopped is cut off after the write stall timeout (here 1 s)."""

    async def main() -> None:
        async with h3_node(tmp_path, write_stall_timeout_s=1.0) as (w, h3), \
                h3_client(h3.address) as writer:  # fmt: skip
            relay = await LossyRelay.start(h3.address)
            try:
                async with h3_client(relay.address) as c:
                    session = await _session(c)
                    assert (await c.call(session, hello()))["type"] == "welcome"
                    await create(writer, "s1")
                    a = await c.call(session, subscribe(2, "s1"))
                    assert a["type"] == "subscribed"
                    (served,) = h3.sessions
                    relay.large, relay.drop_large_until = 0, float("inf")  # nothing reaches it
                    high = 0
                    for i in range(60):  # 6 MB of pushes
                        r = await writer.request(
                            "POST", "/v1/sessions/s1/messages", message(f"{i}" + "z" * 100_000)
                        )
                        assert r.status == 200
                        high = max(high, served.unacked_bytes())
                    assert served._write_paused or served.closed
                    assert 1024 * 1024 < high < 3 * 1024 * 1024, high  # (and a push or two)
                    for _ in range(60):
                        if served.closed:
                            break
                        await asyncio.sleep(0.05)
                    assert served.closed and not h3.sessions
                    assert h3.session_closes == {1008: 1}
                    assert w.clients.stalled_closed == 1 and w.clients.pending_bytes == 0
            finally:
                relay.close()
            assert (await writer.request("GET", "/health/live")).status == 200

    run(main())


async def migrate(relay: LossyRelay, c: H3Client, h3: H3Server) -> None:
    """Move the client to a new address (the relay's new upstream socket) and wait until the
    server has validated it.  Without loss meanwhile: aioquic abandons a path validation whose
    challenge is lost (after 3 PTOs) and goes back to the old address, gone here."""
    loss, reorder = relay.loss, relay.reorder
    relay.loss = relay.reorder = 0.0
    await relay.rebind()
    port = relay.upstream_port

    def moved() -> bool:
        return any(
            (path := conn._quic._network_paths[0]).addr[1] == port and path.is_validated
            for conn in h3.connections
        )

    for _ in range(50):
        await asyncio.wait_for(c.ping(), 5)  # (the client sends from its new address)
        if moved():
            break
        await asyncio.sleep(0.02)
    assert moved()
    relay.loss, relay.reorder = loss, reorder


def test_subscriptions_under_loss_and_reordering_and_an_address_change(tmp_path: Path) -> None:
    async def main() -> None:
        async with h3_node(tmp_path) as (_, h3), h3_client(h3.address) as writer:
            relay = await LossyRelay.start(h3.address, loss=0.05, reorder=0.1)
            try:
                async with h3_client(relay.address) as c:
                    session = await _session(c)
                    assert (await c.call(session, hello()))["type"] == "welcome"
                    n, per = 8, 10
                    subs = {}
                    for i in range(n):
                        await create(writer, f"s{i}")
                        a = await c.call(session, subscribe(10 + i, f"s{i}"))
                        subs[i] = a["sub_id"]
                    first_port = relay.upstream_port
                    for k in range(per):
                        if k == per // 2:  # the client's address changes (a new network)
                            await migrate(relay, c, h3)
                        await asyncio.gather(*(
                            writer.request("POST", f"/v1/sessions/s{i}/messages",
                                           message(f"{i}-{k}"))
                            for i in range(n)
                        ))  # fmt: skip

                    def contents(i: int) -> list[str]:
                        return [m["content"] for p in c.pushes(subs[i]) for m in p["messages"]]

                    await c.wait_for(lambda: all(len(contents(i)) >= per for i in range(n)), 20)
                    for i in range(n):
                        assert contents(i) == [f"{i}-{k}" for k in range(per)]
                    assert relay.dropped > 0
                    # the same connection and session, at the new address
                    assert len(h3.connections) == 2 and len(h3.sessions) == 1
                    session_obj = next(iter(h3.sessions))
                    assert session_obj.host.peer_address()[1] == relay.upstream_port != first_port
                    assert (await c.call(session, {"type": "ping", "rid": 500}))["type"] == "pong"
            finally:
                relay.close()

    run(main())


def test_connections_per_node_are_capped(tmp_path: Path) -> None:
    async def main() -> None:
        async with h3_node(tmp_path, H3Limits(connections_max=1, streams_max=6)) as (_, h3), \
                h3_client(h3.address) as c:  # fmt: skip
            assert (await c.request("GET", "/health/live")).status == 200
            # QUIC's stream limit is h3_streams_max, each direction
            assert c._quic._remote_max_streams_bidi == c._quic._remote_max_streams_uni == 6
            with pytest.raises(ConnectionError):
                async with h3_client(h3.address) as other:
                    await other.request("GET", "/health/live")
            assert h3.refused == 1
            assert (await c.request("GET", "/health/live")).status == 200
            metrics = parse_metrics((await c.request("GET", "/metrics")).body.decode())
            assert metrics["ctxstore_quic_connections_refused_total"] == 1
            assert metrics["ctxstore_quic_connections"] == 1

    run(main())


def test_with_retry_a_client_proves_its_address_first(tmp_path: Path) -> None:
    async def main() -> None:
        async with h3_node(tmp_path, H3Limits(retry=True)) as (_, h3), \
                h3_client(h3.address) as c:  # fmt: skip
            assert (await c.request("GET", "/health/live")).status == 200
            assert c._quic._retry_source_connection_id is not None  # (it was retried)

    run(main())


def test_metrics_body_is_prometheus_text(tmp_path: Path) -> None:
    async def main() -> None:
        async with h3_node(tmp_path) as (_, h3), h3_client(h3.address) as c:
            body = (await c.request("GET", "/metrics")).body.decode()
            for name in ("ctxstore_quic_packets_lost_total", "ctxstore_wt_sessions_total"):
                assert name in body
            assert msgspec.json.decode((await c.request("GET", "/health/live")).body)

    run(main())


def test_the_transports_say_where_webtransport_is_and_the_certificate_hash(
    tmp_path: Path,
) -> None:
    """``GET /v1/transports`` (what ctxstore.js asks before it connects): no WebTransport
    without ``--h3``; with it, the listener's port and the hash of the certificate it serves,
    over HTTP/1.1 and HTTP/3 alike, readable by any origin, no token needed; the document the
    OpenAPI schema describes."""
    from .test_web_http import call, conform

    async def main() -> None:
        async with web_node(tmp_path / "plain", tokens=["t0k"]) as w:
            r = await call(w.address, "GET", "/v1/transports", origin="https://elsewhere.example")
            assert r.status == 200, r.body
            assert r.headers["access-control-allow-origin"] == "*"
            assert r.json() == {
                "websocket": {"path": "/v1/ws",
                              "subprotocols": ["ctxstore.v1.json", "ctxstore.v1.msgpack"]},
                "webtransport": None,
            }  # fmt: skip
            r = await call(w.address, "POST", "/v1/transports")
            assert r.status == 404  # GET only (no other route here)
        cert = generate(str(tmp_path / "tls"))
        async with h3_node(tmp_path / "h3", tls=(cert.cert_path, cert.key_path)) as (w, h3):
            r = await call(w.address, "GET", "/v1/transports")
            found = r.json()
            assert found["webtransport"] == {
                "port": h3.address[1], "path": "/v1/wt",
                "protocols": ["ctxstore.v1.json", "ctxstore.v1.msgpack"],
                "cert_sha256": [cert.sha256],
            }  # fmt: skip
            async with h3_client(h3.address) as c:
                assert (await c.request("GET", "/v1/transports")).json() == found
            doc = (await call(w.address, "GET", "/v1/openapi.json")).json()
            op = doc["paths"]["/v1/transports"]["get"]
            schema = op["responses"]["200"]["content"]["application/json"]["schema"]
            schemas = doc["components"]["schemas"]
            conform(found, schema, schemas)
            with pytest.raises(AssertionError):
                conform({**found, "webtransport": {"port": 1}}, schema, schemas)
            # past the certificate's validity its hash is no use to a browser: not advertised
            advert = w.ops.api.webtransport if w.ops.api is not None else None
            assert advert is not None
            late = advert.not_after + datetime.timedelta(seconds=1)
            assert advert.describe(late).cert_sha256 == []
            assert advert.describe(advert.not_before).cert_sha256 == [cert.sha256]
        # a CA's certificate (trustme: years of validity): no hash, the browser checks it
        ca = trustme.CA()
        issued = ca.issue_cert("localhost", "127.0.0.1")
        chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
        chain.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(str(key))
        async with h3_node(tmp_path / "ca", tls=(str(chain), str(key))) as (w, h3):
            found = (await call(w.address, "GET", "/v1/transports")).json()["webtransport"]
            assert found["port"] == h3.address[1] and found["cert_sha256"] == []

    run(main())


def test_only_a_short_lived_ecdsa_certificate_is_hashable(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    from ctxstore.web_transports import hashable

    def cert(key: Any, days: float) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
            .sign(key, hashes.SHA256())
        )  # fmt: skip

    p256 = ec.generate_private_key(ec.SECP256R1())
    assert hashable(cert(p256, 14)) and hashable(cert(p256, 1))
    assert not hashable(cert(p256, 14.01))
    assert not hashable(cert(rsa.generate_private_key(65537, 2048), 1))
    from cryptography.x509 import load_pem_x509_certificate

    generated = generate(str(tmp_path))  # what make run-h3 and cluster up --h3 make
    assert hashable(load_pem_x509_certificate(Path(generated.cert_path).read_bytes()))


def test_a_ca_issued_chain_and_a_verifying_client(tmp_path: Path) -> None:
    """A real deployment's certificate: issued by a CA (trustme's), checked by the client."""
    ca = trustme.CA()
    issued = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))

    async def main() -> None:
        async with h3_node(tmp_path, tls=(str(cert), str(key))) as (_, h3):
            config = client_configuration()
            config.verify_mode = ssl.CERT_REQUIRED
            config.server_name = "localhost"
            ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
            config.load_verify_locations(cafile=str(tmp_path / "ca.pem"))
            async with connect(*h3.address, configuration=config, create_protocol=H3Client) as c:
                assert isinstance(c, H3Client)
                assert (await c.request("GET", "/health/live")).status == 200
            other = trustme.CA()  # a client trusting another CA refuses the node
            config = client_configuration()
            config.verify_mode = ssl.CERT_REQUIRED
            config.server_name = "localhost"
            other.cert_pem.write_to_path(str(tmp_path / "other.pem"))
            config.load_verify_locations(cafile=str(tmp_path / "other.pem"))
            with pytest.raises(ConnectionError):
                async with connect(*h3.address, configuration=config, create_protocol=H3Client):
                    pass

    run(main())


def test_cluster_up_h3_prints_the_certificate_hash(tmp_path: Path) -> None:
    from .test_cli import ClusterUp

    with ClusterUp(tmp_path, "--base-port", "0", "--h3") as up:
        started = up.started()
        (node,) = started["nodes"]
        host, port = node["ops"].split(":")
        assert node["wt"] == f"https://{host}:{port}/v1/wt"

        async def main() -> None:
            async with h3_client((host, int(port))) as c:
                session, status = await c.open_session()
                assert status == 200
                assert (await c.call(session, hello()))["type"] == "welcome"
                peer = c._quic.tls._peer_certificate
                assert peer is not None
                der = peer.public_bytes(serialization.Encoding.DER)
                assert hashlib.sha256(der).hexdigest() == started["cert_sha256"]

        run(main())


def test_the_subscription_delay_tool_runs_over_both_transports(tmp_path: Path) -> None:
    """``bench/subdelay.py`` (docs/web.md §8.3's figures under loss; here without): one line per
    transport, every message delivered."""
    from .test_cli import ClusterUp

    with ClusterUp(tmp_path, "--base-port", "0", "--h3") as up:
        (node,) = up.started()["nodes"]
        for via in ("ws", "wt"):
            done = subprocess.run(
                [sys.executable, "-m", "bench.subdelay", "--node", node["client"],
                 "--http", node["ops"], "--via", via, "--sessions", "3", "--rate", "40",
                 "--duration", "1"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            line = msgspec.json.decode(done.stdout)
            assert line["via"] == via and line["count"] == line["sent"] >= 30, line
            assert 0 <= line["p50_ms"] <= line["p99_ms"] <= line["max_ms"] < 2000, line


def test_fuzz_malformed_datagrams_and_webtransport_messages(tmp_path: Path) -> None:
    """100 000 malformed datagrams (random bytes, and client Initials with a new connection id
    and a corrupted byte) and malformed WebTransport messages: no crash, no state kept for a
    datagram that decrypts to nothing, bounded memory, clients still served."""

    async def main() -> None:
        async with h3_node(tmp_path) as (_, h3):
            relay = await LossyRelay.start(h3.address)
            initials: list[bytes] = []
            forward = relay.datagram_received

            def capture(data: bytes, addr: tuple[str, int]) -> None:
                if not initials:
                    initials.append(data)
                forward(data, addr)

            relay.datagram_received = capture  # type: ignore[method-assign]
            async with h3_client(relay.address) as c:
                assert (await c.request("GET", "/health/live")).status == 200
            relay.close()
            initial = initials[0]
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rng = random.Random(26)
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            for i in range(100_000):
                if i % 50 == 0:
                    d = bytearray(initial)
                    d[6:14] = rng.randbytes(8)  # a new destination connection id
                    d[rng.randrange(40, len(d))] ^= 1 + rng.randrange(255)
                    data = bytes(d)
                else:
                    data = rng.randbytes(rng.randrange(1, 1500))
                with contextlib.suppress(BlockingIOError):
                    sock.sendto(data, h3.address)
                if i % 64 == 0:
                    await asyncio.sleep(0)
            sock.close()
            await asyncio.sleep(0.2)
            assert h3.quic is not None
            assert not h3.connections and not h3.quic._protocols  # (nothing decrypted)
            # malformed WebTransport messages: each a goodbye or an error, never a crash
            async with h3_client(h3.address) as c:
                session = await _session(c)
                closed = 0
                for i in range(300):
                    kind = i % 5
                    if kind == 0:
                        raw = HEADER.pack(8) + rng.randbytes(8)  # not JSON
                    elif kind == 1:
                        raw = HEADER.pack(5) + b"[1,2]"  # not an object
                    elif kind == 2:
                        raw = HEADER.pack(40) + b'{"type":"hello"'  # cut, then the end
                    elif kind == 3:
                        raw = HEADER.pack(2**31) + b"x"  # over the limit
                    else:
                        obj = {"type": rng.choice(["ping", "read", "append", "x"]),
                               "rid": rng.choice([1, 0, -1, "a", 2**70]), "z": 1}  # fmt: skip
                        raw = c.encode(obj)
                    sid = c.h3.create_webtransport_stream(session)
                    c._quic.send_stream_data(sid, raw, True)
                    c.transmit()
                    await asyncio.sleep(0.002)
                    if session not in {s.session_id for s in h3.sessions}:
                        closed += 1
                        session = await _session(c)
                assert closed > 50  # (a goodbye each time: the session ends)
                session = await _session(c)
                assert (await c.call(session, hello()))["type"] == "welcome"
                assert (await c.call(session, {"type": "ping", "rid": 2}))["type"] == "pong"
            growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
            assert growth_mb < 64, growth_mb

    run(main(), timeout_s=120)


def test_fuzz_odd_http3_requests_and_connects(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """2 000 HTTP/3 requests and extended CONNECTs that aioquic lets through (well-formed
    HTTP/3, odd in every value: methods, paths, queries, tokens, bodies, protocols; some reset
    at once) on one connection, within QUIC's stream limit (128): each answered (never 5xx) or
    reset, no error logged, every stream's credit back (a refused CONNECT the client leaves
    open too: the node stops it), the connection and the node go on."""

    async def main() -> None:
        async with h3_node(tmp_path) as (_, h3), h3_client(h3.address) as c:
            await create(c, "s1")
            rng = random.Random(2603)
            # (no HEAD: aioquic's client holds its answer's content-length against it)
            methods = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"CONNECT",
                       b"BREW", b"get"]  # fmt: skip
            paths = [b"/v1/sessions", b"/v1/sessions/s1", b"/v1/sessions/s1/messages",
                     b"/v1/sessions/s1/events", b"/v1/wt", b"/v1/ws", b"/health/live", b"/metrics",
                     b"/static/ctxstore.js", b"/", b"*", b"/v1/", b"/v1/sessions/%ff/messages",
                     b"/v1/sessions/s1/context", b"/v1/agents/a/inbox",
                     b"/static/../x"]  # fmt: skip
            queries = [b"", b"?after_seq=x", b"?limit=99999999999999999999", b"?a=%zz&&=",
                       b"?protocol=ctxstore.v1.msgpack", b"?protocol=x", b"?token=t",
                       b"?user_id=u1&limit=-1", b"?after_seq=0&context_events=maybe"]  # fmt: skip
            statuses: dict[int, int] = {}
            reset = 0
            connects: set[int] = set()

            async def credit(sid: int) -> None:  # (QUIC's MAX_STREAMS: the node's 128)
                for _ in range(300):
                    if sid // 4 + 1 <= c._quic._remote_max_streams_bidi:
                        return
                    c.transmit()
                    await asyncio.sleep(0.01)
                limit = c._quic._remote_max_streams_bidi
                raise AssertionError(f"no credit for stream {sid} (limit {limit})")

            for batch in range(50):
                waiting = []
                for _ in range(40):
                    sid = c._quic.get_next_available_stream_id()
                    await credit(sid)
                    method = rng.choice(methods)
                    head = [(b":method", method), (b":scheme", b"https"),
                            (b":authority", rng.choice([b"localhost", b"x" * 300])),
                            (b":path", rng.choice(paths) + rng.choice(queries))]  # fmt: skip
                    if method == b"CONNECT":
                        connects.add(sid)
                        head.append((b":protocol", rng.choice([b"webtransport", b"websocket"])))
                    for name, value in (
                        (b"authorization", b"Bearer " + rng.randbytes(6).hex().encode()),
                        (b"last-event-id", rng.choice([b"1", b"-1", b"x", b"9" * 30])),
                        (b"content-type", rng.choice([b"application/json", b"text/plain"])),
                        (b"origin", b"https://elsewhere.example"),
                    ):
                        if rng.random() < 0.3:
                            head.append((name, value))
                    bodies = [b"", b"{}", b"[1]", b'{"sender":"user"}', b"\xff\xfe",
                              msgspec.json.encode(message("hi")), rng.randbytes(64)]  # fmt: skip
                    body = rng.choice(bodies)
                    c.incoming[sid] = _Incoming()
                    connect = sid in connects  # (a session: ended by us once answered)
                    c.h3.send_headers(sid, head, end_stream=not body and not connect)
                    if body and not connect:
                        c.h3.send_data(sid, body, end_stream=True)
                    if rng.random() < 0.1:
                        c._quic.reset_stream(sid, 0x10C)
                        reset += 1
                    else:
                        waiting.append(sid)
                c.transmit()
                for sid in waiting:
                    inc = c.incoming[sid]
                    await asyncio.wait_for(inc.got_headers.wait(), 10)
                    assert c.terminated is None, c.terminated
                    status = int(dict(inc.headers)[b":status"])
                    statuses[status] = statuses.get(status, 0) + 1
                    if not inc.done.is_set():  # an event stream or a session: ended by us
                        if sid in connects:
                            c._quic.send_stream_data(sid, b"", end_stream=True)
                        c._quic.stop_stream(sid, 0x10C)
                c.transmit()
                assert c.terminated is None, (batch, c.terminated)
            assert sum(statuses.values()) + reset == 2000
            assert not [s for s in statuses if s >= 500], statuses
            assert statuses.get(200, 0) > 20 and statuses.get(404, 0) > 100, statuses
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert not errors, errors[:3]
            assert (await c.request("GET", "/health/live")).status == 200
            for _ in range(100):
                if not h3.sessions:
                    break
                await asyncio.sleep(0.02)
            assert not h3.sessions and len(h3.connections) == 1

    run(main(), timeout_s=180)


def test_serve_names_a_certificate_it_cannot_load(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    for cert, expected in (("missing.pem", "No such file"), ("bad.pem", "cannot load")):
        done = subprocess.run(
            [sys.executable, "-m", "ctxstore", "serve", "--data-dir", str(tmp_path / "d"),
             "--listen", "127.0.0.1:0", "--peer-listen", "127.0.0.1:0",
             "--http", "127.0.0.1:0", "--h3", "127.0.0.1:0",
             "--tls-cert", str(tmp_path / cert), "--tls-key", str(tmp_path / cert)],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 5, done.stderr
        assert f"cannot start: tls_cert {tmp_path / cert}" in done.stderr
        assert expected in done.stderr


def test_webtransport_sessions_per_connection_are_capped(tmp_path: Path) -> None:
    async def main() -> None:
        async with h3_node(tmp_path, H3Limits(sessions_max=2)) as (_, h3), \
                h3_client(h3.address) as c:  # fmt: skip
            first = await _session(c)
            await _session(c)
            stream, status = await c.open_session()
            assert status == 429
            await c.wait_for(lambda: c.incoming[stream].done.is_set())
            body = msgspec.json.decode(bytes(c.incoming[stream].body))
            assert "at most 2 sessions per connection" in body["message"]
            assert dict(c.incoming[stream].headers)[b"retry-after"] == b"1"
            # one ends: a new one is served
            c.h3.send_data(first, b"", end_stream=True)
            c.transmit()
            await c.wait_for(lambda: len(h3.sessions) == 1)
            session = await _session(c)
            assert (await c.call(session, hello()))["type"] == "welcome"

    run(main())


def test_a_silent_connection_is_closed_at_the_idle_timeout(tmp_path: Path) -> None:
    """One that carries no session nor event stream is not pinged: QUIC's idle timeout (here
    0.5 s; the client would wait 60 s) ends it, and the metrics say so."""

    async def main() -> None:
        async with h3_node(tmp_path, H3Limits(idle_timeout_s=0.5)) as (_, h3):
            config = client_configuration()
            config.idle_timeout = 60.0
            async with connect(*h3.address, configuration=config, create_protocol=H3Client) as c:
                assert isinstance(c, H3Client)
                assert (await c.request("GET", "/health/live")).status == 200
                assert len(h3.connections) == 1
                await c.wait_for(lambda: c.terminated is not None, 10)
                for _ in range(100):  # (each end's idle timer fires on its own)
                    if not h3.connections:
                        break
                    await asyncio.sleep(0.05)
                assert not h3.connections
            async with h3_client(h3.address) as other:
                metrics = parse_metrics((await other.request("GET", "/metrics")).body.decode())
            assert metrics["ctxstore_quic_connections"] == 1  # (the one asking)
            assert metrics["ctxstore_quic_connections_total"] == 2

    run(main())


def test_a_webtransport_session_on_a_node_not_holding_the_group(tmp_path: Path) -> None:
    """Scale-out (docs/scaling.md): a session's native connection on a node that holds none of
    the group's replicas writes, reads and subscribes through them, over WebTransport too."""
    from ctxstore import placement
    from ctxstore.ops import serve_ops

    from .test_relay import GROUPS, away, cluster

    async def main() -> None:
        sid, replicas = away(4, 4)
        async with cluster(tmp_path, 4) as nodes:
            far = nodes[4]
            assert placement.group_of(sid, GROUPS) not in far.node.host
            ops = await serve_ops(far.node, far.service, "127.0.0.1", 0, clients=far.clients)
            try:
                cert = generate(str(tmp_path / "tls"))
                h3 = await attach_h3(
                    ops, far.clients, "127.0.0.1", 0, cert.cert_path, cert.key_path
                )
                async with h3_client(h3.address) as c, \
                        await native_connect(nodes[replicas[0]].target) as writer:  # fmt: skip
                    await writer.create_session("u1", "a", {}, sid)
                    await writer.append(sid, "m1")
                    session = await _session(c)
                    assert (await c.call(session, hello()))["type"] == "welcome"
                    a = await c.call(session, subscribe(2, sid))
                    assert a["type"] == "subscribed", a
                    sub = a["sub_id"]
                    await writer.append(sid, "m2")
                    appended = await c.call(session, {
                        "type": "append", "rid": 3, "session_id": sid, **message("m3"),
                        "client_msg_id": None, "expected_seq": None, "token_count": None,
                        "role": None, "parts": None, "if_version": None,
                    })  # fmt: skip
                    assert appended["type"] == "appended" and appended["seq"] == 3, appended

                    def contents() -> list[str]:
                        return [m["content"] for p in c.pushes(sub) for m in p["messages"]]

                    await c.wait_for(lambda: len(contents()) >= 3)
                    assert contents() == ["m1", "m2", "m3"]
                    read = await c.call(
                        session, {"type": "read", "rid": 4, "session_id": sid, "after_seq": 0,
                                  "limit": 10}
                    )  # fmt: skip
                    assert [m["seq"] for m in read["messages"]] == [1, 2, 3]
                    assert far.service.relay.relayed >= 2  # (the append and the read)
                    assert far.node.state.last_seq(sid) is None  # node 4 holds none of it
            finally:
                ops.close()
                await ops.wait_closed()

    run(main())


def test_the_certificate_tool_prints_its_hash(tmp_path: Path) -> None:
    """``python -m ctxstore.tlscert DIR`` (``make run-h3``): one JSON line, the hash of the
    certificate it wrote."""
    done = subprocess.run(
        [sys.executable, "-m", "ctxstore.tlscert", str(tmp_path / "tls")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    printed = msgspec.json.decode(done.stdout)
    pem = Path(printed["cert"]).read_bytes()
    assert printed["cert_sha256"] == certificate_hash(pem)
    assert Path(printed["key"]).exists()
    usage = subprocess.run(
        [sys.executable, "-m", "ctxstore.tlscert"], capture_output=True, text=True, timeout=60
    )
    assert usage.returncode == 2 and "usage" in usage.stderr


class _NullQuic:
    """The QUIC connection a fuzzed session writes to: it keeps what is sent, acknowledges it
    at once (nothing unacknowledged), and refuses to end a stream twice as aioquic does."""

    def __init__(self) -> None:
        self._streams: dict[int, Any] = {}
        self.sent = 0
        self.ended: set[int] = set()

    def send_stream_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        if stream_id in self.ended:
            raise ValueError("cannot send data on an ended stream")  # (aioquic's FinalSizeError)
        self.sent += len(data)
        if end_stream:
            self.ended.add(stream_id)

    def stop_stream(self, stream_id: int, error_code: int) -> None:
        pass

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self.ended.add(stream_id)


class _FuzzHost(SessionHost):
    def __init__(self) -> None:
        self.quic = cast(Any, _NullQuic())
        self.next_stream = 3
        self.closes = 0
        self.ended = 0

    def create_wt_stream(self, session_id: int, unidirectional: bool) -> int:
        self.next_stream += 4
        return self.next_stream

    def send_capsule_and_end(self, session_id: int, data: bytes) -> None:
        self.closes += 1

    def transmit_soon(self) -> None:
        pass

    def peer_address(self) -> Any:
        return ("127.0.0.1", 4433)

    def session_ended(self, session: WtSession) -> None:
        self.ended += 1


def _malformed(rng: random.Random, json: bool) -> bytes:
    """One malformed WebTransport message (its 4-byte length and body), or a bad framing."""
    kind = rng.randrange(12)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 64))  # not even a length and a message
    if kind == 1:
        return HEADER.pack(rng.choice([2**31, 2**32 - 1, 4 * 1024 * 1024 + 1])) + b"x"
    if kind == 2:
        body = rng.randbytes(rng.randrange(0, 200))  # random bytes as a message
        return HEADER.pack(len(body)) + body
    if kind == 3:  # a message cut short: the length says more than comes
        return HEADER.pack(rng.randrange(10, 100)) + b'{"type":"ping"'
    odd = "\udcff" if json else b"\xff"
    values: list[Any] = [None, True, -1, 0, 1, 2**63, 2**70, -(2**70), 1.5, "", "x" * 300,
                         [], {}, [1, [2, [3]]], {"a": {"b": None}}, odd]  # fmt: skip
    types = ["hello", "ping", "append", "read", "subscribe", "unsubscribe", "create_session",
             "get_session", "list_sessions", "mark_read", "compact", "x", ""]  # fmt: skip
    fields = ["rid", "session_id", "sub_id", "after_seq", "limit", "content", "sender",
              "metadata", "parts", "protocol_version", "token", "user_id", "z"]  # fmt: skip
    obj: dict[str, Any] = {"type": rng.choice(types)}
    for name in rng.sample(fields, rng.randrange(0, 6)):
        obj[name] = rng.choice(values)
    if json:
        if kind == 4:  # not an object
            body = msgspec.json.encode(rng.choice(values[:-1]))
        elif kind == 5:  # a broken object
            text = msgspec.json.encode({k: v for k, v in obj.items() if isinstance(v, int)})
            body = text[: rng.randrange(1, len(text))]
        elif kind == 6:  # nested deeper than allowed
            body = b'{"type":"append","metadata":' + b"[" * 200 + b"]" * 200 + b"}"
        else:
            try:
                body = msgspec.json.encode(obj)
            except (msgspec.EncodeError, UnicodeEncodeError, OverflowError):
                body = b'{"type":"ping","rid":"a"}'
    else:
        items = [obj.pop("type"), *obj.values()]
        if kind == 4:
            items = items[1:]  # no tag
        try:
            body = msgspec.msgpack.encode(items if kind != 5 else obj)
        except (msgspec.EncodeError, OverflowError):
            body = b"\x92\xa4ping\xa1a"
        if kind == 6:
            body = body[: rng.randrange(1, len(body) + 1)]
    return HEADER.pack(len(body)) + body


def test_fuzz_100_000_malformed_webtransport_messages(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The session's own parsing (``WtSession.stream_data``: framing, JSON or msgpack, the hello
    first, rids, streams) against 100 000 malformed messages, cut at random points, on new and
    reused streams, before and after a hello, each session over a real node's native core: no
    exception (an internal error would be close code 1011), no answer without its request's
    stream (the core reads a malformed request's rid as the session does), every session
    ends, nothing is kept once they end.  (QUIC and HTTP/3 framing are aioquic's: the datagram fuzz
    above reaches them.)"""

    async def main() -> None:
        async with web_node(tmp_path) as w:
            rng = random.Random(2626)
            host = _FuzzHost()
            codes: dict[int, int] = {}

            def stats(what: str, n: int) -> None:
                if what == "closes":
                    codes[n] = codes.get(n, 0) + 1

            sent = sessions = 0
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            while sent < 100_000:
                json = sessions % 2 == 0
                protocol = "ctxstore.v1.json" if json else "ctxstore.v1.msgpack"
                host.quic = cast(Any, _NullQuic())  # (each session: streams of its own)
                session = WtSession(host, sessions * 4, w.clients, protocol, stats)
                sessions += 1
                session.start()
                if rng.random() < 0.5:  # past the hello: requests reach the core
                    ok = hello() if json else ["hello", 1, 2, "fuzz", None]
                    raw = msgspec.json.encode(ok) if json else msgspec.msgpack.encode(ok)
                    session.stream_data(0, HEADER.pack(len(raw)) + raw, True)
                streams = [4 * k for k in range(1, 6)]  # (QUIC: none sends after its end)
                for _ in range(rng.randrange(1, 40)):
                    if session.closed:
                        break
                    data = _malformed(rng, json)
                    sent += 1
                    k = rng.randrange(len(streams))
                    uni = rng.random() < 0.05  # (a stream of the client's own)
                    stream = 2 + 4 * (sent + 8) if uni else streams[k]
                    cut = rng.randrange(0, len(data) + 1)
                    end = rng.random() < 0.3
                    session.stream_data(stream, data[:cut], False)
                    session.stream_data(stream, data[cut:], end)
                    if end and not uni:
                        streams[k] = max(streams) + 4
                    if sent % 16 == 0:
                        await asyncio.sleep(0)  # (the core answers)
                if not session.closed:
                    session.close(1000, "fuzz")
                await asyncio.sleep(0)
            for _ in range(200):
                if not w.clients.connections:
                    break
                await asyncio.sleep(0.01)
            assert sent >= 100_000 and sessions > 1000
            assert 1011 not in codes, codes  # (an exception on input)
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert not errors, errors[:3]
            assert codes.get(1008, 0) > 1000, codes  # (bad_request goodbyes)
            assert host.ended == host.closes == sessions == sum(codes.values())
            assert not w.clients.connections and w.clients.pending_bytes == 0
            growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
            assert growth_mb < 64, growth_mb
            # and the node serves still
            async with await native_connect("{}:{}".format(*w.clients.address)) as c:
                await c.ping()

    run(main(), timeout_s=300)
