"""The data of the Raft core: entries, hard state, snapshots and the messages peers exchange.

Everything here is a msgspec Struct so that the transport can encode it without a copy and
validate what a peer sends.  Messages form one tagged union (``Message``); every message names
its sender (``frm``), its destination (``to``) and the sender's ``term`` when it was made.
Fields are only ever appended, with defaults, so the encoding stays compatible.
"""

from __future__ import annotations

import enum

import msgspec
import msgspec.msgpack

NONE = 0
"""The node id that means "nobody" (no vote, no known leader)."""


class EntryType(enum.IntEnum):
    NORMAL = 0
    CONF_CHANGE = 1


class Entry(msgspec.Struct, array_like=True, frozen=True, gc=False):
    term: int
    index: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""


class HardState(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """What must be durable before a node votes or acknowledges: term, vote and commit index."""

    term: int = 0
    vote: int = NONE
    commit: int = 0


class ConfState(msgspec.Struct, array_like=True, frozen=True):
    """The membership of a group: voters and learners (disjoint, sorted)."""

    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()


class ConfChangeType(enum.IntEnum):
    ADD_NODE = 0  # add a voter, or promote a learner to voter
    ADD_LEARNER = 1
    REMOVE_NODE = 2


class ConfChange(msgspec.Struct, array_like=True, frozen=True):
    type: ConfChangeType
    node_id: int
    context: bytes = b""


class SnapshotMeta(msgspec.Struct, array_like=True, frozen=True):
    index: int = 0
    term: int = 0
    conf_state: ConfState = ConfState()


class Snapshot(msgspec.Struct, array_like=True, frozen=True):
    meta: SnapshotMeta = SnapshotMeta()
    data: bytes = b""


class AppendEntries(msgspec.Struct, array_like=True, tag=1, gc=False):
    frm: int
    to: int
    term: int
    prev_index: int
    prev_term: int
    entries: list[Entry]
    commit: int


class AppendResponse(msgspec.Struct, array_like=True, tag=2, gc=False):
    """Answer to AppendEntries / InstallSnapshot.

    Accepted: ``index`` is the last index the follower now holds in agreement with the leader.
    Rejected: ``index`` echoes the rejected ``prev_index``; ``reject_hint`` and ``log_term`` name
    the follower's last index whose term is at most the leader's ``prev_term`` (fast backtracking).
    """

    frm: int
    to: int
    term: int
    index: int
    reject: bool = False
    reject_hint: int = 0
    log_term: int = 0


class Heartbeat(msgspec.Struct, array_like=True, tag=3, gc=False):
    """``round``: the leader's heartbeat round in its term (1, 2, 3 ..., raft/readonly.py),
    echoed in the answer; 0 in a quiesce heartbeat, which is not a round.  ``quiesce``: the
    leader stops ticking this group after it (raft/multi.py); the core treats it as any
    heartbeat.  ``context`` is no longer set (reads are confirmed by rounds) but still echoed."""

    frm: int
    to: int
    term: int
    commit: int
    context: bytes = b""
    quiesce: bool = False
    round: int = 0


class HeartbeatResponse(msgspec.Struct, array_like=True, tag=4, gc=False):
    """``round``: the round of the heartbeat answered (its ``context`` is echoed too)."""

    frm: int
    to: int
    term: int
    context: bytes = b""
    round: int = 0


class RequestVote(msgspec.Struct, array_like=True, tag=5, gc=False):
    """A (pre-)vote request.  A pre-vote carries the term the candidate *would* use."""

    frm: int
    to: int
    term: int
    last_index: int
    last_term: int
    pre_vote: bool = False
    transfer: bool = False  # sent on TimeoutNow: bypasses leader stickiness


class VoteResponse(msgspec.Struct, array_like=True, tag=6, gc=False):
    frm: int
    to: int
    term: int
    reject: bool
    pre_vote: bool = False


class InstallSnapshot(msgspec.Struct, array_like=True, tag=7):
    frm: int
    to: int
    term: int
    snapshot: Snapshot


class TimeoutNow(msgspec.Struct, array_like=True, tag=8, gc=False):
    frm: int
    to: int
    term: int


class ReadIndex(msgspec.Struct, array_like=True, tag=9, gc=False):
    """A follower (or learner) asks the leader for a linearizable read index."""

    frm: int
    to: int
    term: int
    context: bytes


class ReadIndexResponse(msgspec.Struct, array_like=True, tag=10, gc=False):
    frm: int
    to: int
    term: int
    index: int
    context: bytes


Message = (
    AppendEntries
    | AppendResponse
    | Heartbeat
    | HeartbeatResponse
    | RequestVote
    | VoteResponse
    | InstallSnapshot
    | TimeoutNow
    | ReadIndex
    | ReadIndexResponse
)

MESSAGE_TYPES: tuple[type, ...] = (
    AppendEntries,
    AppendResponse,
    Heartbeat,
    HeartbeatResponse,
    RequestVote,
    VoteResponse,
    InstallSnapshot,
    TimeoutNow,
    ReadIndex,
    ReadIndexResponse,
)


def entry_bytes(entry: Entry) -> int:
    """The payload size counted against flow-control and uncommitted-size limits."""
    return len(entry.data)


_conf_change_encoder = msgspec.msgpack.Encoder()
_conf_change_decoder = msgspec.msgpack.Decoder(ConfChange)


def encode_conf_change(change: ConfChange) -> bytes:
    return _conf_change_encoder.encode(change)


def decode_conf_change(data: bytes) -> ConfChange:
    return _conf_change_decoder.decode(data)
