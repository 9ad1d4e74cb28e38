"""The replicated agent registry: validation at the wire and the server, create/update/get/
list/disable through one in-process node, and its place in a group's snapshot."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from ctxstore import commands
from ctxstore.records import agent_from_wire
from ctxstore.state import ConversationState
from raft.messages import Entry, EntryType
from wire.client import ClientError, agent, connect
from wire.protocol import CreateAgent, DisableAgent, GetAgent, ListAgents, UpdateAgent

from .test_auth_service import AUTH, code, session_as, token
from .test_ops import nodes, run, single_node


def entry(index: int, cmd: commands.Command) -> Entry:
    return Entry(term=1, index=index, type=EntryType.NORMAL, data=commands.encode_command(cmd))


@pytest.mark.parametrize(
    "fields",
    [
        {"url": "ftp://example.com/x"},
        {"url": "http://a b/"},
        {"url": "http://user@host/"},
        {"headers": {"Bad Header": "v"}},
        {"headers": {"X-A": "line\r\nbreak"}},
        {"history": "tail 0"},
        {"history": "last 5"},
        {"max_attempts": 0},
        {"debounce_ms": -1},
        {"timeout_ms": 10},
        {"status": "paused"},
        {"protocol": "h3"},
    ],
)
def test_the_schema_refuses_bad_fields(fields: dict[str, object]) -> None:
    kwargs: dict[str, object] = {"url": "http://localhost:9/hook", **fields}
    url = kwargs.pop("url")
    with pytest.raises(msgspec.ValidationError):
        agent("a1", str(url), **kwargs)  # type: ignore[arg-type]


def test_the_registry_is_replicated_state_kept_by_snapshots() -> None:
    state = ConversationState()
    a = agent_from_wire(agent("bot", "http://localhost:9/hook", history="tail 20"))
    put = commands.PutAgent(a, True)
    assert state.apply(0, [entry(1, put)]) == [commands.AgentSaved(a)]
    again = state.apply(0, [entry(2, put)])[0]
    assert isinstance(again, commands.Rejected) and again.code == "conflict"
    b = msgspec.structs.replace(a, url="https://example.com/v2")
    assert state.apply(0, [entry(3, commands.PutAgent(b, False))]) == [commands.AgentSaved(b)]
    (off,) = state.apply(0, [entry(4, commands.DisableAgent("bot"))])
    assert isinstance(off, commands.AgentSaved) and off.agent.status == "disabled"
    missing = state.apply(0, [entry(5, commands.DisableAgent("nobody"))])[0]
    assert isinstance(missing, commands.Rejected) and missing.code == "not_found"
    copy = ConversationState()
    copy.restore(0, state.snapshot(0))
    assert copy.get_agent("bot") == off.agent
    assert copy.list_agents(None, 10) == ([off.agent], None)


def test_agents_over_the_native_protocol(tmp_path: Path) -> None:
    async def main() -> None:
        async with single_node(tmp_path) as h:
            assert await h.node.wait_leaders(10)
            async with await connect(h.target) as c:
                a = agent("bot", "http://127.0.0.1:9/hook", headers={"Authorization": "x"})
                assert (await c.create_agent(a)).agent == a
                with pytest.raises(ClientError) as e:
                    await c.create_agent(a)
                assert e.value.code == "conflict"
                for bad in (
                    agent("b2", "http://127.0.0.1:9/", headers={"Content-Length": "3"}),
                    agent("b3", "http://127.0.0.1:99999/"),
                    agent("b4", "http://127.0.0.1/", timeout_ms=1000, idle_timeout_ms=2000),
                ):
                    with pytest.raises(ClientError) as e:
                        await c.create_agent(bad)
                    assert e.value.code == "bad_request"
                with pytest.raises(ClientError) as e:
                    await c.update_agent(agent("ghost", "http://127.0.0.1:9/"))
                assert e.value.code == "not_found"
                b = agent("bot", "http://127.0.0.1:9/v2", history="window", debounce_ms=0)
                assert (await c.update_agent(b)).agent == b
                assert (await c.get_agent("bot")).agent == b
                for i in range(3):
                    await c.create_agent(agent(f"z{i}", "http://127.0.0.1:9/"))
                page = await c.list_agents(limit=2)
                assert [x.id for x in page.agents] == ["bot", "z0"]
                rest = await c.list_agents(page.next_cursor, 10)
                assert [x.id for x in rest.agents] == ["z1", "z2"] and rest.next_cursor is None
                assert (await c.disable_agent("bot")).agent.status == "disabled"
                with pytest.raises(ClientError) as e:
                    await c.get_agent("nobody")
                assert e.value.code == "not_found"

    run(main())


def test_the_registry_is_for_services_only_with_tokens(tmp_path: Path) -> None:
    """docs/auth.md: an operation missing from the table (the agent registry) is a service's."""

    async def main() -> None:
        async with nodes(tmp_path, 1, **AUTH) as (h,):
            assert await h.node.wait_leaders(10)
            a = agent("bot", "http://127.0.0.1:9/hook")
            requests = [CreateAgent(0, a), UpdateAgent(0, a), GetAgent(0, "bot"),
                        ListAgents(0, None, 10), DisableAgent(0, "bot")]  # fmt: skip
            for role, sub in (("user", "alice"), ("agent", "bot")):
                async with session_as(h, token(sub, role)) as c:
                    assert [code(await c.call(r)) for r in requests] == ["forbidden"] * 5
            async with session_as(h, token("svc", "service")) as c:
                assert [code(await c.call(r)) for r in requests] == ["ok"] * 5

    run(main())


def test_a_dispatch_ends_once_and_only_for_its_attempt_in_flight() -> None:
    state = ConversationState()
    n = iter(range(1, 100))

    def apply(cmd: commands.Command) -> object:
        return state.apply(0, [entry(next(n), cmd)])[0]

    def reply(attempt: int) -> commands.Append:
        return commands.Append("s", "agent", "bot", "text", f"r{attempt}", {},
                               f"agent-reply:1:{attempt}", None, None, 5, "assistant")  # fmt: skip

    def code(result: object) -> str:
        return result.code if isinstance(result, commands.Rejected) else type(result).__name__

    apply(commands.CreateSession("s", "u", "bot", {}, 1))
    assert code(apply(commands.DispatchBegin("s", 1, 1, 2))) == "conflict"  # no user message
    apply(commands.Append("s", "user", "u", "text", "hi", {}, None, None, None, 3, "user"))
    assert code(apply(commands.DispatchBegin("s", 1, 1, 4))) == "DispatchBegun"
    assert code(apply(commands.DispatchBegin("s", 1, 1, 4))) == "conflict"  # a second begin
    assert code(apply(commands.DispatchBegin("s", 1, 2, 5))) == "DispatchBegun"  # a new leader
    copy = ConversationState()
    copy.restore(0, state.snapshot(0))
    assert copy.dispatch_state("s") == ("bot", "u", 1, 0, (1, 2))
    assert code(apply(commands.DispatchEnd("s", 1, 1, reply(1)))) == "conflict"  # deposed
    assert code(apply(commands.DispatchEnd("s", 1, 2, reply(2)))) == "Appended"
    assert code(apply(commands.DispatchEnd("s", 1, 2, reply(2)))) == "conflict"  # once
    assert code(apply(commands.DispatchBegin("s", 1, 3, 6))) == "conflict"  # answered
    assert state.dispatch_state("s") == ("bot", "u", 1, 1, None)
    assert state.undispatched(0) == []
    result = state.read("s", 0, 10)
    assert result is not None and [m.content for m in result.messages] == ["hi", "r2"]
