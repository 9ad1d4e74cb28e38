"""Real ``python -m bench.raft_testnode`` processes: 3 nodes x 256 groups on loopback, every
peer link through a fault-injecting proxy (tests/cluster/harness.py, proxy.py).

Timing model (defaults of bench.raft_testnode): tick 50 ms, election timeout 10 ticks (randomised in
[0.5, 1) s), quiescent groups that only wake on a message or when the transport reports a peer
down; a killed or cut peer is reported down at once (its connection resets), a silent one
after ``dead_after_s`` = 5 s (checked every ``ping_interval_s`` = 1 s).

The bounds asserted below are several times the expected figures so that a slow CI machine
(2 cores shared by two tests of this module and 6 node processes) does not fail them; the
measured figures are printed and recorded as ``figure:*`` user properties (shown in the
"raft cluster figures" summary when tests/cluster is run on its own).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Awaitable, Callable

import msgspec
import pytest

from bench.raft_cluster import CLUSTER_ID, SECRET
from bench.raft_control import ControlClient
from raft import peer_codec as codec

from .conftest import ClusterFactory
from .harness import (
    Address,
    Cluster,
    Load,
    assert_histories,
    group_table,
    run,
)

pytestmark = pytest.mark.cluster

GROUPS = 256
WRITERS = 50
# Bounds (seconds).  Expected: failover ~1-1.5 s (one election timeout after the reset);
# restart ~1-2 s (the preferred node of each group campaigns within 5 ticks).
FAILOVER_BOUND_S = 5.0
RESTART_LEADERS_BOUND_S = 10.0
# Blackhole: quiescent groups wait for dead-peer detection (5 s of silence, checked every 1 s)
# and then an election (< 1 s, backoff aside): expected ~5.5-7 s.
BLACKHOLE_FAILOVER_BOUND_S = 15.0

Record = Callable[[str, object], None]


def figure(record_property: Record, name: str, seconds: float) -> None:
    print(f"{name}: {seconds:.2f} s")
    record_property(f"figure:{name}", f"{seconds:.2f}s")


def test_elect_replicate_quiesce(make_cluster: ClusterFactory, record_property: Record) -> None:
    """Every group elects exactly one leader known to all 3 nodes; one proposal per group is
    acknowledged and is then the whole history of that group on all 3 replicas; afterwards
    every group is quiescent on every node (``awake == 0``); SIGTERM stops each node cleanly
    (exit 0)."""

    async def body() -> None:
        async with make_cluster(groups=GROUPS) as c:
            t0 = time.monotonic()
            leaders = await c.wait_leaders(timeout=30)
            figure(record_property, "first_election", time.monotonic() - t0)
            spread = sorted((await c.leader_counts()).items())
            print(f"groups led per node: {spread}")
            assert len(leaders) == GROUPS

            attempted: set[bytes] = set()
            acks = await c.propose_everywhere("a", attempted)
            hists = await c.wait_converged(timeout=30)
            assert_histories(hists, acks, attempted)
            # A group proposed to once holds exactly that entry (a retry follows only an
            # unknown outcome, whose entry may or may not be there).
            for a in acks:
                if f"a/{a.group}/1".encode() not in attempted:
                    assert all(h[a.group] == [a.data] for h in hists.values()), a

            t1 = time.monotonic()
            await c.wait_quiescent(timeout=30)
            figure(record_property, "quiesce_after_writes", time.monotonic() - t1)
            assert await c.stop_all() == {1: 0, 2: 0, 3: 0}

    run(body, 120)


async def busiest_leader(c: Cluster) -> int:
    counts = await c.leader_counts()
    print(f"groups led per node: {sorted(counts.items())}")
    return counts.most_common(1)[0][0]


def test_kill_leader_under_load(make_cluster: ClusterFactory, record_property: Record) -> None:
    """kill -9 of the node leading the most groups while 50 writers propose on all 256 groups:
    the other two elect a leader for every group within FAILOVER_BOUND_S, writes continue
    (also on the groups the victim led); the victim restarts and catches up; then every
    acknowledged entry is in every replica's history exactly once, at its acknowledged
    position, and the three replicas of each group are identical."""

    async def body() -> None:
        async with make_cluster(groups=GROUPS) as c:
            await c.wait_leaders(timeout=30)
            victim = await busiest_leader(c)
            settled, _ = await c.leaders()
            victim_groups = [g for g, lead in settled.items() if lead == victim]
            others = [i for i in c.ids if i != victim]
            load = Load(c, range(GROUPS), writers=WRITERS).start()
            await load.wait_acks(1500, timeout=60)

            t0 = time.monotonic()
            await c.kill(victim)
            await c.wait_leaders(others, timeout=60)
            failover = time.monotonic() - t0
            figure(record_property, "failover_after_kill", failover)
            assert failover < FAILOVER_BOUND_S

            await load.wait_acks(200, groups=victim_groups, timeout=60)
            await load.wait_acks(1000, timeout=60)
            ready = await c.restart(victim)
            figure(record_property, "restart_ready", ready)
            caught_up = await c.wait_caught_up(victim, others, timeout=90)
            figure(record_property, "catch_up_after_restart", caught_up)
            await load.wait_acks(500, timeout=60)
            await load.stop()
            hists = await c.wait_converged(timeout=90)
            print(f"acks: {len(load.acks)}, errors seen by writers: {dict(load.errors)}")
            assert_histories(hists, load.acks, load.attempted)
            assert await c.stop_all() == {1: 0, 2: 0, 3: 0}

    run(body, 240)


def test_full_cluster_kill_and_restart(
    make_cluster: ClusterFactory, record_property: Record
) -> None:
    """kill -9 of all three nodes at once under load, then a restart of all three: every group
    has a leader again within RESTART_LEADERS_BOUND_S of the spawn, every acknowledged entry
    survived (exactly once, at its position, identical on all replicas) and every group takes
    new writes."""

    async def body() -> None:
        async with make_cluster(groups=GROUPS) as c:
            await c.wait_leaders(timeout=30)
            load = Load(c, range(GROUPS), writers=WRITERS).start()
            await load.wait_acks(2000, timeout=60)
            await c.kill(*c.ids)
            await load.stop()
            assert c.running() == []

            t0 = time.monotonic()
            ready = await c.start_nodes(c.ids)
            await c.wait_leaders(timeout=60)
            restart = time.monotonic() - t0
            figure(record_property, "restart_all_ready", ready)
            figure(record_property, "restart_all_to_leaders", restart)
            assert restart < RESTART_LEADERS_BOUND_S

            t1 = time.monotonic()
            hists = await c.wait_converged(timeout=60)
            figure(record_property, "restart_all_converged", time.monotonic() - t1)
            print(f"acks: {len(load.acks)}, errors seen by writers: {dict(load.errors)}")
            assert_histories(hists, load.acks, load.attempted)

            acks = await c.propose_everywhere("after", load.attempted)
            hists = await c.wait_converged(timeout=60)
            assert_histories(hists, load.acks + acks, load.attempted)
            assert await c.stop_all() == {1: 0, 2: 0, 3: 0}

    run(body, 240)


async def wait_no_leadership(c: Cluster, node: int, timeout: float = 30.0) -> float:
    """Wait until ``node`` leads no group (check-quorum made it step down); the seconds."""
    t0 = time.monotonic()
    while True:
        roles = [r.role for r in group_table(await c.status(node)).values()]
        if "leader" not in roles:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"node {node} still leads {roles.count('leader')} groups")
        await asyncio.sleep(0.05)


def test_partitioned_node_catches_up_from_the_log(
    make_cluster: ClusterFactory, record_property: Record
) -> None:
    """The node leading the most groups is cut off by the proxies (both links reset, new
    connections refused) while 50 writers keep writing: the other two elect leaders for every
    group within FAILOVER_BOUND_S, the cut-off node steps down everywhere (check-quorum), writes
    continue; after the heal it catches up through ordinary appends (no snapshot) to identical
    histories holding every acknowledged entry once, at its position."""

    async def body() -> None:
        async with make_cluster(groups=GROUPS) as c:
            await c.wait_leaders(timeout=30)
            victim = await busiest_leader(c)
            others = [i for i in c.ids if i != victim]
            load = Load(c, range(GROUPS), writers=WRITERS).start()
            await load.wait_acks(1000, timeout=60)

            t0 = time.monotonic()
            c.isolate(victim)
            await c.wait_leaders(others, timeout=60)
            failover = time.monotonic() - t0
            figure(record_property, "failover_after_cut", failover)
            assert failover < FAILOVER_BOUND_S
            cut_at = len(load.acks)
            await wait_no_leadership(c, victim)
            figure(record_property, "isolated_node_steps_down", time.monotonic() - t0)
            await load.wait_written(cut_at, timeout=60)  # every group moved on without it
            await load.wait_acks(1000, timeout=60)
            behind = group_table(await c.status(victim))
            ahead = [group_table(await c.status(i)) for i in others]
            assert all(behind[g].commit < max(t[g].commit for t in ahead) for g in range(GROUPS))

            c.heal()
            caught_up = await c.wait_caught_up(victim, others, timeout=90)
            figure(record_property, "catch_up_after_heal", caught_up)
            await load.wait_acks(300, timeout=60)
            await load.stop()
            hists = await c.wait_converged(timeout=90)
            print(f"acks: {len(load.acks)}, errors seen by writers: {dict(load.errors)}")
            assert_histories(hists, load.acks, load.attempted)
            status = await c.status(victim)
            assert status["driver"]["snapshots_restored"] == 0, status["driver"]
            assert all(p.aborted > 0 for p in c.links_of(victim))
            assert await c.stop_all() == {1: 0, 2: 0, 3: 0}

    run(body, 240)


def test_partitioned_node_catches_up_from_a_snapshot(
    make_cluster: ClusterFactory, record_property: Record
) -> None:
    """Like the previous test, but the nodes snapshot every 50 entries and, while the victim is
    cut off and the writers keep writing, both other nodes compact the log of every group: a
    group written meanwhile can only reach the victim as an InstallSnapshot.  After the heal
    the victim restored at least one snapshot per such group (driver stats
    ``snapshots_restored``) and all three replicas hold identical histories with every
    acknowledged entry once, at its position."""

    async def body() -> None:
        async with make_cluster(groups=GROUPS, snapshot_entries=50) as c:
            await c.wait_leaders(timeout=30)
            victim = await busiest_leader(c)
            others = [i for i in c.ids if i != victim]
            load = Load(c, range(GROUPS), writers=WRITERS).start()
            await load.wait_acks(500, timeout=60)

            c.isolate(victim)
            await c.wait_leaders(others, timeout=60)
            cut_at = len(load.acks)
            await load.wait_written(cut_at, timeout=60)
            await load.wait_acks(1500, timeout=60)
            written = {a.group for a in load.acks[cut_at:]}
            assert written == set(range(GROUPS))
            applied = {i: group_table(await c.status(i)) for i in others}
            await asyncio.gather(*(c.call(i, compactor(g)) for i in others for g in range(GROUPS)))
            # ``compact`` answers before the snapshot is taken.  Wait until each group's
            # snapshot file (past what was applied before the call, so past the victim's log)
            # exists on both nodes: the compaction is then submitted to the WAL.  Then a fence:
            # an entry on every group, applied by both nodes.  The driver publishes WAL rounds
            # in order and applies an entry only once the round persisting it is published, so
            # the compaction is published (the log truncated) before the victim can return.
            t0 = time.monotonic()
            while True:
                snaps = {i: c.snapshot_indexes(i) for i in others}
                todo = [
                    (i, g)
                    for i in others
                    for g in written
                    if snaps[i].get(g, 0) < applied[i][g].applied
                ]
                if not todo:
                    break
                assert time.monotonic() - t0 < 60, f"not compacted: {todo[:10]}"
                await asyncio.sleep(0.1)
            fence = await c.propose_everywhere("fence", load.attempted)
            for i in others:
                await c.wait_caught_up(i, others, timeout=60)
            figure(record_property, "compaction_of_all_groups", time.monotonic() - t0)
            before = (await c.status(victim))["driver"]["snapshots_restored"]

            c.heal()
            caught_up = await c.wait_caught_up(victim, others, timeout=90)
            figure(record_property, "snapshot_catch_up_after_heal", caught_up)
            await load.wait_acks(300, timeout=60)
            await load.stop()
            hists = await c.wait_converged(timeout=90)
            restored = (await c.status(victim))["driver"]["snapshots_restored"] - before
            print(f"snapshots restored: {restored}")
            assert restored >= len(written)
            assert_histories(hists, load.acks + fence, load.attempted)
            assert await c.stop_all() == {1: 0, 2: 0, 3: 0}

    run(body, 240)


def compactor(group: int) -> Callable[[ControlClient], Awaitable[None]]:
    return lambda client: client.compact(group)


async def wait_quiescent_groups(c: Cluster, groups: set[int], timeout: float) -> None:
    """Wait until ``groups`` are quiescent on every node."""
    deadline = time.monotonic() + timeout
    while True:
        tables = {i: group_table(s) for i, s in (await c.statuses()).items()}
        awake = {g for t in tables.values() for g in groups if not t[g].quiescent}
        if not awake:
            return
        assert time.monotonic() < deadline, f"groups still awake: {sorted(awake)[:10]}"
        await asyncio.sleep(0.05)


async def settle_times(
    c: Cluster, ids: list[int], subsets: dict[str, set[int]], timeout: float
) -> dict[str, float]:
    """Seconds until every group of each subset has one leader among ``ids`` known to all."""
    t0 = time.monotonic()
    out: dict[str, float] = {}
    while len(out) < len(subsets):
        settled, problems = await c.leaders(ids)
        for name, groups in subsets.items():
            if name not in out and groups <= settled.keys():
                out[name] = time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"unsettled after {timeout} s: {problems[:10]}")
        await asyncio.sleep(0.05)
    return out


def test_blackholed_leader_is_replaced(
    make_cluster: ClusterFactory, record_property: Record
) -> None:
    """The links of the node leading the most groups silently drop every byte (connections
    stay open).  Writers load the even groups only; the odd groups are idle and quiescent.
    The other two elect leaders for the busy groups after an election timeout (their leader's
    heartbeats stop), and for the quiescent ones only once the transport declares the silent
    peer dead (``dead_after_s`` = 5 s): both bounded by BLACKHOLE_FAILOVER_BOUND_S, the
    quiescent ones not before 3 s.  Writes continue on the groups the victim led; after the heal
    every group takes a write and all replicas converge to identical histories holding every
    acknowledged entry once, at its position."""

    async def body() -> None:
        async with make_cluster(groups=GROUPS) as c:
            await c.wait_leaders(timeout=30)
            victim = await busiest_leader(c)
            others = [i for i in c.ids if i != victim]
            busy = set(range(0, GROUPS, 2))
            load = Load(c, sorted(busy), writers=WRITERS).start()
            await load.wait_acks(1000, timeout=60)
            settled, _ = await c.leaders()
            led_busy = {g for g, lead in settled.items() if lead == victim and g in busy}
            led_idle = {g for g, lead in settled.items() if lead == victim and g not in busy}
            await wait_quiescent_groups(c, led_idle, timeout=30)

            c.blackhole(victim)
            times = await settle_times(
                c, others, {"busy": led_busy, "idle": led_idle}, BLACKHOLE_FAILOVER_BOUND_S * 2
            )
            figure(record_property, "failover_after_blackhole_busy", times["busy"])
            figure(record_property, "failover_after_blackhole_quiescent", times["idle"])
            assert times["busy"] < BLACKHOLE_FAILOVER_BOUND_S
            assert 3.0 < times["idle"] < BLACKHOLE_FAILOVER_BOUND_S
            await c.wait_leaders(others, timeout=30)
            await load.wait_acks(200, groups=led_busy, timeout=60)
            assert all(p.dropped_bytes > 0 for p in c.links_of(victim))

            c.heal()
            caught_up = await c.wait_caught_up(victim, others, timeout=90)
            figure(record_property, "catch_up_after_blackhole_heal", caught_up)
            await load.wait_acks(300, timeout=60)
            await load.stop()
            acks = await c.propose_everywhere("after", load.attempted)
            hists = await c.wait_converged(timeout=90)
            print(f"acks: {len(load.acks)}, errors seen by writers: {dict(load.errors)}")
            assert_histories(hists, load.acks + acks, load.attempted)
            assert await c.stop_all() == {1: 0, 2: 0, 3: 0}

    run(body, 240)


# -- a seeded fault schedule --------------------------------------------------------------------
FAULTS = ["kill", "kill_two", "kill_while_recovering", "sigterm", "cut", "kill"]


def test_seeded_faults_keep_every_acknowledged_entry(
    make_cluster: ClusterFactory, record_property: Record
) -> None:
    """Six faults in a row under load (50 writers on 256 groups, a snapshot every 50 entries
    plus random forced compactions): kill -9 of one node; of two at once (quorum lost, then
    both restarted); a kill -9 again while the restarted node recovers; a SIGTERM (exit 0);
    a cut of both links; a last kill -9.  The kinds are fixed, the victims and delays come from
    a seeded RNG.  After each fault every group has one leader and writes go on; at the end
    the three replicas are identical and hold every acknowledged entry once, at its
    position."""

    async def body() -> None:
        rng = random.Random(1127)
        async with make_cluster(groups=GROUPS, snapshot_entries=50) as c:
            await c.wait_leaders(timeout=30)
            load = Load(c, range(GROUPS), writers=WRITERS).start()
            await load.wait_acks(500, timeout=60)
            for fault in FAULTS:
                victim = rng.choice(c.ids)
                down = [victim]
                if fault == "kill":
                    await c.kill(victim)
                elif fault == "kill_two":
                    down = rng.sample(c.ids, 2)
                    await c.kill(*down)
                elif fault == "kill_while_recovering":
                    await c.kill(victim)
                    await asyncio.sleep(rng.uniform(0.1, 0.5))
                    await c.restart(victim)
                    await asyncio.sleep(rng.uniform(0.0, 0.3))
                    await c.kill(victim)
                elif fault == "sigterm":
                    assert await c.stop(victim) == 0
                else:
                    c.isolate(victim)
                await asyncio.sleep(rng.uniform(0.2, 1.5))
                if fault == "cut":
                    c.heal()
                else:
                    await c.start_nodes(down)
                compact = rng.sample(range(GROUPS), 16)
                await asyncio.gather(*(c.call(c.leader_hint(g), compactor(g)) for g in compact))
                t0 = time.monotonic()
                await c.wait_leaders(timeout=60)
                print(f"{fault} of {down}: leaders again after {time.monotonic() - t0:.2f} s")
                await load.wait_acks(300, timeout=60)
            await load.stop()
            hists = await c.wait_converged(timeout=90)
            print(f"acks: {len(load.acks)}, errors seen by writers: {dict(load.errors)}")
            assert_histories(hists, load.acks, load.attempted)
            assert await c.stop_all() == {1: 0, 2: 0, 3: 0}

    run(body, 240)


# -- bad peers -------------------------------------------------------------------------------------
async def open_peer(addr: Address) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*addr)


async def closed_by_node(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Read (and discard) until the node closes or resets the connection; False on timeout."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def read_frame(reader: asyncio.StreamReader) -> codec.Frame:
    async with asyncio.timeout(10):
        (n,) = codec.HEADER.unpack(await reader.readexactly(codec.HEADER.size))
        body = await reader.readexactly(n)
    return _frame_decoder.decode(body)


_frame_decoder: msgspec.msgpack.Decoder[codec.Frame] = msgspec.msgpack.Decoder(codec.Frame)


def hello(cluster_id: str, node_id: int) -> bytes:
    return bytes(codec.encode_frame(codec.Hello(cluster_id, node_id, os.urandom(32))))


async def bad_peer(addr: Address, send: bytes, timeout: float = 10.0) -> bool:
    """Connect, send ``send`` and report whether the node closed the connection."""
    reader, writer = await open_peer(addr)
    try:
        writer.write(send)
        return await closed_by_node(reader, timeout)
    finally:
        writer.close()


async def wrong_secret(addr: Address, claimed_id: int, acceptor_id: int) -> bool:
    """A full handshake as node ``claimed_id`` whose Auth is computed with a wrong secret."""
    reader, writer = await open_peer(addr)
    try:
        writer.write(hello(CLUSTER_ID, claimed_id))
        reply = await read_frame(reader)
        assert isinstance(reply, codec.HelloReply), reply
        assert reply.node_id == acceptor_id
        mac = codec.handshake_mac(
            b"not-the-secret", b"auth", reply.challenge, CLUSTER_ID, claimed_id, acceptor_id
        )
        writer.write(bytes(codec.encode_frame(codec.Auth(mac))))
        return await closed_by_node(reader, 10)
    finally:
        writer.close()


async def authenticated_then_oversized(addr: Address, claimed_id: int, acceptor_id: int) -> bool:
    """A peer that knows the secret (so it displaces the real connection of ``claimed_id``)
    and then declares a frame above the 16 MiB limit."""
    reader, writer = await open_peer(addr)
    try:
        proto = codec.PeerProtocol(
            codec.Role.DIALER, claimed_id, CLUSTER_ID, SECRET.encode(), os.urandom(32),
            frozenset({acceptor_id}),
        )  # fmt: skip
        writer.write(proto.data_to_send())
        proto.receive_data(bytes(codec.encode_frame(await read_frame(reader))))
        assert proto.next_event() == codec.PeerAuthenticated(acceptor_id)
        writer.write(proto.data_to_send())  # our Auth
        writer.write(codec.HEADER.pack(codec.FRAME_BYTES_MAX + 1))
        return await closed_by_node(reader, 10)
    finally:
        writer.close()


def test_bad_peers_are_refused(make_cluster: ClusterFactory) -> None:
    """Strangers on a real node's peer port: garbage, a length prefix over the handshake limit
    (and one of 4 GiB), a frame out of turn, a wrong cluster id, an unknown or higher node id,
    a full handshake with a wrong secret, a silent connection (handshake timeout), and a peer
    that knows the secret but then declares an oversized frame.  Each connection is closed by
    the node with the expected error in its log, and the node keeps serving: the process is
    alive, its real peers stay (or come back) connected, and a proposal on every group commits
    on all three replicas."""

    async def body() -> None:
        async with make_cluster(groups=GROUPS) as c:
            await c.wait_leaders(timeout=30)
            n3, n1 = c.nodes[3].peer, c.nodes[1].peer  # n3 accepts ids 1, 2; n1 accepts none
            garbage = codec.HEADER.pack(8) + b"\xc1" * 8  # 0xc1: never valid msgpack
            over = codec.HEADER.pack(codec.HANDSHAKE_FRAME_BYTES_MAX + 1)
            cases = {
                "garbage": bad_peer(n3, garbage),
                "oversized length": bad_peer(n3, over),
                "4 GiB length": bad_peer(n3, b"\xff\xff\xff\xff"),
                "out of turn": bad_peer(n3, bytes(codec.encode_frame(codec.Ping()))),
                "wrong cluster": bad_peer(n3, hello("another-cluster", 1)),
                "unknown node": bad_peer(n3, hello(CLUSTER_ID, 9)),
                "higher id dials": bad_peer(n1, hello(CLUSTER_ID, 2)),
                "garbage to n1": bad_peer(n1, garbage),
                "wrong secret": wrong_secret(n3, 1, 3),
                "silent": bad_peer(n3, b"", timeout=15),
            }  # fmt: skip
            results = await asyncio.gather(*cases.values())
            closed = dict(zip(cases, results, strict=True))
            assert all(closed.values()), closed

            status = await c.status(3)
            assert status["live_peers"] == [1, 2], status["live_peers"]
            log3, log1 = c.nodes[3].log_path.read_text(), c.nodes[1].log_path.read_text()
            for code in (
                codec.MALFORMED_FRAME, codec.FRAME_TOO_LARGE, codec.UNEXPECTED_FRAME,
                codec.WRONG_CLUSTER, codec.UNKNOWN_NODE, codec.AUTH_FAILED, "handshake timed out",
            ):  # fmt: skip
                assert code in log3, f"{code!r} not in node 3's log"
            assert codec.UNKNOWN_NODE in log1 and codec.MALFORMED_FRAME in log1
            for log in (log1, log3):  # every line a node writes is JSON (the harness's are not)
                for line in log.splitlines():
                    if not line.startswith("=== harness"):
                        assert isinstance(json.loads(line)["msg"], str), line

            # Knowing the secret, a peer can displace node 1's connection; its oversized frame
            # closes it, and node 1 dials again.
            assert await authenticated_then_oversized(n3, 1, 3)
            await c.wait_leaders(timeout=30)
            attempted: set[bytes] = set()
            acks = await c.propose_everywhere("f", attempted)
            hists = await c.wait_converged(timeout=60)
            assert_histories(hists, acks, attempted)
            assert (await c.status(3))["live_peers"] == [1, 2]
            assert c.running() == [1, 2, 3]
            assert await c.stop_all() == {1: 0, 2: 0, 3: 0}

    run(body, 120)
