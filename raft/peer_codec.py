"""The peer-to-peer wire protocol of the Raft transport, sans I/O.

A frame is a 4-byte big-endian length N followed by N bytes of msgpack: one ``Frame`` (a tagged
union of array-like Structs).  ``PeerProtocol`` is the state machine of one connection: bytes go
in through ``receive_data``, events come out of ``next_event``, frames to write come out of
``send`` (and handshake answers out of ``data_to_send``).  It does no I/O and draws no random
numbers: the challenge is handed in by the caller.

Rules of this file:
- A declared length is compared with the limit of the current state before its body is
  buffered; during the handshake the limit is tiny.
- Anything a peer sends that is not allowed by ``TRANSITIONS`` (or does not decode, or fails a
  check) raises ``ProtocolError`` with a stable code.  The first error is sticky: the protocol
  is closed and every later call raises the same error.
- Handshake (the lower node id dials): dialer -> ``Hello{cluster, id, challenge_d}``; acceptor
  -> ``HelloReply{id, mac("reply", challenge_d), challenge_a}``; dialer -> ``Auth{mac("auth",
  challenge_a)}``.  Each mac is HMAC-SHA256 over label, challenge, cluster id and both node ids
  under the shared cluster secret, so each side proves it knows the secret, and a reply cannot
  be reflected as an auth.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct

import msgspec
import msgspec.msgpack

from .errors import InvariantViolation, RaftError, check
from .messages import InstallSnapshot, Message

FRAME_BYTES_MAX = 16 * 1024 * 1024
"""Default limit of an established connection's frames (batches and snapshot chunks)."""
HANDSHAKE_FRAME_BYTES_MAX = 1024
"""Limit of a frame before the peer is authenticated."""
CHALLENGE_BYTES = 32
HEADER = struct.Struct(">I")
_IDS = struct.Struct(">QQ")
_NODE_ID_MAX = 2**64 - 1


class ProtocolError(RaftError):
    """A peer broke the protocol; the connection must close.  ``code`` says how."""

    code = "protocol_error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


# Stable codes of ProtocolError.
FRAME_TOO_LARGE = "frame_too_large"
MALFORMED_FRAME = "malformed_frame"
UNEXPECTED_FRAME = "unexpected_frame"
WRONG_CLUSTER = "wrong_cluster"
UNKNOWN_NODE = "unknown_node"
AUTH_FAILED = "auth_failed"
MALFORMED_SNAPSHOT = "malformed_snapshot"


# --- frames --------------------------------------------------------------------------------------


class Hello(msgspec.Struct, array_like=True, tag=1, frozen=True):
    cluster_id: str
    node_id: int
    challenge: bytes


class HelloReply(msgspec.Struct, array_like=True, tag=2, frozen=True):
    node_id: int
    mac: bytes
    challenge: bytes


class Auth(msgspec.Struct, array_like=True, tag=3, frozen=True):
    mac: bytes


class Batch(msgspec.Struct, array_like=True, tag=4, gc=False):
    """``commits``: commit notices of the sender's leaders for the receiver's followers, flat
    ``group, term, commit`` triples (raft/multi.py).  Added after the first release, last and
    with a default: a node without it ignores the trailing field, and decodes none from such
    a node (its followers wait for the next append or heartbeat, as before)."""

    items: list[tuple[int, Message]]
    commits: list[int] = []


class SnapshotChunk(msgspec.Struct, array_like=True, tag=5, frozen=True):
    """A slice of an encoded ``InstallSnapshot`` message for ``group``; chunks arrive in order."""

    group: int
    snapshot_index: int
    offset: int
    data: bytes
    last: bool


class Ping(msgspec.Struct, array_like=True, tag=6, frozen=True):
    nonce: int = 0


class Pong(msgspec.Struct, array_like=True, tag=7, frozen=True):
    nonce: int = 0


class AppBatch(msgspec.Struct, array_like=True, tag=8, gc=False):
    """Opaque application payloads (e.g. requests forwarded to a group's leader): the transport
    carries them in order and knows nothing of their content."""

    items: list[bytes]


Frame = Hello | HelloReply | Auth | Batch | SnapshotChunk | Ping | Pong | AppBatch

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Frame] = msgspec.msgpack.Decoder(Frame)
_snapshot_decoder = msgspec.msgpack.Decoder(InstallSnapshot)


def encode_frame(frame: Frame) -> bytearray:
    """The frame with its length prefix, in a fresh buffer the caller may keep."""
    buf = bytearray(HEADER.size)
    _encoder.encode_into(frame, buf, HEADER.size)
    HEADER.pack_into(buf, 0, len(buf) - HEADER.size)
    return buf


def encode_snapshot_message(message: InstallSnapshot) -> bytes:
    return _encoder.encode(message)


