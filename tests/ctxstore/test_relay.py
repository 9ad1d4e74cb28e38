"""ctxstore/relay.py and relay_streams.py on in-process clusters of 4-5 real nodes (WALs, peer
sockets, client ports) where each group lives on 3 of them, placed by rendezvous hashing as the
cluster view places them: a client connected to a node that does not hold its session's group
writes, reads, subscribes and lists there as anywhere, through the group's replicas."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import msgspec
import uvloop

from bench.nodestats import parse_metrics
from ctxstore import placement
from ctxstore.auth import SERVICE
from ctxstore.config import Settings
from ctxstore.launcher import free_port
from ctxstore.metrics import NodeMetrics
from ctxstore.node import Node
from ctxstore.peer_messages import RelayAnswer, RelayEnded, RelayEnvelope, RelayRequest
from ctxstore.relay import SWEEP_S, Relay
from ctxstore.router import GroupMoved
from ctxstore.server import Service
from ctxstore.subscriptions import SubscriptionLimits
from tests.ctxstore.agent_server import agent_server
from wire.aio import Server
from wire.aio import serve as wire_serve
from wire.client import Client, ClientError, agent, connect
from wire.framing import ClientConnection, PushReceived, ResponseReceived
from wire.protocol import (
    PROTOCOL_VERSION,
    Append,
    GapEvent,
    GetSession,
    Hello,
    InboxDelta,
    InboxEntry,
    InboxSnapshot,
    LastN,
    Message,
    MessageEvent,
    Routes,
    Session,
    SessionInfo,
    Subscribe,
    Subscribed,
    Welcome,
)

GROUPS = 8


def run(coro: Coroutine[Any, Any, None], timeout_s: float = 90) -> None:
    uvloop.run(asyncio.wait_for(coro, timeout_s))


@dataclass
class Member:
    node: Node
    service: Service
    clients: Server

    @property
    def target(self) -> str:
        return "{}:{}".format(*self.clients.address)

    @property
    def id(self) -> int:
        return self.node.settings.node_id


def view_of(n: int) -> dict[int, tuple[int, ...]]:
    """Each group's replicas in a cluster of nodes 1..n (``placement.placement``)."""
    return placement.placement(range(1, n + 1), GROUPS)


def away(n: int, node: int, prefix: str = "s") -> tuple[str, tuple[int, ...]]:
    """The first session id ``prefix<i>`` whose group ``node`` does not hold, and its replicas."""
    view = view_of(n)
    for i in range(1000):
        sid = f"{prefix}{i}"
        replicas = view[placement.group_of(sid, GROUPS)]
        if node not in replicas:
            return sid, replicas
    raise AssertionError("no such session id")


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path,
    n: int,
    views: dict[int, Callable[[int], tuple[int, ...]]] | None = None,
    **extra: Any,
) -> AsyncIterator[dict[int, Member]]:
    """``n`` nodes on this loop, each group on its ``view_of(n)`` replicas (node i believes
    ``views[i](g)`` after it started, if given: a stale view)."""
    view = view_of(n)
    peer_ports = {i: free_port() for i in range(1, n + 1)}
    members: dict[int, Member] = {}
    async with contextlib.AsyncExitStack() as stack:
        for i in peer_ports:
            peers = ",".join(f"{j}=127.0.0.1:{p}" for j, p in peer_ports.items() if j != i)
            settings = Settings(
                node_id=i, data_dir=str(tmp_path / f"n{i}"), listen="127.0.0.1:0",
                peer_listen=f"127.0.0.1:{peer_ports[i]}", peers=peers, groups=GROUPS, tick_ms=10,
                wal_writer="inline", **extra,
            )  # fmt: skip
            node = Node(settings, replicas=lambda g: view[g])
            await node.start()
            if views and i in views:
                node.replicas = views[i]
            service = Service(node)
            clients = await wire_serve(service, "127.0.0.1", 0)
            node.advertise("{}:{}".format(*clients.address))
            members[i] = Member(node, service, clients)
            stack.push_async_callback(stop, members, i)
        for m in members.values():
            assert await m.node.wait_leaders(20)
        yield members


