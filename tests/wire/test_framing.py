"""The sans-IO connections of ``wire.framing``: framing, the handshake, schema errors, sticky
protocol errors, pushes, the goodbye, and fuzzing."""

from __future__ import annotations

import os
import struct
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire.errors import LocalProtocolError
from wire.framing import (
    CONNECTION_CLOSED,
    HELLO_FRAME_BYTES_MAX,
    METADATA_BYTES_MAX,
    METADATA_DEPTH_MAX,
    PUSH_TYPES,
    TRANSITIONS,
    BadRequest,
    ClientConnection,
    ConnectionClosed,
    Input,
    ProtocolError,
    PushReceived,
    RequestReceived,
    ResponseReceived,
    ServerConnection,
    State,
    encode_frame,
    input_of,
)
from wire.protocol import (
    FRAME_BYTES_MAX,
    REHELLO_VERSION,
    Append,
    Error,
    GapEvent,
    GetSession,
    Hello,
    MessageEvent,
    Messages,
    Ping,
    Pong,
    Push,
    Read,
    Request,
    Response,
    Subscribed,
    SubscriptionClosed,
    Welcome,
)

from .helpers import (
    Pair,
    drain,
    frame,
    hello,
    open_client,
    open_server,
    raw,
    responses,
    server_messages,
    welcome,
)
from .samples import (
    EDGE_PUSHES,
    EDGE_REQUESTS,
    EDGE_RESPONSES,
    MESSAGES,
    PUSHES,
    REQUESTS,
    RESPONSES,
)


def renumbered(messages: list[Any], first_rid: int) -> list[Any]:
    return [msgspec.structs.replace(m, rid=first_rid + i) for i, m in enumerate(messages)]


def small(messages: list[Any]) -> list[Any]:
    return [m for m in messages if len(encode_frame(m)) < 2000]


STREAM_REQUESTS: list[Request] = renumbered(
    small([m for m in [*REQUESTS.values(), *EDGE_REQUESTS] if type(m) is not Hello]), 2
)
STREAM_RESPONSES: list[Response] = renumbered(
    small([m for m in [*RESPONSES.values(), *EDGE_RESPONSES] if m.rid and type(m) is not Welcome]),
    2,
)


def feed_in_pieces(
    conn: ServerConnection | ClientConnection, data: bytes, cuts: list[int]
) -> list[Any]:
    events: list[Any] = []
    start = 0
    for cut in [*cuts, len(data)]:
        conn.receive_data(data[start:cut])
        events += drain(conn)
        start = cut
    return events


def assert_protocol_error(server: ServerConnection, code: str, match: str = "") -> ProtocolError:
    """The server is broken with ``code``, has queued ``Error{rid 0}`` and stays broken."""
    events = drain(server)
    assert events, "no event"
    error = events[-1]
    assert isinstance(error, ProtocolError), events
    assert error.code == code
    assert match in error.message
    assert server.state is State.MUST_CLOSE
    *_, last = responses(server.data_to_send())
    assert last == Error(0, code, error.message, False, {})
    # sticky: more input is ignored, the error comes back, sends are discarded
    server.receive_data(encode_frame(Ping(99)))
    assert server.next_event() is error
    assert server.buffered_bytes == 0
    server.send(Pong(99))
    assert server.data_to_send() == b""
    return error


# -- framing ---------------------------------------------------------------------------------------


def test_request_stream_split_at_every_offset_decodes_identically() -> None:
    data = b"".join(encode_frame(m) for m in STREAM_REQUESTS)
    expected = [RequestReceived(m) for m in STREAM_REQUESTS]
    assert feed_in_pieces(open_server(), data, []) == expected
    for cut in range(len(data) + 1):
        assert feed_in_pieces(open_server(), data, [cut]) == expected, cut
    assert feed_in_pieces(open_server(), data, list(range(len(data)))) == expected


def test_response_stream_split_at_every_offset_decodes_identically() -> None:
    data = b"".join(encode_frame(m) for m in STREAM_RESPONSES)
    expected = [ResponseReceived(m) for m in STREAM_RESPONSES]
    assert feed_in_pieces(open_client(), data, []) == expected
    for cut in range(len(data) + 1):
        assert feed_in_pieces(open_client(), data, [cut]) == expected, cut
    assert feed_in_pieces(open_client(), data, list(range(len(data)))) == expected


def test_handshake_split_at_every_offset() -> None:
    data = encode_frame(hello(token="t")) + encode_frame(Ping(2))
    for cut in range(len(data) + 1):
        server = ServerConnection()
        assert feed_in_pieces(server, data, [cut]) == [RequestReceived(hello(token="t"))]
        server.send(welcome())
        assert drain(server) == [RequestReceived(Ping(2))]


def test_two_cuts_in_a_frame_pair() -> None:
    data = encode_frame(STREAM_REQUESTS[0]) + encode_frame(STREAM_REQUESTS[1])
    expected = [RequestReceived(m) for m in STREAM_REQUESTS[:2]]
    for a in range(len(data) + 1):
        for b in range(a, len(data) + 1):
            assert feed_in_pieces(open_server(), data, [a, b]) == expected


