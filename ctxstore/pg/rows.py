"""Sessions, messages, read cursors and agents as Postgres rows (the columns of ``schema``), and
back.

An agent's row holds the *names* of its request headers, never their values: headers typically
carry credentials (``Authorization: Bearer ...``), and no secret is copied into Postgres.

PostgreSQL's ``text`` and ``jsonb`` cannot hold the NUL character (U+0000), which a message may
contain: it is stored as U+FFFD (the replacement character).  Everything else round-trips:
timestamps (ms since the epoch) as ``timestamptz``, metadata as ``jsonb`` (msgpack binary
values as base64 strings, as msgspec's JSON encoder writes them).

Timestamps cross asyncpg as integers, not ``datetime``: a connection that writes rows is given
``use_millis`` (a ``timestamptz`` codec from and to ms since the epoch), which spares building
a ``datetime`` per row (about a sixth of the flusher's CPU per row); ``MESSAGE_SELECT`` reads
``inserted_at`` as ms in SQL, so reading needs no codec.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec

from wire.protocol import Session
from wire.web_codec import json_stand_in

from ..records import NO_PARTS, AgentRecord, StoredMessage, decode_parts, encode_parts

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
NUL, REPLACEMENT = "\x00", "\ufffd"

MESSAGE_COLUMNS = (
    "session_id", "seq", "sender", "sender_id", "kind", "content", "metadata", "client_msg_id",
    "inserted_at", "token_count", "role", "parts",
)  # fmt: skip
# The message columns to SELECT for ``message_from_row`` (jsonb as text: msgspec decodes it;
# the time as ms since the epoch: exact, the column holds whole milliseconds).
_SELECT_AS = {
    "metadata": "metadata::text",
    "parts": "parts::text",
    "inserted_at": "(extract(epoch FROM inserted_at) * 1000)::bigint AS inserted_at",
}
MESSAGE_SELECT = ", ".join(_SELECT_AS.get(c, c) for c in MESSAGE_COLUMNS)
SESSION_COLUMNS = ("id", "user_id", "agent_id", "created_at", "metadata", "last_seq")
CURSOR_COLUMNS = ("session_id", "user_id", "last_read_seq")
# (and updated_at, the database's now() when the row is written: the table's default)
AGENT_COLUMNS = (
    "id", "url", "header_names", "timeout_ms", "idle_timeout_ms", "debounce_ms", "history",
    "max_attempts", "status", "protocol", "source_index",
)  # fmt: skip

# The web's stand-in for a msgpack extension stored before the boundary refused them
# (wire/framing.py ``value_fault``):
_encode_json = msgspec.json.Encoder(enc_hook=json_stand_in).encode
_JSON_NUL = b"\\u0000"
_decode_metadata = msgspec.json.Decoder(dict[str, Any]).decode
_decode_parts = msgspec.json.Decoder(list[dict[str, Any]]).decode


def timestamp(ms: int) -> dt.datetime:
    return EPOCH + dt.timedelta(0, 0, ms * 1000)  # (microseconds: integers, faster than ms=)


# PostgreSQL's binary timestamps count microseconds from 2000-01-01 UTC.
_PG_EPOCH_MS = 946_684_800_000


def _encode_millis(ms: int) -> tuple[int]:
    return ((ms - _PG_EPOCH_MS) * 1000,)


def _decode_millis(value: tuple[int]) -> int:
    return value[0] // 1000 + _PG_EPOCH_MS


async def use_millis(conn: Any) -> None:
    """Make ``conn`` take and give ``timestamptz`` values as ms since the epoch (ints)."""
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=_encode_millis,
        decoder=_decode_millis,
        format="tuple",
    )


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
    data: bytes | None
    try:
        data = _encode_json(value)
    except TypeError:  # a key JSON has no form for (stored before it was refused): as a string
        data = None
    if data is None or _JSON_NUL in data:  # or a NUL somewhere in a string: rewrite
        data = _encode_json(_scrub(value))
    return data.decode()


def stored_metadata(value: dict[str, Any]) -> dict[str, Any]:
    """``value`` as it reads back from Postgres (through JSON, NUL replaced)."""
    return _decode_metadata(json_text(value))


def message_record(m: StoredMessage) -> tuple[Any, ...]:
    """A ``messages`` row (for a connection with ``use_millis``)."""
    return (
        m.session_id,
        m.seq,
        m.sender,
        text(m.sender_id),
        text(m.kind),
        text(m.content),
        json_text(m.metadata) if m.metadata else "{}",  # (most messages have none)
        None if m.client_msg_id is None else text(m.client_msg_id),
        m.inserted_at,  # (ms: ``use_millis``)
        m.token_count,
        m.role,
        None if (parts := decode_parts(m.parts)) is None else json_text(parts),
    )


def session_record(s: Session) -> tuple[Any, ...]:
    """A ``sessions`` row (for a connection with ``use_millis``)."""
    return (s.id, s.user_id, s.agent_id, s.created_at, json_text(s.metadata), s.last_seq)


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
        row[8],
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
    "use_millis",
]
