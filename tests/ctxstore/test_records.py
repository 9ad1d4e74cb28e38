"""ctxstore/records.py: the conversions at the boundary keep every field, and raw parts are the
bytes the parts encode to."""

from __future__ import annotations

from typing import Any

import msgspec
import msgspec.msgpack

from ctxstore import records
from wire import protocol as wire

PARTS: list[dict[str, Any]] = [
    {"type": "reasoning", "text": "think"},
    {"type": "tool-x", "toolCallId": "c", "state": "input-available", "input": {"q": [1, 2]}},
    {"type": "text", "text": "hi"},
]


def _message(parts: list[dict[str, Any]] | None) -> wire.Message:
    return wire.Message("s-1", 4, "agent", "a-1", "text", "" if parts else "short", {"k": 1},
                        "m-1", 1_700_000_000_000, 12, "assistant", parts)  # fmt: skip


def test_a_message_converts_both_ways_unchanged() -> None:
    for parts in (PARTS, None):
        m = _message(parts)
        stored = records.message_from_wire(m)
        assert records.message_to_wire(stored) == m
        assert records.messages_to_wire([stored, stored]) == [m, m]


def test_a_stored_message_encodes_as_the_wire_message_it_mirrors() -> None:
    """The archive and snapshots hold what the wire type wrote before records existed."""
    enc = msgspec.msgpack.Encoder()
    for parts in (PARTS, None):
        m = _message(parts)
        data = enc.encode(records.message_from_wire(m))
        assert data == enc.encode(m)
        assert msgspec.msgpack.decode(data, type=records.StoredMessage).parts == (
            records.encode_parts(parts)
        )


def test_parts_are_raw_msgpack_of_the_checked_list() -> None:
    raw = records.encode_parts(PARTS)
    assert bytes(raw) == msgspec.msgpack.encode(PARTS)  # the client's key order kept
    assert records.decode_parts(raw) == PARTS
    assert records.part_types(raw) == ["reasoning", "tool-x", "text"]
    assert records.encode_parts(None) == records.NO_PARTS
    assert records.decode_parts(records.NO_PARTS) is None
    assert records.part_types(records.NO_PARTS) == []
    assert bytes(records.NO_PARTS) == msgspec.msgpack.encode(None)


def test_every_policy_converts_both_ways() -> None:
    policies: list[wire.Policy] = [
        wire.LastN(5), wire.SkipParts(["tool-", "reasoning"], 9), wire.SkipParts(["tool-"]),
        wire.TokenBudget(), wire.Manual(),
    ]  # fmt: skip
    for p in policies:
        assert records.policy_to_wire(records.policy_from_wire(p)) == p
    config = records.WindowConfig(4000, 0.5, records.policy_from_wire(wire.LastN(3)), "cl100k_base")
    assert records.config_to_wire(config) == wire.ContextConfig(
        4000, 0.5, wire.LastN(3), "cl100k_base"
    )


def test_an_agent_converts_both_ways_and_encodes_alike() -> None:
    agent = wire.Agent("bot", "https://agent.example/hook", {"x-key": "v"}, 60_000, 10_000, 500,
                       "tail 20", 5, "active", "h2")  # fmt: skip
    record = records.agent_from_wire(agent)
    assert records.agent_to_wire(record) == agent
    assert msgspec.msgpack.encode(record) == msgspec.msgpack.encode(agent)
