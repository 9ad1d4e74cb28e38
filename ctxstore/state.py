"""The replicated conversation state of a node: the Raft ``StateMachine`` of its data groups.

Every replica applies the same committed entries (``ctxstore.commands``) in the same order and
reaches the same state, so this module is pure and deterministic: no clock (timestamps travel in
commands), no I/O, no randomness, no iteration over unordered containers whose order could
differ between replicas.  Queries read the node's *applied* state (no linearizability here;
the server decides when a read may be served).

Per group, sessions by id.  A session id lives in one group: given the cluster's group count,
a create in another group than ``placement.group_of(id)`` is refused (``bad_request``).  Per
session:
- ``last_seq``; an append gets ``seq = last_seq + 1`` and the ``inserted_at`` of its command;
- the **dedupe window**: the ``client_msg_id``s of the last ``dedupe_ids_max`` appends that had
  one, each with (seq, inserted_at, fingerprint of sender, sender_id, kind, content, metadata,
  and role and parts for a structured message: ``fingerprint``, carried in the command).
  A retry with the same content gets the original answer (``deduped``); with other content,
  ``conflict`` naming the original seq.  Limit: an id evicted from the window (more than
  ``dedupe_ids_max`` newer ids since) is not recognised; appending it again adds a new message;
- the **hot tail**: the newest messages, at most ``tail_messages_max`` and ``tail_bytes_max``
  bytes of payload (UTF-8 content + msgpack metadata), oldest evicted first; the newest message
  always stays, so the payload bound is ``tail_bytes_max`` + one message.  Besides, all tails
  of a group share ``group_tail_bytes_max`` (payload + ``MESSAGE_OVERHEAD_BYTES`` per
  message): above it the tail of the session appended to least recently is trimmed to its
  newest message, then the next (the order is part of the snapshot, so every replica trims
  the same tails).  Older messages are not in memory (``ReadResult.first_seq`` tells the
  caller; the node's archive serves them);
- the **read cursor** of the session's user (its owner), forward only: ``MarkRead`` moves it
  and is refused (``forbidden``) for any other ``user_id``; an append with sender ``user``
  moves it to that append's seq, as a chat app does (the user wrote after everything before
  it), so unread = ``last_seq`` - cursor never counts the user's own messages and costs O(1)
  per append, with no history scan.  Cursors are kept per user id, at most ``cursors_max``
  (snapshots of older versions may hold other users' cursors); a new user beyond that evicts
  the lowest cursor (ties: lowest user id), whose user then reads as cursor 0.
Postgres watermarks (design §5.4, ctxstore/pg/flusher.py): per group, the sessions not yet
entirely in Postgres, each with (changed_index: the raft index of its latest change, a create,
append or cursor move; flushed_seq: its messages up to there are in Postgres; flushed_index: its
row and cursors as of that entry are).  A change adds a clean session (flushed_seq its last_seq
before the change); ``PostgresFlushed`` (proposed by the leader after a flush) moves the marks
forward, never back, and drops the session once ``flushed_seq = last_seq`` and
``flushed_index >= changed_index``; a reset (``ctxstore db backfill``) makes every session of
the group pending from seq 0 and starts a new epoch, whose older marks are ignored.  A session
absent is entirely in Postgres.  Kept whether or not Postgres is configured (the state cannot
know), about 100 bytes per session changed since its last flush.
Limits change replicated outcomes (dedupe, cursors): every replica must use the same
``StateLimits``.  Node-wide indexes, maintained on apply and fixed on restore: session id ->
group (for queries), user id -> sorted session ids (for ``list_sessions``).

Memory per session, worst case and typical: docs/ctxstore.md ("Memory per session").

Objects returned by queries and results (``Session``, ``Message``, their metadata dicts) are
shared with the state: callers must not mutate them.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections import deque
from dataclasses import dataclass
from hashlib import blake2b
from itertools import islice
from typing import Any, Protocol

import msgspec
import msgspec.msgpack

from raft.errors import InvariantViolation, check
from raft.messages import Entry, EntryType
from wire.protocol import ContextReason, Session

from .authz import FORBIDDEN_MESSAGE, owns
from .commands import (
    Actor,
    AgentSaved,
    Append,
    AppendBatch,
    Appended,
    Compact,
    ContextChanged,
    CreateSession,
    DisableAgent,
    DispatchBegin,
    DispatchBegun,
    DispatchEnd,
    MarkRead,
    PostgresFlushed,
    PostgresMarked,
    PutAgent,
    ReadMarked,
    Rejected,
    SessionCreated,
    SetContextConfig,
    decode_command,
)
from .placement import group_of
from .records import NO_PARTS, AgentRecord, StoredMessage, part_types
from .state_schema import GroupSnap, ReadResult, RecordSnap, SessionSnap, WindowSnap
from .window import Record, Window, WindowLimits

SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class StateLimits:
    """Bounds of the per-session state (identical on every replica of a cluster)."""

    dedupe_ids_max: int = 1024  # client_msg_ids remembered per session
    tail_messages_max: int = 10_000  # messages of the hot tail per session
    tail_bytes_max: int = 8 * 1024 * 1024  # payload bytes of the hot tail per session
    group_tail_bytes_max: int = 4 * 1024 * 1024  # all hot tails of a group (payload + overhead)
    cursors_max: int = 1024  # read cursors (users) per session
    window_records_max: int = 10_000  # messages of a context window
    window_bytes_max: int = 2 * 1024 * 1024  # encoded size of a window's messages
    replacement_bytes_max: int = 1024 * 1024  # encoded size of one compaction's replacement

    def __post_init__(self) -> None:
        for name in ("dedupe_ids_max", "tail_messages_max", "tail_bytes_max", "cursors_max",
                     "group_tail_bytes_max", "window_records_max", "window_bytes_max",
                     "replacement_bytes_max"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"StateLimits.{name} must be at least 1")


class StateObserver(Protocol):
    """Told what each applied entry changed, on every replica, in apply order (the archive, live
    subscriptions and inboxes follow the state through it).  Called during ``apply``: must not
    raise, must not call back into the state's commands."""

    def on_message(self, group: int, index: int, user_id: str, message: StoredMessage) -> None:
        """A message was appended at raft ``index``; ``user_id`` owns its session."""

    def on_session(self, group: int, index: int, session: Session) -> None:
        """A session was created."""

    def on_cursor(self, session_id: str, owner_id: str, user_id: str, seq: int) -> None:
        """``user_id``'s read cursor of a session owned by ``owner_id`` moved to ``seq`` by a
        ``MarkRead`` (the move of an append as ``user`` is told by ``on_message`` alone)."""

    def on_context(self, session_id: str, window: Window, reasons: list[ContextReason]) -> None:
        """The session's context window changed other than by taking an appended message in
        (``reasons``: ``wire.protocol.ContextReason``); called after that entry's
        ``on_message``, if any."""

    def on_evict(self, group: int, index: int, message: StoredMessage) -> None:
        """``message`` left the hot tail, pushed out by applying the entry at ``index`` (0: by a
        ``restore`` under smaller limits).  Oldest first per session."""

    def on_applied(self, group: int, index: int) -> None:
        """Every entry of ``group`` up to ``index`` is applied (called once per apply batch)."""

    def on_agent(self, agent_id: str) -> None:
        """An agent was saved (created, updated or disabled)."""


