"""ctxstore's own records of what it replicates and stores, apart from the client protocol.

Rules of this file:
- These Structs are what commands (ctxstore/commands.py), snapshots (ctxstore/state_schema.py)
  and archive rows (ctxstore/archive.py) hold; the client protocol's types (wire/protocol.py)
  are converted to and from them only where requests come in and answers go out (the server,
  the web gateways, subscriptions' pushes).  A change to the wire protocol does not change
  what is on disk; tests/ctxstore/test_disk_format.py pins the bytes.
- Each record encodes exactly as the wire type it mirrors did when it was first written
  (the same fields in the same order, ``array_like`` or a map alike), so data written before
  these records existed reads back unchanged.  Schema evolution as in commands.py: fields are
  appended with defaults; tags and field types never change.
- Input was validated at the boundary (the wire schema, wire/parts.py), so fields here are
  plain types: no ``Meta`` limits, no patterns.
- A message's ``parts`` are raw msgpack (``msgspec.Raw``): the list of part maps as the
  leader encoded it once, after checking it.  Replicas store, archive and serve those bytes
  without decoding them; only views that need the parts' contents (a window's part types,
  ``skip_parts``, JSON clients, previews) decode them.  ``NO_PARTS`` (msgpack nil) stands for
  the short form (``content`` is the message), since msgspec cannot put ``Raw`` in a union.
- Records are not tracked by the garbage collector (``gc=False``): they hold no cycles and a
  node keeps many of them.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import msgspec.msgpack

from wire import protocol as wire

Metadata = dict[str, Any]
Sender = Literal["user", "agent", "system"]
Role = Literal["user", "assistant", "system", "tool"]

NO_PARTS = msgspec.Raw(b"\xc0")
"""``StoredMessage.parts`` of a short-form message (msgpack nil, as ``None`` was written)."""

_encoder = msgspec.msgpack.Encoder()
_parts_decoder: msgspec.msgpack.Decoder[list[dict[str, Any]]] = msgspec.msgpack.Decoder(
    list[dict[str, Any]]
)


class _PartType(msgspec.Struct, gc=False):
    type: str  # every other key of the part is skipped, not decoded


_types_decoder: msgspec.msgpack.Decoder[list[_PartType]] = msgspec.msgpack.Decoder(list[_PartType])


class StoredMessage(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One message of a session, as the state machine's hot tail, snapshots, the window's
    compaction records and the archive hold it (wire ``Message``'s layout)."""

    session_id: str
    seq: int
    sender: Sender
    sender_id: str
    kind: str
    content: str
    metadata: Metadata
    client_msg_id: str | None
    inserted_at: int
    token_count: int | None
    role: Role | None = None  # None only for messages stored before roles existed
    parts: msgspec.Raw = NO_PARTS  # raw msgpack list of part maps; NO_PARTS: the short form


# -- context windows -------------------------------------------------------------------------------
class LastN(msgspec.Struct, tag="last_n", frozen=True):
    limit: int


class SkipParts(msgspec.Struct, tag="skip_parts", frozen=True):
    types: list[str]
    limit: int | None = None


class TokenBudget(msgspec.Struct, tag="token_budget", frozen=True):
    pass


class Manual(msgspec.Struct, tag="manual", frozen=True):
    pass


Policy = LastN | SkipParts | TokenBudget | Manual


class WindowConfig(msgspec.Struct, array_like=True, frozen=True):
    """A session's context-window configuration (wire ``ContextConfig``'s layout)."""

    token_budget: int
    trigger_ratio: float
    policy: Policy
    tokenizer: str


# -- agents ----------------------------------------------------------------------------------------
class AgentRecord(msgspec.Struct, frozen=True, gc=False):
    """A registered agent (wire ``Agent``'s layout: a map)."""

    id: str
    url: str
    headers: dict[str, str]
    timeout_ms: int
    idle_timeout_ms: int
    debounce_ms: int
    history: str
    max_attempts: int
    status: Literal["active", "disabled"]
    protocol: Literal["auto", "h1", "h2"]


# -- parts -----------------------------------------------------------------------------------------
def encode_parts(parts: list[dict[str, Any]] | None) -> msgspec.Raw:
    """The stored form of checked parts (wire/parts.py ``check_parts``)."""
    return NO_PARTS if parts is None else msgspec.Raw(_encoder.encode(parts))


def decode_parts(raw: msgspec.Raw) -> list[dict[str, Any]] | None:
    return None if raw == NO_PARTS else _parts_decoder.decode(raw)


def part_types(raw: msgspec.Raw) -> list[str]:
    """The ``type`` of each part, without decoding the rest of them."""
    return [] if raw == NO_PARTS else [p.type for p in _types_decoder.decode(raw)]


# -- conversions at the boundary -------------------------------------------------------------------
def message_to_wire(m: StoredMessage) -> wire.Message:
    return wire.Message(
        m.session_id, m.seq, m.sender, m.sender_id, m.kind, m.content, m.metadata,
        m.client_msg_id, m.inserted_at, m.token_count, m.role, decode_parts(m.parts),
    )  # fmt: skip


def messages_to_wire(messages: list[StoredMessage]) -> list[wire.Message]:
    return [message_to_wire(m) for m in messages]


def message_from_wire(m: wire.Message) -> StoredMessage:
    return StoredMessage(
        m.session_id, m.seq, m.sender, m.sender_id, m.kind, m.content, m.metadata,
        m.client_msg_id, m.inserted_at, m.token_count, m.role, encode_parts(m.parts),
    )  # fmt: skip


def policy_from_wire(p: wire.Policy) -> Policy:
    match p:
        case wire.LastN():
            return LastN(p.limit)
        case wire.SkipParts():
            return SkipParts(list(p.types), p.limit)
        case wire.TokenBudget():
            return TokenBudget()
        case wire.Manual():
            return Manual()


def policy_to_wire(p: Policy) -> wire.Policy:
    match p:
        case LastN():
            return wire.LastN(p.limit)
        case SkipParts():
            return wire.SkipParts(list(p.types), p.limit)
        case TokenBudget():
            return wire.TokenBudget()
        case Manual():
            return wire.Manual()


def config_to_wire(c: WindowConfig) -> wire.ContextConfig:
    return wire.ContextConfig(
        c.token_budget,
        c.trigger_ratio,
        policy_to_wire(c.policy),
        c.tokenizer,  # type: ignore[arg-type]  # one of wire.Tokenizer when it was configured
    )


def agent_from_wire(a: wire.Agent) -> AgentRecord:
    return AgentRecord(
        a.id, a.url, dict(a.headers), a.timeout_ms, a.idle_timeout_ms, a.debounce_ms,
        a.history, a.max_attempts, a.status, a.protocol,
    )  # fmt: skip


def agent_to_wire(a: AgentRecord) -> wire.Agent:
    return wire.Agent(
        a.id, a.url, dict(a.headers), a.timeout_ms, a.idle_timeout_ms, a.debounce_ms,
        a.history, a.max_attempts, a.status, a.protocol,
    )  # fmt: skip


__all__ = [
    "NO_PARTS",
    "AgentRecord",
    "LastN",
    "Manual",
    "Policy",
    "SkipParts",
    "StoredMessage",
    "TokenBudget",
    "WindowConfig",
    "agent_from_wire",
    "agent_to_wire",
    "config_to_wire",
    "decode_parts",
    "encode_parts",
    "message_from_wire",
    "message_to_wire",
    "messages_to_wire",
    "part_types",
    "policy_from_wire",
    "policy_to_wire",
]