def append_of_size(rid: int, body_bytes: int) -> Append:
    """An Append whose encoded body is exactly ``body_bytes`` long (4-byte characters)."""
    probe = Append(rid, "s", "user", "", "text", "\U0001f389" * 70_000, {}, None, None, None)
    base = len(msgspec.msgpack.encode(probe)) - 4 * 70_000
    n, rest = divmod(body_bytes - base, 4)
    request = msgspec.structs.replace(probe, sender_id="x" * rest, content="\U0001f389" * n)
    assert len(msgspec.msgpack.encode(request)) == body_bytes
    return request


def test_the_largest_frame_arrives_in_chunks_without_growing_the_buffer() -> None:
    server = open_server()
    requests = [append_of_size(2, FRAME_BYTES_MAX), append_of_size(3, 100_000)]
    data = b"".join(encode_frame(r) for r in requests)
    chunk = 64 * 1024
    events: list[Any] = []
    for start in range(0, len(data), chunk):
        server.receive_data(data[start : start + chunk])
        events += drain(server)
        assert len(server._buffer) <= FRAME_BYTES_MAX + 4 + chunk
    assert events == [RequestReceived(r) for r in requests]
    assert server.buffered_bytes == 0


def test_a_frame_of_exactly_the_limit_is_accepted() -> None:
    server = open_server(max_frame_bytes=100_000)
    request = append_of_size(2, 100_000)
    server.receive_data(encode_frame(request))
    assert drain(server) == [RequestReceived(request)]
    server.receive_data(encode_frame(append_of_size(3, 100_001)))
    assert_protocol_error(server, "too_large", "100001")


def test_oversize_declared_length_fails_before_the_body_arrives() -> None:
    server = open_server(max_frame_bytes=1024)
    server.receive_data(struct.pack(">I", 1025) + b"\x95")  # the header and one body byte
    error = assert_protocol_error(server, "too_large", "1025")
    assert "1024" in error.message


def test_oversize_hello_fails_at_the_handshake_limit() -> None:
    server = ServerConnection()
    server.receive_data(struct.pack(">I", HELLO_FRAME_BYTES_MAX + 1))
    assert_protocol_error(server, "too_large")


def test_a_client_refuses_oversize_frames_both_ways() -> None:
    client = open_client(max_frame_bytes=1024)  # the Welcome's limit applies from now on
    assert client.max_frame_bytes == 1024
    big = Append(2, "s", "user", "", "text", "x" * 2000, {}, None, None, None)
    with pytest.raises(LocalProtocolError) as info:
        client.send(big)
    assert info.value.code == "too_large"
    assert client.data_to_send() == b"" and client.state is State.OPEN
    client.send(Ping(3))  # still usable
    assert client.data_to_send() == encode_frame(Ping(3))
    client.receive_data(struct.pack(">I", 1025))
    [event] = drain(client)
    assert event == ProtocolError("too_large", event.message)


def test_the_buffer_is_compacted_in_place() -> None:
    server = open_server()
    data = b"".join(encode_frame(Ping(rid)) for rid in range(2, 1002))
    server.receive_data(data + encode_frame(Ping(5000))[:3])
    assert len(drain(server)) == 1000
    assert len(server._buffer) == 3


def test_end_of_stream_after_the_last_frame() -> None:
    server = open_server()
    server.receive_data(encode_frame(Ping(2)) + encode_frame(Ping(3))[:5])
    server.receive_data(None)
    assert drain(server) == [RequestReceived(Ping(2)), CONNECTION_CLOSED]
    assert server.next_event() is CONNECTION_CLOSED
    server.send(Pong(2))  # a half-closed peer still gets its answers
    assert responses(server.data_to_send()) == [Pong(2)]
    client = open_client()
    client.receive_data(None)
    assert drain(client) == [CONNECTION_CLOSED]


# -- the handshake ---------------------------------------------------------------------------------


def test_frames_after_the_hello_wait_for_the_welcome() -> None:
    pair = Pair()
    assert pair.send(hello(), Ping(2), Ping(3)) == [RequestReceived(hello())]
    assert pair.server.state is State.GREETING and pair.client.state is State.GREETING
    assert pair.server.next_event() is None
    assert pair.server.in_flight == 1
    assert pair.answer(welcome()) == [ResponseReceived(welcome())]
    assert drain(pair.server) == [RequestReceived(Ping(2)), RequestReceived(Ping(3))]
    assert pair.answer(Pong(3), Pong(2)) == [ResponseReceived(Pong(3)), ResponseReceived(Pong(2))]
    assert pair.server.in_flight == 0 and pair.server.in_flight_bytes == 0


def test_a_refused_hello_closes_and_nothing_after_it_is_handled() -> None:
    pair = Pair()
    pair.send(hello(), Ping(2))
    refusal = Error(1, "unauthorized", "bad token", False, {})
    assert pair.answer(refusal) == [ResponseReceived(refusal)]
    assert pair.server.state is State.MUST_CLOSE and pair.client.state is State.MUST_CLOSE
    assert pair.server.next_event() is None
    pair.client.send(Ping(3))  # discarded
    assert pair.client.data_to_send() == b""