_encoder = msgspec.msgpack.Encoder()
_fingerprint_encoder = msgspec.msgpack.Encoder(order="sorted")  # canonical metadata key order
_parts_decoder: msgspec.msgpack.Decoder[list[Any]] = msgspec.msgpack.Decoder(list[Any])
_snapshot_decoder = msgspec.msgpack.Decoder(GroupSnap)


def fingerprint(
    sender: str,
    sender_id: str,
    kind: str,
    content: str,
    metadata: dict[str, Any],
    role: str | None,
    parts: msgspec.Raw,
) -> bytes:
    """What a retry with the same ``client_msg_id`` must repeat to be the same append (16
    bytes, stored in the dedupe window and snapshots).  A structured message (or a role other
    than its sender's default) adds its role and parts; a short one hashes as before roles
    existed, so retries across an upgrade still match.  The parts are decoded to be hashed with
    their maps' keys sorted, as the metadata's: the hash must not depend on the order a client
    wrote keys in.  The proposer computes it from its command's fields (``Append.fingerprint``);
    ``apply`` only for a command without it, alike.

    A map nested in the metadata or the parts may have keys other than strings (the native
    protocol's msgpack allows them; JSON does not): those cannot be sorted, so such a message
    is hashed with its maps in the order they were written (the command's, the same on every
    replica; a retry must then repeat that order).  It must not raise: ``apply`` would fail on
    every replica, at every replay of the entry."""
    fields: tuple[Any, ...] = (sender, sender_id, kind, content, metadata)
    if parts != NO_PARTS or (role is not None and role != DEFAULT_ROLES[sender]):
        fields = (*fields, role, None if parts == NO_PARTS else _parts_decoder.decode(parts))
    try:
        data = _fingerprint_encoder.encode(fields)
    except TypeError:  # "Only dicts with str keys are supported when `order` is not `None`"
        data = _encoder.encode(fields)
    return blake2b(data, digest_size=16).digest()


def _own_parts(m: StoredMessage) -> StoredMessage:
    """``m`` with parts of its own: decoded parts are a view into the buffer they were decoded
    from (a whole snapshot), which a message kept in memory must not keep alive."""
    return m if m.parts == NO_PARTS else msgspec.structs.replace(m, parts=m.parts.copy())


def payload_bytes(msg: StoredMessage) -> int:
    """The bytes a message counts against ``tail_bytes_max`` (its content, parts and metadata,
    as UTF-8 and msgpack): a function of the message only."""
    content = msg.content
    size = len(content) if content.isascii() else len(content.encode())
    parts = msg.parts
    if parts != NO_PARTS:
        size += len(parts)
    return size + (len(_encoder.encode(msg.metadata)) if msg.metadata else 1)


def message_bytes(m: StoredMessage) -> int:
    """A bound on a message's encoded size (what pages and response budgets count): its payload
    (content, parts, metadata) as the state counts it, its strings (4 bytes a character where
    no pattern keeps them ASCII), and 64 bytes for numbers, its role and msgpack headers."""
    return _message_bytes(m, payload_bytes(m))


def _message_bytes(m: StoredMessage, payload: int) -> int:
    ids = len(m.session_id) + len(m.client_msg_id or "")
    return payload + 64 + ids + 4 * (len(m.sender_id) + len(m.kind))


DEFAULT_ROLES: dict[str, str] = {"user": "user", "agent": "assistant", "system": "system"}
"""The role of a message whose command names none (entries written before roles existed)."""


