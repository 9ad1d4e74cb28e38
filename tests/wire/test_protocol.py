"""The messages of ``wire.protocol``: every type round-trips (requests through a server
connection, responses and pushes through a client connection), and golden vectors pin the exact
bytes of each one.

Golden vectors live in ``golden/<tag>.hex`` (comment lines start with ``#``; the rest is the
frame in hex: the 4-byte length, then the msgpack body).  After a deliberate change to the
encoding, regenerate them and review the diff:

    REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/wire/test_protocol.py
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import msgspec
import pytest

from wire.framing import (
    SUPPORTED_VERSIONS,
    ClientConnection,
    PushReceived,
    ServerConnection,
    encode_frame,
)
from wire.protocol import Hello, Push, Request, Response, Welcome

from .helpers import drain, hello, open_client, open_server
from .samples import (
    EDGE_PUSHES,
    EDGE_REQUESTS,
    EDGE_RESPONSES,
    PUSHES,
    REQUESTS,
    RESPONSES,
    SAMPLES,
    union_types,
)

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("REGEN_GOLDEN") == "1"
request_decoder = msgspec.msgpack.Decoder(Request)
response_decoder = msgspec.msgpack.Decoder(Response)
push_decoder = msgspec.msgpack.Decoder(Push)


def tag_of(message: Request | Response | Push) -> str:
    return str(type(message).__struct_config__.tag)


def test_samples_cover_every_message_type() -> None:
    assert {type(m) for m in REQUESTS.values()} == set(union_types(Request))
    assert {type(m) for m in RESPONSES.values()} == set(union_types(Response))
    assert {type(m) for m in PUSHES.values()} == set(union_types(Push))
    assert all(tag_of(m) == tag for tag, m in SAMPLES.items())


def test_tags_are_unique_across_requests_responses_and_pushes() -> None:
    types = [*union_types(Request), *union_types(Response), *union_types(Push)]
    tags = [t.__struct_config__.tag for t in types]
    assert len(tags) == len(set(tags))
    assert all(isinstance(tag, str) and 0 < len(tag) <= 32 for tag in tags)


def test_every_push_carries_its_sub_id_first() -> None:
    for push_type in union_types(Push):
        assert push_type.__struct_fields__[0] == "sub_id"
        assert push_type.__struct_config__.array_like
    for message_type in [*union_types(Request), *union_types(Response)]:
        assert message_type.__struct_fields__[0] == "rid"


@pytest.mark.parametrize("message", [*REQUESTS.values(), *EDGE_REQUESTS], ids=repr)
def test_request_round_trips(message: Request) -> None:
    data = msgspec.msgpack.encode(message)
    assert request_decoder.decode(data) == message
    if isinstance(message, Hello) and message.protocol_version not in SUPPORTED_VERSIONS:
        return  # refused by the connection: covered in test_framing
    server = ServerConnection() if isinstance(message, Hello) else open_server()
    server.receive_data(encode_frame(message))
    [event] = drain(server)
    assert event.request == message


@pytest.mark.parametrize("message", [*RESPONSES.values(), *EDGE_RESPONSES], ids=repr)
def test_response_round_trips(message: Response) -> None:
    data = msgspec.msgpack.encode(message)
    assert response_decoder.decode(data) == message
    if message.rid == 0:
        return  # an Error with rid 0 closes the connection: covered in test_framing
    if isinstance(message, Welcome):
        client = ClientConnection()
        client.send(hello(message.rid))
    else:
        client = open_client()
    client.receive_data(encode_frame(message))
    [event] = drain(client)
    assert event.response == message


@pytest.mark.parametrize("message", [*PUSHES.values(), *EDGE_PUSHES], ids=repr)
def test_push_round_trips(message: Push) -> None:
    data = msgspec.msgpack.encode(message)
    assert push_decoder.decode(data) == message
    server = open_server()
    assert server.push(message) == len(encode_frame(message))
    client = open_client()
    client.receive_data(server.data_to_send())
    assert drain(client) == [PushReceived(message)]


def test_messages_are_arrays_with_the_tag_first() -> None:
    for tag, message in SAMPLES.items():
        value = msgspec.msgpack.decode(msgspec.msgpack.encode(message))
        assert value[0] == tag
        assert len(value) == 1 + len(type(message).__struct_fields__)


# -- golden vectors --------------------------------------------------------------------------------


def render(tag: str, message: Request | Response | Push) -> str:
    data = encode_frame(message)
    body = data[4:].hex()
    rows = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join(
        [
            f"# {tag}: {message!r}",
            f"# {len(data) - 4} bytes: the length prefix, then the msgpack body",
            data[:4].hex(),
            *rows,
            "",
        ]
    )


def parse(text: str) -> bytes:
    return bytes.fromhex("".join(line for line in text.splitlines() if not line.startswith("#")))


@pytest.mark.parametrize("tag", sorted(SAMPLES))
def test_golden_vector(tag: str) -> None:
    message = SAMPLES[tag]
    path = GOLDEN / f"{tag}.hex"
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(render(tag, message))
    assert path.exists(), f"no golden vector {path.name}: run with REGEN_GOLDEN=1"
    golden = parse(path.read_text())
    assert encode_frame(message) == golden, f"encoding of {tag} changed (REGEN_GOLDEN=1 to accept)"
    (length,) = struct.unpack(">I", golden[:4])
    assert length == len(golden) - 4
    decoder = (
        request_decoder
        if tag in REQUESTS
        else response_decoder
        if tag in RESPONSES
        else push_decoder
    )
    assert decoder.decode(golden[4:]) == message


def test_no_stray_golden_vectors() -> None:
    assert {p.stem for p in GOLDEN.glob("*.hex")} == set(SAMPLES)


def code_blocks_as_bytes(markdown: str) -> list[bytes]:
    """Each fenced block of hex lines (``aa bb  annotation``) as the bytes it spells."""
    blocks: list[bytes] = []
    for block in markdown.split("```")[1::2]:
        tokens: list[str] = []
        for line in block.splitlines():
            for token in line.split():
                if len(token) != 2 or any(c not in "0123456789abcdef" for c in token):
                    break
                tokens.append(token)
        blocks.append(bytes.fromhex("".join(tokens)))
    return blocks


DOC_EXAMPLES = [
    *["hello", "welcome", "append", "appended"],
    *["subscribe", "subscribed", "message_event", "gap_event", "subscription_closed"],
    "inbox_snapshot",
]


@pytest.mark.parametrize("tag", DOC_EXAMPLES)
def test_the_worked_example_in_the_docs_matches_the_golden_vectors(tag: str) -> None:
    doc = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
    assert encode_frame(SAMPLES[tag]) in code_blocks_as_bytes(doc)
