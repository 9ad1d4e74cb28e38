"""Agent dispatch through one in-process node and a real HTTP server (hypercorn, h11 and h2):
replies stored once over h2c, HTTP/1.1 keep-alive and TLS with ALPN; live chunks tagged with
their attempt; retries, drops, debounce, history modes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ctxstore.agents.engine import DispatchLimits
from ctxstore.agents.pool import Pool
from ctxstore.placement import group_of
from wire.client import Client, agent, connect
from wire.protocol import (
    AgentInfo,
    AgentList,
    Append,
    ChunkEvent,
    CreateAgent,
    CreateSession,
    LastN,
    ListAgents,
    Message,
    MessageEvent,
    Subscribe,
    Subscribed,
)
from wire.web_codec import JSON

from .agent_server import Served, agent_server, reply_text
from .test_ops import Harness, nodes, run, single_node
from .test_web import web_node
from .test_web_http import Events, call, message
from .wsclient import WsClient


async def ready(h: Harness) -> Client:
    assert await h.node.wait_leaders(10)
    return await connect(h.target)


async def wait_message(c: Client, sid: str, seq: int, timeout_s: float = 10) -> list[Message]:
    """The session's messages once it has ``seq`` of them."""
    async with asyncio.timeout(timeout_s):
        while True:
            messages = (await c.read(sid)).messages
            if len(messages) >= seq:
                return messages
            await asyncio.sleep(0.02)


async def collect_chunks(c: Client, sid: str, out: list[ChunkEvent]) -> None:
    async with c.subscribe(sid, stream_chunks=True) as sub:
        async for item in sub:
            if isinstance(item, ChunkEvent):
                out.append(item)


async def answered(
    c: Client, text: str, timeout_s: float = 10, settle_s: float = 0.2
) -> tuple[Message, list[ChunkEvent]]:
    """Append ``text`` to session "s" while following its chunks: the stored reply, and the
    chunks pushed until ``settle_s`` after it."""
    chunks: list[ChunkEvent] = []
    follower = asyncio.get_running_loop().create_task(collect_chunks(c, "s", chunks))
    await asyncio.sleep(0.1)
    await c.append("s", text)
    _, reply = await wait_message(c, "s", 2, timeout_s)
    await asyncio.sleep(settle_s)
    follower.cancel()
    return reply, chunks


def text_of(m: Message) -> str:
    assert m.parts is not None
    return "".join(p.get("text", "") for p in m.parts if p["type"] == "text")


async def setup(h: Harness, srv: Served, path: str, **fields: Any) -> Client:
    c = await ready(h)
    h.node.dispatcher.limits = DispatchLimits(backoff_base_s=0.01, backoff_max_s=0.05)
    fields.setdefault("debounce_ms", 0)
    await c.create_agent(agent("bot", srv.url(path), **fields))
    await c.create_session("u", "bot", {}, "s")
    return c


