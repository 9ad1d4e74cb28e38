"""The commands carried in Raft entries, and the results the state machine returns for them.

Rules of this file:
- One msgspec Struct per command or result, ``array_like`` with a small integer tag (an entry
  is a msgpack array: the tag, then the fields in the order written here), ``frozen``.  Commands
  form the tagged union ``Command``; results the union ``Result``.  Encoders and decoders are
  built once, at import.
- A command holds everything the state machine needs to apply it deterministically on every
  replica: timestamps are read by the proposer and travel inside (``created_at``,
  ``inserted_at``: ms since the Unix epoch).  Input was validated at the wire (wire/protocol.py)
  before it was proposed, so fields here are plain types, and the data they embed are
  ctxstore's own records (ctxstore/records.py), not the client protocol's types: a change to
  the protocol does not change what a Raft entry holds.
- Results travel between nodes when a request was forwarded to the leader.  Domain refusals are
  results (``Rejected``), not exceptions: they are part of the replicated outcome.
- Schema evolution: new fields are appended with defaults; tags and field types never change.
  Every node of a cluster must decode every command it may apply.

Names clash on purpose with wire.protocol's requests (``Append``, ``Appended``...): import this
module, not its names (``from ctxstore import commands`` then ``commands.Append``).
"""

from __future__ import annotations

from typing import Any

import msgspec
import msgspec.msgpack

from wire.protocol import MESSAGE_BYTES_MAX, ErrorCode, Session

from .records import NO_PARTS, AgentRecord, Role, Sender, StoredMessage, WindowConfig

Metadata = dict[str, Any]

ENTRY_FIELDS_BYTES_MAX = 16 * 1024
"""What an ``Append`` command holds besides its message's payload (content, parts and
metadata): ids and ``kind`` (bounded by the wire schema: at most 128 + 4 x 128 + 4 x 64 + 128
bytes), the role, numbers, one token count per part (at most ``PARTS_MAX`` x 5 bytes), the
dedupe fingerprint (18 bytes) and msgpack headers; about 6.3 KiB at most, the rest is
headroom."""
ENTRY_BYTES_MAX = MESSAGE_BYTES_MAX + ENTRY_FIELDS_BYTES_MAX
"""The largest command (Raft entry) a node proposes: ``Router`` refuses a bigger one with
``too_large``.  An ``Append`` whose message is within ``MESSAGE_BYTES_MAX`` fits; so does any
``CreateSession`` (metadata at most ``METADATA_BYTES_MAX``) and ``MarkRead``.  ctxstore/limits.py
checks at start-up that an entry this big fits the peer transport."""


