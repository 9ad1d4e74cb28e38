"""A node's size limits, end to end, and the start-up check that they agree (docs/ctxstore.md
"Limits").

A message that is legal at the boundary must fit every stage it passes through, or it is stored
and then stuck: a replication message the peer transport drops on every resend freezes its
group; a message no response frame can hold is acknowledged and never readable.  The chain:

- an ``append``'s content and metadata are at most ``MESSAGE_BYTES_MAX`` together (the rest of
  the message is bounded by the wire schema): more is ``too_large`` at the service;
- its command is one Raft entry of at most ``ENTRY_BYTES_MAX`` (``commands``; the router refuses
  a bigger command of any kind with ``too_large``);
- the entry travels to each follower in an ``AppendEntries`` (the core packs up to
  ``raft_msg_bytes_max`` of entries per message, always at least one), which the transport
  queues only if its estimate fits ``peer_queue_bytes_max`` and sends in one frame of at most
  ``peer_frame_bytes_max``; and to the leader as a ``Forward`` on the application lane
  (``app_queue_bytes_max``), as do history pages for a peer's archive (``history_page_bytes``);
- back to clients, one response frame (``client_frame_bytes_max``) carries a ``read`` answer
  (at most ``read_bytes_max`` of messages, always at least one) or a ``MessageEvent`` push (at
  most ``push_page_bytes``, always at least one), or a ``context`` answer (a window holds at
  most ``window_bytes_max`` of messages in ``window_records_max`` segments at most).

``check`` proves every link with the real encoders and the transport's own accounting, with
``HEADROOM`` to spare on the peer side (the transport's estimate and per-entry overheads), and
raises ``ConfigError`` naming the broken one: a node refuses to start with limits that disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from raft import peer_codec
from raft.core import Config as RaftConfig
from raft.messages import AppendEntries, Entry
from raft.transport import APP_QUEUE_BYTES_MAX, QUEUE_BYTES_MAX, message_bytes
from wire.protocol import (
    FRAME_BYTES_MAX,
    MESSAGE_BYTES_MAX,
    READ_BYTES_MAX,
    Context,
    ContextConfig,
    Messages,
    Segment,
    SkipParts,
)

from . import commands
from .config import ConfigError
from .history import PAGE_BYTES_MAX
from .history import message_bytes as stored_message_bytes
from .peer_messages import Forward, HistoryRows
from .records import StoredMessage
from .state import StateLimits
from .subscriptions import SubscriptionLimits

HEADROOM = 2
"""Peer-side links must hold with this factor to spare: the transport counts an estimate, and
an AppendEntries of many small entries carries a per-entry overhead besides their payload."""

_U64 = 2**64 - 1
_I64 = 2**63 - 1
_WIDE = "\U0001f600"  # 4 bytes in UTF-8: the widest character an id-free string field may hold
_encode = msgspec.msgpack.Encoder().encode


@dataclass(frozen=True)
class Limits:
    """The sizes a node runs with (bytes); ``Node`` builds its parts from these values."""

    message_bytes_max: int = MESSAGE_BYTES_MAX
    entry_bytes_max: int = commands.ENTRY_BYTES_MAX
    raft_msg_bytes_max: int = RaftConfig(id=1).max_size_per_msg  # (an instance: mypyc compiles it)
    peer_queue_bytes_max: int = QUEUE_BYTES_MAX
    peer_frame_bytes_max: int = peer_codec.FRAME_BYTES_MAX
    app_queue_bytes_max: int = APP_QUEUE_BYTES_MAX
    history_page_bytes: int = PAGE_BYTES_MAX
    client_frame_bytes_max: int = FRAME_BYTES_MAX
    read_bytes_max: int = READ_BYTES_MAX
    push_page_bytes: int = SubscriptionLimits.page_bytes
    window_bytes_max: int = StateLimits().window_bytes_max  # (an instance: mypyc compiles it)
    window_records_max: int = StateLimits().window_records_max


def largest_message(payload_bytes: int) -> StoredMessage:
    """A message whose content and metadata hold ``payload_bytes`` and whose other fields are as
    large as the wire schema allows (ids of 128 characters, 4-byte characters where no pattern
    forbids them, 64-bit numbers)."""
    return StoredMessage(
        "s" * 128, _I64, "system", _WIDE * 128, _WIDE * 64, "x" * (payload_bytes - 1), {},
        "c" * 128, _I64, _I64,
    )  # fmt: skip


def largest_append(payload_bytes: int) -> commands.Append:
    m = largest_message(payload_bytes)
    return commands.Append(
        m.session_id, m.sender, m.sender_id, m.kind, m.content, m.metadata, m.client_msg_id,
        _I64, _I64, _I64, fingerprint=bytes(16),
    )  # fmt: skip


def _append_entries(payload_bytes: int) -> AppendEntries:
    entry = Entry(_I64, _I64, data=bytes(payload_bytes))
    return AppendEntries(_U64, _U64, _I64, _I64, _I64, [entry], _I64)


def check(limits: Limits) -> None:
    """Raise ``ConfigError`` unless a maximal message fits every stage (module docstring)."""
    lim = limits

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"config: inconsistent size limits: {what}")

    command = len(commands.encode_command(largest_append(lim.message_bytes_max)))
    need(command <= lim.entry_bytes_max,
         f"an append of message_bytes_max ({lim.message_bytes_max}) is a {command}-byte "
         f"command > entry_bytes_max ({lim.entry_bytes_max})")  # fmt: skip
    # Raft: an AppendEntries carries up to raft_msg_bytes_max of entries, or one bigger entry.
    append = _append_entries(max(lim.entry_bytes_max, lim.raft_msg_bytes_max))
    queued = message_bytes(append)
    need(HEADROOM * queued <= lim.peer_queue_bytes_max,
         f"an AppendEntries of one entry_bytes_max ({lim.entry_bytes_max}) entry or "
         f"raft_msg_bytes_max ({lim.raft_msg_bytes_max}) counts {queued} bytes: "
         f"{HEADROOM} x that > peer_queue_bytes_max ({lim.peer_queue_bytes_max})")  # fmt: skip
    frame = len(peer_codec.encode_frame(peer_codec.Batch([(_U64, append)])))
    need(HEADROOM * frame <= lim.peer_frame_bytes_max,
         f"that AppendEntries is a {frame}-byte frame: {HEADROOM} x that > "
         f"peer_frame_bytes_max ({lim.peer_frame_bytes_max})")  # fmt: skip
    # The application lane: a forwarded command, a page of history for a peer's archive.
    largest = largest_message(lim.message_bytes_max)
    page = max(lim.history_page_bytes, stored_message_bytes(largest))
    forward = Forward(_I64, _U64, bytes(lim.entry_bytes_max))
    history = HistoryRows(_I64, [], _I64, "unavailable", "")
    lanes = {
        "a forwarded entry_bytes_max command": len(_encode(forward)),
        "a history page": len(_encode(history)) + 5 + page,  # + the widest list header
    }
    for what, size in lanes.items():
        frame = len(peer_codec.encode_frame(peer_codec.AppBatch([bytes(size)])))
        need(HEADROOM * (size + 8) <= lim.app_queue_bytes_max,
             f"{what} is {size} bytes: {HEADROOM} x that > app_queue_bytes_max "
             f"({lim.app_queue_bytes_max})")  # fmt: skip
        need(HEADROOM * frame <= lim.peer_frame_bytes_max,
             f"{what} is a {frame}-byte frame: {HEADROOM} x that > peer_frame_bytes_max "
             f"({lim.peer_frame_bytes_max})")  # fmt: skip
    # Clients: one frame holds a read answer or a push of one page (or of one message).
    one = stored_message_bytes(largest)
    encoded = len(_encode(largest))
    need(encoded <= one, f"the stored-size estimate {one} < {encoded} encoded (history.py)")
    envelope = len(_encode(Messages(_I64, [], _I64))) + 5  # + the widest list header
    for what, budget in (("read_bytes_max", lim.read_bytes_max),
                         ("push_page_bytes", lim.push_page_bytes)):  # fmt: skip
        size = envelope + max(budget, one)
        need(size <= lim.client_frame_bytes_max,
             f"a response of {what} ({budget}) or of one message of message_bytes_max is "
             f"{size} bytes > client_frame_bytes_max ({lim.client_frame_bytes_max})")  # fmt: skip
    # A context answer: its messages (each counted as the window counts it), one segment each
    # at worst, and its configuration.
    config = ContextConfig(_I64, 1.0, SkipParts(["x" * 64] * 32, _I64), "cl100k_base")
    context = Context(_I64, "s" * 128, [], [], _I64, _I64, True, _I64, _I64, config)
    segment = len(_encode(Segment(_I64, _I64, _I64, True)))
    window = len(_encode(context)) + 10 + max(lim.window_bytes_max, one)
    window += lim.window_records_max * segment
    need(window <= lim.client_frame_bytes_max,
         f"a context answer of window_bytes_max ({lim.window_bytes_max}) in "
         f"window_records_max ({lim.window_records_max}) segments is {window} bytes > "
         f"client_frame_bytes_max ({lim.client_frame_bytes_max})")  # fmt: skip
    need(HEADROOM * (envelope + one) <= lim.client_frame_bytes_max,
         f"a response holding one message of message_bytes_max is {envelope + one} bytes: "
         f"{HEADROOM} x that > client_frame_bytes_max ({lim.client_frame_bytes_max})")  # fmt: skip


__all__ = ["HEADROOM", "Limits", "check", "largest_append", "largest_message"]
