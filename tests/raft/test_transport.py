"""The peer codec (sans I/O) and the asyncio transport over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import pytest
import uvloop

from raft import InvariantViolation
from raft import peer_codec as codec
from raft.messages import (
    AppendEntries,
    ConfState,
    Entry,
    Heartbeat,
    InstallSnapshot,
    Message,
    RequestVote,
    Snapshot,
    SnapshotMeta,
    VoteResponse,
)
from raft.transport import Item, Transport

SECRET = b"s3cret"
CLUSTER = "test-cluster"

# --- codec helpers -------------------------------------------------------------------------------


def protocol(role: codec.Role, node_id: int, peers: set[int], **kw: Any) -> codec.PeerProtocol:
    args: dict[str, Any] = {"cluster_id": CLUSTER, "secret": SECRET}
    args.update(kw)
    challenge = bytes([node_id]) * codec.CHALLENGE_BYTES
    return codec.PeerProtocol(role, node_id, challenge=challenge, peer_ids=frozenset(peers), **args)


def drain(p: codec.PeerProtocol) -> list[codec.Event]:
    events = []
    while (event := p.next_event()) is not None:
        events.append(event)
    return events


def pair(**kw: Any) -> tuple[codec.PeerProtocol, codec.PeerProtocol]:
    """A dialer (node 1) and an acceptor (node 2) after a completed handshake."""
    d = protocol(codec.Role.DIALER, 1, {2}, **kw)
    a = protocol(codec.Role.ACCEPTOR, 2, {1}, **kw)
    a.receive_data(d.data_to_send())
    assert drain(a) == []
    d.receive_data(a.data_to_send())
    assert drain(d) == [codec.PeerAuthenticated(2)]
    a.receive_data(d.data_to_send())
    assert drain(a) == [codec.PeerAuthenticated(1)]
    assert d.state is a.state is codec.State.ESTABLISHED
    return d, a


def hb(frm: int = 1, to: int = 2, term: int = 1) -> Heartbeat:
    return Heartbeat(frm=frm, to=to, term=term, commit=0)


def append(index: int, data: bytes = b"x", frm: int = 1, to: int = 2) -> AppendEntries:
    entries = [Entry(term=1, index=index, data=data)]
    return AppendEntries(frm, to, 1, index - 1, 1, entries, 0)


def vote(frm: int = 1, to: int = 2) -> RequestVote:
    return RequestVote(frm=frm, to=to, term=2, last_index=0, last_term=0)


# --- codec tests ---------------------------------------------------------------------------------


def test_handshake_split_at_every_byte_offset() -> None:
    hello = protocol(codec.Role.DIALER, 1, {2}).data_to_send()
    for i in range(len(hello) + 1):
        a = protocol(codec.Role.ACCEPTOR, 2, {1})
        a.receive_data(hello[:i])
        assert drain(a) == []
        a.receive_data(hello[i:])
        assert drain(a) == []
        assert a.state is codec.State.AWAIT_AUTH and a.data_to_send()


def test_frames_round_trip_split_at_every_byte_offset() -> None:
    items: list[tuple[int, Message]] = [(0, hb()), (7, append(5, b"abc")), (255, vote())]
    chunk = codec.SnapshotChunk(group=3, snapshot_index=9, offset=0, data=b"snap", last=True)
    d, _ = pair()
    data = d.send(codec.Batch(items)) + d.send(chunk) + d.send(codec.Ping(4))
    want = [codec.BatchReceived(items), codec.ChunkReceived(chunk)]
    for i in range(len(data) + 1):
        _, a = pair()
        a.receive_data(data[:i])
        got = drain(a)
        a.receive_data(data[i:])
        got += drain(a)
        assert got == want
        assert a.data_to_send() == codec.encode_frame(codec.Pong(4))


def test_commit_notices_ride_in_a_batch_and_older_nodes_ignore_them() -> None:
    """``Batch.commits`` was added after the first release, last and with a default: a batch
    from a node without it decodes with none, and a node without it skips the trailing field
    (a decoder of the old frame shape stands in for one)."""
    items: list[tuple[int, Message]] = [(7, append(5, b"abc"))]
    d, a = pair()
    a.receive_data(d.send(codec.Batch(items, [7, 2, 5, 9, 2, 4])))
    a.receive_data(d.send(codec.Batch([], [1, 2, 3])))
    assert drain(a) == [codec.BatchReceived(items, [7, 2, 5, 9, 2, 4]),
                        codec.BatchReceived([], [1, 2, 3])]  # fmt: skip

    class OldBatch(msgspec.Struct, array_like=True, tag=4):
        items: list[tuple[int, Message]]

    new = codec.encode_frame(codec.Batch(items, [7, 2, 5]))[codec.HEADER.size :]
    assert msgspec.msgpack.decode(new, type=OldBatch).items == items
    old = msgspec.msgpack.encode(OldBatch(items))
    assert msgspec.msgpack.decode(old, type=codec.Frame) == codec.Batch(items, [])
    _, a = pair()
    a.receive_data(d.send(codec.Batch(items, [7, 2])))  # not in triples
    with pytest.raises(codec.ProtocolError, match=codec.MALFORMED_FRAME):
        drain(a)


def test_oversize_frame_is_rejected_from_its_header_alone() -> None:
    _, a = pair(frame_bytes_max=1000)
    a.receive_data(codec.HEADER.pack(1000))  # exactly the limit: waits for its body
    assert a.next_event() is None
    _, a = pair(frame_bytes_max=1000)
    a.receive_data(codec.HEADER.pack(1001))  # no body: the header is enough
    with pytest.raises(codec.ProtocolError) as e:
        a.next_event()
    assert e.value.code == codec.FRAME_TOO_LARGE
    with pytest.raises(codec.ProtocolError) as again:  # sticky
        a.receive_data(b"more")
    assert again.value is e.value and a.state is codec.State.CLOSED


def test_handshake_frames_have_a_small_limit() -> None:
    a = protocol(codec.Role.ACCEPTOR, 2, {1})
    a.receive_data(codec.HEADER.pack(codec.HANDSHAKE_FRAME_BYTES_MAX + 1))
    with pytest.raises(codec.ProtocolError, match=codec.FRAME_TOO_LARGE):
        a.next_event()


def test_local_oversize_frame_raises_before_anything_is_sent() -> None:
    d, _ = pair(frame_bytes_max=100)
    with pytest.raises(codec.ProtocolError, match=codec.FRAME_TOO_LARGE):
        d.send(codec.Batch([(1, append(1, b"y" * 200))]))
    assert d.send(codec.Ping())  # the connection is still fine


@pytest.mark.parametrize("established", [False, True])
def test_garbage_is_a_protocol_error_never_a_crash(established: bool) -> None:
    rng = random.Random(3)
    for _ in range(300):
        a = pair()[1] if established else protocol(codec.Role.ACCEPTOR, 2, {1})
        body = rng.randbytes(rng.randrange(0, 60))
        a.receive_data(codec.HEADER.pack(len(body)) + body)
        try:
            drain(a)
        except codec.ProtocolError as e:
            assert e.code in {codec.MALFORMED_FRAME, codec.UNEXPECTED_FRAME}


def test_valid_msgpack_of_the_wrong_shape_is_malformed() -> None:
    _, a = pair()
    a.receive_data(codec.encode_frame(codec.Ping())[:4] + b"\x93\x04\x01\x02")  # [4, 1, 2]
    with pytest.raises(codec.ProtocolError, match=codec.MALFORMED_FRAME):
        drain(a)


@pytest.mark.parametrize(
    ("dialer", "acceptor", "code", "failing"),
    [
        ({"cluster_id": "other"}, {}, codec.WRONG_CLUSTER, "acceptor"),
        ({"secret": b"wrong"}, {}, codec.AUTH_FAILED, "dialer"),
        ({}, {"peers": {5}}, codec.UNKNOWN_NODE, "acceptor"),
    ],
)
def test_handshake_refusals(
    dialer: dict[str, Any], acceptor: dict[str, Any], code: str, failing: str
) -> None:
    d = protocol(codec.Role.DIALER, 1, {2}, **dialer)
    a = protocol(codec.Role.ACCEPTOR, 2, acceptor.pop("peers", {1}), **acceptor)
    with pytest.raises(codec.ProtocolError) as e:
        a.receive_data(d.data_to_send())
        drain(a)
        d.receive_data(a.data_to_send())
        drain(d)
    assert e.value.code == code
    assert (d if failing == "dialer" else a).state is codec.State.CLOSED


def test_forged_auth_and_early_batch_are_refused() -> None:
    d = protocol(codec.Role.DIALER, 1, {2})
    a = protocol(codec.Role.ACCEPTOR, 2, {1})
    a.receive_data(d.data_to_send())
    drain(a)
    a.receive_data(codec.encode_frame(codec.Auth(b"\0" * 32)))
    with pytest.raises(codec.ProtocolError, match=codec.AUTH_FAILED):
        drain(a)
    early = protocol(codec.Role.ACCEPTOR, 2, {1})
    early.receive_data(codec.encode_frame(codec.Batch([(1, hb())])))
    with pytest.raises(codec.ProtocolError, match=codec.UNEXPECTED_FRAME):
        drain(early)


@pytest.mark.parametrize(("frm", "to"), [(3, 2), (1, 3)])
def test_a_peer_cannot_speak_for_another_node(frm: int, to: int) -> None:
    """An authenticated peer may send only its own messages, addressed to us."""
    d, a = pair()
    a.receive_data(d.send(codec.Batch([(1, hb(frm=1, to=2)), (2, hb(frm=frm, to=to))])))
    with pytest.raises(codec.ProtocolError, match=codec.MALFORMED_FRAME):
        drain(a)


# --- transport helpers ---------------------------------------------------------------------------


def run(
    factory: Callable[[], Coroutine[Any, Any, None]],
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop,
) -> None:
    """Run a test coroutine (on uvloop unless told otherwise) with a hard timeout."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(asyncio.wait_for(factory(), 15))