def _shares(tokens: int, parts: msgspec.Raw) -> list[int]:
    """Counts per part where none were made (a message taken from the tail when a window
    opens, an entry older than counts): the message's count shared by the parts' encoded
    sizes, the rounding on the last part (deterministic, so alike on every replica)."""
    sizes = [len(_encoder.encode(p)) for p in _parts_decoder.decode(parts)]
    total = sum(sizes) or 1
    shares = [tokens * size // total for size in sizes]
    if shares:
        shares[-1] += tokens - sum(shares)
    return shares


def _record(
    msg: StoredMessage, tokens: int | None, part_tokens: list[int] | None, payload: int = -1
) -> Record:
    """The context-window record of a message (its counts as the proposer made them);
    ``payload``: its ``payload_bytes`` if known."""
    if payload < 0:
        payload = payload_bytes(msg)
    size = _message_bytes(msg, payload)
    if tokens is None:  # proposed before counts existed: a deterministic estimate
        tokens = (payload + 3) // 4
    per_part = None
    if msg.parts != NO_PARTS:
        types = part_types(msg.parts)
        if part_tokens is None or len(part_tokens) != len(types):
            part_tokens = _shares(tokens, msg.parts)
        per_part = list(zip(types, part_tokens, strict=True))
    role = msg.role if msg.role is not None else DEFAULT_ROLES[msg.sender]
    return Record(msg.seq, msg.seq, role, tokens, per_part, size)


MESSAGE_OVERHEAD_BYTES = 400
"""What a tail message costs beyond its payload (StoredMessage struct, strings, deque slots): an
estimate (measured: ~200-660 B), charged against ``group_tail_bytes_max``."""


def _not_found(session_id: str) -> Rejected:
    return Rejected("not_found", f"no session {session_id!r}", {})


def _refused(s: _Session | None, actor: Actor | None) -> Rejected | None:
    """``forbidden`` unless ``actor`` (a restricted principal) owns ``s``: the same answer
    whether or not the session exists (ctxstore/authz.py)."""
    if actor is None or (s is not None and owns(actor.role, actor.sub, s.user_id, s.agent_id)):
        return None
    return Rejected("forbidden", FORBIDDEN_MESSAGE, {})


def _version(window: Window | None) -> int:
    return 0 if window is None else window.version


def _stale(if_version: int, version: int) -> Rejected:
    return Rejected(
        "conflict",
        f"if_version {if_version} but the context window is at version {version}",
        {"version": version},
    )


class _Session:
    """One session's replicated state (see the module docstring)."""

    __slots__ = (
        "agent_id",
        "created_at",
        "cursors",
        "dedupe",
        "dedupe_order",
        "dispatched_seq",
        "id",
        "inflight",
        "last_seq",
        "last_user_seq",
        "metadata",
        "tail",
        "tail_bytes",
        "tail_sizes",
        "user_id",
        "window",
        "window_limits",
    )

    def __init__(
        self,
        id: str,
        user_id: str,
        agent_id: str,
        created_at: int,
        metadata: dict[str, Any],
        window_limits: WindowLimits,
    ) -> None:
        self.id = id
        self.user_id = user_id
        self.agent_id = agent_id
        self.created_at = created_at
        self.metadata = metadata
        self.last_seq = 0
        self.tail: deque[StoredMessage] = deque()
        self.tail_sizes: deque[int] = deque()  # payload_bytes of each tail message
        self.tail_bytes = 0
        self.dedupe: dict[str, tuple[int, int, bytes]] = {}  # id -> (seq, inserted_at, print)
        # Its ids, oldest first (made at the first): evicting the oldest by ``next(iter(dict))``
        # walked the slots deleted since the dict last resized, ~850 of them an append at the
        # default 1 024 ids, on every replica.
        self.dedupe_order: deque[str] | None = None
        self.cursors: dict[str, int] = {}  # user id -> last read seq
        self.window: Window | None = None  # until the session's first set_context_config
        self.window_limits = window_limits
        self.last_user_seq = 0  # the newest message sent by ``user``
        self.dispatched_seq = 0  # the user messages up to it are answered (or dropped)
        self.inflight: tuple[int, int] | None = None  # (trigger seq, attempt) of the call

    def to_wire(self) -> Session:
        return Session(
            self.id, self.user_id, self.agent_id, self.created_at, self.metadata, self.last_seq
        )

    def push(
        self,
        msg: StoredMessage,
        limits: StateLimits,
        evicted: list[StoredMessage] | None,
        size: int = -1,
    ) -> int:
        """Append ``msg`` to the tail, evicting by the session's limits (into ``evicted``, if
        given); the change of the tail's group charge (``_charge``).  ``size``: its
        ``payload_bytes`` if known."""
        if size < 0:
            size = payload_bytes(msg)
        tail, sizes = self.tail, self.tail_sizes
        tail.append(msg)
        sizes.append(size)
        self.tail_bytes += size
        charge = size + MESSAGE_OVERHEAD_BYTES
        while len(tail) > limits.tail_messages_max or (
            self.tail_bytes > limits.tail_bytes_max and len(tail) > 1
        ):
            old = tail.popleft()
            if evicted is not None:
                evicted.append(old)
            size = sizes.popleft()
            self.tail_bytes -= size
            charge -= size + MESSAGE_OVERHEAD_BYTES
        return charge

    def trim(self, evicted: list[StoredMessage] | None) -> int:
        """Evict all but the newest message (into ``evicted``, if given); the charge freed."""
        tail, sizes = self.tail, self.tail_sizes
        freed = 0
        while len(tail) > 1:
            old = tail.popleft()
            if evicted is not None:
                evicted.append(old)
            size = sizes.popleft()
            self.tail_bytes -= size
            freed += size + MESSAGE_OVERHEAD_BYTES
        return freed

    def charge(self) -> int:
        return self.tail_bytes + MESSAGE_OVERHEAD_BYTES * len(self.tail)

    def remember(self, client_msg_id: str, seen: tuple[int, int, bytes], limit: int) -> None:
        dedupe = self.dedupe
        order = self.dedupe_order
        if order is None:
            order = self.dedupe_order = deque()
        held = len(dedupe)
        dedupe[client_msg_id] = seen
        if len(dedupe) > held:  # a new id (one held keeps its place, as in the dict)
            order.append(client_msg_id)
        while len(dedupe) > limit:
            del dedupe[order.popleft()]  # the oldest

    def set_cursor(self, user_id: str, seq: int, limit: int) -> None:
        cursors = self.cursors
        if user_id not in cursors:
            while len(cursors) >= limit:
                lowest = min(cursors.items(), key=lambda kv: (kv[1], kv[0]))
                del cursors[lowest[0]]
        cursors[user_id] = seq

    def to_snap(self) -> SessionSnap:
        return SessionSnap(
            self.id,
            self.user_id,
            self.agent_id,
            self.created_at,
            self.metadata,
            self.last_seq,
            list(self.tail),
            self.dedupe,
            self.cursors,
            None if self.window is None else _window_snap(self.window),
            [self.dispatched_seq, self.last_user_seq, *(self.inflight or (0, 0))],
        )

    @classmethod
    def from_snap(
        cls, snap: SessionSnap, limits: StateLimits, evicted: list[StoredMessage] | None
    ) -> _Session:
        s = cls(
            snap.id, snap.user_id, snap.agent_id, snap.created_at, snap.metadata,
            _window_limits(limits),
        )  # fmt: skip
        s.last_seq = snap.last_seq
        check(
            all(m.seq == snap.last_seq - len(snap.tail) + 1 + i for i, m in enumerate(snap.tail)),
            f"snapshot of session {snap.id!r}: tail seqs are not contiguous up to last_seq",
        )
        for msg in snap.tail:
            s.push(_own_parts(msg), limits, evicted)
        for cmid, seen in snap.dedupe.items():
            s.remember(cmid, seen, limits.dedupe_ids_max)
        for user_id, seq in snap.cursors.items():
            s.set_cursor(user_id, seq, limits.cursors_max)
        if snap.window is not None:
            s.window = Window(s.window_limits)
            _restore_window(s.window, snap.window)
        if snap.dispatch:
            check(len(snap.dispatch) == 4, f"snapshot of session {snap.id!r}: bad dispatch state")
            s.dispatched_seq, s.last_user_seq, trigger, attempt = snap.dispatch
            s.inflight = (trigger, attempt) if attempt else None
        return s

    def open_window(self, counts: dict[int, tuple[int, list[int]]]) -> Window:
        """The session's window, started at its first configuration with the messages of its
        hot tail (replicated state, so every replica starts it alike), counted by ``counts``
        (the proposer's, by seq) or else as they were stored."""
        if self.window is None:
            self.window = w = Window(self.window_limits)
            for m in self.tail:
                tokens, per_part = counts.get(m.seq, (m.token_count, None))
                w.restore(_record(m, tokens, per_part or None))
        elif counts:  # a new tokenizer: the proposer counted the tail again
            self.window.recount(counts)
        return self.window


def _window_limits(limits: StateLimits) -> WindowLimits:
    return WindowLimits(
        limits.window_records_max, limits.window_bytes_max, limits.replacement_bytes_max
    )


def _window_snap(w: Window) -> WindowSnap:
    records = [
        RecordSnap(r.first_seq, r.last_seq, r.role, r.tokens, r.part_tokens, r.size, r.message)
        for r in w.records
    ]
    return WindowSnap(w.config, w.version, w.needs_compaction, records)


def _restore_window(w: Window, snap: WindowSnap) -> None:
    """Rebuild a window as it was (no policy runs: the snapshot holds its outcome)."""
    if snap.config is not None:
        w.configure(snap.config)
    for r in snap.records:
        part_tokens = None if r.part_tokens is None else [(t, n) for t, n in r.part_tokens]
        message = None if r.message is None else _own_parts(r.message)
        w.restore(Record(r.first_seq, r.last_seq, r.role, r.tokens, part_tokens, r.size,
                         message))  # fmt: skip
    w.version = snap.version
    w.needs_compaction = snap.needs_compaction


class ConversationState:
    """The state of every data group of a node (``raft.driver.StateMachine``), and its queries.

    ``groups``: the cluster's group count (``placement.group_of``), the same on every node; with
    it, creates and snapshots are checked against placement.  Without it (None) any group may
    hold any session id, but one id in two groups of this node raises ``InvariantViolation``
    (requests were misrouted).

    Queries about one session return ``None`` when the session is unknown on this node (never
    created, or its group is not hosted here).
    """

    def __init__(
        self,
        limits: StateLimits | None = None,
        groups: int | None = None,
        observer: StateObserver | None = None,
    ) -> None:
        self.limits = limits if limits is not None else StateLimits()
        self.group_count = groups
        self.observer = observer
        self._window_limits = _window_limits(self.limits)
        self._evicted: list[StoredMessage] = []  # scratch: what one append pushes out of the tails
        self._groups: dict[int, dict[str, _Session]] = {}
        self._charge: dict[int, int] = {}  # group -> what its tails cost (``_Session.charge``)
        # group -> sessions whose tail has more than one message, least recently appended first
        self._evictable: dict[int, dict[str, _Session]] = {}
        self._where: dict[str, int] = {}  # session id -> group, all groups
        self._agents: dict[int, dict[str, AgentRecord]] = {}  # group -> agent id -> agent
        self._by_user: dict[str, list[str]] = {}  # user id -> sorted session ids, all groups
        # group -> session id -> [changed_index, flushed_seq, flushed_index, reset_seq] (Postgres
        # marks; reset_seq: last_seq at the group's last reset, the part a backfill copies)
        self._pg: dict[int, dict[str, list[int]]] = {}
        self._pg_epoch: dict[int, int] = {}  # group -> index of its last reset

    # -- groups ------------------------------------------------------------------------------------
    def add_group(self, group: int) -> None:
        """Host ``group`` (empty unless it is already hosted).  ``apply`` and ``restore`` add
        groups implicitly."""
        self._groups.setdefault(group, {})
        self._agents.setdefault(group, {})
        self._charge.setdefault(group, 0)
        self._evictable.setdefault(group, {})
        self._pg.setdefault(group, {})
        self._pg_epoch.setdefault(group, 0)

    def remove_group(self, group: int) -> None:
        """Forget ``group`` (its replica moved away)."""
        for s in self._groups.pop(group, {}).values():
            self._unindex(s)
        self._agents.pop(group, None)
        self._charge.pop(group, None)
        self._evictable.pop(group, None)
        self._pg.pop(group, None)
        self._pg_epoch.pop(group, None)

    def drop_group(self, group: int) -> list[str]:
        """Forget everything of ``group`` (this node left it: ``retire.retire_group``): its
        sessions with their tails, read cursors, dedupe windows, context windows and dispatch
        cursors, its agents and its Postgres marks.  Queries answer as for a group never
        hosted here.  Returns the ids of the sessions dropped (sorted)."""
        sessions = sorted(self._groups.get(group, {}))
        self.remove_group(group)
        return sessions

    @property
    def hosted_groups(self) -> list[int]:
        return sorted(self._groups)

    # -- StateMachine ------------------------------------------------------------------------------
    def apply(self, group: int, entries: list[Entry]) -> list[object]:
        """One result per entry: ``None`` for entries that carry no command (the leader's empty
        no-op, membership changes), a ``commands.Result`` otherwise, and for an
        ``AppendBatch`` the list of its appends' results.  An undecodable entry
        raises ``InvariantViolation``: only our own nodes propose."""
        sessions = self._groups.get(group)
        if sessions is None:
            self.add_group(group)
            sessions = self._groups[group]
        out: list[object] = []
        for e in entries:
            if not e.data or e.type != EntryType.NORMAL:
                out.append(None)
                continue
            try:
                cmd = decode_command(e.data)
            except msgspec.DecodeError as exc:
                raise InvariantViolation(
                    f"group {group} entry {e.index}: undecodable command ({exc})"
                ) from exc
            match cmd:
                case Append():
                    out.append(self._append(group, e.index, sessions, cmd))
                case AppendBatch(appends):  # in order, each as if it were its own entry
                    out.append([self._append(group, e.index, sessions, a) for a in appends])
                case CreateSession():
                    out.append(self._create(group, e.index, sessions, cmd))
                case MarkRead():
                    out.append(self._mark_read(group, e.index, sessions, cmd))
                case SetContextConfig():
                    out.append(self._configure(sessions, cmd))
                case Compact():
                    out.append(self._compact(sessions, cmd))
                case PostgresFlushed():
                    out.append(self._postgres_flushed(group, e.index, sessions, cmd))
                case DispatchBegin():
                    out.append(self._dispatch_begin(sessions, cmd))
                case DispatchEnd():
                    out.append(self._dispatch_end(group, e.index, sessions, cmd))
                case PutAgent():
                    out.append(self._put_agent(group, cmd))
                case DisableAgent():
                    out.append(self._disable_agent(group, cmd))
        if self.observer is not None and entries:
            self.observer.on_applied(group, entries[-1].index)
        return out

    def snapshot(self, group: int) -> bytes:
        sessions = self._groups.get(group, {})
        evictable = list(self._evictable.get(group, ()))
        pg = [(sid, e[0], e[1], e[2], e[3]) for sid, e in self._pg.get(group, {}).items()]
        snap = GroupSnap(
            SNAPSHOT_VERSION,
            [s.to_snap() for s in sessions.values()],
            evictable,
            pg,
            self._pg_epoch.get(group, 0),
            [a for _, a in sorted(self._agents.get(group, {}).items())],
        )
        return _encoder.encode(snap)

    def restore(self, group: int, data: bytes) -> None:
        """Replace ``group``'s state by the snapshot's (``b""``: empty); fix the indexes."""
        snap = GroupSnap(SNAPSHOT_VERSION, [])
        if data:
            try:
                snap = _snapshot_decoder.decode(data)
            except msgspec.DecodeError as exc:
                raise InvariantViolation(f"group {group}: undecodable snapshot ({exc})") from exc
        check(
            snap.version == SNAPSHOT_VERSION,
            f"group {group}: snapshot version {snap.version}, expected {SNAPSHOT_VERSION}",
        )
        self.remove_group(group)
        self.add_group(group)
        sessions = self._groups[group]
        evicted: list[StoredMessage] | None = [] if self.observer is not None else None
        for ss in snap.sessions:
            check(
                self._placed(ss.id, group) and ss.id not in sessions,
                f"group {group}: snapshot holds session {ss.id!r} twice or of another group",
            )
            self._add(group, sessions, _Session.from_snap(ss, self.limits, evicted))
        agents = self._agents[group]
        for a in snap.agents:
            check(self._placed(a.id, group), f"group {group}: snapshot holds agent {a.id!r}")
            agents[a.id] = a
        evictable = self._evictable[group]
        for sid in snap.evictable or list(sessions):
            s = sessions.get(sid)
            check(s is not None, f"group {group}: snapshot names unknown session {sid!r}")
            if s is not None and len(s.tail) > 1:
                evictable[sid] = s
        pg = self._pg[group]
        for sid, changed, flushed_seq, flushed_index, reset_seq in snap.postgres:
            check(sid in sessions, f"group {group}: snapshot marks unknown session {sid!r}")
            pg[sid] = [changed, flushed_seq, flushed_index, reset_seq]
        self._pg_epoch[group] = snap.postgres_epoch
        self._charge[group] = 0
        self._recharge(group, sum(s.charge() for s in sessions.values()), evicted)
        if evicted:  # smaller limits here than where the snapshot was taken
            assert self.observer is not None
            for m in evicted:
                self.observer.on_evict(group, 0, m)

    # -- commands ----------------------------------------------------------------------------------
    def _create(
        self, group: int, index: int, sessions: dict[str, _Session], cmd: CreateSession
    ) -> SessionCreated | Rejected:
        s = sessions.get(cmd.session_id)
        actor = cmd.actor
        if actor is not None and not owns(actor.role, actor.sub, cmd.user_id, cmd.agent_id):
            return Rejected("forbidden", FORBIDDEN_MESSAGE, {})
        if s is not None:
            if (refused := _refused(s, actor)) is not None:
                return refused
            if s.user_id == cmd.user_id and s.agent_id == cmd.agent_id:
                return SessionCreated(s.to_wire(), False)
            return Rejected("conflict", f"session {s.id!r} exists for another user or agent", {})
        if self.group_count is not None:
            home = group_of(cmd.session_id, self.group_count)
            if home != group:
                return Rejected(
                    "bad_request",
                    f"session {cmd.session_id!r} belongs to group {home}, not {group}",
                    {"group": home},
                )
        s = _Session(
            cmd.session_id, cmd.user_id, cmd.agent_id, cmd.created_at, cmd.metadata,
            self._window_limits,
        )  # fmt: skip
        self._add(group, sessions, s)
        self._pg[group][s.id] = [index, 0, 0, 0]
        wire = s.to_wire()
        if self.observer is not None:
            self.observer.on_session(group, index, wire)
        return SessionCreated(wire, True)

    def _append(
        self, group: int, index: int, sessions: dict[str, _Session], cmd: Append
    ) -> Appended | Rejected:
        # Every field at once (in the Struct's order: a field added to Append fails here at
        # once): compiled code reads a Struct's field by a generic getattr, and ~20 of them were
        # ~2 000 of the ~24 000 instructions of a plain append's apply (callgrind).
        (
            session_id, sender, sender_id, kind, content, metadata, cmid, expected_seq,
            token_count, inserted_at, role, parts, part_tokens, if_version, actor, proposed,
        ) = msgspec.structs.astuple(cmd)  # fmt: skip
        s = sessions.get(session_id)
        if (refused := _refused(s, actor)) is not None:
            return refused
        if s is None:
            return _not_found(session_id)
        printed = b""
        if cmid is not None:  # the proposer's fingerprint, or (an entry before it) computed here
            printed = proposed if proposed is not None else fingerprint(
                sender, sender_id, kind, content, metadata, role, parts
            )  # fmt: skip
            seen = s.dedupe.get(cmid)
            if seen is not None:
                seq, seen_at, original = seen
                if original == printed:
                    return Appended(seq, seen_at, True)
                return Rejected(
                    "conflict",
                    f"client_msg_id {cmid!r} was used for other content (seq {seq})",
                    {"seq": seq},
                )
        if expected_seq is not None and expected_seq != s.last_seq:
            return Rejected(
                "conflict",
                f"expected_seq {expected_seq} but last_seq is {s.last_seq}",
                {"last_seq": s.last_seq},
            )
        window = s.window
        if if_version is not None and if_version != (version := _version(window)):
            return _stale(if_version, version)
        seq = s.last_seq = s.last_seq + 1
        mark = self._pg[group].get(s.id)
        if mark is None:
            self._pg[group][s.id] = [index, seq - 1, 0, 0]
        else:
            mark[0] = index
        msg = StoredMessage(
            s.id,
            seq,
            sender,
            sender_id,
            kind,
            content,
            metadata,
            cmid,
            inserted_at,
            token_count,
            role,
            parts.copy(),  # its own bytes, not a view keeping the whole entry alive
        )
        payload = payload_bytes(msg)
        reasons = None
        if window is not None:
            reasons = window.append(_record(msg, token_count, part_tokens, payload))
        observer = self.observer
        evicted = self._evicted if observer is not None else None  # reused: no list per append
        charge = s.push(msg, self.limits, evicted, payload)
        evictable = self._evictable[group]
        evictable.pop(s.id, None)
        if len(s.tail) > 1:
            evictable[s.id] = s  # the most recently appended: last
        self._recharge(group, charge, evicted)
        if evicted:
            assert observer is not None
            for m in evicted:
                observer.on_evict(group, index, m)
            evicted.clear()
        if cmid is not None:
            s.remember(cmid, (seq, inserted_at, printed), self.limits.dedupe_ids_max)
        if sender == "user":  # the user has read what came before its own message
            s.set_cursor(s.user_id, seq, self.limits.cursors_max)
            s.last_user_seq = seq
        if observer is not None:
            observer.on_message(group, index, s.user_id, msg)
            if reasons:
                assert window is not None
                observer.on_context(s.id, window, reasons)
        return Appended(seq, inserted_at, False)

    def _configure(
        self, sessions: dict[str, _Session], cmd: SetContextConfig
    ) -> ContextChanged | Rejected:
        s = sessions.get(cmd.session_id)
        if (refused := _refused(s, cmd.actor)) is not None:
            return refused
        if s is None:
            return _not_found(cmd.session_id)
        counts = {seq: (tokens, per_part) for seq, tokens, per_part in cmd.counts}
        window = s.open_window(counts)
        return self._context_changed(s, window, window.configure(cmd.config))

    def _compact(self, sessions: dict[str, _Session], cmd: Compact) -> ContextChanged | Rejected:
        s = sessions.get(cmd.session_id)
        if (refused := _refused(s, cmd.actor)) is not None:
            return refused
        if s is None:
            return _not_found(cmd.session_id)
        window = s.window
        if cmd.if_version is not None and cmd.if_version != (version := _version(window)):
            return _stale(cmd.if_version, version)
        if window is None:
            return Rejected("bad_request", "the session has no context window: configure it "
                            "first (set_context_config)", {"version": 0})  # fmt: skip
        records = [
            _record(m, m.token_count, tokens)
            for m, tokens in zip(cmd.replacement, cmd.part_tokens, strict=True)
        ]
        for r, m in zip(records, cmd.replacement, strict=True):
            r.message = _own_parts(m)
            r.compacted = True
        size = sum(r.size for r in records)
        if size > window.limits.replacement_bytes_max:
            return Rejected(
                "too_large",
                f"the replacement is {size} bytes > {window.limits.replacement_bytes_max}",
                {"bytes": size, "limit": window.limits.replacement_bytes_max},
            )
        outcome = window.compact(cmd.from_seq, cmd.to_seq, records)
        if isinstance(outcome, str):
            return Rejected("bad_request", outcome, {"version": window.version})
        return self._context_changed(s, window, outcome)

    def _context_changed(
        self, s: _Session, w: Window, reasons: list[ContextReason]
    ) -> ContextChanged:
        if self.observer is not None and reasons:
            self.observer.on_context(s.id, w, reasons)
        first = w.first_seq
        return ContextChanged(
            w.version, w.tokens, w.needs_compaction, s.last_seq + 1 if first is None else first
        )

    # -- agents ------------------------------------------------------------------------------
    def _put_agent(self, group: int, cmd: PutAgent) -> AgentSaved | Rejected:
        agent = cmd.agent
        if not self._placed(agent.id, group):
            return Rejected("bad_request", f"agent {agent.id!r} belongs to another group", {})
        agents = self._agents[group]
        known = agent.id in agents
        if cmd.create and known:
            return Rejected("conflict", f"agent {agent.id!r} exists (update_agent changes it)", {})
        if not cmd.create and not known:
            return Rejected("not_found", f"no agent {agent.id!r}", {})
        agents[agent.id] = agent
        if self.observer is not None:
            self.observer.on_agent(agent.id)
        return AgentSaved(agent)

    def _disable_agent(self, group: int, cmd: DisableAgent) -> AgentSaved | Rejected:
        agents = self._agents[group]
        agent = agents.get(cmd.agent_id)
        if agent is None:
            return Rejected("not_found", f"no agent {cmd.agent_id!r}", {})
        if agent.status != "disabled":
            agent = agents[agent.id] = msgspec.structs.replace(agent, status="disabled")
            if self.observer is not None:
                self.observer.on_agent(agent.id)
        return AgentSaved(agent)

    def _dispatch_begin(
        self, sessions: dict[str, _Session], cmd: DispatchBegin
    ) -> DispatchBegun | Rejected:
        s = sessions.get(cmd.session_id)
        if s is None:
            return _not_found(cmd.session_id)
        trigger, attempt = cmd.trigger_seq, cmd.attempt
        if trigger <= s.dispatched_seq or trigger > s.last_user_seq or attempt < 1:
            return Rejected(
                "conflict",
                f"trigger {trigger} is not past the dispatch cursor {s.dispatched_seq} up to "
                f"the last user message {s.last_user_seq}",
                {"dispatched_seq": s.dispatched_seq, "last_user_seq": s.last_user_seq},
            )
        if s.inflight is not None and s.inflight >= (trigger, attempt):
            return Rejected(
                "conflict",
                f"attempt {s.inflight[1]} of trigger {s.inflight[0]} is in flight",
                {"trigger_seq": s.inflight[0], "attempt": s.inflight[1]},
            )
        s.inflight = (trigger, attempt)
        return DispatchBegun(trigger, attempt)

    def _dispatch_end(
        self, group: int, index: int, sessions: dict[str, _Session], cmd: DispatchEnd
    ) -> Appended | Rejected:
        s = sessions.get(cmd.session_id)
        if s is None:
            return _not_found(cmd.session_id)
        if s.inflight != (cmd.trigger_seq, cmd.attempt) or cmd.append.session_id != s.id:
            return Rejected(
                "conflict",
                f"attempt {cmd.attempt} of trigger {cmd.trigger_seq} is not in flight",
                {"dispatched_seq": s.dispatched_seq},
            )
        result = self._append(group, index, sessions, cmd.append)
        if isinstance(result, Appended):
            s.dispatched_seq = cmd.trigger_seq
            s.inflight = None
        return result

    def _mark_read(
        self, group: int, index: int, sessions: dict[str, _Session], cmd: MarkRead
    ) -> ReadMarked | Rejected:
        s = sessions.get(cmd.session_id)
        if (refused := _refused(s, cmd.actor)) is not None:
            return refused
        if s is None:
            return _not_found(cmd.session_id)
        if cmd.user_id != s.user_id:  # (a user token's user_id is its sub: ctxstore/authz.py)
            return Rejected("forbidden", "only the session's user may mark it read", {})
        if cmd.seq > s.last_seq:
            return Rejected(
                "bad_request",
                f"seq {cmd.seq} is beyond the session's last_seq {s.last_seq}",
                {"last_seq": s.last_seq},
            )
        current = s.cursors.get(cmd.user_id, 0)
        if cmd.seq <= current:
            return ReadMarked(current)
        s.set_cursor(cmd.user_id, cmd.seq, self.limits.cursors_max)
        mark = self._pg[group].get(s.id)
        if mark is None:
            self._pg[group][s.id] = [index, s.last_seq, 0, 0]
        else:
            mark[0] = index
        if self.observer is not None:
            self.observer.on_cursor(s.id, s.user_id, cmd.user_id, cmd.seq)
        return ReadMarked(cmd.seq)

    def _postgres_flushed(
        self, group: int, index: int, sessions: dict[str, _Session], cmd: PostgresFlushed
    ) -> PostgresMarked:
        if cmd.reset:
            self._pg[group] = {sid: [index, 0, 0, s.last_seq] for sid, s in sessions.items()}
            self._pg_epoch[group] = index
            return PostgresMarked(0)
        if cmd.epoch < self._pg_epoch[group]:
            return PostgresMarked(0)  # read before a reset: copied to what may be gone
        pg = self._pg[group]
        clean = 0
        for sid, seq, index in cmd.marks:
            mark = pg.get(sid)
            s = sessions.get(sid)
            if mark is None or s is None:
                continue  # entirely in Postgres already (a stale or repeated flush)
            if seq > mark[1]:
                mark[1] = min(seq, s.last_seq)
            if index > mark[2]:
                mark[2] = index
            if mark[1] >= s.last_seq and mark[2] >= mark[0]:
                del pg[sid]
                clean += 1
        return PostgresMarked(clean)

    # -- queries -----------------------------------------------------------------------------------
    def get_agent(self, agent_id: str) -> AgentRecord | None:
        if self.group_count is not None:  # placed like a session
            return self._agents.get(group_of(agent_id, self.group_count), {}).get(agent_id)
        for agents in self._agents.values():
            agent = agents.get(agent_id)
            if agent is not None:
                return agent
        return None

    def list_agents(self, cursor: str | None, limit: int) -> tuple[list[AgentRecord], str | None]:
        """The agents of this node's groups with id > ``cursor``, by id; the next cursor is None
        on the last page."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        ids = sorted(a for agents in self._agents.values() for a in agents)
        start = 0 if cursor is None else bisect_right(ids, cursor)
        page = ids[start : start + limit]
        found = [a for a in (self.get_agent(i) for i in page) if a is not None]
        return found, (page[-1] if start + limit < len(ids) else None)

    def dispatch_state(
        self, session_id: str
    ) -> tuple[str, str, int, int, tuple[int, int] | None] | None:
        """(agent id, user id, last user seq, dispatched seq, in-flight marker) of a session."""
        s = self._lookup(session_id)
        if s is None:
            return None
        return s.agent_id, s.user_id, s.last_user_seq, s.dispatched_seq, s.inflight

    def undispatched(self, group: int) -> list[str]:
        """The sessions of ``group`` with user messages past their dispatch cursor."""
        return [s.id for s in self._groups.get(group, {}).values()
                if s.last_user_seq > s.dispatched_seq]  # fmt: skip

    def get_session(self, session_id: str) -> Session | None:
        s = self._lookup(session_id)
        return None if s is None else s.to_wire()

    def owned_by(self, session_id: str, role: str, sub: str) -> bool:
        """Whether the session exists here and ``role``/``sub`` owns it (ctxstore/authz.py)."""
        s = self._lookup(session_id)
        return s is not None and owns(role, sub, s.user_id, s.agent_id)

    def read(self, session_id: str, after_seq: int, limit: int) -> ReadResult | None:
        """At most ``limit`` messages with ``seq > after_seq`` still in the hot tail.  When
        ``after_seq + 1 < first_seq``, messages between them are not in memory."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        s = self._lookup(session_id)
        if s is None:
            return None
        tail = s.tail
        first_seq = s.last_seq - len(tail) + 1
        start = max(after_seq + 1, first_seq) - first_seq  # positions in the tail
        stop = min(start + limit, len(tail))
        if start >= stop:
            messages: list[StoredMessage] = []
        elif start <= len(tail) - stop:  # nearer the left end
            messages = list(islice(tail, start, stop))
        else:
            messages = list(islice(reversed(tail), len(tail) - stop, len(tail) - start))
            messages.reverse()
        return ReadResult(messages, s.last_seq, first_seq)

    def list_sessions(
        self, user_id: str, cursor: str | None, limit: int
    ) -> tuple[list[Session], str | None]:
        """``user_id``'s sessions on this node with id > ``cursor``, by id; the next cursor is
        None on the last page."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        ids = self._by_user.get(user_id, [])
        start = 0 if cursor is None else bisect_right(ids, cursor)
        page = ids[start : start + limit]
        sessions = []
        for sid in page:
            s = self._lookup(sid)
            if s is None:
                raise InvariantViolation(f"user index names unknown session {sid!r}")
            sessions.append(s.to_wire())
        more = start + limit < len(ids)
        return sessions, (page[-1] if more else None)

    def last_seq(self, session_id: str) -> int | None:
        s = self._lookup(session_id)
        return None if s is None else s.last_seq

    def last_message(self, session_id: str) -> StoredMessage | None:
        """The session's newest message (the hot tail always keeps it), None if it has none."""
        s = self._lookup(session_id)
        return s.tail[-1] if s is not None and s.tail else None

    def user_session_ids(self, user_id: str) -> list[str]:
        """``user_id``'s sessions on this node, by id (a copy)."""
        return list(self._by_user.get(user_id, ()))

    def group_tails(self, group: int) -> tuple[list[tuple[str, int, int]], list[StoredMessage]]:
        """For each session of ``group``: (id, first seq of its hot tail, last_seq); and every
        message of those tails."""
        sessions: list[tuple[str, int, int]] = []
        messages: list[StoredMessage] = []
        for s in self._groups.get(group, {}).values():
            sessions.append((s.id, s.last_seq - len(s.tail) + 1, s.last_seq))
            messages.extend(s.tail)
        return sessions, messages

    def session_ids(self, group: int) -> list[str]:
        return list(self._groups.get(group, ()))

    def window(self, session_id: str) -> tuple[Window | None, int] | None:
        """The session's context window (None: never configured) and last seq (shared with
        the state: read it, do not change it, before the next apply)."""
        s = self._lookup(session_id)
        return None if s is None else (s.window, s.last_seq)

    def read_cursor(self, session_id: str, user_id: str) -> int | None:
        s = self._lookup(session_id)
        return None if s is None else s.cursors.get(user_id, 0)

    def unread(self, session_id: str, user_id: str) -> int | None:
        """Messages after ``user_id``'s read cursor (for the owner: never its own messages)."""
        s = self._lookup(session_id)
        return None if s is None else s.last_seq - s.cursors.get(user_id, 0)

    def postgres_pending(self, group: int) -> list[tuple[str, int, int, int]]:
        """The sessions of ``group`` not entirely in Postgres, oldest change first:
        (session_id, changed_index, flushed_seq, last_seq)."""
        out: list[tuple[str, int, int, int]] = []
        sessions = self._groups.get(group, {})
        for sid, mark in self._pg.get(group, {}).items():
            out.append((sid, mark[0], mark[1], sessions[sid].last_seq))
        return out

    def postgres_epoch(self, group: int) -> int:
        """The index of ``group``'s last reset (0: none): a flush tells it with its marks."""
        return self._pg_epoch.get(group, 0)

    def postgres_backlog(self, group: int) -> int:
        """Messages of ``group`` not yet in Postgres."""
        sessions = self._groups.get(group, {})
        return sum(sessions[sid].last_seq - m[1] for sid, m in self._pg.get(group, {}).items())

    def postgres_backfill_rows(self, group: int) -> int:
        """Messages of ``group`` its last reset asks to copy again, not copied yet."""
        return sum(max(0, m[3] - m[1]) for m in self._pg.get(group, {}).values())

    def postgres_flushed_seq(self, session_id: str) -> int | None:
        """The session's messages up to this seq are in Postgres (None: unknown session)."""
        s = self._lookup(session_id)
        if s is None:
            return None
        mark = self._pg[self._where[session_id]].get(session_id)
        return s.last_seq if mark is None else mark[1]

    def cursors(self, session_id: str) -> dict[str, int] | None:
        """Every read cursor of the session, user id -> seq (a copy)."""
        s = self._lookup(session_id)
        return None if s is None else dict(s.cursors)

    # -- helpers -----------------------------------------------------------------------------------
    def _recharge(self, group: int, delta: int, evicted: list[StoredMessage] | None) -> None:
        """Add ``delta`` to the group's tail charge; while it exceeds ``group_tail_bytes_max``,
        trim the tail of the least recently appended session down to its newest message."""
        total = self._charge[group] + delta
        budget = self.limits.group_tail_bytes_max
        evictable = self._evictable[group]
        while total > budget and evictable:
            total -= evictable.pop(next(iter(evictable))).trim(evicted)
        self._charge[group] = total

    def tail_charge(self, group: int) -> int:
        """What ``group``'s hot tails cost now (payload + per-message overhead)."""
        return self._charge.get(group, 0)

    def _lookup(self, session_id: str) -> _Session | None:
        group = self._where.get(session_id)
        return None if group is None else self._groups[group][session_id]

    def _placed(self, session_id: str, group: int) -> bool:
        """Whether placement allows ``session_id`` in ``group`` (always, without a group count)."""
        return self.group_count is None or group_of(session_id, self.group_count) == group

    def _add(self, group: int, sessions: dict[str, _Session], s: _Session) -> None:
        other = self._where.setdefault(s.id, group)
        check(other == group, f"session {s.id!r} in groups {other} and {group}: misrouted")
        sessions[s.id] = s
        insort(self._by_user.setdefault(s.user_id, []), s.id)

    def _unindex(self, s: _Session) -> None:
        del self._where[s.id]
        ids = self._by_user[s.user_id]
        i = bisect_left(ids, s.id)
        check(i < len(ids) and ids[i] == s.id, f"session {s.id!r} missing from the user index")
        del ids[i]
        if not ids:
            del self._by_user[s.user_id]


__all__ = [
    "SNAPSHOT_VERSION",
    "ConversationState",
    "ReadResult",
    "StateLimits",
    "StateObserver",
    "fingerprint",
    "message_bytes",
    "payload_bytes",
]
