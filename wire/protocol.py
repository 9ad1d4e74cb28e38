"""The messages of the native binary protocol (design §4.1; docs/protocol.md).

Rules of this file:
- One msgspec Struct per message, ``array_like`` (a message is a msgpack array: the tag, then
  the fields in the order written here), with a short string tag.  Requests form the tagged
  union ``Request``; responses and errors the union ``Response``; server pushes (subscription
  events, which answer no request) the union ``Push``.  Tags are unique across all three (a
  client decodes ``Response | Push`` as one union).
- A request's first field is its ``rid`` (>= 1), echoed by its response; a push's first field
  is the ``sub_id`` (>= 1) of the subscription it belongs to.
- Every field is required on the wire: an optional value is sent as nil, never left out (a
  missing field is a ``bad_request``, not a default).  Schema evolution: a new field is appended
  at the end *with* a default; tags and field types never change (``PROTOCOL_VERSIONS``).
- Limits are part of the schema (``Meta``): a value out of range fails validation, which the
  server answers with ``bad_request`` naming the field.
- Data types shared by requests and responses (``Session``, ``Message``) are plain Structs,
  not tracked by the garbage collector (``gc=False``: they cannot form cycles), since a node
  holds many of them.
- Timestamps are integers: milliseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .parts import Role

PROTOCOL_VERSION = 4
PROTOCOL_VERSIONS = frozenset({1, 2, 3, 4})
"""What a server accepts in ``Hello`` and a client in ``Welcome`` (which echoes the client's).
Version 2 added structured messages (``role``, ``parts``) and context windows; version 3 the
agents registry (``create_agent``...) and live agent chunks (``Subscribe.stream_chunks``);
version 4 a second ``Hello`` on an open connection (a token refreshed: ``REHELLO_VERSION``)
and ``Welcome.expires_in_ms``.
The rule: a version only appends fields (with defaults) and adds request, response and push
types, so a server of version N serves clients of every version up to N: a version-1 client
never sends the new requests, leaves the new fields out (they mean what version 1 meant) and
ignores the fields appended to what it receives.  A client of version N needs a server of version N
(its requests carry the new fields): upgrade the servers first."""
REHELLO_VERSION = 4
"""From this version on a client may send another ``Hello`` on an open connection, with a new
token for the same principal; before it a second Hello is a protocol error."""
FRAME_BYTES_MAX = 4 * 1024 * 1024  # default negotiated maximum (Welcome.max_frame_bytes)
METADATA_BYTES_MAX = 16 * 1024  # a metadata map, msgpack-encoded
MESSAGE_BYTES_MAX = 1024 * 1024
"""The largest message an append may carry: its content (UTF-8) and metadata (msgpack-encoded)
together; more is answered ``too_large``.  The rest of a message is bounded by the schema (ids,
``kind``), so a node can prove at start-up that the largest message fits its Raft entry, its
peer transport and one response frame (ctxstore/limits.py)."""
READ_BYTES_MAX = 2 * 1024 * 1024
"""The byte budget of a ``read`` answer: messages are added while their encoded size stays
within it, and there is always at least one (a page of ``MESSAGE_BYTES_MAX`` messages fits)."""
METADATA_DEPTH_MAX = 32  # nesting levels of a metadata map: the map is 1, a map or array in it 2

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$"
Id = Annotated[str, Meta(min_length=1, max_length=128, pattern=ID_PATTERN)]
Rid = Annotated[int, Meta(ge=1, le=2**63 - 1)]  # 0 is reserved: Error{rid: 0} = the last word
Seq = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Limit = Annotated[int, Meta(ge=1, le=1000)]
Kind = Annotated[str, Meta(min_length=1, max_length=64)]
Content = str  # with the metadata at most MESSAGE_BYTES_MAX bytes (server-checked: too_large)
Metadata = dict[str, Any]  # string keys; at most 16 KiB encoded, 32 levels deep (server-checked)
SubId = Annotated[int, Meta(ge=1, le=2**63 - 1)]
Sender = Literal["user", "agent", "system"]
Part = dict[str, Any]  # one part of a structured message: wire/parts.py (checked by the server)
Version = Annotated[int, Meta(ge=0, le=2**63 - 1)]  # of a session's context window
TokenCount = Annotated[int, Meta(ge=0, le=2**31 - 1)]
Tokenizer = Literal["o200k_base", "cl100k_base"]
PartPrefix = Annotated[str, Meta(min_length=1, max_length=64)]
ContextReason = Literal[
    "compacted",  # a range of the window was replaced (compact)
    "trimmed",  # the policy dropped messages (or parts) from the window
    "configured",  # the window's configuration changed
    "needs_compaction",  # the window went over budget x trigger_ratio
]
Timestamp = int  # ms since the Unix epoch
GapReason = Literal[
    "retention",  # deleted by the retention policy
    "unavailable",  # not obtainable (no longer held where the server could read them)
]
CloseReason = Literal[
    "slow_consumer",  # the client did not read fast enough: subscribe again from the last seq
    "shutdown",  # the node is going away: subscribe again (on another node)
    "not_found",  # the session does not exist (any more): do not subscribe again
    "unavailable",  # the server cannot follow the session now: subscribe again, with backoff
]

ErrorCode = Literal[
    "bad_request",  # invalid input; ``message`` names the field
    "unauthorized",  # missing or invalid token
    "forbidden",
    "not_found",
    "conflict",  # expected_seq mismatch, client_msg_id reused with other content, id taken
    "too_large",  # a frame, a message (MESSAGE_BYTES_MAX) or a response over its limit
    "rate_limited",
    "unavailable",  # no leader / no quorum yet: retry (retryable = true)
    "timeout",  # outcome unknown: retry with the same client_msg_id
    "internal",
]


# -- data --------------------------------------------------------------------------------------
class Session(msgspec.Struct, array_like=True, frozen=True, gc=False):
    id: str
    user_id: str
    agent_id: str
    created_at: Timestamp
    metadata: Metadata
    last_seq: int


class Message(msgspec.Struct, array_like=True, frozen=True, gc=False):
    session_id: str
    seq: int
    sender: Sender
    sender_id: str
    kind: str
    content: str
    metadata: Metadata
    client_msg_id: str | None
    inserted_at: Timestamp
    token_count: int | None
    # version 2
    role: Role | None = None  # nil only for messages stored by version 1 (see sender)
    parts: list[Part] | None = None  # nil: the short form, ``content`` is one text part


class NewMessage(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """A message a request writes besides ``Append`` (a compaction's replacement): a map, as
    in JSON (every key required).  ``parts`` given: ``content`` must be empty."""

    role: Role
    kind: Kind
    content: Content
    parts: list[Part] | None
    metadata: Metadata
    token_count: TokenCount | None  # nil: counted by the server


# -- context windows (version 2) ---------------------------------------------------------------
class LastN(msgspec.Struct, tag="last_n", forbid_unknown_fields=True):
    """Keep the newest ``limit`` messages of the window."""

    limit: Annotated[int, Meta(ge=1, le=100_000)]


class SkipParts(msgspec.Struct, tag="skip_parts", forbid_unknown_fields=True):
    """Leave out of the window the parts whose type starts with one of ``types`` (``tool-``,
    ``reasoning``...), keeping their messages; ``limit``: as ``last_n`` too (nil: no limit)."""

    types: Annotated[list[PartPrefix], Meta(min_length=1, max_length=32)]
    limit: Annotated[int, Meta(ge=1, le=100_000)] | None = None


class TokenBudget(msgspec.Struct, tag="token_budget", forbid_unknown_fields=True):
    """Drop the oldest messages until the window fits ``token_budget x trigger_ratio``; a tool
    call and its result (the ``tool`` messages after it) leave together."""


class Manual(msgspec.Struct, tag="manual", forbid_unknown_fields=True):
    """Nothing automatic: the client compacts (``needs_compaction`` tells when)."""


Policy = LastN | SkipParts | TokenBudget | Manual


class ContextConfig(msgspec.Struct, array_like=True, frozen=True):
    token_budget: int
    trigger_ratio: float
    policy: Policy
    tokenizer: Tokenizer


class Segment(msgspec.Struct, array_like=True, frozen=True):
    """A run of the window: ``count`` messages of ``Context.messages`` standing for the
    session's messages ``from_seq..to_seq``: those very messages, or (``compacted``) the
    replacement a compaction put in their place."""

    from_seq: int
    to_seq: int
    count: int
    compacted: bool


class InboxEntry(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One session of a user's inbox, as of its last message."""

    session_id: str
    agent_id: str
    last_seq: int
    unread: int  # messages after the user's read cursor (``MarkRead``)
    last_activity: Timestamp  # inserted_at of the last message (created_at if none)
    last_sender: Sender | None  # nil: no message yet
    last_sender_id: str | None
    preview: str  # the start of the last message's content


# -- agents (version 3; docs/agents.md) ------------------------------------------------------------
AgentUrl = Annotated[
    str, Meta(min_length=10, max_length=2048, pattern=r"^https?://[^\s/?#@]+(?:[/?][^\s]*)?$")
]
HeaderName = Annotated[
    str, Meta(min_length=1, max_length=128, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
]
HeaderValue = Annotated[str, Meta(max_length=8192, pattern=r"^[^\r\n\x00]*$")]
HistoryMode = Annotated[str, Meta(max_length=16, pattern=r"^(?:all|window|tail [1-9][0-9]{0,3})$")]
"""Which messages a webhook call carries: ``all`` (the history up to the trigger, at most
``AGENT_HISTORY_MESSAGES_MAX``, the newest), ``tail N`` (the last N, 1..9999) or ``window``
(the session's context window, as ``get_context`` returns it)."""
AgentStatus = Literal["active", "disabled"]
AgentProtocol = Literal["auto", "h1", "h2"]  # h2 on http://: HTTP/2 with prior knowledge (h2c)
AGENT_HEADERS_MAX = 32


class Agent(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """A registered agent: where and how its webhook is called.  A **map** (like
    ``NewMessage``), the same in JSON; every field is required."""

    id: Id
    url: AgentUrl
    headers: Annotated[dict[HeaderName, HeaderValue], Meta(max_length=AGENT_HEADERS_MAX)]
    timeout_ms: Annotated[int, Meta(ge=100, le=3_600_000)]  # the whole call
    idle_timeout_ms: Annotated[int, Meta(ge=100, le=600_000)]  # between two chunks
    debounce_ms: Annotated[int, Meta(ge=0, le=60_000)]
    history: HistoryMode
    max_attempts: Annotated[int, Meta(ge=1, le=20)]
    status: AgentStatus
    protocol: AgentProtocol


# -- requests (client -> server) -------------------------------------------------------------------
class Hello(msgspec.Struct, array_like=True, tag="hello", forbid_unknown_fields=True):
    """Must be the first frame of a connection.  From version 4 (``REHELLO_VERSION``) a client
    may send another on the open connection, of the same ``protocol_version``, to refresh its
    token (docs/auth.md): answered ``Welcome``, or an ``Error`` that leaves the connection as
    it was."""

    rid: Rid
    protocol_version: Annotated[int, Meta(ge=1)]
    client_name: Annotated[str, Meta(max_length=128)]
    token: Annotated[str, Meta(max_length=1024)] | None


class CreateSession(
    msgspec.Struct, array_like=True, tag="create_session", forbid_unknown_fields=True
):
    """Create a session (``session_id`` nil: the server picks one).  Creating an existing id
    again with the same user and agent returns it; with others, ``conflict``."""

    rid: Rid
    user_id: Id
    agent_id: Id
    metadata: Metadata
    session_id: Id | None


class GetSession(msgspec.Struct, array_like=True, tag="get_session", forbid_unknown_fields=True):
    rid: Rid
    session_id: Id


class ListSessions(
    msgspec.Struct, array_like=True, tag="list_sessions", forbid_unknown_fields=True
):
    """A user's sessions ordered by id; ``cursor``: the ``next_cursor`` of the previous page."""

    rid: Rid
    user_id: Id
    cursor: Annotated[str, Meta(max_length=256)] | None
    limit: Limit


class Append(msgspec.Struct, array_like=True, tag="append", forbid_unknown_fields=True):
    """Append one message; the server assigns ``seq = last_seq + 1``.

    ``client_msg_id``: repeating a recent one returns the original seq with ``deduped`` (same
    content) or ``conflict`` (other content).  ``expected_seq``: append only if the session's
    ``last_seq`` equals it (``conflict`` with ``details.last_seq`` otherwise)."""

    rid: Rid
    session_id: Id
    sender: Sender
    sender_id: Annotated[str, Meta(max_length=128)]
    kind: Kind
    content: Content
    metadata: Metadata
    client_msg_id: Id | None
    expected_seq: Seq | None
    token_count: Annotated[int, Meta(ge=0)] | None
    # version 2 (a version-1 client leaves them out: the sender's role, content, no guard)
    role: Role | None = None  # nil: the sender's (user: user, agent: assistant, system: system)
    parts: list[Part] | None = None  # then ``content`` must be empty
    if_version: Version | None = None  # append only while the window is at this version


class Read(msgspec.Struct, array_like=True, tag="read", forbid_unknown_fields=True):
    """Messages with ``seq > after_seq``, oldest first, at most ``limit``."""

    rid: Rid
    session_id: Id
    after_seq: Seq
    limit: Limit


class MarkRead(msgspec.Struct, array_like=True, tag="mark_read", forbid_unknown_fields=True):
    """Move ``user_id``'s read cursor of the session forward to ``seq`` (never back)."""

    rid: Rid
    session_id: Id
    user_id: Id
    seq: Seq


class Ping(msgspec.Struct, array_like=True, tag="ping", forbid_unknown_fields=True):
    rid: Rid


class GetRoutes(msgspec.Struct, array_like=True, tag="get_routes", forbid_unknown_fields=True):
    """The routing table: which node leads each group (a client may send each request straight
    to its session's leader; a stale table costs a forward, never a wrong answer)."""

    rid: Rid


class Subscribe(msgspec.Struct, array_like=True, tag="subscribe", forbid_unknown_fields=True):
    """Follow a session: answered ``Subscribed``, then pushes every message with
    ``seq > after_seq`` in order (``MessageEvent``, ``GapEvent`` for messages that will not
    come), then the live ones, until ``Unsubscribe`` or ``SubscriptionClosed``."""

    rid: Rid
    session_id: Id
    after_seq: Seq
    # version 2: also push a ``ContextEvent`` when the session's context window changes other
    # than by an append, or goes over its budget
    context_events: bool = False
    # version 3: also push the session's live agent chunks (``ChunkEvent``)
    stream_chunks: bool = False


class Unsubscribe(msgspec.Struct, array_like=True, tag="unsubscribe", forbid_unknown_fields=True):
    """End a subscription of this connection; pushes already on their way may still arrive."""

    rid: Rid
    sub_id: SubId


class SubscribeInbox(
    msgspec.Struct, array_like=True, tag="subscribe_inbox", forbid_unknown_fields=True
):
    """Follow a user's inbox: answered ``InboxSnapshot``, then ``InboxDelta`` pushes."""

    rid: Rid
    user_id: Id


class SetContextConfig(
    msgspec.Struct, array_like=True, tag="set_context_config", forbid_unknown_fields=True
):
    """Configure the session's context window; the policy applies at once."""

    rid: Rid
    session_id: Id
    token_budget: Annotated[int, Meta(ge=1, le=100_000_000)]
    trigger_ratio: Annotated[float, Meta(gt=0.0, le=1.0)]
    policy: Policy
    tokenizer: Tokenizer | None  # nil: the node's default (``--tokenizer``)


class GetContext(msgspec.Struct, array_like=True, tag="get_context", forbid_unknown_fields=True):
    """The session's context window (linearizable, like ``read``)."""

    rid: Rid
    session_id: Id


class Compact(msgspec.Struct, array_like=True, tag="compact", forbid_unknown_fields=True):
    """Replace the window's messages ``from_seq..to_seq`` (a run of whole segments) with
    ``replacement``; the session's history is not changed.  ``if_version``: only while the
    window is at this version (``conflict`` with ``details.version`` otherwise)."""

    rid: Rid
    session_id: Id
    from_seq: Annotated[int, Meta(ge=1, le=2**63 - 1)]
    to_seq: Annotated[int, Meta(ge=1, le=2**63 - 1)]
    replacement: Annotated[list[NewMessage], Meta(max_length=64)]
    if_version: Version | None


class CreateAgent(msgspec.Struct, array_like=True, tag="create_agent", forbid_unknown_fields=True):
    """Register an agent (``conflict`` if its id is taken: ``update_agent`` changes it)."""

    rid: Rid
    agent: Agent


class UpdateAgent(msgspec.Struct, array_like=True, tag="update_agent", forbid_unknown_fields=True):
    """Replace a registered agent's fields (``not_found`` if there is none)."""

    rid: Rid
    agent: Agent


class GetAgent(msgspec.Struct, array_like=True, tag="get_agent", forbid_unknown_fields=True):
    rid: Rid
    agent_id: Id


class ListAgents(msgspec.Struct, array_like=True, tag="list_agents", forbid_unknown_fields=True):
    """Registered agents by id; ``cursor``: the ``next_cursor`` of the previous page."""

    rid: Rid
    cursor: Annotated[str, Meta(max_length=256)] | None
    limit: Limit


class DisableAgent(
    msgspec.Struct, array_like=True, tag="disable_agent", forbid_unknown_fields=True
):
    """Stop dispatching to the agent (calls in flight finish); ``update_agent`` re-enables."""

    rid: Rid
    agent_id: Id


Request = (
    Hello
    | CreateSession
    | GetSession
    | ListSessions
    | Append
    | Read
    | MarkRead
    | Ping
    | GetRoutes
    | Subscribe
    | Unsubscribe
    | SubscribeInbox
    | SetContextConfig
    | GetContext
    | Compact
    | CreateAgent
    | UpdateAgent
    | GetAgent
    | ListAgents
    | DisableAgent
)


# -- responses (server -> client) ------------------------------------------------------------------
class Welcome(msgspec.Struct, array_like=True, tag="welcome"):
    rid: int
    node_id: int
    cluster_id: str
    protocol_version: int
    max_frame_bytes: int
    # appended (version 4; older clients ignore it): how long the connection's token has left
    # (the node closes the connection then), from when this Welcome was sent; nil: no expiry
    expires_in_ms: int | None = None


class SessionInfo(msgspec.Struct, array_like=True, tag="session"):
    rid: int
    session: Session


class SessionList(msgspec.Struct, array_like=True, tag="sessions"):
    rid: int
    sessions: list[Session]
    next_cursor: str | None  # nil on the last page


class Appended(msgspec.Struct, array_like=True, tag="appended"):
    rid: int
    seq: int
    inserted_at: Timestamp
    deduped: bool


class Messages(msgspec.Struct, array_like=True, tag="messages"):
    rid: int
    messages: list[Message]
    last_seq: int  # the session's last seq when the read was served


class ReadMarked(msgspec.Struct, array_like=True, tag="read_marked"):
    rid: int
    session_id: str
    user_id: str
    seq: int  # the cursor after the request (a lower seq leaves it unchanged)


class Pong(msgspec.Struct, array_like=True, tag="pong"):
    rid: int


class Error(msgspec.Struct, array_like=True, tag="error"):
    """The answer to a request that failed.  ``rid`` 0: the server's goodbye, after which it
    closes the connection: the connection is broken (unreadable rid, oversize or undecodable
    frame, bad handshake), or the node is shutting down (``unavailable``, retryable)."""

    rid: int
    code: ErrorCode
    message: str
    retryable: bool
    details: dict[str, Any]


class Routes(msgspec.Struct, array_like=True, tag="routes"):
    rid: int
    version: int  # grows with every leader change this node sees
    leaders: list[int]  # index = group: the leader's node id, 0 if unknown
    addresses: dict[int, str]  # node id -> "host:port" of its native listener (those known)
    # appended (clients ignore trailing fields): index = group: its replicas, by node id; a
    # request may go to any of them (the leader still serves writes first-hand)
    replicas: list[list[int]] = []


class Subscribed(msgspec.Struct, array_like=True, tag="subscribed"):
    """Answers ``Subscribe``; it precedes the subscription's first push."""

    rid: int
    sub_id: int  # unique among this connection's subscriptions
    last_seq: int  # the session's last seq when the subscription started


class Unsubscribed(msgspec.Struct, array_like=True, tag="unsubscribed"):
    rid: int
    sub_id: int


class InboxSnapshot(msgspec.Struct, array_like=True, tag="inbox_snapshot"):
    """Answers ``SubscribeInbox``: the user's sessions, the most recently active first."""

    rid: int
    sub_id: int
    entries: list[InboxEntry]
    truncated: bool  # more sessions exist than the snapshot holds


class Context(msgspec.Struct, array_like=True, tag="context"):
    """Answers ``get_context``: the window's messages, oldest first, as the policy shapes
    them (``skip_parts`` leaves parts out); a compaction's replacement messages have seq 0."""

    rid: int
    session_id: str
    messages: list[Message]
    segments: list[Segment]
    token_count: int  # of the window, as counted by its tokenizer
    version: int
    needs_compaction: bool  # token_count > token_budget x trigger_ratio
    window_first_seq: int  # the oldest seq the window stands for (last_seq + 1: empty)
    last_seq: int
    config: ContextConfig | None  # nil: never configured (manual, no budget)


class ContextChanged(msgspec.Struct, array_like=True, tag="context_changed"):
    """Answers ``set_context_config`` and ``compact``: the window after the change."""

    rid: int
    session_id: str
    version: int
    token_count: int
    needs_compaction: bool
    window_first_seq: int


class AgentInfo(msgspec.Struct, array_like=True, tag="agent"):
    """Answers ``create_agent``, ``update_agent``, ``get_agent`` and ``disable_agent``."""

    rid: int
    agent: Agent


class AgentList(msgspec.Struct, array_like=True, tag="agents"):
    rid: int
    agents: list[Agent]
    next_cursor: str | None  # nil on the last page


Response = (
    Welcome
    | SessionInfo
    | SessionList
    | Appended
    | Messages
    | ReadMarked
    | Pong
    | Error
    | Routes
    | Subscribed
    | Unsubscribed
    | InboxSnapshot
    | Context
    | ContextChanged
    | AgentInfo
    | AgentList
)


# -- pushes (server -> client, answering no request) -----------------------------------------------
class MessageEvent(msgspec.Struct, array_like=True, tag="message_event"):
    """One or more consecutive messages of the subscribed session, oldest first."""

    sub_id: int
    messages: list[Message]


class GapEvent(msgspec.Struct, array_like=True, tag="gap_event"):
    """Messages ``from_seq..to_seq`` (inclusive) will not be delivered."""

    sub_id: int
    from_seq: int
    to_seq: int
    reason: GapReason


class InboxDelta(msgspec.Struct, array_like=True, tag="inbox_delta"):
    """Inbox entries that changed (each replaces the entry of its session)."""

    sub_id: int
    entries: list[InboxEntry]


class SubscriptionClosed(msgspec.Struct, array_like=True, tag="subscription_closed"):
    """The server ended the subscription; no push of it follows.  The client may subscribe
    again from its last seq, except after ``not_found``."""

    sub_id: int
    reason: CloseReason
    message: str


class ContextEvent(msgspec.Struct, array_like=True, tag="context_event"):
    """The subscribed session's context window changed other than by an append (``reason``),
    or went over its budget x trigger_ratio (``needs_compaction``): a summariser acts on it."""

    sub_id: int
    reason: ContextReason
    version: int
    token_count: int
    needs_compaction: bool
    window_first_seq: int


class ChunkEvent(msgspec.Struct, array_like=True, tag="stream_chunk"):
    """One chunk of an agent's streamed answer (AI SDK UI message stream), live, not stored:
    the answer to the user messages up to ``trigger_seq``, call ``attempt`` (a client drops
    the chunks of an earlier attempt when a later one starts).  Pushed only to subscriptions
    that asked (``Subscribe.stream_chunks``)."""

    sub_id: int
    trigger_seq: int
    attempt: int
    chunk: dict[str, Any]


Push = MessageEvent | GapEvent | InboxDelta | SubscriptionClosed | ContextEvent | ChunkEvent

RETRYABLE: frozenset[str] = frozenset({"unavailable", "timeout", "rate_limited"})


def error(rid: int, code: ErrorCode, message: str, **details: Any) -> Error:
    return Error(rid, code, message, code in RETRYABLE, details)


__all__ = [
    "AGENT_HEADERS_MAX",
    "FRAME_BYTES_MAX",
    "MESSAGE_BYTES_MAX",
    "METADATA_BYTES_MAX",
    "METADATA_DEPTH_MAX",
    "PROTOCOL_VERSION",
    "PROTOCOL_VERSIONS",
    "READ_BYTES_MAX",
    "REHELLO_VERSION",
    "RETRYABLE",
    "Agent",
    "AgentInfo",
    "AgentList",
    "AgentProtocol",
    "AgentStatus",
    "AgentUrl",
    "Append",
    "Appended",
    "ChunkEvent",
    "CloseReason",
    "Compact",
    "Context",
    "ContextChanged",
    "ContextConfig",
    "ContextEvent",
    "ContextReason",
    "CreateAgent",
    "CreateSession",
    "DisableAgent",
    "Error",
    "ErrorCode",
    "GapEvent",
    "GapReason",
    "GetAgent",
    "GetContext",
    "GetRoutes",
    "GetSession",
    "Hello",
    "HistoryMode",
    "InboxDelta",
    "InboxEntry",
    "InboxSnapshot",
    "LastN",
    "ListAgents",
    "ListSessions",
    "Manual",
    "MarkRead",
    "Message",
    "MessageEvent",
    "Messages",
    "NewMessage",
    "Part",
    "Ping",
    "Policy",
    "Pong",
    "Push",
    "Read",
    "ReadMarked",
    "Request",
    "Response",
    "Role",
    "Routes",
    "Segment",
    "Session",
    "SessionInfo",
    "SessionList",
    "SetContextConfig",
    "SkipParts",
    "SubId",
    "Subscribe",
    "SubscribeInbox",
    "Subscribed",
    "SubscriptionClosed",
    "TokenBudget",
    "Tokenizer",
    "Unsubscribe",
    "Unsubscribed",
    "UpdateAgent",
    "Welcome",
    "error",
]
