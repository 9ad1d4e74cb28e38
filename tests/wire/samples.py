"""Representative instances of every message of ``wire.protocol`` (one per tag, for the golden
vectors: requests, responses and pushes), plus edge cases for round trips."""

from __future__ import annotations

from typing import Any, get_args

from wire.protocol import (
    Agent,
    AgentInfo,
    AgentList,
    Append,
    Appended,
    ChunkEvent,
    Compact,
    Context,
    ContextChanged,
    ContextConfig,
    ContextEvent,
    CreateAgent,
    CreateSession,
    DisableAgent,
    Error,
    GapEvent,
    GetAgent,
    GetContext,
    GetRoutes,
    GetSession,
    Hello,
    InboxDelta,
    InboxEntry,
    InboxSnapshot,
    LastN,
    ListAgents,
    ListSessions,
    Manual,
    MarkRead,
    Message,
    MessageEvent,
    Messages,
    NewMessage,
    Ping,
    Pong,
    Push,
    Read,
    ReadMarked,
    Request,
    Response,
    Routes,
    Segment,
    Session,
    SessionInfo,
    SessionList,
    SetContextConfig,
    SkipParts,
    Subscribe,
    Subscribed,
    SubscribeInbox,
    SubscriptionClosed,
    TokenBudget,
    Unsubscribe,
    Unsubscribed,
    UpdateAgent,
    Welcome,
)

T0 = 1_700_000_000_000  # ms since the epoch

SESSION = Session("s-1", "u-1", "agent-1", T0, {"title": "Trip"}, 2)
MESSAGES = [
    Message("s-1", 1, "user", "u-1", "text", "hello", {}, "m-1", T0 + 1, 1, "user"),
    Message("s-1", 2, "agent", "agent-1", "text", "hi, 世界", {"model": "x"}, None, T0 + 2, 7),
    Message(
        "s-1",
        3,
        "agent",
        "agent-1",
        "text",
        "",
        {},
        None,
        T0 + 3,
        21,
        "assistant",
        [
            {"type": "reasoning", "text": "look it up"},
            {
                "type": "tool-search",
                "toolCallId": "c1",
                "state": "output-available",
                "input": {"q": "paris"},
                "output": ["Paris"],
            },
            {"type": "text", "text": "Paris."},
        ],
    ),
]
SUMMARY = Message(
    "s-1", 0, "system", "", "summary", "they said hello", {}, None, T0 + 4, 4, "system"
)
CONFIG = ContextConfig(8000, 0.7, LastN(50), "o200k_base")
INBOX = [
    InboxEntry("s-1", "agent-1", 2, 1, T0 + 2, "agent", "agent-1", "hi, 世界"),
    InboxEntry("s-2", "agent-2", 0, 0, T0, None, None, ""),
]

AGENT = Agent(
    "agent-1", "https://agents.example/hook?v=1", {"Authorization": "Bearer k"}, 120_000,
    30_000, 500, "tail 20", 5, "active", "auto",
)  # fmt: skip

REQUESTS: dict[str, Request] = {
    "hello": Hello(1, 1, "ctxstore-python", "s3cret"),
    "create_session": CreateSession(2, "u-1", "agent-1", {"title": "Trip"}, "s-1"),
    "get_session": GetSession(3, "s-1"),
    "list_sessions": ListSessions(4, "u-1", None, 100),
    "append": Append(5, "s-1", "user", "u-1", "text", "hello", {}, "m-1", None, None),
    "read": Read(6, "s-1", 0, 100),
    "mark_read": MarkRead(7, "s-1", "u-1", 2),
    "ping": Ping(8),
    "get_routes": GetRoutes(9),
    "subscribe": Subscribe(10, "s-1", 0),
    "unsubscribe": Unsubscribe(11, 1),
    "subscribe_inbox": SubscribeInbox(12, "u-1"),
    "set_context_config": SetContextConfig(13, "s-1", 8000, 0.7, LastN(50), "o200k_base"),
    "get_context": GetContext(14, "s-1"),
    "compact": Compact(
        15,
        "s-1",
        1,
        2,
        [
            NewMessage("system", "summary", "they said hello", None, {}, None),
        ],
        3,
    ),
    "create_agent": CreateAgent(16, AGENT),
    "update_agent": UpdateAgent(17, AGENT),
    "get_agent": GetAgent(18, "agent-1"),
    "list_agents": ListAgents(19, None, 100),
    "disable_agent": DisableAgent(20, "agent-1"),
}