def test_the_first_frame_must_be_a_hello() -> None:
    server = ServerConnection()
    server.receive_data(encode_frame(Ping(1)))
    assert_protocol_error(server, "bad_request", "first frame must be hello")


@pytest.mark.parametrize(
    "body",
    [
        ["hello", 1, 1, "x"],  # too short
        ["hello", 1, 0, "x", None],  # protocol_version >= 1
        ["hello", 1, 1, "x" * 129, None],
        ["hello", "one", 1, "x", None],
    ],
)
def test_an_invalid_hello_is_a_protocol_error(body: list[Any]) -> None:
    server = ServerConnection()
    server.receive_data(raw(body))
    assert_protocol_error(server, "bad_request", "valid hello")


def test_an_unsupported_protocol_version_is_refused() -> None:
    server = ServerConnection()
    server.receive_data(encode_frame(Hello(1, 99, "x", None)))
    assert_protocol_error(server, "bad_request", "protocol_version: 99 is not supported")


def test_a_second_hello_before_version_4_is_a_protocol_error() -> None:
    server = open_server()  # (version 1)
    server.receive_data(encode_frame(hello(2)))
    assert_protocol_error(server, "bad_request", "a second hello needs protocol_version >= 4")


def test_a_second_hello_of_version_4_refreshes_an_open_connection() -> None:
    pair = Pair()
    assert len(pair.send(Hello(1, REHELLO_VERSION, "x", "t1"))) == 1
    pair.answer(Welcome(1, 7, "c", REHELLO_VERSION, FRAME_BYTES_MAX, 1000))
    # a request like any other: what follows it is not held
    first, second = pair.send(Hello(2, REHELLO_VERSION, "x", "t2"), Ping(3))
    assert first.request == Hello(2, REHELLO_VERSION, "x", "t2") and second.request == Ping(3)
    assert pair.server.hello == first.request and pair.server.state is State.OPEN
    pair.answer(Pong(3), Welcome(2, 7, "c", REHELLO_VERSION, FRAME_BYTES_MAX, 2000))
    assert pair.client.state is State.OPEN and pair.client.welcome is not None
    assert pair.client.welcome.expires_in_ms == 2000
    # refused: an Error answers it, and the connection stays open
    assert len(pair.send(Hello(4, REHELLO_VERSION, "x", "bad"))) == 1
    pair.answer(Error(4, "unauthorized", "no", False, {}))
    assert pair.client.state is State.OPEN and pair.server.state is State.OPEN
    # another version: bad_request naming it, the connection open
    pair.server.receive_data(encode_frame(Hello(5, 3, "x", "t3")))
    [bad] = drain(pair.server)
    assert isinstance(bad, BadRequest) and bad.error.details == {"field": "protocol_version"}
    assert "keeps its version (4)" in bad.error.message and pair.server.state is State.OPEN


def test_the_welcome_must_match_the_connection() -> None:
    pair = Pair(max_frame_bytes=1024)
    pair.send(hello())
    with pytest.raises(LocalProtocolError, match="max_frame_bytes"):
        pair.server.send(welcome(max_frame_bytes=FRAME_BYTES_MAX))
    with pytest.raises(LocalProtocolError, match="cannot send Pong in state greeting"):
        pair.server.send(Pong(1))
    assert pair.server.data_to_send() == b"" and pair.server.in_flight == 1
    pair.answer(welcome(max_frame_bytes=1024))
    assert pair.client.max_frame_bytes == 1024


def test_a_client_cannot_skip_the_hello() -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError, match="cannot send Ping in state idle"):
        client.send(Ping(1))
    with pytest.raises(LocalProtocolError, match="rid"):
        client.send(hello(rid=0))
    client.send(hello())
    with pytest.raises(LocalProtocolError, match="cannot send Hello in state greeting"):
        client.send(hello(2))


def test_a_response_before_the_welcome_breaks_the_client() -> None:
    client = ClientConnection()
    client.send(hello())
    client.receive_data(encode_frame(Pong(1)))
    [event] = drain(client)
    assert event.code == "internal" and "pong" in event.message
    assert client.next_event() is event


def test_an_error_with_rid_0_is_the_servers_goodbye() -> None:
    client = open_client()
    client.receive_data(encode_frame(Pong(2)) + encode_frame(Error(0, "too_large", "x", False, {})))
    assert drain(client) == [ResponseReceived(Pong(2)), ProtocolError("too_large", "x")]
    assert client.state is State.MUST_CLOSE


def test_undecodable_responses_break_the_client() -> None:
    for body in [
        b"\xc1",
        msgspec.msgpack.encode(["pong"]),
        msgspec.msgpack.encode(["nope", 1]),
        b"\x92\xa1\x80\x01",  # a tag that is not UTF-8
        b"\x94\xb3subscription_closed\x01\xa1\x80",  # a string that is not UTF-8
    ]:
        client = open_client()
        client.receive_data(frame(body))
        [event] = drain(client)
        assert isinstance(event, ProtocolError) and event.code == "internal"