def listening_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(16)
    sock.setblocking(False)
    return sock


FAST = {"backoff_min_s": 0.01, "backoff_max_s": 0.1, "handshake_timeout_s": 1.0}


class Node:
    """A transport plus a record of everything it delivered."""

    def __init__(
        self, node_id: int, sock: socket.socket, addrs: dict[int, tuple[str, int]], **kw: Any
    ) -> None:
        self.id = node_id
        self.port = sock.getsockname()[1]
        self.received: list[tuple[int, Item]] = []
        self.batches: list[tuple[int, list[Item]]] = []
        self.statuses: list[tuple[int, int, bool]] = []
        self.app: list[tuple[int, bytes]] = []
        peers = {pid: a for pid, a in addrs.items() if pid != node_id}
        args: dict[str, Any] = {"cluster_id": CLUSTER, "secret": SECRET, **FAST}
        args.update(kw)
        self.t = Transport(
            node_id,
            listen=sock,
            peers=peers,
            on_batch=self._on_batch,
            on_snapshot_status=lambda to, g, ok: self.statuses.append((to, g, ok)),
            on_app=lambda frm, payloads: self.app.extend((frm, p) for p in payloads),
            **args,
        )

    def _on_batch(self, frm: int, items: list[Item]) -> None:
        self.batches.append((frm, items))
        self.received.extend((frm, item) for item in items)