RESPONSES: dict[str, Response] = {
    "welcome": Welcome(1, 1, "cluster-a", 1, 4 * 1024 * 1024),
    "session": SessionInfo(2, SESSION),
    "sessions": SessionList(4, [SESSION], "s-1"),
    "appended": Appended(5, 1, T0 + 1, False),
    "messages": Messages(6, MESSAGES, 2),
    "read_marked": ReadMarked(7, "s-1", "u-1", 2),
    "pong": Pong(8),
    "routes": Routes(
        9,
        3,
        [1, 2, 0, 3],
        {1: "127.0.0.1:7400", 2: "127.0.0.1:7401"},
        [[1, 2, 3], [1, 2, 4], [2, 3, 4], [1, 3, 4]],
    ),
    "error": Error(5, "conflict", "expected_seq 1, last_seq 2", False, {"last_seq": 2}),
    "subscribed": Subscribed(10, 1, 2),
    "unsubscribed": Unsubscribed(11, 1),
    "inbox_snapshot": InboxSnapshot(12, 2, INBOX, False),
    "context": Context(
        14,
        "s-1",
        [SUMMARY, MESSAGES[2]],
        [Segment(1, 2, 1, True), Segment(3, 3, 1, False)],
        25,
        4,
        False,
        1,
        3,
        CONFIG,
    ),
    "context_changed": ContextChanged(15, "s-1", 4, 25, False, 1),
    "agent": AgentInfo(16, AGENT),
    "agents": AgentList(19, [AGENT], None),
}

PUSHES: dict[str, Push] = {
    "message_event": MessageEvent(1, MESSAGES[:1]),
    "gap_event": GapEvent(1, 3, 5, "retention"),
    "inbox_delta": InboxDelta(2, INBOX[:1]),
    "subscription_closed": SubscriptionClosed(1, "slow_consumer", "1000 messages behind"),
    "context_event": ContextEvent(1, "compacted", 4, 25, False, 1),
    "stream_chunk": ChunkEvent(1, 3, 1, {"type": "text-delta", "id": "t1", "delta": "Hel"}),
}

SAMPLES: dict[str, Request | Response | Push] = {**REQUESTS, **RESPONSES, **PUSHES}

# More shapes for round trips: every optional field set and unset, limits, unicode, nesting.
EDGE_REQUESTS: list[Request] = [
    Hello(2**63 - 1, 1, "", None),
    Hello(1, 2, "n" * 128, "t" * 1024),
    CreateSession(1, "u", "a", {}, None),
    CreateSession(1, "U.x:y@z-_", "A" * 128, {"nested": {"list": [1, 2.5, None, True, "ü"]}}, None),
    ListSessions(1, "u", "cursor:" + "c" * 249, 1),
    ListSessions(1, "u", None, 1000),
    Append(1, "s", "agent", "a" * 128, "k" * 64, "", {"n": -1}, None, 0, 0),
    Append(1, "s", "system", "", "tool-call", "x" * 10_000, {}, "m" * 128, 2**63 - 1, 2**40),
    Append(1, "s", "user", "", "text", "emoji 🎉 and NUL \x00", {"": ""}, "m", None, 5),
    Read(1, "s", 2**63 - 1, 1),
    MarkRead(1, "s", "u", 0),
    Subscribe(1, "s", 2**63 - 1),
    Unsubscribe(1, 2**63 - 1),
    SubscribeInbox(1, "u" * 128),
    Append(
        1,
        "s",
        "agent",
        "a",
        "text",
        "",
        {},
        None,
        None,
        None,
        "tool",
        [{"type": "data-x", "data": None}],
        2**63 - 1,
    ),
    Append(1, "s", "user", "u", "text", "hi", {}, None, None, None, None, None, None),
    SetContextConfig(1, "s", 1, 1.0, SkipParts(["tool-", "reasoning"], None), None),
    SetContextConfig(1, "s", 100_000_000, 1e-9, TokenBudget(), "cl100k_base"),
    SetContextConfig(1, "s", 5, 0.5, Manual(), None),
    Compact(1, "s", 2**63 - 1, 2**63 - 1, [], None),
]
EDGE_RESPONSES: list[Response] = [
    Welcome(1, 0, "", 1, 1),
    SessionList(1, [], None),
    Messages(1, [], 0),
    Appended(1, 2**63 - 1, 0, True),
    Error(0, "too_large", "a frame of 5000000 bytes", False, {}),
    Error(9, "unavailable", "no leader yet", True, {"group": 17, "retry_after_ms": 50}),
    Error(0, "unavailable", "node shutting down", True, {}),
    Subscribed(1, 2**63 - 1, 0),
    InboxSnapshot(1, 1, [], True),
    Context(1, "s", [], [], 0, 0, False, 1, 0, None),
]
EDGE_PUSHES: list[Push] = [
    MessageEvent(2**63 - 1, MESSAGES),
    MessageEvent(1, []),
    GapEvent(1, 1, 2**63 - 1, "unavailable"),
    InboxDelta(1, []),
    SubscriptionClosed(1, "not_found", ""),
    SubscriptionClosed(1, "shutdown", "node shutting down"),
    SubscriptionClosed(1, "unavailable", "ünïcode"),
    ContextEvent(1, "needs_compaction", 2**63 - 1, 0, True, 2**63 - 1),
]


def union_types(union: Any) -> list[type[Any]]:
    return list(get_args(union))


__all__ = [
    "EDGE_PUSHES",
    "EDGE_REQUESTS",
    "EDGE_RESPONSES",
    "INBOX",
    "PUSHES",
    "REQUESTS",
    "RESPONSES",
    "SAMPLES",
    "union_types",
]