def test_transitions_table() -> None:
    assert input_of(hello(), State.IDLE) is Input.HELLO
    assert input_of(Ping(1), State.OPEN) is Input.REQUEST
    assert input_of(welcome(), State.GREETING) is Input.WELCOME
    assert input_of(Error(1, "internal", "", False, {}), State.GREETING) is Input.REFUSAL
    assert input_of(Error(1, "internal", "", False, {}), State.OPEN) is Input.RESPONSE
    assert input_of(Error(0, "internal", "", False, {}), State.OPEN) is Input.GOODBYE
    assert input_of(Pong(1), State.OPEN) is Input.RESPONSE
    for push in PUSHES.values():
        assert input_of(push, State.OPEN) is Input.PUSH
    assert TRANSITIONS[State.OPEN, Input.PUSH] is State.OPEN
    assert [state for state, i in TRANSITIONS if i is Input.PUSH] == [State.OPEN]
    assert not any(state is State.MUST_CLOSE for state, _ in TRANSITIONS)  # a dead end
    reachable = {State.IDLE} | set(TRANSITIONS.values())
    assert reachable == set(State)


# -- requests and answers --------------------------------------------------------------------------


def test_answers_in_any_order_each_exactly_once() -> None:
    pair = Pair().handshake()
    assert len(pair.send(*[Ping(rid) for rid in range(2, 12)])) == 10
    assert pair.server.in_flight == 10
    answers = [Pong(rid) for rid in reversed(range(2, 12))]
    assert pair.answer(*answers) == [ResponseReceived(a) for a in answers]
    with pytest.raises(LocalProtocolError, match="no request 5 in flight"):
        pair.server.send(Pong(5))
    assert pair.server.in_flight == 0


def test_a_rid_already_in_flight_is_a_bad_request() -> None:
    pair = Pair().handshake()
    [event] = pair.send(GetSession(2, "s"))
    assert isinstance(event, RequestReceived)
    pair.client.send(Ping(2))
    pair.server.receive_data(pair.client.data_to_send())
    [event] = drain(pair.server)
    assert isinstance(event, BadRequest) and event.error.details == {"field": "rid"}
    assert pair.server.in_flight == 1


def test_a_request_with_rid_0_is_a_protocol_error() -> None:
    server = open_server()
    server.receive_data(raw(["ping", 0]))
    assert_protocol_error(server, "bad_request", "rid")


def test_a_response_over_the_limit_becomes_too_large() -> None:
    pair = Pair(max_frame_bytes=1024).handshake()
    pair.send(Read(2, "s", 0, 10))
    [event] = pair.answer(_big_messages(2))
    assert event.response.code == "too_large"
    assert event.response.details == {"max_frame_bytes": 1024}
    assert pair.server.in_flight == 0


def _big_messages(rid: int) -> Messages:
    message = msgspec.structs.replace(MESSAGES[0], content="x" * 2000)
    return Messages(rid, [message], 1)


def test_an_unencodable_response_raises_and_stays_in_flight() -> None:
    pair = Pair().handshake()
    pair.send(Read(2, "s", 0, 10))
    bad = Messages(
        2, [msgspec.structs.replace(_big_messages(2).messages[0], metadata={"x": object()})], 1
    )
    with pytest.raises(LocalProtocolError) as info:
        pair.server.send(bad)
    assert info.value.code == "internal"
    assert pair.server.data_to_send() == b"" and pair.server.awaits_answer(2)
    pair.server.send(Error(2, "internal", "oops", False, {}))
    assert not pair.server.awaits_answer(2)


# -- schema errors: bad_request naming the field, the connection goes on ---------------------------

APPEND = ["append", 9, "s-1", "user", "", "text", "hi", {}, None, None, None]


