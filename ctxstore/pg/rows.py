"""Sessions, messages, read cursors and agents as Postgres rows (the columns of ``schema``), and
back.

An agent's row holds the *names* of its request headers, never their values: headers typically
carry credentials (``Authorization: Bearer ...``), and no secret is copied into Postgres.

PostgreSQL's ``text`` and ``jsonb`` cannot hold the NUL character (U+0000), which a message may
contain: it is stored as U+FFFD (the replacement character).  Everything else round-trips:
timestamps (ms since the epoch) as ``timestamptz``, metadata as ``jsonb`` (msgpack binary
values as base64 strings, as msgspec's JSON encoder writes them).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec

from wire.protocol import Session

from ..records import NO_PARTS, AgentRecord, StoredMessage, decode_parts, encode_parts

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
NUL, REPLACEMENT = "\x00", "\ufffd"

MESSAGE_COLUMNS = (
    "session_id", "seq", "sender", "sender_id", "kind", "content", "metadata", "client_msg_id",
    "inserted_at", "token_count", "role", "parts",
)  # fmt: skip
# The message columns to SELECT for ``message_from_row`` (jsonb as text: msgspec decodes it).
MESSAGE_SELECT = ", ".join(
    f"{c}::text" if c in ("metadata", "parts") else c for c in MESSAGE_COLUMNS
)
SESSION_COLUMNS = ("id", "user_id", "agent_id", "created_at", "metadata", "last_seq")
CURSOR_COLUMNS = ("session_id", "user_id", "last_read_seq")
# (and updated_at, the database's now() when the row is written: the table's default)
AGENT_COLUMNS = (
    "id", "url", "header_names", "timeout_ms", "idle_timeout_ms", "debounce_ms", "history",
    "max_attempts", "status", "protocol", "source_index",
)  # fmt: skip

_encode_json = msgspec.json.Encoder().encode
_JSON_NUL = b"\\u0000"
_decode_metadata = msgspec.json.Decoder(dict[str, Any]).decode
_decode_parts = msgspec.json.Decoder(list[dict[str, Any]]).decode


def timestamp(ms: int) -> dt.datetime:
    return EPOCH + dt.timedelta(0, 0, ms * 1000)  # (microseconds: integers, faster than ms=)


def millis(t: dt.datetime) -> int:
    delta = t - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def text(value: str) -> str:
    return value.replace(NUL, REPLACEMENT) if NUL in value else value


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return text(value)
    if isinstance(value, dict):
        return {text(str(k)): _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_scrub(v) for v in value]
    return value


def json_text(value: Any) -> str:
    data = _encode_json(value)
    if _JSON_NUL in data:  # a NUL somewhere in a string (or a literal "\u0000"): rewrite
        data = _encode_json(_scrub(value))
    return data.decode()


def stored_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` as it reads back from Postgres (through JSON, NUL replaced)."""
    return _decode_metadata(json_text(value))


def message_record(m: StoredMessage) -> tuple[Any, ...]:
    return (
        m.session_id,
        m.seq,
        m.sender,
        text(m.sender_id),
        text(m.kind),
        text(m.content),
        json_text(m.metadata) if m.metadata else "{}",  # (most messages have none)
        None if m.client_msg_id is None else text(m.client_msg_id),
        timestamp(m.inserted_at),
        m.token_count,
        m.role,
        None if (parts := decode_parts(m.parts)) is None else json_text(parts),
    )


def session_record(s: Session) -> tuple[Any, ...]:
    return (s.id, s.user_id, s.agent_id, timestamp(s.created_at), json_text(s.metadata), s.last_seq)


def cursor_records(session_id: str, cursors: dict[str, int]) -> list[tuple[Any, ...]]:
    return [(session_id, user_id, seq) for user_id, seq in cursors.items()]


def agent_record(a: AgentRecord, source_index: int) -> tuple[Any, ...]:
    """``a`` as read at the group's applied raft index ``source_index``: its header names
    (sorted), not their values.  (Ids, URLs and header names are checked at the boundary: no
    NUL.)"""
    return (
        a.id, a.url, sorted(a.headers), a.timeout_ms, a.idle_timeout_ms, a.debounce_ms, a.history,
        a.max_attempts, a.status, a.protocol, source_index,
    )  # fmt: skip


def message_from_row(row: Any) -> StoredMessage:
    """A ``messages`` row (selected with ``MESSAGE_SELECT``) as a StoredMessage."""
    return StoredMessage(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        _decode_metadata(row[6]),
        row[7],
        millis(row[8]),
        row[9],
        row[10],
        NO_PARTS if row[11] is None else encode_parts(_decode_parts(row[11])),
    )


__all__ = [
    "AGENT_COLUMNS",
    "CURSOR_COLUMNS",
    "MESSAGE_COLUMNS",
    "MESSAGE_SELECT",
    "SESSION_COLUMNS",
    "agent_record",
    "cursor_records",
    "json_text",
    "message_from_row",
    "message_record",
    "millis",
    "session_record",
    "stored_metadata",
    "text",
    "timestamp",
]