async def stop(members: dict[int, Member], i: int) -> None:
    m = members.pop(i, None)
    if m is not None:
        m.clients.close()
        await m.clients.wait_closed()
        await m.node.stop()


async def applied(
    nodes: dict[int, Member], ids: list[str], view: dict[int, tuple[int, ...]]
) -> None:
    """Until every replica of their groups applied the creation of these sessions or agents
    (reads without a barrier, a list or an inbox, see them then wherever they are served)."""

    def known(m: Member, i: str) -> bool:
        state = m.node.state
        return state.last_seq(i) is not None or state.get_agent(i) is not None

    for _ in range(400):
        if all(known(nodes[r], i) for i in ids for r in view[placement.group_of(i, GROUPS)]):
            return
        await asyncio.sleep(0.025)
    raise AssertionError("the replicas did not apply the creations within 10 s")


async def client(m: Member, **kw: Any) -> Client:
    return await connect(m.target, **kw)


def seqs(items: list[Any]) -> list[int]:
    return [x.seq for x in items if isinstance(x, Message)]


async def take(sub: Any, count: int) -> list[Any]:
    out = []
    async for item in sub:
        out.append(item)
        if len(out) == count:
            return out
    return out


def test_a_node_not_holding_the_group_serves_every_request_through_a_replica(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        sid, replicas = away(4, 4)
        async with cluster(tmp_path, 4) as nodes:
            far = nodes[4]
            assert placement.group_of(sid, GROUPS) not in far.node.host
            async with await client(far) as c:
                info = await c.create_session("alice", "bot", {"k": 1}, sid)
                assert info.session.id == sid
                named = await c.create_session("alice", "bot")  # named by node 4
                assert (await c.get_session(named.session.id)).session.user_id == "alice"
                for i in range(5):
                    assert (await c.append(sid, f"m{i}")).seq == i + 1
                read = await c.read(sid)
                assert [m.content for m in read.messages] == [f"m{i}" for i in range(5)]
                assert (await c.mark_read(sid, "alice", 3)).seq == 5  # (its own appends: 5)
                await c.set_context_config(sid, 10_000, LastN(2))
                context = await c.get_context(sid)
                assert [m.seq for m in context.messages] == [4, 5]
                try:
                    await c.get_session("nope")
                except ClientError as e:
                    assert e.code == "not_found"
                else:
                    raise AssertionError("no error for an unknown session")
                try:
                    await c.append(sid, "late", expected_seq=1)
                except ClientError as e:
                    assert e.code == "conflict"
                else:
                    raise AssertionError("no conflict")
            assert far.service.relay.relayed >= 10
            served = sum(m.service.relay.served_relays for m in nodes.values())
            assert served == far.service.relay.relayed
            scraped = parse_metrics(NodeMetrics(far.node, far.service).render().decode())
            assert scraped["ctxstore_relay_requests_total"] == far.service.relay.relayed
            assert scraped["ctxstore_relay_served_total"] == 0
            # The replicas hold it all; node 4 none of it.
            assert far.node.state.last_seq(sid) is None
            assert nodes[replicas[0]].node.state.last_seq(sid) == 5

    run(main())


def test_a_replica_that_no_longer_holds_the_group_sends_the_request_on(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        view = view_of(5)

        def stale(g: int) -> tuple[int, ...]:  # node 4 believes another node holds each group
            wrong = min(n for n in range(1, 6) if n not in view[g] and n != 4)
            return (wrong, *view[g])  # (asked first: the view's order)

        async with cluster(tmp_path, 5, views={4: stale}) as nodes:
            far = nodes[4]
            async with await client(far) as c:
                for i in range(GROUPS * 2):
                    await c.create_session("alice", "bot", {}, f"s{i}")
                    assert (await c.append(f"s{i}", "x")).seq == 1
                    assert len((await c.read(f"s{i}")).messages) == 1
            # Each group's first request went to the wrong node, which refused it, and on.
            relayed = {placement.group_of(f"s{i}", GROUPS) for i in range(GROUPS * 2)}
            relayed -= set(far.node.host.groups())
            refused = sum(m.service.relay.refused_relays for m in nodes.values())
            assert relayed and refused >= len(relayed)

    run(main())


def test_requests_fail_unavailable_when_no_replica_is_reachable(tmp_path: Path) -> None:
    async def main() -> None:
        sid, replicas = away(4, 4)
        async with cluster(tmp_path, 4, request_timeout_s=2.0) as nodes:
            far = nodes[4]
            async with await client(far) as c:
                await c.create_session("alice", "bot", {}, sid)
                for i in replicas:
                    await stop(nodes, i)
                loop = asyncio.get_running_loop()
                started = loop.time()
                for call in (c.get_session(sid), c.append(sid, "lost?")):
                    try:
                        await call
                    except ClientError as e:
                        assert e.code == "unavailable" and e.retryable
                    else:
                        raise AssertionError("answered without a replica")
                assert loop.time() - started < 2.0  # (not left to the deadline)
                assert not far.service.relay._calls

    run(main())


def test_a_relayed_subscription_replays_goes_live_and_outlives_its_replica(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        sid, replicas = away(4, 4)
        async with cluster(tmp_path, 4) as nodes:
            far = nodes[4]
            async with await client(far) as c, await client(nodes[replicas[0]]) as writer:
                await writer.create_session("alice", "bot", {}, sid)
                for i in range(3):
                    await writer.append(sid, f"old{i}")
                sub = c.subscribe(sid, after_seq=0)
                await sub
                assert seqs(await take(sub, 3)) == [1, 2, 3]  # replayed
                await writer.append(sid, "live")
                assert seqs(await take(sub, 1)) == [4]
                # Kill the replica carrying the subscription: it resumes at another, unseen.
                follow = far.service.follow
                (stream,) = follow.streams.all()
                victim = stream.peer
                assert victim in replicas
                await stop(nodes, victim)
                survivor = next(i for i in replicas if i != victim)
                async with await client(nodes[survivor]) as w2:
                    for i in range(3):
                        await w2.append_with_retry(sid, f"after{i}")
                got = await take(sub, 3)
                assert seqs(got) == [5, 6, 7]
                assert sub.resumes == 0  # the client never saw it break
                assert follow.resumed >= 1 and stream.peer != victim
                await c.unsubscribe(sub.sub_id or 0)
                await asyncio.sleep(0.2)
                assert not follow.streams.all()
                assert not any(m.service.relay._served for m in nodes.values())

    run(main())


class SlowReader:
    """A native connection that reads only when told to, through a small receive buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.core = ClientConnection()
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, target: str) -> SlowReader:
        host, port = target.rsplit(":", 1)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # (no autotuning)
        sock.setblocking(False)
        reader = cls(sock)
        await reader.loop.sock_connect(sock, (host, int(port)))
        await reader.send(Hello(1, PROTOCOL_VERSION, "slow", None))
        assert isinstance(await reader.next(), Welcome)
        return reader

    async def send(self, request: Any) -> None:
        self.core.send(request)
        await self.loop.sock_sendall(self.sock, self.core.data_to_send())

    async def next(self) -> Any:
        while True:
            event = self.core.next_event()
            if isinstance(event, ResponseReceived):
                return event.response
            if isinstance(event, PushReceived):
                return event.push
            assert event is None, event
            data = await self.loop.sock_recv(self.sock, 65536)
            self.core.receive_data(data or None)


def test_a_relayed_subscription_of_a_slow_client_loses_nothing(tmp_path: Path) -> None:
    COUNT = 1500

    async def main() -> None:
        sid, replicas = away(4, 4)
        async with cluster(tmp_path, 4) as nodes:
            small = SubscriptionLimits(backlog_bytes_high=64 * 1024, page_bytes=16 * 1024)
            for m in nodes.values():
                m.node.subscriptions.limits = small
                m.service.follow.limits = small
            far = nodes[4]
            async with await client(nodes[replicas[0]]) as writer:
                await writer.create_session("alice", "bot", {}, sid)
                reader = await SlowReader.open(far.target)
                await reader.send(Subscribe(2, sid, 0))
                assert isinstance(await reader.next(), Subscribed)
                (stream,) = far.service.follow.streams.all()
                backlog_max = 0

                async def watch() -> None:  # what node 4 holds for its client
                    nonlocal backlog_max
                    while True:
                        backlog_max = max(backlog_max, stream.conn.backlog_bytes)
                        await asyncio.sleep(0.005)

                watcher = asyncio.create_task(watch())
                body = "x" * 6000  # 9 MB while the reader reads nothing: over the sockets'
                for k in range(0, COUNT, 100):  # buffers (the server's grows to 4 MB)
                    await asyncio.gather(
                        *(writer.append(sid, f"{i}:{body}") for i in range(k, k + 100))
                    )
                # The sockets' buffers fill (the replica replays what they take), then node 4
                # holds back: it acknowledges nothing more, and the replica stops pushing.
                for _ in range(400):
                    if far.service.follow.acks_withheld:
                        break
                    await asyncio.sleep(0.05)
                assert far.service.follow.acks_withheld > 0
                await asyncio.sleep(0.3)
                watcher.cancel()
                # Node 4 held two windows at most for its client, never the 9 MB.
                high = small.backlog_bytes_high
                assert backlog_max <= 2 * high + small.page_bytes + 8 * 1024
                replica = nodes[stream.peer]
                got: list[int] = []
                while len(got) < COUNT:
                    push = await reader.next()
                    assert isinstance(push, MessageEvent), push
                    got += [m.seq for m in push.messages]
                assert got == list(range(1, COUNT + 1))
                assert replica.node.subscriptions.replaying == 0
                reader.sock.close()

    run(main())


def test_a_relayed_subscription_reports_the_gaps_retention_made(tmp_path: Path) -> None:
    async def main() -> None:
        sid, replicas = away(4, 4)
        async with cluster(tmp_path, 4, retention_max_messages=5, tail_messages_max=2) as nodes:
            far = nodes[4]
            async with await client(nodes[replicas[0]]) as writer:
                await writer.create_session("alice", "bot", {}, sid)
                for i in range(20):
                    await writer.append(sid, f"m{i}")
            for i in replicas:  # the archives apply retention as they flush
                await nodes[i].node.archive.barrier()
            async with await client(far) as c:
                sub = c.subscribe(sid, after_seq=0)
                await sub
                items = await take(sub, 6)
                gap = items[0]
                assert isinstance(gap, GapEvent) and gap.from_seq == 1
                assert seqs(items[1:]) == list(range(gap.to_seq + 1, gap.to_seq + 6))

    run(main())


def test_lists_span_the_groups_held_elsewhere(tmp_path: Path) -> None:
    async def main() -> None:
        view = view_of(5)
        async with cluster(tmp_path, 5) as nodes:
            far = nodes[5]
            sids = sorted(f"s{i:02}" for i in range(23))
            agent_ids = sorted(f"a{i:02}" for i in range(11))
            async with await client(far) as c:
                for sid in sids:
                    await c.create_session("alice", "bot", {}, sid)
                await c.create_session("bob", "bot", {}, "b1")
                for aid in agent_ids:
                    await c.create_agent(agent(aid, "http://127.0.0.1:9/never"))
                await applied(nodes, [*sids, *agent_ids], view)  # (lists read applied state)
                listed, cursor, pages = [], None, 0
                while True:
                    page = await c.list_sessions("alice", cursor, limit=5)
                    listed += [s.id for s in page.sessions]
                    pages += 1
                    cursor = page.next_cursor
                    if cursor is None:
                        break
                assert listed == sids and pages == 5
                agents, cursor = [], None
                while True:
                    got = await c.list_agents(cursor, limit=4)
                    agents += [a.id for a in got.agents]
                    cursor = got.next_cursor
                    if cursor is None:
                        break
                assert agents == agent_ids
            assert len(far.node.state.user_session_ids("alice")) < len(sids)  # some elsewhere

    run(main())


def test_a_session_leader_not_holding_its_agents_group_reads_the_agent_from_a_replica(
    tmp_path: Path,
) -> None:
    """The dispatcher runs on the session's leader; the agent lives in the group its id hashes
    to, which that node may not hold: it reads the agent through the relay (it used to find
    nothing in its own state, so the session's agent was never called)."""

    async def main() -> None:
        view = view_of(4)
        sid = "s0"
        group = placement.group_of(sid, GROUPS)
        async with cluster(tmp_path, 4) as nodes, agent_server() as srv:
            leader = 0
            for _ in range(400):
                leader = nodes[view[group][0]].node.group_leader(group) or 0
                if leader:
                    break
                await asyncio.sleep(0.025)
            aid = next(f"bot{i}" for i in range(1000)
                       if leader not in view[placement.group_of(f"bot{i}", GROUPS)])  # fmt: skip
            dispatcher = nodes[leader].node.dispatcher
            async with await client(nodes[leader]) as c:
                await c.create_agent(agent(aid, srv.url("/sse"), debounce_ms=0, protocol="h2"))
                await c.create_session("u", aid, {}, sid)
                await c.append(sid, "hello")
                async with asyncio.timeout(15):
                    while len((await c.read(sid)).messages) < 2:
                        await asyncio.sleep(0.02)
                reply = (await c.read(sid)).messages[1]
                assert (reply.sender, reply.sender_id) == ("agent", aid)
                assert group not in nodes[leader].node.driver.host or leader in view[group]
                assert dispatcher.remote_lookups >= 1 and dispatcher.lookups == 0
                # Disabled on its own group: this node's calls stop once its copy is re-read.
                await c.disable_agent(aid)
                await asyncio.sleep(dispatcher.limits.remote_agent_ttl_s + 0.2)
                await c.append(sid, "second")  # the kept copy is stale: read again
                await asyncio.sleep(0.5)
                await c.append(sid, "third")
                await asyncio.sleep(0.5)
                senders = [m.sender for m in (await c.read(sid)).messages]
            assert senders.count("agent") <= 2 and senders[-1] == "user", senders
            assert len(srv.agent.calls) <= 2

    run(main())


def test_get_routes_tells_each_groups_replicas(tmp_path: Path) -> None:
    async def main() -> None:
        view = view_of(5)
        async with cluster(tmp_path, 5) as nodes:
            async with await client(nodes[5]) as c:
                routes = await c.get_routes()
            assert [tuple(r) for r in routes.replicas] == [view[g] for g in range(GROUPS)]
            for g, leader in enumerate(routes.leaders):
                assert leader == 0 or leader in view[g]

    run(main())


def test_routes_of_an_older_server_decode_without_replicas() -> None:
    old = msgspec.msgpack.encode(["routes", 9, 3, [1, 2], {1: "127.0.0.1:7400"}])
    routes = msgspec.msgpack.decode(old, type=Routes)
    assert (routes.leaders, routes.replicas) == ([1, 2], [])


async def deltas_until(
    inbox: Any, want: Callable[[dict[str, InboxEntry]], bool], seen: dict[str, InboxEntry]
) -> None:
    """Read the inbox's deltas into ``seen`` until ``want(seen)``."""
    while not want(seen):
        delta = await asyncio.wait_for(anext(inbox), 10)
        assert isinstance(delta, InboxDelta), delta
        for e in delta.entries:
            seen[e.session_id] = e


def test_an_inbox_gathers_the_sessions_of_groups_held_elsewhere(tmp_path: Path) -> None:
    async def main() -> None:
        view = view_of(5)
        async with cluster(tmp_path, 5) as nodes:
            far = nodes[5]
            sids = [f"s{i}" for i in range(24)]
            remote = [s for s in sids if 5 not in view[placement.group_of(s, GROUPS)]]
            local = [s for s in sids if s not in remote]
            assert remote and local
            async with await client(far) as c, await client(far) as writer:
                for sid in sids:
                    await writer.create_session("alice", "bot", {}, sid)
                await writer.create_session("bob", "bot", {}, "b1")
                await applied(nodes, [*sids, "b1"], view)  # (an inbox reads applied state)
                inbox = c.subscribe_inbox("alice")
                await inbox
                snapshot = await anext(inbox)
                assert isinstance(snapshot, InboxSnapshot) and not snapshot.truncated
                assert sorted(e.session_id for e in snapshot.entries) == sorted(sids)
                follow = far.service.follow
                (box,) = follow.inboxes.all()
                assert box.hosted == {g for g in range(GROUPS) if 5 in view[g]}
                peers = {p.peer for p in box.parts}
                assert 5 not in peers and len(peers) <= 3  # a cover, not a node per group
                # Deltas, for the groups here and elsewhere.
                seen: dict[str, InboxEntry] = {}
                await writer.append(remote[0], "hello")
                await writer.append(local[0], "there")
                await writer.append("b1", "not alice's")
                await deltas_until(
                    inbox, lambda s: all(s.get(x, _E).last_seq == 1 for x in (remote[0], local[0])),
                    seen,
                )  # fmt: skip
                assert "b1" not in seen
                # A node carrying part of the inbox dies: its groups are followed elsewhere.
                victim = next(iter(peers))
                lost = [s for s in remote if victim in view[placement.group_of(s, GROUPS)]]
                assert lost
                await stop(nodes, victim)
                for sid in lost:
                    await writer.append_with_retry(sid, "after")
                await deltas_until(
                    inbox, lambda s: all(s.get(x, _E).last_seq >= 1 for x in lost), seen
                )
                assert inbox.resumes == 0 and follow.resumed >= 1
                await c.unsubscribe(inbox.sub_id or 0)
                await asyncio.sleep(0.2)
                assert not follow.inboxes.all()
                assert not any(m.service.relay._served for m in nodes.values())
                assert not far.node.inboxes.count

    run(main())


_E = InboxEntry("", "", 0, 0, 0, None, None, "")


# -- the origin's choices, with a recording transport ---------------------------------------------
class Wire:
    """A transport that records what the relay sends and which peers are connected."""

    def __init__(self, connected: set[int]) -> None:
        self.connected = connected
        self.gone: set[int] = set()  # removed from the cluster (retired ids)
        self.sent: list[tuple[int, Any]] = []

    def retired(self, peer: int) -> bool:
        return peer in self.gone

    def send_app(self, to: int, payload: bytes) -> bool:
        if to not in self.connected:
            return False
        self.sent.append((to, msgspec.msgpack.decode(payload, type=RelayEnvelope)))
        return True

    def is_connected(self, peer: int) -> bool:
        return peer in self.connected

    def requests(self) -> list[tuple[int, RelayRequest]]:
        return [(p, e) for p, e in self.sent if isinstance(e, RelayRequest)]


def origin(wire: Wire, **kw: Any) -> Relay:
    """Node 9's relay, for group 0 held by nodes 1, 2, 3 (none of them hosted here)."""
    return Relay(9, lambda: wire, lambda g: False, lambda g: (1, 2, 3), lambda g: 0,
                 cast(Any, None), **kw)  # fmt: skip


def answer(
    relay: Relay, peer: int, fid: int, response: Any, code: str = "", leader: int = 0
) -> None:
    data = b"" if response is None else msgspec.msgpack.encode(response)
    relay.on_envelope(peer, RelayAnswer(fid, data, code, "", leader))


def test_the_origin_asks_the_next_replica_when_one_cannot_serve() -> None:
    async def main() -> None:
        wire = Wire({1, 2, 3})
        relay = origin(wire)
        got: list[Any] = []
        relay.request(0, GetSession(7, "s"), SERVICE, got.append)
        ((peer, first),) = wire.requests()
        assert peer == 1  # the first in the view's order
        answer(relay, 1, first.fid, None, code="unavailable")  # not hosted there (any more)
        peer, second = wire.requests()[1]
        assert peer == 2 and not got
        info = SessionInfo(7, Session("s", "u", "a", 0, {}, 0))
        answer(relay, 2, second.fid, info, leader=3)
        assert got == [info]
        # The leader it named is asked first from now on; a read lost with it goes on.
        relay.request(0, GetSession(8, "s"), SERVICE, got.append)
        peer = wire.requests()[2][0]
        assert peer == 3
        relay.on_peer_down(3)
        assert wire.requests()[3][0] in (1, 2) and len(got) == 1
        relay.stop()

    run(main())


def test_a_write_lost_with_its_replica_is_timeout_and_one_past_its_deadline_too() -> None:
    async def main() -> None:
        wire = Wire({1, 2, 3})
        relay = origin(wire, request_timeout_s=0.2)
        got: list[Any] = []
        relay.request(
            0, Append(5, "s", "user", "u", "text", "x", {}, "m1", None, None), SERVICE, got.append
        )
        ((peer, _),) = wire.requests()
        relay.on_peer_down(peer)
        assert [(e.code, e.rid) for e in got] == [("timeout", 5)]  # outcome unknown
        assert len(wire.requests()) == 1  # not sent again
        relay.request(0, GetSession(6, "s"), SERVICE, got.append)
        await asyncio.sleep(0.4)  # no answer at all: the deadline answers
        assert [(e.code, e.rid) for e in got[1:]] == [("timeout", 6)]
        relay.stop()

    run(main())


def test_a_request_handed_on_keeps_what_is_left_of_its_deadline() -> None:
    """``timeout_s`` (a request handed on: ``Service._hand_on``) bounds the relayed call, and
    never beyond ``request_timeout_s``."""

    async def main() -> None:
        wire = Wire({1, 2, 3})
        loop = asyncio.get_running_loop()
        got: list[Any] = []
        relay = origin(wire, request_timeout_s=5.0)
        started = loop.time()
        relay.request(0, GetSession(1, "s"), SERVICE, got.append, timeout_s=0.1)
        while not got:
            await asyncio.sleep(0.01)
        assert got[0].code == "timeout" and loop.time() - started < 0.5
        relay.stop()
        capped = origin(wire, request_timeout_s=0.1)
        started = loop.time()
        capped.request(0, GetSession(2, "s"), SERVICE, got.append, timeout_s=10.0)
        while len(got) < 2:
            await asyncio.sleep(0.01)
        assert got[1].code == "timeout" and loop.time() - started < 0.5
        capped.stop()

    run(main())


def test_with_no_replica_connected_a_request_fails_unavailable_soon() -> None:
    async def main() -> None:
        wire = Wire(set())
        relay = origin(wire, request_timeout_s=5.0)
        got: list[Any] = []
        started = asyncio.get_running_loop().time()
        relay.request(0, GetSession(1, "s"), SERVICE, got.append)
        while not got:
            await asyncio.sleep(0.01)
        assert got[0].code == "unavailable" and not wire.sent
        assert asyncio.get_running_loop().time() - started < 1.0  # 5 asks, 20..100 ms apart
        relay.stop()

    run(main())


def test_a_request_whose_group_moves_away_while_here_is_handed_on_to_its_replicas(
    tmp_path: Path,
) -> None:
    """A replica on its way out of a group (the view no longer places it there) that hears from
    no leader does not serve a request it took for the group; nothing of it was proposed
    there, so instead of answering ``unavailable`` (the client would retry) it relays it to
    the group's other replicas, once: a client's write and read there are answered, and a
    request another node relayed to it goes back to that node, which asks the next replica."""

    async def main() -> None:
        sid, _ = away(4, 4)
        group = placement.group_of(sid, GROUPS)
        async with cluster(tmp_path, 4) as nodes:
            view = view_of(4)
            leaving = nodes[next(r for r in view[group] if nodes[r].node.group_leader(group)
                                 != r)]  # fmt: skip
            far = nodes[4]
            async with await client(far) as c:
                await c.create_session("alice", "bot", {}, sid)
            await applied(nodes, [sid], view)
            router = leaving.node.router
            router.placed = lambda g: g != group
            router._reachable_leader = lambda g: 0 if g == group else 1  # type: ignore[method-assign]
            async with await client(leaving) as c:
                assert (await c.append(sid, "one", client_msg_id="m1")).seq == 1
                assert [m.content for m in (await c.read(sid)).messages] == ["one"]
            assert leaving.service.handed_on == 2 and router.group_gone == 2
            assert leaving.service.relay.relayed == 2
            # Relayed to the leaving replica first (node 4's view): refused back, asked on.
            far.node.replicas = lambda g: (
                (leaving.id, *(r for r in view[g] if r != leaving.id)) if g == group else view[g]
            )
            far.service.relay._leaders.pop(group, None)  # (as its earlier answer told)
            async with await client(far) as c:
                assert (await c.append(sid, "two", client_msg_id="m2")).seq == 2
            assert leaving.service.relay.refused_relays == 1
            assert leaving.service.relay.relayed == 2  # (never relayed a relayed request on)
            scraped = parse_metrics(NodeMetrics(leaving.node, leaving.service).render().decode())
            assert scraped["ctxstore_relay_handed_on_total"] == 3
            others = [nodes[r] for r in view[group] if r != leaving.id]
            for _ in range(200):  # (a follower applies a little later)
                if [m.node.state.last_seq(sid) for m in others] == [2, 2]:
                    break
                await asyncio.sleep(0.01)
            assert [m.node.state.last_seq(sid) for m in others] == [2, 2]
            # One whose deadline is (nearly) spent is answered unavailable, as before.
            replies: list[Any] = []
            late = SimpleNamespace(closed=False, context=None, reply=replies.append)
            moved = GroupMoved("unavailable", "moved")
            since = time.perf_counter() - 4.99  # (request_timeout_s: 5 s)
            leaving.service._hand_on(cast(Any, late), group, GetSession(9, sid), since, moved)
            assert [(r.code, r.rid) for r in replies] == [("unavailable", 9)]
            assert leaving.service.handed_on == 3

    run(main())


def test_the_ends_owed_to_a_peer_removed_from_the_cluster_are_forgotten() -> None:
    """Streams a replica served end while their origin is away: told when it is back; an
    origin removed from the cluster never is, and its ids (up to ``ENDS_MAX``) leave."""

    async def main() -> None:
        wire = Wire({1})
        relay = origin(wire)
        relay.now()  # (its sweep runs from the first use)
        relay._ends[7] = {3, 4}  # owed to node 7, not connected
        relay._ends[1] = {5}
        await asyncio.sleep(SWEEP_S * 3)
        assert relay._ends == {7: {3, 4}}  # node 1 was told; 7 is only away
        assert [(p, e) for p, e in wire.sent if isinstance(e, RelayEnded)] == [(1, RelayEnded([5]))]
        wire.gone.add(7)
        await asyncio.sleep(SWEEP_S * 3)
        assert relay._ends == {}
        relay.stop()

    run(main())