def with_field(index: int, value: Any) -> list[Any]:
    body = list(APPEND)
    body[index] = value
    return body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (with_field(2, 5), "session_id"),
        (with_field(2, ""), "session_id"),
        (with_field(2, "has space"), "session_id"),
        (with_field(2, "x" * 129), "session_id"),
        (with_field(3, "bot"), "sender"),
        (with_field(4, "x" * 129), "sender_id"),
        (with_field(5, ""), "kind"),
        (with_field(6, None), "content"),
        (with_field(7, {1: 2}), "metadata"),
        (with_field(7, []), "metadata"),
        (with_field(8, ""), "client_msg_id"),
        (with_field(9, -1), "expected_seq"),
        (with_field(10, -1), "token_count"),
        (with_field(7, {"big": "x" * METADATA_BYTES_MAX}), "metadata"),
        (APPEND[:3], "sender"),  # too short: the first missing field
        (APPEND[:-1], "token_count"),
        (["nope", 9], "type"),  # unknown tag
        (["read", 9, "s", 0, 0], "limit"),
        (["read", 9, "s", 0, 1001], "limit"),
        (["read", 9, "s", -1, 10], "after_seq"),
        (["list_sessions", 9, "u", 5, 10], "cursor"),
        (["mark_read", 9, "s", "u", "1"], "seq"),
        (["create_session", 9, "u", "a", None, None], "metadata"),
        (["get_session", 9, "s", "extra"], None),  # too long
        ([b"append", 9], "type"),  # the tag must be a string
        # version 2: context windows and structured messages
        (["set_context_config", 9, "s", 0, 0.5, {"type": "manual"}, None], "token_budget"),
        (["set_context_config", 9, "s", 10, 0.0, {"type": "manual"}, None], "trigger_ratio"),
        (["set_context_config", 9, "s", 10, 1.01, {"type": "manual"}, None], "trigger_ratio"),
        (["set_context_config", 9, "s", 10, 0.5, {"type": "lru"}, None], "policy"),
        (["set_context_config", 9, "s", 10, 0.5, {"type": "last_n"}, None], "policy"),
        (["set_context_config", 9, "s", 10, 0.5, {"type": "last_n", "limit": 0}, None], "policy"),
        (
            ["set_context_config", 9, "s", 10, 0.5, {"type": "skip_parts", "types": []}, None],
            "policy",
        ),
        (["set_context_config", 9, "s", 10, 0.5, {"type": "manual"}, "gpt2"], "tokenizer"),
        (["compact", 9, "s", 0, 1, [], None], "from_seq"),
        (["compact", 9, "s", 1, 1, [{"role": "system"}], None], "replacement"),
        (
            [
                "append",
                9,
                "s",
                "user",
                "u",
                "text",
                "",
                {},
                None,
                None,
                None,
                None,
                [{"type": "video"}],
            ],
            "parts[0].type",
        ),
        (
            [
                "append",
                9,
                "s",
                "user",
                "u",
                "text",
                "",
                {},
                None,
                None,
                None,
                None,
                [{"type": "text", "text": "x", "color": "red"}],
            ],
            "parts[0].color",
        ),
        (["append", 9, "s", "agent", "a", "text", "", {}, None, None, None, "user", None], "role"),
        (
            [
                "append",
                9,
                "s",
                "user",
                "u",
                "text",
                "x",
                {},
                None,
                None,
                None,
                None,
                [{"type": "step-start"}],
            ],
            "content",
        ),
    ],
)
def test_schema_errors_name_the_field_and_keep_the_connection(body: list[Any], field: str) -> None:
    server = open_server()
    server.receive_data(raw(body))
    [event] = drain(server)
    assert isinstance(event, BadRequest), event
    assert event.rid == 9
    error = event.error
    assert (error.rid, error.code, error.retryable) == (9, "bad_request", False)
    if field is None:
        assert error.details == {} and "too many fields" in error.message
    else:
        assert error.details == {"field": field}
        assert error.message.startswith(f"{field}: ")
    assert responses(server.data_to_send()) == [error]
    assert server.in_flight == 0
    server.receive_data(encode_frame(Ping(10)))  # the connection goes on
    assert drain(server) == [RequestReceived(Ping(10))]


@pytest.mark.parametrize(
    "data",
    [
        frame(b"\xc1"),  # not msgpack
        frame(msgspec.msgpack.encode(["ping", 9]) + b"\x00"),  # trailing bytes
        frame(b""),  # an empty body
        raw(5),  # not an array
        raw([]),
        raw(["ping"]),  # no rid
        raw(["ping", "9"]),  # an unreadable rid
        raw(["nope", -1]),
        raw(["ping", 2**64 - 1]),
        frame(b"\x92\xa5hello" + b"\x91" * 100_000 + b"\x00"),  # a Hello nested too deeply
        frame(b"\x91\xa1\x80"),  # a tag that is not UTF-8
        frame(b"\x92\xa1\x80\x09"),
        frame(b"\x93\xabget_session\x09\xa1\x80"),  # a string that is not UTF-8
    ],
)
def test_undecodable_requests_are_protocol_errors(data: bytes) -> None:
    server = open_server()
    server.receive_data(data)
    assert_protocol_error(server, "bad_request")


def nested(levels: int) -> dict[str, Any]:
    """A metadata map ``levels`` deep (the map itself is level 1)."""
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def deep_body(head: bytes, levels: int) -> bytes:
    """``head`` (an array header and its first elements), then one array ``levels`` deep: deeper
    than msgspec encodes or decodes for a large ``levels``."""
    return frame(head + b"\x91" * levels + b"\xc0")


APPEND_HEAD = b"\x9b\xa6append\x09\xa1s\xa4user\xa0\xa4text\xa2hi"  # 8 of 11 fields


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (deep_body(b"\x93\xa4ping\x09", 100_000), None),  # an extra field nested too deeply
        (deep_body(b"\x93\xa4ping\x09", 990), None),
        (deep_body(b"\x94\xabget_session\x09\xa1s", 5000), None),
        (frame(APPEND_HEAD + b"\x81\xa1a" * 100_000 + b"\x80\xc0\xc0\xc0"), None),  # undecodable
        (raw(with_field(7, nested(METADATA_DEPTH_MAX + 1))), "metadata"),
        (raw(with_field(7, {"k": [nested(METADATA_DEPTH_MAX - 1)]})), "metadata"),
        (frame(APPEND_HEAD + b"\x81\xa1a" * 500 + b"\x80\xc0\xc0\xc0"), "metadata"),  # decodable
        (raw(["create_session", 9, "u", "a", nested(METADATA_DEPTH_MAX + 1), None]), "metadata"),
    ],
)
def test_deep_nesting_with_a_readable_rid_is_a_bad_request(data: bytes, field: str | None) -> None:
    """Issue 27 item 5: a request nested too deeply is answered ``bad_request`` for its rid
    (naming the field when known); the connection goes on."""
    server = open_server()
    server.receive_data(data)
    [event] = drain(server)
    assert isinstance(event, BadRequest), event
    assert event.rid == 9 and event.error.details == ({} if field is None else {"field": field})
    assert responses(server.data_to_send()) == [event.error]
    assert server.in_flight == 0
    server.receive_data(encode_frame(Ping(10)))
    assert drain(server) == [RequestReceived(Ping(10))]


