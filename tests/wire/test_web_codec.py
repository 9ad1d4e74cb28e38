"""The JSON encoding of the WebSocket protocol (``wire/web_codec.py``): every message
round-trips, the shapes are the native schemas' (fields, order, limits, tags)."""

from __future__ import annotations

from typing import Any, get_args

import msgspec
import pytest

from wire.framing import ServerConnection, encode_frame
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
    Unsubscribe,
    Unsubscribed,
    UpdateAgent,
    Welcome,
    error,
)
from wire.web_codec import (
    REQUEST_TWINS,
    SERVER_MESSAGE_TWINS,
    Undecodable,
    bodies,
    frame_of_json,
    from_json_object,
    goodbye_of,
    json_request,
    json_text,
    json_twin,
)

SESSION = Session("s1", "u1", "a1", 1_700_000_000_000, {"topic": "x", "n": [1, 2.5, None]}, 3)
MESSAGE = Message("s1", 3, "agent", "a1", "text", "héllo \u2603 \"q\"\n", {"m": {"k": True}},
                  "c-1", 1_700_000_000_001, 12)  # fmt: skip
ENTRY = InboxEntry("s1", "a1", 3, 2, 1_700_000_000_001, "agent", "a1", "héllo")
AGENT = Agent("a1", "https://a.example/hook", {"X-Key": "k"}, 1000, 500, 0, "tail 3", 2,
              "active", "h2")  # fmt: skip
REQUESTS: list[Any] = [
    Hello(1, 1, "web", "tok"),
    Hello(1, 1, "web", None),
    CreateSession(2, "u1", "a1", {"k": "v"}, None),
    CreateSession(2, "u1", "a1", {}, "s1"),
    GetSession(3, "s1"),
    ListSessions(4, "u1", None, 50),
    Append(5, "s1", "user", "u1", "text", "hi", {"a": 1}, "c-1", 2, 7),
    Append(5, "s1", "system", "", "note", "", {}, None, None, None),
    Read(6, "s1", 0, 100),
    MarkRead(7, "s1", "u1", 3),
    Ping(8),
    GetRoutes(9),
    Subscribe(10, "s1", 0),
    Unsubscribe(11, 4),
    SubscribeInbox(12, "u1"),
    Append(
        13,
        "s1",
        "agent",
        "a1",
        "text",
        "",
        {},
        None,
        None,
        None,
        "tool",
        [{"type": "tool-x", "toolCallId": "c", "state": "input-available", "input": {}}],
        4,
    ),
    Subscribe(14, "s1", 0, True),
    SetContextConfig(15, "s1", 8000, 0.5, LastN(20), None),
    SetContextConfig(15, "s1", 8000, 1.0, SkipParts(["tool-"], 3), "cl100k_base"),
    GetContext(16, "s1"),
    Compact(17, "s1", 1, 3, [NewMessage("system", "summary", "s", None, {}, 2)], 5),
    CreateAgent(18, AGENT),
    UpdateAgent(19, AGENT),
    GetAgent(20, "a1"),
    ListAgents(21, None, 10),
    DisableAgent(22, "a1"),
    Subscribe(23, "s1", 0, False, True),
]
RESPONSES: list[Any] = [
    Welcome(1, 1, "ctxstore", 1, 4 * 1024 * 1024),
    SessionInfo(2, SESSION),
    SessionList(4, [SESSION, SESSION], "s1"),
    SessionList(4, [], None),
    Appended(5, 4, 1_700_000_000_002, False),
    Messages(6, [MESSAGE, MESSAGE], 3),
    ReadMarked(7, "s1", "u1", 3),
    Pong(8),
    error(9, "conflict", "expected_seq 2, last_seq 3", last_seq=3),
    Routes(9, 12, [1, 0, 2], {1: "127.0.0.1:7400", 2: "127.0.0.1:7401"}),
    Subscribed(10, 4, 3),
    Unsubscribed(11, 4),
    InboxSnapshot(12, 5, [ENTRY], False),
    Context(
        16,
        "s1",
        [MESSAGE],
        [Segment(3, 3, 1, False)],
        12,
        7,
        True,
        3,
        3,
        ContextConfig(10, 0.5, SkipParts(["reasoning"], None), "o200k_base"),
    ),
    Context(16, "s1", [], [], 0, 0, False, 4, 3, None),
    ContextChanged(17, "s1", 8, 12, False, 3),
    AgentInfo(18, AGENT),
    AgentList(21, [AGENT], "a1"),
]
PUSHES: list[Any] = [
    MessageEvent(4, [MESSAGE]),
    GapEvent(4, 1, 2, "retention"),
    InboxDelta(5, [ENTRY, InboxEntry("s2", "a2", 0, 0, 5, None, None, "")]),
    SubscriptionClosed(4, "slow_consumer", "the subscriber did not read for 30 s"),
    ContextEvent(4, "trimmed", 9, 12, False, 3),
    ChunkEvent(4, 3, 2, {"type": "text-delta", "id": "t", "delta": "hé"}),
]


def test_the_samples_cover_every_message_type() -> None:
    assert {type(m) for m in REQUESTS} == set(get_args(Request))
    assert {type(m) for m in RESPONSES} == set(get_args(Response))
    assert {type(m) for m in PUSHES} == set(get_args(Push))


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_every_request_round_trips_and_reaches_the_core_as_itself(request_: Any) -> None:
    text = json_request(request_)
    obj = msgspec.json.decode(text)
    assert obj["type"] == type(request_).__struct_config__.tag
    assert list(obj)[1:] == list(type(request_).__struct_fields__)  # named, in schema order
    assert from_json_object(msgspec.json.decode(text, type=REQUEST_TWINS)) == request_
    # What the server does with it: the native frame, decoded by the native core.
    core = ServerConnection()
    if type(request_) is not Hello:
        core.receive_data(encode_frame(Hello(99, 1, "t", None)))
        core.next_event()
        core.send(Welcome(99, 0, "", 1, core.max_frame_bytes))
    core.receive_data(frame_of_json(text))
    event = core.next_event()
    assert getattr(event, "request", None) == request_, event