async def start_nodes(ids: list[int], absent: tuple[int, ...] = (), **kw: Any) -> dict[int, Node]:
    """Started nodes ``ids``; the ``absent`` ids are peers with an address but no process."""
    socks = {i: listening_socket() for i in [*ids, *absent]}
    addrs = {i: ("127.0.0.1", s.getsockname()[1]) for i, s in socks.items()}
    nodes = {i: Node(i, socks[i], addrs, **kw) for i in ids}
    for n in nodes.values():
        await n.t.start()
    return nodes


async def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def connected(nodes: dict[int, Node]) -> None:
    ids = set(nodes)
    await wait_for(lambda: all(set(n.t.connected_peers()) == ids - {n.id} for n in nodes.values()))


async def close_all(*nodes: Node) -> None:
    for n in nodes:
        await n.t.close()


async def exchange(a: Node, b: Node, group: int = 1) -> None:
    """a sends b a vote request; wait until b delivered it."""
    msg = vote(a.id, b.id)
    before = len(b.received)
    a.t.send(b.id, [(group, msg)])
    await wait_for(lambda: (a.id, (group, msg)) in b.received[before:])


# --- transport tests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loop_factory", [uvloop.new_event_loop, asyncio.new_event_loop], ids=["uvloop", "asyncio"]
)
def test_three_nodes_exchange_batches_over_one_connection_per_pair(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def main() -> None:
        nodes = await start_nodes([1, 2, 3])
        await connected(nodes)
        for a in nodes.values():
            for b in nodes.values():
                if a is not b:
                    await exchange(a, b, group=a.id * 10 + b.id)
        for n in nodes.values():
            assert n.t.connection_count() == 2
            assert all(n.t.stats.peers[p].connects == 1 for p in nodes if p != n.id)
        # the lower id dials: node 1 accepts nothing, node 3 accepts from 1 and 2
        assert [nodes[i].t.stats.accepted for i in (1, 2, 3)] == [0, 1, 2]
        await close_all(*nodes.values())

    run(main, loop_factory)


def test_sends_in_one_iteration_leave_as_one_frame() -> None:
    async def main() -> None:
        nodes = await start_nodes([1, 2])
        await connected(nodes)
        a, b = nodes[1], nodes[2]
        before = a.t.stats.peers[2].batches_sent
        items = [(g, append(g, bytes([g % 256]) * 10)) for g in range(200)]
        for item in items:
            a.t.send(2, [item])
        await wait_for(lambda: len(b.received) == 200)
        assert a.t.stats.peers[2].batches_sent == before + 1
        assert b.batches == [(1, items)]
        await close_all(a, b)

    run(main)


def test_commit_notices_leave_with_the_batch_after_its_messages_or_are_counted_dropped() -> None:
    async def main() -> None:
        nodes = await start_nodes([1, 2], absent=(3,))
        await connected(nodes)
        a, b = nodes[1], nodes[2]
        got: list[tuple[int, list[int]]] = []
        order: list[str] = []
        b.t.on_commits = lambda frm, notices: (got.append((frm, notices)), order.append("c"))
        on_batch = b.t.on_batch
        b.t.on_batch = lambda frm, items: (on_batch(frm, items), order.append("m"))
        before = a.t.stats.peers[2].batches_sent
        a.t.send(2, [(5, append(5, b"x"))])
        a.t.send_commits(2, [5, 1, 3])
        a.t.send_commits(2, [6, 1, 9])
        await wait_for(lambda: len(got) == 1)
        assert got == [(1, [5, 1, 3, 6, 1, 9])] and order == ["m", "c"]
        assert a.t.stats.peers[2].batches_sent == before + 1  # one frame for both
        a.t.send_commits(2, [7, 1, 4])  # notices alone
        await wait_for(lambda: len(got) == 2)
        stats = a.t.stats.peers[2]
        assert (stats.commits_sent, b.t.stats.peers[1].commits_received) == (3, 3)
        a.t.send_commits(3, [1, 1, 1, 2, 1, 1])  # a peer not connected
        assert a.t.stats.peers[3].commits_dropped == 2
        await close_all(a, b)

    run(main)


async def rogue_handshake(port: int, hello: codec.Hello, auth_mac: bytes | None) -> bytes:
    """Send a Hello (and optionally an Auth) from a raw socket; return what the node answers
    before it closes (b"" if it closes at once)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(codec.encode_frame(hello))
    if auth_mac is not None:
        writer.write(codec.encode_frame(codec.Auth(auth_mac)))
    data = await asyncio.wait_for(reader.read(), 3)  # until EOF: the node closes
    writer.close()
    return data


def test_bad_peers_are_refused_while_good_peers_keep_working() -> None:
    async def main() -> None:
        nodes = await start_nodes([1, 3], absent=(2,))
        await connected(nodes)
        good, target = nodes[1], nodes[3]
        addrs = {3: ("127.0.0.1", target.port)}
        rogues = [  # node 2 is a member, but these impostors fail the handshake
            Node(2, listening_socket(), addrs, secret=b"wrong"),
            Node(2, listening_socket(), addrs, cluster_id="other"),
            Node(0, listening_socket(), addrs),  # not a member
        ]
        for r in rogues:
            await r.t.start()
        challenge = b"c" * codec.CHALLENGE_BYTES
        # a raw client that knows the protocol but not the secret: forged Auth
        await rogue_handshake(target.port, codec.Hello(CLUSTER, 2, challenge), b"\0" * 32)
        # node 4 has a higher id than 3: it must not dial 3
        assert await rogue_handshake(target.port, codec.Hello(CLUSTER, 4, challenge), None) == b""
        await wait_for(lambda: target.t.stats.refused >= 5)
        await wait_for(lambda: all(r.t.stats.refused >= 1 for r in rogues))
        await exchange(good, target)
        await exchange(target, good)
        assert target.t.connected_peers() == [1]
        assert all(r.t.connected_peers() == [] for r in rogues)
        assert not [item for item in target.received if item[0] != 1]
        await close_all(*rogues, good, target)

    run(main)


@pytest.mark.parametrize(
    "junk",
    [b"\x00\x00\x00\x05hello", b"\xff" * 64, codec.HEADER.pack(2**31) + b"x" * 100],
    ids=["garbage", "ff", "oversize"],
)
def test_garbage_and_oversized_frames_close_that_connection_only(junk: bytes) -> None:
    async def main() -> None:
        nodes = await start_nodes([1, 2])
        await connected(nodes)
        reader, writer = await asyncio.open_connection("127.0.0.1", nodes[2].port)
        writer.write(junk)
        assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the node
        writer.close()
        await exchange(nodes[1], nodes[2])
        await exchange(nodes[2], nodes[1])
        assert nodes[2].t.stats.peers[1].connects == 1
        await close_all(*nodes.values())

    run(main)


def test_handshake_slots_go_to_the_newest_connections() -> None:
    """At most ``handshakes_max`` inbound handshakes: a new connection takes the slot of the
    oldest (closed at once, long before its handshake deadline)."""

    async def main() -> None:
        nodes = await start_nodes([1, 2], handshakes_max=2, handshake_timeout_s=10.0)
        await connected(nodes)
        streams = [await asyncio.open_connection("127.0.0.1", nodes[2].port) for _ in range(4)]
        for reader, _ in streams[:2]:  # the oldest two: evicted
            assert await asyncio.wait_for(reader.read(), 1) == b""
        await wait_for(lambda: nodes[2].t.stats.handshakes_evicted == 2)
        assert len(nodes[2].t._handshaking) == 2
        await exchange(nodes[1], nodes[2])
        for _, writer in streams:
            writer.close()
        await close_all(*nodes.values())

    run(main)


def test_a_peer_reconnects_through_a_flood_of_stalled_connections(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 27 item 6: stalled unauthenticated connections (from another address, and from
    the peer's own) keep coming and never send a byte; a peer whose connection dropped is
    connected again within a second, and the log has a few lines, not one per connection."""

    async def main() -> None:
        nodes = await start_nodes([1, 2], handshake_timeout_s=30.0)
        await connected(nodes)
        stalled: list[asyncio.StreamWriter] = []

        async def flood() -> None:
            while True:
                for source in ("127.0.0.2", "127.0.0.1"):
                    _, writer = await asyncio.open_connection(
                        "127.0.0.1", nodes[2].port, local_addr=(source, 0)
                    )
                    stalled.append(writer)
                await asyncio.sleep(0.002)

        flooding = asyncio.create_task(flood())
        await wait_for(lambda: len(stalled) >= 300)
        assert len(nodes[2].t._handshaking) <= 64
        old = nodes[1].t._peers[2].conn
        assert old is not None
        old.abort("the peer went away")
        start = time.monotonic()
        await wait_for(lambda: nodes[1].t.stats.peers[2].connects == 2, timeout_s=3)
        await connected(nodes)
        assert time.monotonic() - start < 1.5
        await exchange(nodes[1], nodes[2])
        flooding.cancel()
        evicted = nodes[2].t.stats.handshakes_evicted
        assert evicted >= len(stalled) - 64 - 10, (evicted, len(stalled))
        for writer in stalled:
            writer.close()
        await close_all(*nodes.values())
        lines = [r for r in caplog.records if "unauthenticated" in r.getMessage()]
        assert 1 <= len(lines) <= 3, [r.getMessage() for r in lines]

    with caplog.at_level("WARNING", logger="raft.transport"):
        run(main)


def test_garbage_from_an_authenticated_peer_closes_and_it_reconnects() -> None:
    async def main() -> None:
        nodes = await start_nodes([1, 2])
        await connected(nodes)
        conn = nodes[1].t._peers[2].conn
        assert conn is not None
        conn.write(codec.HEADER.pack(2**30))  # node 1 misbehaves once
        await wait_for(lambda: nodes[2].t.stats.protocol_errors == 1)
        await wait_for(lambda: nodes[1].t.stats.peers[2].connects == 2)
        await connected(nodes)
        await exchange(nodes[1], nodes[2])
        await close_all(*nodes.values())

    run(main)


@pytest.mark.parametrize("restarted", [1, 2])
def test_reconnect_after_the_peer_restarts(restarted: int) -> None:
    async def main() -> None:
        nodes = await start_nodes([1, 2])
        await connected(nodes)
        other = nodes[3 - restarted]
        old = nodes[restarted]
        await old.t.close()
        await wait_for(lambda: other.t.connected_peers() == [])
        addrs = {1: ("127.0.0.1", nodes[1].port), 2: ("127.0.0.1", nodes[2].port)}
        new = Node(restarted, listening_socket(old.port), addrs)
        await new.t.start()
        nodes[restarted] = new
        await connected(nodes)
        await exchange(other, new)
        await exchange(new, other)
        assert other.t.stats.peers[restarted].connects == 2
        await close_all(other, new)

    run(main)


def test_slow_peer_memory_is_bounded_and_drops_are_counted() -> None:
    async def main() -> None:
        limit = 256 * 1024
        nodes = await start_nodes([1, 2], queue_bytes_max=limit, write_buffer_high_bytes=limit)
        await connected(nodes)
        a, b = nodes[1], nodes[2]
        slow = b.t._peers[1].conn
        assert slow is not None
        slow.pause_reading()
        conn = a.t._peers[2].conn
        assert conn is not None and conn._transport is not None
        payload = b"p" * 32 * 1024
        peak = 0
        for i in range(2000):  # 64 MiB offered in total
            a.t.send(2, [(1, append(i + 1, payload)), (2, hb())])
            await asyncio.sleep(0)
            buffered = conn._transport.get_write_buffer_size()
            peak = max(peak, buffered + a.t._peers[2].queue_bytes)
        stats = a.t.stats.peers[2]
        assert stats.dropped_slow > 1000
        assert peak < 3 * limit, peak
        a.t.send(2, [(3, vote())])  # not resendable: waits in the queue
        assert a.t._peers[2].queue
        slow.resume_reading()
        await wait_for(lambda: (1, (3, vote())) in b.received)
        await close_all(a, b)

    run(main)


def snapshot_message(size: int) -> InstallSnapshot:
    data = random.Random(5).randbytes(size)
    meta = SnapshotMeta(index=42, term=3, conf_state=ConfState(voters=(1, 2)))
    return InstallSnapshot(frm=1, to=2, term=3, snapshot=Snapshot(meta=meta, data=data))


def test_snapshot_streams_in_chunks_while_batches_keep_flowing() -> None:
    async def main() -> None:
        nodes = await start_nodes([1, 2], snapshot_chunk_bytes=16 * 1024)
        await connected(nodes)
        a, b = nodes[1], nodes[2]
        message = snapshot_message(1024 * 1024)  # 64 chunks
        a.t.send(2, [(9, message)])  # routed to the snapshot lane
        i = 0
        while not any(item == (9, message) for _, item in b.received):
            i += 1
            a.t.send(2, [(1, VoteResponse(1, 2, 3, reject=False)), (2, hb())])
            await asyncio.sleep(0)
            assert i < 10_000
        position = [item for _, item in b.received].index((9, message))
        assert position >= 20  # batches of other groups arrived while the snapshot streamed
        await wait_for(lambda: a.statuses == [(2, 9, True)])
        assert b.t.stats.peers[1].snapshots_received == 1
        await close_all(a, b)

    run(main)


def test_snapshot_chunks_leave_at_most_at_snapshot_bytes_per_s() -> None:
    """512 KiB in 64 KiB chunks at 1 MiB/s: the bucket holds one chunk, the other seven wait
    for theirs (0.44 s); Raft batches are not held back meanwhile."""

    async def main() -> None:
        nodes = await start_nodes(
            [1, 2], snapshot_chunk_bytes=64 * 1024, snapshot_bytes_per_s=1024 * 1024
        )
        await connected(nodes)
        a, b = nodes[1], nodes[2]
        loop = asyncio.get_running_loop()
        start = loop.time()
        message = snapshot_message(512 * 1024)
        a.t.send(2, [(9, message)])
        await asyncio.sleep(0.1)
        a.t.send(2, [(2, hb())])  # not behind the snapshot's pace
        await wait_for(lambda: (2, hb()) in [item for _, item in b.received])
        assert (9, message) not in [item for _, item in b.received]
        await wait_for(lambda: a.statuses == [(2, 9, True)])
        elapsed = loop.time() - start
        assert 0.4 <= elapsed < 3, elapsed
        assert a.t.stats.snapshot_waits > 0
        assert any(item == (9, message) for _, item in b.received)
        await close_all(a, b)

    run(main)


def test_snapshot_to_a_peer_that_goes_down_is_reported_failed() -> None:
    async def main() -> None:
        nodes = await start_nodes([1, 2], snapshot_chunk_bytes=16 * 1024)
        await connected(nodes)
        a, b = nodes[1], nodes[2]
        b.t._peers[1].conn.pause_reading()  # type: ignore[union-attr]
        a.t.send_snapshot(2, 4, snapshot_message(8 * 1024 * 1024))
        await asyncio.sleep(0.05)
        await b.t.close()
        await wait_for(lambda: a.statuses == [(2, 4, False)])
        a.t.send_snapshot(2, 5, snapshot_message(10))  # no connection: fails at once
        await wait_for(lambda: a.statuses == [(2, 4, False), (2, 5, False)])
        await a.t.close()

    run(main)


def test_silent_peer_is_declared_down() -> None:
    async def main() -> None:
        nodes = await start_nodes([1, 2], ping_interval_s=0.05, dead_after_s=0.3)
        await connected(nodes)
        downs: list[int] = []
        nodes[2].t.on_peer_down = downs.append
        nodes[2].t._peers[1].conn.pause_reading()  # type: ignore[union-attr]
        await wait_for(lambda: downs == [1], timeout_s=3)
        await connected(nodes)  # node 1 dials again
        await close_all(*nodes.values())

    run(main)


def test_application_payloads_travel_in_order_batched_and_bounded() -> None:
    async def main() -> None:
        nodes = await start_nodes([1, 2], app_queue_bytes_max=64 * 1024)
        await connected(nodes)
        a, b = nodes[1], nodes[2]
        payloads = [b"p%d" % i for i in range(500)]
        assert all(a.t.send_app(2, p) for p in payloads)
        assert b.t.send_app(1, b"back")
        await wait_for(lambda: len(b.app) == 500 and len(a.app) == 1)
        assert b.app == [(1, p) for p in payloads]
        assert a.app == [(2, b"back")]
        assert a.t.stats.peers[2].app_sent == 500
        # The queue is bounded: a burst beyond it is refused, not buffered.
        big = b"x" * 1024
        results = [a.t.send_app(2, big) for _ in range(100)]
        assert results.count(False) > 0 and a.t.stats.peers[2].app_refused > 0
        await close_all(b)
        await wait_for(lambda: a.t.connected_peers() == [])
        assert a.t.send_app(2, b"to a dead peer") is False
        assert a.t.send_app(99, b"to nobody") is False
        await close_all(a)

    run(main)


def test_an_app_batch_before_authentication_is_refused() -> None:
    d = protocol(codec.Role.DIALER, 1, {2})
    a = protocol(codec.Role.ACCEPTOR, 2, {1})
    a.receive_data(bytes(codec.encode_frame(codec.AppBatch([b"sneaky"]))))
    with pytest.raises(codec.ProtocolError) as e:
        a.next_event()
    assert e.value.code == codec.UNEXPECTED_FRAME
    del d


def test_a_joining_peer_is_added_and_a_retired_one_refused() -> None:
    async def main() -> None:
        nodes = await start_nodes([1, 2])
        await connected(nodes)
        # Node 3 joins: it knows both; they learn of it (the cluster view) and connect.
        sock3 = listening_socket()
        addrs = {i: ("127.0.0.1", n.port) for i, n in nodes.items()}
        addrs[3] = ("127.0.0.1", sock3.getsockname()[1])
        n3 = Node(3, sock3, addrs)
        await n3.t.start()
        await asyncio.sleep(0.05)
        assert n3.t.connected_peers() == []  # unknown to 1 and 2 yet: refused
        for n in nodes.values():
            n.t.add_peer(3, addrs[3])
        nodes[3] = n3
        await connected(nodes)
        await exchange(nodes[1], n3)
        await exchange(n3, nodes[2])
        # Node 1 is removed: the others retire it; it keeps dialling and is refused.
        for i in (2, 3):
            nodes[i].t.retire_peer(1)
            assert nodes[i].t.retired(1) and 1 not in nodes[i].t.peers()
        await wait_for(lambda: nodes[1].t.connected_peers() == [])
        refused = nodes[2].t.stats.refused
        await wait_for(lambda: nodes[2].t.stats.refused > refused + 1)  # its redials
        assert nodes[2].t.connected_peers() == [3] and n3.t.connected_peers() == [2]
        nodes[2].t.send(1, [(0, hb(2, 1))])  # to a retired node: dropped, counted
        assert nodes[2].t.stats.dropped_no_peer == 1
        with pytest.raises(InvariantViolation):
            nodes[2].t.add_peer(1, addrs[1])
        await exchange(nodes[2], n3)
        await close_all(*nodes.values())

    run(main)