def decode_snapshot_message(data: bytes | bytearray) -> InstallSnapshot:
    try:
        return _snapshot_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise ProtocolError(MALFORMED_SNAPSHOT, str(e)) from None


def handshake_mac(
    secret: bytes, label: bytes, challenge: bytes, cluster_id: str, dialer: int, acceptor: int
) -> bytes:
    message = label + b"\0" + challenge + _IDS.pack(dialer, acceptor) + cluster_id.encode()
    return hmac.new(secret, message, hashlib.sha256).digest()


# --- events --------------------------------------------------------------------------------------


class PeerAuthenticated(msgspec.Struct, frozen=True):
    peer_id: int


class BatchReceived(msgspec.Struct, frozen=True):
    items: list[tuple[int, Message]]
    commits: list[int] = []


class ChunkReceived(msgspec.Struct, frozen=True):
    chunk: SnapshotChunk


class AppReceived(msgspec.Struct, frozen=True):
    items: list[bytes]


Event = PeerAuthenticated | BatchReceived | ChunkReceived | AppReceived


# --- the state machine ---------------------------------------------------------------------------


class Role(enum.Enum):
    DIALER = "dialer"
    ACCEPTOR = "acceptor"


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"  # acceptor, start
    AWAIT_REPLY = "await_reply"  # dialer, start (Hello sent)
    AWAIT_AUTH = "await_auth"  # acceptor, HelloReply sent
    ESTABLISHED = "established"
    CLOSED = "closed"  # after a protocol error


# (state, frame received) -> next state.  Every other pair is an unexpected frame.
TRANSITIONS: dict[tuple[State, type], State] = {
    (State.AWAIT_HELLO, Hello): State.AWAIT_AUTH,
    (State.AWAIT_REPLY, HelloReply): State.ESTABLISHED,
    (State.AWAIT_AUTH, Auth): State.ESTABLISHED,
    (State.ESTABLISHED, Batch): State.ESTABLISHED,
    (State.ESTABLISHED, SnapshotChunk): State.ESTABLISHED,
    (State.ESTABLISHED, Ping): State.ESTABLISHED,
    (State.ESTABLISHED, Pong): State.ESTABLISHED,
    (State.ESTABLISHED, AppBatch): State.ESTABLISHED,
}
# Frames this side may send once established.
SENDABLE = (Batch, SnapshotChunk, Ping, Pong, AppBatch)