# -- commands (proposed by a leader, applied by every replica) -------------------------------------
class Actor(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Who asked for a command, when the node that took it had a restricted principal (a
    ``user`` or ``agent`` token, ctxstore/auth.py): the state machine refuses it
    (``forbidden``) unless that principal owns the session (``authz.owns``), so the leader
    enforces the rule wherever the request arrived.  None: a service (or auth off)."""

    role: str
    sub: str


class CreateSession(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=1):
    """Create a session; again with the same user and agent it is a no-op (idempotent)."""

    session_id: str
    user_id: str
    agent_id: str
    metadata: Metadata
    created_at: int
    actor: Actor | None = None  # who asked, if restricted (checked on apply)


class Append(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=2):
    """Append one message; the state machine assigns ``seq = last_seq + 1``.  With sender
    ``user`` it also moves the session owner's read cursor to that seq.  ``token_count`` was
    counted by the proposer (ctxstore/tokens.py), ``part_tokens`` per part; ``role`` is set
    (the proposer resolved the sender's default).  Fields after ``inserted_at`` came with
    context windows: an entry written before them is a short-form message, counted as
    ceil(payload bytes / 4) tokens.  ``fingerprint``: the dedupe fingerprint of an append with
    a ``client_msg_id`` (``state.fingerprint`` of its sender, sender_id, kind, content,
    metadata, role and parts), computed once by the proposer from this command's own fields,
    so that no replica decodes the parts again to hash them; None (an entry written before
    it, or no ``client_msg_id``): ``apply`` computes it.  Never taken from a client."""

    session_id: str
    sender: Sender
    sender_id: str
    kind: str
    content: str
    metadata: Metadata
    client_msg_id: str | None
    expected_seq: int | None
    token_count: int | None
    inserted_at: int
    role: Role | None = None
    parts: msgspec.Raw = NO_PARTS  # ctxstore/records.py: raw msgpack, checked by the proposer
    part_tokens: list[int] | None = None  # one per part
    if_version: int | None = None  # the context window's version the append requires
    actor: Actor | None = None  # who asked, if restricted (checked on apply)
    fingerprint: bytes | None = None  # with a client_msg_id: state.fingerprint of the above


class MarkRead(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=3):
    """Move ``user_id``'s read cursor of the session forward to ``seq`` (never back); refused
    (``forbidden``) unless ``user_id`` is the session's user."""

    session_id: str
    user_id: str
    seq: int
    actor: Actor | None = None  # who asked, if restricted (checked on apply)


class SetContextConfig(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=4):
    """Configure a session's context window (its policy applies at once).  ``counts``: the
    proposer's ``(seq, tokens, tokens per part)`` of the hot tail's messages, when this opens
    the window or changes its tokenizer (appends are counted only for windowed sessions)."""

    session_id: str
    config: WindowConfig
    counts: list[tuple[int, int, list[int]]] = []
    actor: Actor | None = None  # who asked, if restricted (checked on apply)


class Compact(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=5):
    """Replace the window's records of ``from_seq..to_seq`` by ``replacement`` (messages with
    seq 0, counted by the proposer: ``token_count`` set, ``part_tokens`` per message)."""

    session_id: str
    from_seq: int
    to_seq: int
    replacement: list[StoredMessage]
    part_tokens: list[list[int]]
    if_version: int | None
    actor: Actor | None = None  # who asked, if restricted (checked on apply)


class PostgresFlushed(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=20):
    """The group's leader copied sessions to Postgres (ctxstore/pg/flusher.py): for each mark
    ``(session_id, seq, index)``, every message up to ``seq``, and the session's row and read
    cursors as of the entry at ``index`` (its latest change when the leader read it).  Marks
    never move back; stale or unknown ones are ignored, and so are all of a command whose
    ``epoch`` (the group's when the leader read it) is older than the group's.  ``reset``
    (``ctxstore db backfill``) makes every session of the group pending from seq 0 and starts
    a new epoch: everything is copied again."""

    marks: list[tuple[str, int, int]]
    epoch: int = 0
    reset: bool = False


# -- agents (tags 30..39; ctxstore/agents/, docs/agents.md) --------------------------------------
class PutAgent(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=30):
    """Register (``create``: refused ``conflict`` if the id is taken) or replace (refused
    ``not_found`` if there is none) an agent; it lives in the group of ``group_of(agent.id)``."""

    agent: AgentRecord
    create: bool


class DisableAgent(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=31):
    agent_id: str


class DispatchBegin(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=32):
    """The group leader starts call ``attempt`` of the session's agent for the user messages
    up to ``trigger_seq``: the session's in-flight marker.  Refused (``conflict``) when the
    session's cursor is already at or past ``trigger_seq``, when ``trigger_seq`` is not a user
    message's seq it knows, or when the marker holds this attempt or a later one of it."""

    session_id: str
    trigger_seq: int
    attempt: int
    started_at: int


class DispatchEnd(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=33):
    """Store the outcome of call ``attempt`` (the assembled reply, or a ``system`` message
    saying the dispatch was dropped) and move the cursor to ``trigger_seq``.  Applied only while
    the in-flight marker is exactly (``trigger_seq``, ``attempt``): a deposed leader's late
    outcome, or a second one, is refused (``conflict``) and stores nothing."""

    session_id: str
    trigger_seq: int
    attempt: int
    append: Append


class AppendBatch(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=10):
    """The appends a group's leader took within one loop pass, in one entry
    (ctxstore/router.py): applied in order exactly as if each were its own entry (its own
    seq, dedupe and result); the entry's result is the list of their results.  Written only by
    the router, which never puts one over ``ENTRY_BYTES_MAX`` in it (``encode_append_batch``)."""

    appends: list[Append]


class _AppendBatchOut(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=10):
    """``AppendBatch``'s bytes from already encoded ``Append`` commands (no decode, no
    re-encode: each is copied as it is)."""

    appends: list[msgspec.Raw]


Command = (
    CreateSession | Append | MarkRead | SetContextConfig | Compact | PostgresFlushed
    | PutAgent | DisableAgent | DispatchBegin | DispatchEnd | AppendBatch
)  # fmt: skip


# -- results (one per applied command) -------------------------------------------------------------
class SessionCreated(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=1):
    """``created`` is false when the session already existed with the same user and agent."""

    session: Session
    created: bool


class Appended(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=2):
    """``deduped``: a retry of a recent append (same ``client_msg_id``, same content)."""

    seq: int
    inserted_at: int
    deduped: bool


class ReadMarked(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=3):
    seq: int  # the cursor after the command


class Rejected(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=4):
    """A domain refusal; the state did not change.  ``code`` is the client-facing error code."""

    code: ErrorCode
    message: str
    details: dict[str, Any]


class ContextChanged(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=5):
    """The window after a ``SetContextConfig`` or ``Compact``."""

    version: int
    token_count: int
    needs_compaction: bool
    window_first_seq: int


class PostgresMarked(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=20):
    clean: int  # sessions of the command now entirely in Postgres


class AgentSaved(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=30):
    agent: AgentRecord


class DispatchBegun(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=31):
    trigger_seq: int
    attempt: int


Result = (
    SessionCreated | Appended | ReadMarked | Rejected | ContextChanged | PostgresMarked
    | AgentSaved | DispatchBegun
)  # fmt: skip


# -- codecs ----------------------------------------------------------------------------------------
_encoder = msgspec.msgpack.Encoder()
_command_decoder: msgspec.msgpack.Decoder[Command] = msgspec.msgpack.Decoder(Command)
_result_decoder: msgspec.msgpack.Decoder[Result] = msgspec.msgpack.Decoder(Result)


def encode_command(cmd: Command) -> bytes:
    return _encoder.encode(cmd)


APPEND_BATCH_OVERHEAD_BYTES = 8
"""What an ``AppendBatch`` entry holds besides its appends' bytes (array headers and tag)."""


def encode_append_batch(appends: list[bytes]) -> bytes:
    """An ``AppendBatch`` of encoded ``Append`` commands (``encode_command``'s bytes): its size
    is the sum of theirs plus at most ``APPEND_BATCH_OVERHEAD_BYTES``."""
    return _encoder.encode(_AppendBatchOut([msgspec.Raw(a) for a in appends]))


def decode_command(data: bytes) -> Command:
    """Raises ``msgspec.DecodeError`` (or its subclass ``ValidationError``) on bad data."""
    return _command_decoder.decode(data)


def encode_result(result: Result) -> bytes:
    return _encoder.encode(result)


def decode_result(data: bytes) -> Result:
    """Raises ``msgspec.DecodeError`` (or its subclass ``ValidationError``) on bad data."""
    return _result_decoder.decode(data)


__all__ = [
    "APPEND_BATCH_OVERHEAD_BYTES",
    "ENTRY_BYTES_MAX",
    "ENTRY_FIELDS_BYTES_MAX",
    "Actor",
    "AgentSaved",
    "Append",
    "AppendBatch",
    "Appended",
    "Command",
    "Compact",
    "ContextChanged",
    "CreateSession",
    "DisableAgent",
    "DispatchBegin",
    "DispatchBegun",
    "DispatchEnd",
    "MarkRead",
    "PostgresFlushed",
    "PostgresMarked",
    "PutAgent",
    "ReadMarked",
    "Rejected",
    "Result",
    "SessionCreated",
    "SetContextConfig",
    "decode_command",
    "decode_result",
    "encode_append_batch",
    "encode_command",
    "encode_result",
]