EXT = msgspec.msgpack.Ext(5, b"xy")
STAMP = msgspec.msgpack.decode(b"\xd6\xff\x00\x00\x00\x01")  # a msgpack timestamp (ext -1)


def with_parts(parts: list[Any]) -> list[Any]:
    return [*with_field(6, ""), None, parts]


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        (with_field(7, {"k": {1: 2}}), "metadata.k", "a map key must be a string, not int 1"),
        (with_field(7, {"k": [{"x": {None: 1}}]}), "metadata.k[0].x", "not NoneType None"),
        (with_field(7, {"k": [1, {b"x": 1}]}), "metadata.k[1]", "not bytes b'x'"),
        (with_field(7, {"e": EXT}), "metadata.e", "a msgpack extension (type 5)"),
        (with_field(7, {"l": [0, [STAMP]]}), "metadata.l[1][0]", "a msgpack datetime"),
        (
            ["create_session", 9, "u", "a", {"tags": {2: "x"}}, None],
            "metadata.tags",
            "a map key must be a string",
        ),
        (
            with_parts(
                [
                    {
                        "type": "dynamic-tool",
                        "toolName": "t",
                        "toolCallId": "c",
                        "state": "input-available",
                        "input": {"q": {7: 1}},
                    }
                ]
            ),
            "parts[0].input.q",
            "a map key must be a string",
        ),
        (
            with_parts([{"type": "text", "text": "x"}, {"type": "data-x", "data": [EXT]}]),
            "parts[1].data[0]",
            "a msgpack extension",
        ),
        (
            [
                "compact",
                9,
                "s",
                1,
                2,
                [
                    {
                        "role": "system",
                        "kind": "text",
                        "content": "x",
                        "parts": None,
                        "metadata": {"m": {1.5: 0}},
                        "token_count": None,
                    }
                ],
                None,
            ],
            "replacement[0].metadata.m",
            "not float 1.5",
        ),
    ],
)
def test_values_without_a_json_form_are_a_bad_request(body: Any, field: str, says: str) -> None:
    """A non-string map key or a msgpack extension in stored metadata or parts would fail every
    JSON reader of the message forever (the web, the Postgres copy, an agent's webhook): the
    request is refused naming the path, and the connection goes on."""
    server = open_server()
    server.receive_data(raw(body))
    [event] = drain(server)
    assert isinstance(event, BadRequest), event
    assert event.rid == 9 and event.error.details == {"field": field}
    assert event.error.message.startswith(f"{field}: ") and says in event.error.message
    server.receive_data(encode_frame(Ping(10)))
    assert drain(server) == [RequestReceived(Ping(10))]


def test_binary_and_every_json_value_are_kept() -> None:
    server = open_server()
    metadata = {"b": b"\x00", "n": None, "t": True, "i": -(2**63), "f": 0.5, "l": [{"s": "x"}]}
    request = Append(2, "s", "user", "", "text", "hi", metadata, None, None, None)
    server.receive_data(encode_frame(request))
    assert drain(server) == [RequestReceived(request)]


def test_metadata_at_the_depth_limit_is_accepted() -> None:
    server = open_server()
    metadata = {"k": [nested(METADATA_DEPTH_MAX - 2)], "flat": 1}  # 1 + 1 + 30 levels
    request = Append(2, "s", "user", "", "text", "hi", metadata, None, None, None)
    server.receive_data(encode_frame(request))
    assert drain(server) == [RequestReceived(request)]


def test_metadata_under_the_limit_is_accepted() -> None:
    server = open_server()
    request = Append(2, "s", "user", "", "text", "x" * 40_000, {"k": "v" * 1000}, None, None, None)
    server.receive_data(encode_frame(request))
    assert drain(server) == [RequestReceived(request)]


# -- fuzzing ---------------------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(
        ["hello", "append", "read", "ping", "get_session", "mark_read", "s-1", "user"]
    ),
    lambda children: (
        st.lists(children, max_size=12) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=30,
)
bodies = st.one_of(
    st.binary(max_size=64),
    msgpack_values.map(msgspec.msgpack.encode),
    st.lists(msgpack_values, max_size=11).map(
        lambda xs: msgspec.msgpack.encode(["append", 3, *xs])
    ),
    st.sampled_from([*REQUESTS.values(), *EDGE_REQUESTS]).map(msgspec.msgpack.encode),
)
server_bodies = st.one_of(
    bodies,
    st.sampled_from([*RESPONSES.values(), *EDGE_RESPONSES, *PUSHES.values(), *EDGE_PUSHES]).map(
        msgspec.msgpack.encode
    ),
    st.lists(msgpack_values, max_size=5).map(
        lambda xs: msgspec.msgpack.encode(["message_event", 1, *xs])
    ),
)
frames = bodies.map(frame) | st.binary(max_size=16)
FUZZ = settings(
    max_examples=int(os.environ.get("WIRE_FUZZ_EXAMPLES", "300")),  # more for a soak
    suppress_health_check=[HealthCheck.too_slow],
    deadline=None,
)


