"""The messages nodes send each other on the peer connection's application lane (design §4.1,
§5.4, §5.5, §5.6): ``Transport.send_app`` carries them, batched per loop iteration, beside
the Raft messages, and ``Router.on_app`` takes them in.  Each is a msgspec Struct with an
integer tag; the tags are the protocol and never change meaning.  A new field is appended with
a default (so an older node still decodes what a newer one sends); an unknown tag is dropped
and counted by the receiver.

- 1, 2 ``Forward``, ``ForwardReply``: a command to its group's leader (``ctxstore.router``);
- 3 ``Advertise``: where a node serves clients (``GetRoutes``);
- 4, 5 ``HistoryFetch``, ``HistoryRows``: archive refill after an InstallSnapshot
  (``ctxstore.backfill``);
- 30, 31 ``ChunkRelay``, ``ChunkInterest``: live agent chunks for other nodes' subscribers;
- 40-45 ``RelayRequest`` … ``RelayEnded``: requests and streams of groups not hosted here
  (``ctxstore.relay``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from .records import StoredMessage


class Forward(msgspec.Struct, array_like=True, tag=1):
    fid: int
    group: int
    command: bytes
    append: bool = False  # ``command`` is an encoded ``commands.Append`` (it may be batched)


class ForwardReply(msgspec.Struct, array_like=True, tag=2):
    fid: int
    result: bytes  # an encoded commands.Result when ``code`` is empty
    code: str  # "" | "not_leader" | "unavailable" | "timeout" | "internal"
    message: str
    leader: int


class Advertise(msgspec.Struct, array_like=True, tag=3):
    """Sent to every peer whose connection comes up: where this node serves clients."""

    node_id: int
    client_address: str


class HistoryFetch(msgspec.Struct, array_like=True, tag=4):
    """Messages ``after_seq < seq <= to_seq`` of a session, for a peer refilling its archive
    after an InstallSnapshot (design §5.4)."""

    fid: int
    session_id: str
    after_seq: int
    to_seq: int
    limit: int


class HistoryRows(msgspec.Struct, array_like=True, tag=5):
    """The answer: consecutive messages from ``after_seq + 1`` on, or from ``gap_to + 1`` on when
    ``gap_to`` > 0 (retention deleted everything up to it).  ``code`` "" or "unavailable"."""

    fid: int
    messages: list[StoredMessage]
    gap_to: int
    code: str
    message: str


class ChunkRelay(msgspec.Struct, array_like=True, tag=30):
    """Live agent chunks (``chunk``, then ``more``: what one read of the agent's stream
    brought), from the leader running the call to every peer with subscribers of the session
    (ctxstore/agents/engine.py); best effort, never queued past the peer's application
    queue."""

    session_id: str
    trigger_seq: int
    attempt: int
    chunk: dict[str, Any]
    more: list[dict[str, Any]] = []  # the chunks after ``chunk`` that the same read brought


class ChunkInterest(msgspec.Struct, array_like=True, tag=31):
    """The sender has (``on``) or no longer has chunk subscribers of these sessions: a leader
    relays a session's chunks only to the peers that have some.  Sent for one session as its
    first subscriber comes or its last goes, and for all of them when a peer connects."""

    sessions: list[str]
    on: bool


class RelayRequest(msgspec.Struct, array_like=True, tag=40):
    """A client's request (encoded, its rid the client's) with the principal it came with."""

    fid: int
    group: int
    request: bytes
    role: str
    sub: str
    sessions: list[str] | None
    expires_at: float | None
    groups: list[int] = []  # a SubscribeInbox: only these groups' sessions (empty: all hosted)


class RelayAnswer(msgspec.Struct, array_like=True, tag=41):
    """``response``: the encoded answer when ``code`` is empty; ``code`` "unavailable": the
    replica could not take the request (not hosted there, too busy): ask another."""

    fid: int
    response: bytes
    code: str
    message: str
    leader: int  # the group's leader as the replica knows it (0: none)


class RelayPush(msgspec.Struct, array_like=True, tag=42):
    fid: int
    event: bytes  # an encoded wire Push


class RelayAck(msgspec.Struct, array_like=True, tag=43):
    """The origin took these streams' pushes up to ``totals`` bytes (of ``RelayPush.event``)."""

    fids: list[int]
    totals: list[int]


class RelayCancel(msgspec.Struct, array_like=True, tag=44):
    fids: list[int]


class RelayEnded(msgspec.Struct, array_like=True, tag=45):
    """The replica ended these streams without a word (a push could not be queued)."""

    fids: list[int]


class MemberQuery(msgspec.Struct, array_like=True, tag=50):
    """Is the sender still a member of ``group``? (ctxstore/strays.py)"""

    qid: int
    group: int


class MemberAnswer(msgspec.Struct, array_like=True, tag=51):
    """What the answering node knows of ``group``: ``leader`` if it leads it at ``term``;
    ``pending`` if a membership change is in its log, not applied; ``members``: the voters and
    learners of its applied configuration (ctxstore/strays.py)."""

    qid: int
    group: int
    term: int
    leader: bool
    pending: bool
    members: list[int]


STRAY_ENVELOPES = (MemberQuery, MemberAnswer)


class Led(msgspec.Struct, array_like=True, tag=52):
    """How many data groups the sender leads (``Node``, on change and every few seconds): a
    node that hosts only some groups balances on its peers' own counts (``Mover._shed``)."""

    count: int


RelayEnvelope = RelayRequest | RelayAnswer | RelayPush | RelayAck | RelayCancel | RelayEnded
RELAY_ENVELOPES = (RelayRequest, RelayAnswer, RelayPush, RelayAck, RelayCancel, RelayEnded)

Envelope = (
    Forward | ForwardReply | Advertise | HistoryFetch | HistoryRows | ChunkRelay | ChunkInterest
    | RelayRequest | RelayAnswer | RelayPush | RelayAck | RelayCancel | RelayEnded
    | MemberQuery | MemberAnswer | Led
)  # fmt: skip

encode = msgspec.msgpack.Encoder().encode
decode_envelope = msgspec.msgpack.Decoder(Envelope).decode

__all__ = [
    "RELAY_ENVELOPES",
    "STRAY_ENVELOPES",
    "Advertise",
    "ChunkInterest",
    "ChunkRelay",
    "Envelope",
    "Forward",
    "ForwardReply",
    "HistoryFetch",
    "HistoryRows",
    "Led",
    "MemberAnswer",
    "MemberQuery",
    "RelayAck",
    "RelayAnswer",
    "RelayCancel",
    "RelayEnded",
    "RelayEnvelope",
    "RelayPush",
    "RelayRequest",
    "decode_envelope",
    "encode",
]