@pytest.mark.parametrize("message", RESPONSES + PUSHES, ids=lambda r: type(r).__name__)
def test_every_response_and_push_round_trips(message: Any) -> None:
    (body,) = bodies(encode_frame(message))
    text = json_text(body)
    obj = msgspec.json.decode(text)
    assert obj["type"] == type(message).__struct_config__.tag
    assert from_json_object(msgspec.json.decode(text, type=SERVER_MESSAGE_TWINS)) == message


def test_metadata_without_a_json_form_is_given_one() -> None:
    """msgpack holds values JSON has not (a native client may store them): binary, extension
    types, integer keys, NaN.  A JSON reader gets a stand-in, never an encoding failure."""
    metadata = {
        "b": b"\x00\x01",
        "e": msgspec.msgpack.Ext(5, b"xy"),
        "k": {1: 2},
        "n": float("nan"),
    }
    message = Message("s1", 1, "user", "u", "text", "hi", metadata, None, 5, None)
    (body,) = bodies(encode_frame(Messages(1, [message], 1)))
    (got,) = msgspec.json.decode(json_text(body))["messages"]
    assert got["metadata"] == {
        "b": "AAE=",
        "e": {"msgpack_ext": 5, "data": "eHk="},
        "k": {"1": 2},
        "n": None,
    }


def test_the_twins_keep_the_limits_and_refuse_unknown_fields() -> None:
    twin = json_twin(Append)
    good = msgspec.json.decode(json_request(REQUESTS[6]))
    msgspec.convert(good, twin)
    for field, value in (("rid", 0), ("session_id", "bad id"), ("sender", "robot")):
        with pytest.raises(msgspec.ValidationError, match=field):
            msgspec.convert(good | {field: value}, twin)
    with pytest.raises(msgspec.ValidationError, match="unknown field `x`"):
        msgspec.convert(good | {"x": 1}, twin)
    with pytest.raises(msgspec.ValidationError, match="missing required field `content`"):
        msgspec.convert({k: v for k, v in good.items() if k != "content"}, twin)


def test_only_a_json_object_is_a_request() -> None:
    for text in (b"", b"{", b"[1]", b"1", b'"ping"', b"\xff"):
        with pytest.raises(Undecodable):
            frame_of_json(text)
    with pytest.raises(Undecodable):  # an integer msgpack cannot carry
        frame_of_json(b'{"type": "ping", "rid": 1' + b"0" * 30 + b"}")
    for depth in (999, 5000, 100_000):  # nested deeper than the decoder goes
        deep = b"[" * depth + b"]" * depth
        with pytest.raises(Undecodable, match="nested too deeply"):
            frame_of_json(b'{"type": "ping", "rid": 1, "x": ' + deep + b"}")


def test_a_field_left_out_takes_its_default_and_never_cuts_the_request_short() -> None:
    """The fields a protocol version appended may be left out, each on its own: ``parts``
    without ``role`` is a structured message (it was once cut at ``role``: an empty text
    message, the parts dropped); a required field left out, or an unknown one, is refused."""
    core = ServerConnection()
    core.receive_data(encode_frame(Hello(99, 2, "t", None)))
    core.next_event()
    core.send(Welcome(99, 0, "", 2, core.max_frame_bytes))
    base = {"type": "append", "rid": 1, "session_id": "s1", "sender": "agent",
            "sender_id": "a1", "kind": "text", "content": "", "metadata": {},
            "client_msg_id": None, "expected_seq": None, "token_count": None}  # fmt: skip
    parts = [{"type": "text", "text": "hi"}]
    core.receive_data(frame_of_json(msgspec.json.encode({**base, "parts": parts})))
    event = core.next_event()
    request = getattr(event, "request", None)
    assert isinstance(request, Append), event
    assert (request.parts, request.role, request.if_version) == (parts, None, None)
    core.receive_data(frame_of_json(msgspec.json.encode({**base, "rid": 2, "if_version": 3})))
    request = getattr(core.next_event(), "request", None)
    assert isinstance(request, Append) and request.if_version == 3 and request.parts is None
    subscribe = {"type": "subscribe", "rid": 3, "session_id": "s1", "after_seq": 0}
    core.receive_data(frame_of_json(msgspec.json.encode(subscribe)))
    request = getattr(core.next_event(), "request", None)
    assert isinstance(request, Subscribe) and request.context_events is False
    for rid, bad, words in [
        (4, {**subscribe, "rid": 4, "bogus": 1}, "too many fields"),
        (5, {k: v for k, v in base.items() if k != "kind"} | {"rid": 5}, "kind"),
    ]:
        core.receive_data(frame_of_json(msgspec.json.encode(bad)))
        core.next_event()
        *_, body = bodies(core.data_to_send())
        answer = msgspec.msgpack.decode(body, type=Error)
        assert isinstance(answer, Error) and answer.rid == rid, answer
        assert answer.code == "bad_request" and words in answer.message, answer


def test_the_goodbye_is_recognised_from_its_bytes() -> None:
    (bye,) = bodies(encode_frame(Error(0, "unavailable", "shutting down", True, {})))
    assert goodbye_of(bye) == ("unavailable", "shutting down")
    for other in (error(1, "bad_request", "x"), Pong(0 + 1)):
        (body,) = bodies(encode_frame(other))
        assert goodbye_of(body) is None