def serve_everything(server: ServerConnection, events: list[Any]) -> None:
    """Answer like a server would: Welcome the Hello, Pong everything else."""
    for event in events:
        assert isinstance(event, RequestReceived | BadRequest | ProtocolError | ConnectionClosed)
        if isinstance(event, RequestReceived):
            rid = event.request.rid
            if server.state is State.GREETING:
                server.send(welcome(rid))
            else:
                server.send(Pong(rid))


@FUZZ
@given(data=st.binary(max_size=256), hello_first=st.booleans(), cut=st.integers(0, 300))
def test_arbitrary_bytes_only_yield_events(data: bytes, hello_first: bool, cut: int) -> None:
    server = ServerConnection()
    stream = (encode_frame(hello()) if hello_first else b"") + data
    for piece in (stream[:cut], stream[cut:], None):
        server.receive_data(piece)
        for _ in range(100):
            events = drain(server)
            serve_everything(server, events)
            if not events:
                break
    check_output(server)


@FUZZ
@given(parts=st.lists(frames, max_size=8), eof=st.booleans())
def test_arbitrary_frames_after_a_hello_only_yield_events(parts: list[bytes], eof: bool) -> None:
    server = ServerConnection()
    for piece in [encode_frame(hello()), *parts, *([None] if eof else [])]:
        server.receive_data(piece)
        for _ in range(100):
            events = drain(server)
            serve_everything(server, events)
            if not events:
                break
    check_output(server)


def check_output(server: ServerConnection) -> None:
    out = responses(server.data_to_send())  # always whole, decodable frames
    if server.error is not None:
        assert out[-1].rid == 0 and out[-1].code == server.error.code


@FUZZ
@given(parts=st.lists(server_bodies.map(frame) | st.binary(max_size=16), max_size=8))
def test_arbitrary_bytes_to_a_client_only_yield_events(parts: list[bytes]) -> None:
    client = ClientConnection()
    client.send(hello())
    for piece in [encode_frame(welcome()), *parts]:
        client.receive_data(piece)
        for event in drain(client):
            assert isinstance(
                event, ResponseReceived | PushReceived | ProtocolError | ConnectionClosed
            )


# -- pushes and the goodbye ------------------------------------------------------------------------

STREAM_PUSHES: list[Push] = small([*PUSHES.values(), *EDGE_PUSHES])


def interleaved() -> list[Response | Push]:
    """Responses and pushes in a mixed order (a push first and last)."""
    out: list[Response | Push] = []
    pushes = list(STREAM_PUSHES)
    for response in STREAM_RESPONSES:
        if pushes:
            out.append(pushes.pop(0))
        out.append(response)
    return [*out, *pushes]


def test_pushes_and_responses_split_at_every_offset_decode_identically() -> None:
    messages = interleaved()
    data = b"".join(encode_frame(m) for m in messages)
    expected = [
        PushReceived(m) if isinstance(m, PUSH_TYPES) else ResponseReceived(m)  # type: ignore[arg-type]
        for m in messages
    ]
    assert len({type(e) for e in expected}) == 2
    assert feed_in_pieces(open_client(), data, []) == expected
    for cut in range(len(data) + 1):
        assert feed_in_pieces(open_client(), data, [cut]) == expected, cut
    assert feed_in_pieces(open_client(), data, list(range(len(data)))) == expected


def test_a_server_queues_pushes_between_its_answers_without_touching_in_flight() -> None:
    pair = Pair().handshake()
    pair.send(Ping(2), Read(3, "s-1", 0, 10))
    assert (pair.server.in_flight, pair.server.awaits_answer(3)) == (2, True)
    in_flight_bytes = pair.server.in_flight_bytes
    pair.server.send(Subscribed(3, 1, 2))  # (answering a Read: the core does not check kinds)
    event = MessageEvent(1, MESSAGES)
    size = pair.server.push(event)
    assert (
        size
        == len(encode_frame(event))
        == pair.server.bytes_to_send - len(encode_frame(Subscribed(3, 1, 2)))
    )
    assert pair.server.in_flight == 1 and pair.server.in_flight_bytes < in_flight_bytes
    pair.server.push(GapEvent(1, 3, 4, "retention"))
    assert pair.answer(Pong(2)) == [
        ResponseReceived(Subscribed(3, 1, 2)),
        PushReceived(event),
        PushReceived(GapEvent(1, 3, 4, "retention")),
        ResponseReceived(Pong(2)),
    ]
    assert pair.server.in_flight == 0 and pair.server.in_flight_bytes == 0
    assert pair.server.state is State.OPEN and pair.client.state is State.OPEN