def test_an_sse_reply_over_h2c_is_stored_once_and_its_chunks_are_pushed_live(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, agent_server() as srv:
            c = await setup(h, srv, "/sse", protocol="h2", history="tail 5",
                            headers={"Authorization": "Bearer k"})  # fmt: skip
            reply, chunks = await answered(c, "hello", settle_s=0.05)
            assert (reply.sender, reply.sender_id, reply.role) == ("agent", "bot", "assistant")
            assert text_of(reply) == reply_text(3, "hello")
            assert reply.parts is not None and reply.parts[0] == {"type": "step-start"}
            assert reply.client_msg_id == "agent-reply:1:1"
            assert reply.metadata["model"] == "echo" and reply.metadata["tokens"] == 3
            assert reply.metadata["agent"]["termination"] == "finish"
            (call,) = srv.agent.calls
            assert call.http_version == "2" and call.headers["authorization"] == "Bearer k"
            assert call.body["trigger_seq"] == 1 and call.body["user_id"] == "u"
            assert [m["parts"] for m in call.body["messages"]] == [
                [{"type": "text", "text": "hello"}]
            ]
            types = [e.chunk["type"] for e in chunks]
            assert types[0] == "start" and types[-1] == "finish" and "text-delta" in types
            assert {(e.trigger_seq, e.attempt) for e in chunks} == {(1, 1)}
            await asyncio.sleep(0.3)
            assert len((await c.read("s")).messages) == 2  # once
            stats = h.node.dispatcher.stats["bot"]
            assert (stats.attempts, stats.replies, stats.in_flight) == (1, 1, 0)

    run(main())


def test_jsonl_over_http11_reuses_its_keep_alive_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, agent_server() as srv:
            c = await setup(h, srv, "/jsonl", history="all")
            await c.append("s", "one")
            await wait_message(c, "s", 2)
            await c.append("s", "two")
            messages = await wait_message(c, "s", 4)
            assert text_of(messages[3]) == reply_text(3, "two")
            assert [call.http_version for call in srv.agent.calls] == ["1.1", "1.1"]
            assert len(srv.agent.calls[1].body["messages"]) == 3  # all, up to the trigger
            assert h.node.dispatcher.pool.connections_opened == 1
            scraped = await h.scrape()
            assert scraped["ctxstore_agent_connections_opened_total"] == 1
            assert scraped["ctxstore_agent_connections_idle"] == 1

    run(main())


def test_tls_with_alpn_speaks_http2_or_http11_as_the_agent_says(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, agent_server(tls=True) as srv:
            h.node.dispatcher.pool = Pool(ssl_context=srv.client_context)
            c = await setup(h, srv, "/sse")
            await c.append("s", "secure")
            _, reply = await wait_message(c, "s", 2)
            assert text_of(reply) == reply_text(3, "secure")
            assert srv.agent.calls[0].http_version == "2"
            await c.update_agent(agent("bot", srv.url("/sse"), debounce_ms=0, protocol="h1"))
            await c.append("s", "secure too")
            messages = await wait_message(c, "s", 4)
            assert text_of(messages[3]) == reply_text(3, "secure too")
            assert srv.agent.calls[1].http_version == "1.1"  # ALPN http/1.1 only

    run(main())


def test_failed_attempts_are_retried_and_the_reply_is_stored_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, agent_server() as srv:
            srv.agent.plans["/r"] = ["429", "cut", "malformed", "nofinish", "error", "503", "sse"]
            c = await setup(h, srv, "/r", max_attempts=7, protocol="h2")
            reply, chunks = await answered(c, "again", timeout_s=30)
            assert text_of(reply) == reply_text(3, "again")
            assert reply.metadata["agent"]["attempt"] == 7
            assert len((await c.read("s")).messages) == 2
            attempts = {e.attempt for e in chunks}
            assert {2, 3, 7} <= attempts and {e.trigger_seq for e in chunks} == {1}
            failures = h.node.dispatcher.stats["bot"].failures
            cut = {"reset", "connection"} & set(failures)  # hypercorn resets or closes
            assert len(cut) == 1 and sum(failures.values()) == 6
            assert set(failures) - cut == {"http_429", "invalid_json", "no_finish",
                                           "agent_error", "http_503"}  # fmt: skip
            scraped = await h.scrape()
            assert scraped['ctxstore_agent_calls_total{agent="bot"}'] == 7
            assert scraped['ctxstore_agent_replies_total{agent="bot"}'] == 1
            assert scraped['ctxstore_agent_calls_in_flight{agent="bot"}'] == 0
            assert scraped['ctxstore_agent_call_failures_total{agent="bot",reason="http_429"}'] == 1
            assert scraped['ctxstore_agent_first_chunk_seconds_count{agent="bot"}'] == 1
            assert scraped['ctxstore_agent_call_seconds_count{agent="bot"}'] == 7
            assert scraped["ctxstore_agent_chunks_pushed_total"] >= len(chunks)

    run(main())


def test_chunks_read_together_are_shown_up_to_a_bad_one(tmp_path: Path) -> None:
    """The chunks one read brings are shown in order, those before a chunk the assembler
    refuses included, that one and the rest of the attempt not."""

    async def main() -> None:
        async with single_node(tmp_path) as h, agent_server() as srv:
            srv.agent.plans["/b"] = ["error-batch", "sse"]
            c = await setup(h, srv, "/b", protocol="h1")
            reply, chunks = await answered(c, "hi", timeout_s=30)
            assert text_of(reply) == reply_text(3, "hi")
            first = [e.chunk["type"] for e in chunks if e.attempt == 1]
            assert first == ["start", "start-step", "text-start", "text-delta"]
            assert h.node.dispatcher.stats["bot"].failures == {"agent_error": 1}

    run(main())


def test_a_404_is_not_retried_and_the_drop_is_recorded(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, agent_server() as srv:
            c = await setup(h, srv, "/404")
            await c.append("s", "anyone?")
            _, note = await wait_message(c, "s", 2)
            assert (note.sender, note.role, note.kind) == ("system", "system", "agent_dropped")
            assert note.metadata["agent"]["dropped"] == "http_404"
            assert len(srv.agent.calls) == 1
            assert h.node.dispatcher.stats["bot"].drops == {"http_404": 1}
            scraped = await h.scrape()
            assert scraped['ctxstore_agent_drops_total{agent="bot",reason="http_404"}'] == 1

    run(main())


@pytest.mark.parametrize("protocol", ["h1", "h2"])
def test_a_stalled_agent_times_out_until_its_attempts_are_spent(
    tmp_path: Path, protocol: str
) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, agent_server() as srv:
            c = await setup(h, srv, "/stall", idle_timeout_ms=200, max_attempts=2,
                            protocol=protocol)  # fmt: skip
            started = asyncio.get_running_loop().time()
            await c.append("s", "hello?")
            _, note = await wait_message(c, "s", 2)
            assert note.metadata["agent"]["dropped"] == "idle_timeout"
            version = {"h1": "1.1", "h2": "2"}[protocol]
            assert [call.http_version for call in srv.agent.calls] == [version] * 2
            # two idle timeouts of 0.2 s and a backoff: not sooner, and not much later
            assert 0.4 <= asyncio.get_running_loop().time() - started < 3

    run(main())


def test_a_burst_of_user_messages_is_answered_by_one_call(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, agent_server() as srv:
            c = await setup(h, srv, "/sse", debounce_ms=300)
            for word in ("a", "b", "c"):
                await c.append("s", word)
            messages = await wait_message(c, "s", 4)
            assert text_of(messages[3]) == reply_text(3, "c")
            (call,) = srv.agent.calls
            assert call.body["trigger_seq"] == 3
            assert messages[3].metadata["agent"]["trigger_seq"] == 3

    run(main())


def test_calls_due_in_one_pass_start_a_few_per_pass_and_each_is_answered_once(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, agent_server() as srv:
            c = await setup(h, srv, "/sse", debounce_ms=60_000)  # armed, not fired by itself
            d = h.node.dispatcher
            d.limits = DispatchLimits(starts_per_pass=2)
            sids = ["s", *(f"s{i}" for i in range(1, 7))]
            for sid in sids[1:]:
                await c.create_session("u", "bot", {}, sid)
            for sid in sids:
                await c.append(sid, f"hi {sid}")
            async with asyncio.timeout(10):
                while len(d._timers) < len(sids):
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0)  # a fresh pass: a full budget
            for sid in sids:  # every debounce fires in this one pass
                d._timers[sid][1].cancel()
                d._fire(sid)
            assert len(d._tasks) == 2 and list(d._due) == sids[2:]
            d._arm("s6")  # (a user message while it waits: the call will read it)
            assert "s6" not in d._timers
            for sid in sids:
                messages = await wait_message(c, sid, 2)
                replies = [m for m in messages if m.sender == "agent"]
                assert len(replies) == 1, (sid, messages)
            assert not d._due
            assert sorted(call.body["session_id"] for call in srv.agent.calls) == sorted(sids)

    run(main())


def test_disabled_and_unregistered_agents_are_not_called(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, agent_server() as srv:
            c = await setup(h, srv, "/sse")
            await c.disable_agent("bot")
            await c.create_session("u", "nobody", {}, "s2")
            await c.append("s", "quiet")
            await c.append("s2", "quiet")
            await asyncio.sleep(0.5)
            assert srv.agent.calls == []
            assert len((await c.read("s")).messages) == 1

    run(main())


async def known_absent(d: Any, agent_id: str, timeout_s: float = 10) -> None:
    """Once the dispatcher's lookup found ``agent_id`` absent (its barrier done)."""
    async with asyncio.timeout(timeout_s):
        while agent_id not in d._absent:
            await asyncio.sleep(0.01)


def test_an_unregistered_agent_costs_one_barrier_until_it_is_created(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, agent_server() as srv:
            c = await ready(h)
            d = h.node.dispatcher
            await c.create_session("u", "later", {}, "s")
            await c.append("s", "alone 0")
            await known_absent(d, "later")
            for i in range(1, 5):  # counted as each is applied, before its ack
                await c.append("s", f"alone {i}")
            assert (d.lookups, d.absent_hits) == (1, 4)
            assert srv.agent.calls == []
            # Created: the entry leaves with the replicated change, and the session skipped
            # just before (its message may have raced the creation) is called at once.
            await c.create_agent(agent("later", srv.url("/sse"), debounce_ms=0))
            messages = await wait_message(c, "s", 6)
            assert text_of(messages[5]) == reply_text(3, "alone 4")
            await c.append("s", "now")
            messages = await wait_message(c, "s", 8)
            assert text_of(messages[7]) == reply_text(3, "now")
            assert d.lookups == 1 and len(srv.agent.calls) == 2
            # Disabled: found so by one barrier, then cached again.
            await c.disable_agent("later")
            await c.append("s", "off 0")
            await known_absent(d, "later")
            for i in range(1, 3):
                await c.append("s", f"off {i}")
            assert (d.lookups, d.absent_hits) == (2, 6)
            assert len(srv.agent.calls) == 2

    run(main())


def test_the_negative_cache_is_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h:
            c = await ready(h)
            d = h.node.dispatcher
            d.limits = DispatchLimits(absent_agents_max=3, skipped_max=2)
            for i in range(5):
                await c.create_session("u", f"ghost-{i}", {}, f"s{i}")
                await c.append(f"s{i}", "hi")
                await known_absent(d, f"ghost-{i}")
            assert list(d._absent) == ["ghost-2", "ghost-3", "ghost-4"]
            assert list(d._skipped) == ["s3", "s4"]
            await c.append("s0", "again")  # evicted: read again
            await known_absent(d, "ghost-0")
            assert d.lookups == 6 and list(d._absent) == ["ghost-3", "ghost-4", "ghost-0"]
            # Nor does any session whose agent is absent keep a first-chunk start time: one
            # per session ever written to, for ever, on a cluster that dispatches to nobody.
            assert d._acked_at == {}

    run(main())


def test_a_lookup_that_fails_keeps_no_start_time(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h:
            c = await ready(h)
            d = h.node.dispatcher
            loop = asyncio.get_running_loop()

            def no_barrier(group: int) -> asyncio.Future[Any]:
                failed: asyncio.Future[Any] = loop.create_future()
                failed.set_exception(RuntimeError("no leader for the agent's group"))
                return failed

            h.node.router.barrier = no_barrier  # type: ignore[method-assign]
            for i in range(3):
                await c.create_session("u", f"unknown-{i}", {}, f"s{i}")
                await c.append(f"s{i}", "hi")
            async with asyncio.timeout(10):
                while d.lookups < 3 or d._lookups:
                    await asyncio.sleep(0.01)
            # Nothing learned (not known absent): each user message looks up again, and no
            # session keeps a start time meanwhile, one per session ever written to.
            assert d._absent == {} and d._skipped == {}
            assert d._acked_at == {}

    run(main())


def test_agents_and_live_chunks_over_the_json_websocket(tmp_path: Path) -> None:
    async def main() -> None:
        async with web_node(tmp_path) as w, agent_server() as srv:
            ws = await WsClient.open(w.address, [JSON])
            a = agent("bot", srv.url("/sse"), debounce_ms=0, protocol="h2")
            assert await ws.request(CreateAgent(2, a)) == AgentInfo(2, a)
            listed = await ws.request(ListAgents(3, None, 10))
            assert listed == AgentList(3, [a], None)
            await ws.request(CreateSession(4, "u", "bot", {}, "s"))
            subscribed = await ws.request(Subscribe(5, "s", 0, False, True))
            assert isinstance(subscribed, Subscribed)
            await ws.send(Append(6, "s", "user", "u", "text", "web", {}, None, None, None))
            kinds: list[str] = []
            stored: list[Message] = []
            while len(stored) < 2:
                got = await ws.recv()
                if isinstance(got, ChunkEvent):
                    assert (got.trigger_seq, got.attempt) == (1, 1)
                    kinds.append(got.chunk["type"])
                elif isinstance(got, MessageEvent):
                    stored += got.messages
            assert kinds[0] == "start" and kinds[-1] == "finish" and "text-delta" in kinds
            assert text_of(stored[1]) == reply_text(3, "web")
            await ws.close()

    run(main())


def test_http2_flow_control_carries_bodies_past_the_windows_both_ways(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, agent_server() as srv:
            c = await setup(h, srv, "/big", protocol="h2", history="all")
            for i in range(3):  # 3 x 200 KB of history in the request
                await c.append("s", f"{i}" * 200_000, "system", "", "note")
            await c.append("s", "big")
            messages = await wait_message(c, "s", 5)
            text = text_of(messages[4])
            assert text.startswith("echo: big") and len(text) == 9 + 99 * 4001
            (call,) = srv.agent.calls
            assert call.http_version == "2" and len(call.body["messages"]) == 4

    run(main())


def test_a_new_connection_replaces_one_the_agent_closed_with_goaway(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h:
            async with agent_server() as srv:
                c = await setup(h, srv, "/sse", protocol="h2")
                await c.append("s", "one")
                await wait_message(c, "s", 2)
                port = srv.port
            async with agent_server(port=port) as srv:  # the old one said GOAWAY and closed
                await c.append("s", "two")
                messages = await wait_message(c, "s", 4)
                assert text_of(messages[3]) == reply_text(3, "two")
                assert len(srv.agent.calls) == 1
            assert h.node.dispatcher.pool.connections_opened == 2
            assert h.node.dispatcher.stats["bot"].failures == {}

    run(main())


def test_history_window_sends_the_context_window_and_the_reply_is_counted(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h, agent_server() as srv:
            c = await setup(h, srv, "/sse", history="window")
            await c.set_context_config("s", 100_000, LastN(2))
            for word in ("a", "b"):
                await c.append("s", word, "system", "", "note")
            await c.append("s", "last")
            messages = await wait_message(c, "s", 4)
            (call,) = srv.agent.calls
            assert [m["seq"] for m in call.body["messages"]] == [2, 3]
            reply = messages[3]
            assert reply.token_count is not None and reply.token_count > 0
            assert messages[0].token_count is not None

    run(main())


def test_a_call_cancelled_by_a_leadership_flap_resumes_when_leadership_returns(
    tmp_path: Path,
) -> None:
    """Lost and regained before the cancelled task ended: the resume skipped the session (its
    task was still there), so the task's end arms it again."""

    async def main() -> None:
        async with single_node(tmp_path) as h, agent_server() as srv:
            srv.agent.plans["/f"] = ["stall", "sse"]
            c = await setup(h, srv, "/f", protocol="h2")
            await c.append("s", "flap")
            async with asyncio.timeout(10):
                while not srv.agent.calls:
                    await asyncio.sleep(0.01)
            d = h.node.dispatcher
            group = group_of("s", h.node.settings.groups)
            d.on_leader_change(group, 99)  # lost: the call is cancelled
            d.on_leader_change(group, h.node.settings.node_id)  # back before the task ended
            _, reply = await wait_message(c, "s", 2)
            assert reply.metadata["agent"]["attempt"] == 2 and len(srv.agent.calls) == 2

    run(main())


def test_agents_over_the_http_api_and_chunk_events_over_sse(tmp_path: Path) -> None:
    async def main() -> None:
        async with web_node(tmp_path) as w, agent_server() as srv:
            a = w.address
            body = {"id": "bot", "url": srv.url("/sse"), "headers": {}, "timeout_ms": 10_000,
                    "idle_timeout_ms": 5_000, "debounce_ms": 0, "history": "all",
                    "max_attempts": 2, "status": "active", "protocol": "h2"}  # fmt: skip
            r = await call(a, "POST", "/v1/agents", {"agent": body})
            assert r.status == 200 and r.json() == {"agent": body}, r.body
            assert (await call(a, "POST", "/v1/agents", {"agent": body})).status == 409
            bad = await call(a, "POST", "/v1/agents", {"agent": {**body, "url": "ftp://x/"}})
            assert bad.status == 400 and "url" in bad.json()["message"]
            r = await call(a, "POST", "/v1/agents/update", {"agent": {**body, "max_attempts": 3}})
            assert r.status == 200 and r.json()["agent"]["max_attempts"] == 3
            r = await call(a, "GET", "/v1/agents?limit=10")
            assert [x["id"] for x in r.json()["agents"]] == ["bot"] and r.json()[
                "next_cursor"
            ] is None
            assert (await call(a, "GET", "/v1/agents/bot")).json()["agent"]["max_attempts"] == 3
            assert (await call(a, "GET", "/v1/agents/nobody")).status == 404
            session = {"user_id": "u1", "agent_id": "bot", "metadata": {}, "session_id": "s1"}
            await call(a, "POST", "/v1/sessions", session)
            events = await Events.open(a, "/v1/sessions/s1/events?stream_chunks=true")
            assert (await events.next())[1] == "subscribed"
            await call(a, "POST", "/v1/sessions/s1/messages", message("over http"))
            got = []
            while not any(name == "message" and d.get("sender") == "agent"
                          for _, name, d in got):  # fmt: skip
                got.append(await events.next())
            chunks = [d for _, name, d in got if name == "chunk"]
            assert chunks[0]["chunk"]["type"] == "start" and chunks[-1]["chunk"]["type"] == "finish"
            assert {(c["trigger_seq"], c["attempt"]) for c in chunks} == {(1, 1)}
            await events.close()
            r = await call(a, "POST", "/v1/agents/bot/disable", {})
            assert r.status == 200 and r.json()["agent"]["status"] == "disabled"

    run(main())


def test_a_leader_relays_chunks_only_to_peers_with_chunk_subscribers(tmp_path: Path) -> None:
    async def main() -> None:
        async with nodes(tmp_path, 3) as hs, agent_server() as srv:
            assert all([await h.node.wait_leaders(10) for h in hs])
            async with await connect(hs[0].target) as c:
                await c.create_agent(agent("bot", srv.url("/sse"), debounce_ms=0, protocol="h2"))
                await c.create_session("u", "bot", {}, "s")
            group = group_of("s", hs[0].node.settings.groups)
            # The leader every node names (a deposed one may still think it leads a moment).
            async with asyncio.timeout(10):
                while len({h.node.host.leader(group) for h in hs}) != 1:
                    await asyncio.sleep(0.01)
            leader = next(h for h in hs if h.node.host.leader(group) == h.node.settings.node_id)
            watcher, plain = [h for h in hs if h is not leader]
            chunks: list[ChunkEvent] = []
            async with await connect(watcher.target) as cw, await connect(plain.target) as cp:
                follower = asyncio.get_running_loop().create_task(collect_chunks(cw, "s", chunks))
                async with cp.subscribe("s"):  # messages only: no chunks wanted there
                    await asyncio.sleep(0.3)
                    await cp.append("s", "relay?")
                    await wait_message(cp, "s", 2)
                    await asyncio.sleep(0.2)
                follower.cancel()
            relayed = leader.node.router.chunks_relayed
            assert chunks and relayed == len(chunks)  # to the watcher's node alone
            assert plain.node.subscriptions.pushed_chunks == 0

    run(main())
