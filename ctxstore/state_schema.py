"""The msgspec types of ``ctxstore.state``: its query results and its snapshot schema.

They live apart from ``state`` because that module is compiled with mypyc (setup.py), and a
Struct class compiled by mypyc is another schema: its annotations are erased (``list``, not
``list[SessionSnap]``) and its class keywords dropped (no ``array_like``), so msgspec would
encode snapshots and results as maps and decode a snapshot's sessions as plain dicts.  Struct
classes therefore stay in interpreted modules (as ``raft.messages`` does for the Raft core)."""

from __future__ import annotations

from typing import Any

import msgspec

from .records import AgentRecord, StoredMessage, WindowConfig


class ReadResult(msgspec.Struct, array_like=True, frozen=True):
    messages: list[StoredMessage]  # seq > after_seq, oldest first, from the hot tail
    last_seq: int
    first_seq: int  # oldest seq in the hot tail (last_seq + 1 when it is empty)


# -- snapshot schema (version first; fields only appended, with defaults) -------------------------
class SessionSnap(msgspec.Struct, array_like=True, gc=False):
    id: str
    user_id: str
    agent_id: str
    created_at: int
    metadata: dict[str, Any]
    last_seq: int
    tail: list[StoredMessage]
    dedupe: dict[str, tuple[int, int, bytes]]  # oldest first
    cursors: dict[str, int]  # insertion order
    window: WindowSnap | None = None  # None: taken before context windows (an empty window)
    # agents' dispatch: [dispatched_seq, last_user_seq, in-flight trigger seq, attempt] (0, 0:
    # none in flight); empty: taken before agents (nothing dispatched, no user seq known)
    dispatch: list[int] = []


class RecordSnap(msgspec.Struct, array_like=True, gc=False):
    """One record of a context window (ctxstore/window.py)."""

    first_seq: int
    last_seq: int
    role: str
    tokens: int
    part_tokens: list[tuple[str, int]] | None
    size: int
    message: StoredMessage | None  # a compaction's replacement message


class WindowSnap(msgspec.Struct, array_like=True, gc=False):
    config: WindowConfig | None
    version: int
    needs_compaction: bool
    records: list[RecordSnap]


class GroupSnap(msgspec.Struct, array_like=True, gc=False):
    version: int
    sessions: list[SessionSnap]  # creation order
    evictable: list[str] = []  # sessions whose tail may shrink, least recently appended first
    # Sessions not yet entirely in Postgres (ConversationState, "Postgres watermarks"):
    # (session_id, changed_index, flushed_seq, flushed_index, reset_seq), oldest change first.
    postgres: list[tuple[str, int, int, int, int]] = []
    postgres_epoch: int = 0  # index of the group's last PostgresFlushed(reset=True)
    agents: list[AgentRecord] = []  # the agents registered in this group, by id