def test_a_push_needs_an_open_connection() -> None:
    server = ServerConnection()
    with pytest.raises(LocalProtocolError, match="cannot send MessageEvent in state idle"):
        server.push(MessageEvent(1, []))
    server.receive_data(encode_frame(hello()))
    drain(server)
    with pytest.raises(LocalProtocolError, match="in state greeting"):
        server.push(MessageEvent(1, []))
    assert server.data_to_send() == b""
    server.send(welcome())
    server.data_to_send()
    with pytest.raises(LocalProtocolError, match="sub_id"):
        server.push(MessageEvent(0, []))
    with pytest.raises(LocalProtocolError, match="not a push"):
        server.push(Pong(1))  # type: ignore[arg-type]
    assert server.data_to_send() == b""
    assert server.push(MessageEvent(1, [])) > 0


def test_a_push_over_the_limit_raises_too_large_and_queues_nothing() -> None:
    server = open_server(max_frame_bytes=1024)
    server.push(GapEvent(1, 1, 2, "retention"))
    before = server.bytes_to_send
    big = MessageEvent(1, [msgspec.structs.replace(MESSAGES[0], content="x" * 1000)])
    with pytest.raises(LocalProtocolError) as info:
        server.push(big)
    assert info.value.code == "too_large" and "1024" in info.value.message
    assert server.bytes_to_send == before and server.state is State.OPEN
    fits = MessageEvent(1, [msgspec.structs.replace(MESSAGES[0], content="x" * 900)])
    assert len(encode_frame(fits)) - 4 <= 1024
    server.push(fits)  # the split batch goes
    assert server_messages(server.data_to_send()) == [GapEvent(1, 1, 2, "retention"), fits]


def test_unencodable_pushes_raise_and_queue_nothing() -> None:
    server = open_server()
    bad = MessageEvent(1, [msgspec.structs.replace(MESSAGES[0], metadata={"x": object()})])
    with pytest.raises(LocalProtocolError) as info:
        server.push(bad)
    assert info.value.code == "internal" and server.data_to_send() == b""


def test_a_push_before_the_welcome_breaks_the_client() -> None:
    client = ClientConnection()
    client.send(hello())
    client.receive_data(encode_frame(MessageEvent(1, MESSAGES)) + encode_frame(welcome()))
    [event] = drain(client)
    assert isinstance(event, ProtocolError)
    assert event.code == "internal" and "message_event" in event.message
    assert "greeting" in event.message and client.state is State.MUST_CLOSE
    assert client.next_event() is event


@pytest.mark.parametrize("sub_id", [0, -1, 2**63])
def test_a_push_without_a_valid_sub_id_breaks_the_client(sub_id: int) -> None:
    client = open_client()
    client.receive_data(raw(["gap_event", sub_id, 1, 2, "retention"]))
    [event] = drain(client)
    assert isinstance(event, ProtocolError) and event.code == "internal"


def test_a_server_does_not_take_pushes_from_a_client() -> None:
    server = open_server()
    server.receive_data(raw(["message_event", 9, []]))
    [event] = drain(server)
    assert isinstance(event, BadRequest) and event.error.details == {"field": "type"}


def test_goodbye_is_the_last_word_with_the_codes_retryable() -> None:
    pair = Pair().handshake()
    pair.send(Ping(2), Ping(3))
    pair.server.send(Pong(2))
    pair.server.push(MessageEvent(1, []))
    pair.server.goodbye("unavailable", "node shutting down")
    assert pair.server.state is State.MUST_CLOSE
    assert pair.server.in_flight == 1  # Ping 3 stays unanswered
    pair.server.send(Pong(3))  # discarded from now on
    assert pair.server.push(MessageEvent(1, [])) == 0
    pair.server.goodbye("internal", "twice")  # a no-op
    data = pair.server.data_to_send()
    assert server_messages(data)[-1] == Error(0, "unavailable", "node shutting down", True, {})
    pair.client.receive_data(data)
    assert drain(pair.client) == [
        ResponseReceived(Pong(2)),
        PushReceived(MessageEvent(1, [])),
        ProtocolError("unavailable", "node shutting down", retryable=True),
    ]
    assert pair.client.state is State.MUST_CLOSE


@pytest.mark.parametrize(("code", "retryable"), [("internal", False), ("rate_limited", True)])
@pytest.mark.parametrize("state", [State.IDLE, State.GREETING, State.OPEN])
def test_goodbye_in_any_state(state: State, code: Any, retryable: bool) -> None:
    server = open_server() if state is State.OPEN else ServerConnection()
    if state is State.GREETING:
        server.receive_data(encode_frame(hello()))
        drain(server)
    assert server.state is state
    server.goodbye(code, "bye")
    assert server.state is State.MUST_CLOSE and server.next_event() is None
    assert responses(server.data_to_send()) == [Error(0, code, "bye", retryable, {})]


def test_a_subscription_closed_push_is_an_ordinary_push() -> None:
    client = open_client()
    closed = SubscriptionClosed(4, "slow_consumer", "behind")
    client.receive_data(encode_frame(closed) + encode_frame(Pong(2)))
    assert drain(client) == [PushReceived(closed), ResponseReceived(Pong(2))]


def test_pair_handshake_helper() -> None:
    pair = Pair().handshake()
    assert pair.send(Ping(2)) == [RequestReceived(Ping(2))]
    assert pair.answer(Pong(2)) == [ResponseReceived(Pong(2))]
    assert pair.answer() == []