class PeerProtocol:
    """One peer connection's protocol state.

    ``peer_ids`` are the node ids this side accepts as the other end: for a dialer the one peer
    it dialled, for an acceptor the known peers with a lower id than its own.
    """

    def __init__(
        self,
        role: Role,
        node_id: int,
        cluster_id: str,
        secret: bytes,
        challenge: bytes,
        peer_ids: frozenset[int],
        frame_bytes_max: int = FRAME_BYTES_MAX,
    ) -> None:
        check(len(challenge) == CHALLENGE_BYTES, "challenge must be CHALLENGE_BYTES long")
        check(0 <= node_id <= _NODE_ID_MAX, "node id out of range")
        self.role = role
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.peer_id = 0  # known once authenticated (dialer: once the reply is verified)
        self.frame_bytes_max = frame_bytes_max
        self.error: ProtocolError | None = None
        self._secret = secret
        self._challenge = challenge
        self._peer_ids = peer_ids
        self._buffer = bytearray()
        self._pos = 0
        self._out = bytearray()
        if role is Role.DIALER:
            self.state = State.AWAIT_REPLY
            self._out += encode_frame(Hello(cluster_id, node_id, challenge))
        else:
            self.state = State.AWAIT_HELLO

    # bytes in ------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._raise_if_closed()
        self._buffer += data

    def next_event(self) -> Event | None:
        """The next event the buffered bytes make, or None until more bytes arrive."""
        while True:
            self._raise_if_closed()
            frame = self._next_frame()
            if frame is None:
                return None
            try:
                event = self._handle(frame)
            except ProtocolError as e:
                self._close(e)
                raise
            if event is not None:
                return event

    def _next_frame(self) -> Frame | None:
        available = len(self._buffer) - self._pos
        if available < HEADER.size:
            self._compact()
            return None
        (length,) = HEADER.unpack_from(self._buffer, self._pos)
        limit = self._limit()
        if length > limit:
            self._close(ProtocolError(FRAME_TOO_LARGE, f"frame of {length} bytes > {limit}"))
            self._raise_if_closed()
        if available < HEADER.size + length:
            self._compact()
            return None
        start = self._pos + HEADER.size
        self._pos = start + length
        try:
            return _decoder.decode(memoryview(self._buffer)[start : self._pos])
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self._close(ProtocolError(MALFORMED_FRAME, str(e)))
            raise self._error_now() from None

    def _limit(self) -> int:
        if self.state is State.ESTABLISHED:
            return self.frame_bytes_max
        return HANDSHAKE_FRAME_BYTES_MAX

    def _compact(self) -> None:
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0

    def _handle(self, frame: Frame) -> Event | None:
        after = TRANSITIONS.get((self.state, type(frame)))
        if after is None:
            raise ProtocolError(UNEXPECTED_FRAME, f"{type(frame).__name__} in {self.state.value}")
        event: Event | None = None
        match frame:
            case Batch(items, commits):
                for _, m in items:
                    self.check_addressing(m)
                if len(commits) % 3:
                    raise ProtocolError(MALFORMED_FRAME, "commit notices not in triples")
                event = BatchReceived(items, commits)
            case SnapshotChunk():
                event = ChunkReceived(frame)
            case AppBatch(items):
                event = AppReceived(items)
            case Ping(nonce):
                self._out += encode_frame(Pong(nonce))
            case Pong():
                pass
            case Hello():
                self._on_hello(frame)
            case HelloReply():
                event = self._on_reply(frame)
            case Auth(mac):
                self._verify(mac, b"auth", self._challenge, self.peer_id, self.node_id)
                event = PeerAuthenticated(self.peer_id)
        self.state = after
        return event

    def _on_hello(self, hello: Hello) -> None:
        if hello.cluster_id != self.cluster_id:
            raise ProtocolError(WRONG_CLUSTER, f"cluster {hello.cluster_id!r}")
        self._check_peer(hello.node_id, hello.challenge)
        self.peer_id = hello.node_id
        mac = handshake_mac(
            self._secret, b"reply", hello.challenge, self.cluster_id, hello.node_id, self.node_id
        )
        self._out += encode_frame(HelloReply(self.node_id, mac, self._challenge))

    def _on_reply(self, reply: HelloReply) -> PeerAuthenticated:
        self._check_peer(reply.node_id, reply.challenge)
        self._verify(reply.mac, b"reply", self._challenge, self.node_id, reply.node_id)
        self.peer_id = reply.node_id
        mac = handshake_mac(
            self._secret, b"auth", reply.challenge, self.cluster_id, self.node_id, reply.node_id
        )
        self._out += encode_frame(Auth(mac))
        return PeerAuthenticated(reply.node_id)

    def _check_peer(self, peer_id: int, challenge: bytes) -> None:
        if peer_id not in self._peer_ids:
            raise ProtocolError(UNKNOWN_NODE, f"node {peer_id} may not connect here")
        if len(challenge) != CHALLENGE_BYTES:
            raise ProtocolError(MALFORMED_FRAME, "bad challenge length")

    def check_addressing(self, m: Message) -> None:
        """A peer speaks only for itself, and only to us: no message may name another sender."""
        if m.frm != self.peer_id or m.to != self.node_id:
            raise ProtocolError(
                MALFORMED_FRAME,
                f"message from {m.frm} to {m.to} on the connection {self.peer_id}->{self.node_id}",
            )

    def _verify(
        self, mac: bytes, label: bytes, challenge: bytes, dialer: int, acceptor: int
    ) -> None:
        want = handshake_mac(self._secret, label, challenge, self.cluster_id, dialer, acceptor)
        if not hmac.compare_digest(mac, want):
            raise ProtocolError(AUTH_FAILED, f"bad {label.decode()} mac ({dialer} -> {acceptor})")

    # bytes out -----------------------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Handshake frames and Pongs the protocol produced on its own (b"" if none)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def send(self, frame: Frame) -> bytearray:
        """Encode a frame for an established connection.

        Raises ``ProtocolError(FRAME_TOO_LARGE)`` (a local error: nothing was sent) if the frame
        exceeds ``frame_bytes_max``; the caller splits a batch and tries again.
        """
        self._raise_if_closed()
        if self.state is not State.ESTABLISHED:  # (per frame: inline checks)
            raise InvariantViolation("send before the handshake completed")
        if not isinstance(frame, SENDABLE):
            raise InvariantViolation("handshake frames are sent by the protocol itself")
        data = encode_frame(frame)
        if len(data) - HEADER.size > self.frame_bytes_max:
            raise ProtocolError(FRAME_TOO_LARGE, f"local frame of {len(data)} bytes")
        return data

    # errors --------------------------------------------------------------------------------------

    def _close(self, error: ProtocolError) -> None:
        if self.error is None:
            self.error = error
        self.state = State.CLOSED
        self._buffer = bytearray()
        self._pos = 0

    def _error_now(self) -> ProtocolError:
        check(self.error is not None, "no error recorded")
        assert self.error is not None
        return self.error

    def _raise_if_closed(self) -> None:
        if self.error is not None:
            raise self.error
