"""A deterministic simulated cluster: N nodes x G groups, in one thread.

Everything random comes from one ``random.Random(seed)``; the same seed replays the same run.

- Each node runs the production driver's pipeline (raft/pipeline.py: the code the asyncio driver
  runs, less its loop) over a ``MultiRaft`` host holding a replica of every group (a
  non-member's starts empty and learns from the log), a simulated disk, and ctxstore's state
  machine (tests/sim/app.py); above it, ctxstore's ``Router`` (tests/sim/routing.py), which the
  clients submit to: it forwards over the simulated network (``Network.send_app``, lost with the
  connection it was sent on), retries, batches appends at the start of the pass and expires
  deadlines on its timers, run every round on the simulated clock.  Every client request must be
  answered once, by its deadline (``check_requests``).  Inputs go through the pipeline (messages,
  peer liveness reports, ticks, client commands, reads, transfers, compactions, membership
  changes).  With ``quiesce`` (every seed but one in 7) idle groups stop ticking and
  heartbeating; without it, every group ticks as the bare core would.
- Time advances in *rounds*, one loop iteration of every node: peer reports and deliveries,
  then the writes that became durable finish their rounds (``Pipeline.written``), then the
  routers' timers due, then one pass if an input asked for one; every ``ROUNDS_PER_TICK``
  rounds each live node ticks.  The pipeline's clock is the round (``SIM_TICK_S`` per tick).
- The network (``Network``) delays each message by 0..``max_delay`` rounds (so it reorders),
  drops and duplicates at configured rates, and drops whatever crosses a blocked link when it
  is sent or when it arrives (symmetric and asymmetric partitions, isolating a node).  Every
  message travels encoded through msgspec, so the schema is exercised too.
- Peer liveness (``Links``): what a transport would report.  A connection is up while both
  nodes live and neither direction of their link is blocked; a break reaches each live end as
  ``peer_down`` a few rounds later, a (re)connection reaches both ends as ``peer_up`` soon after.
- The disk (tests/sim/disk.py): a ``MemoryStorage`` per group, or (``wal``, every third seed)
  the node's real ``WAL``.  Each pass's group commit becomes durable ``0..max_persist_delay``
  rounds later (the fsync; at once, inside ``submit``, as an inline WAL's, when the delay is 0).
  A crash drops the pipeline, the writes in flight and the application's state; with a WAL it
  may also tear the write in flight.  A restart recovers the disk, checks that it holds
  everything acknowledged, and starts a new pipeline over the disk alone.
- Snapshots are the pipeline's: every ``snapshot_entries`` applied entries, when too many WAL
  segments live, and when a node is asked to compact; on one seed in 5 an "archive" lags the
  applied index (the compaction floor, as ctxstore's archive), holding snapshots back.
- Pauses (``Faults.pause``): a node, preferably a leader, stops for 2-4 election timeouts (a GC
  pause, SIGSTOP): nothing it is sent is read, its writes do not finish, it does not tick.  It
  stops a few rounds into a *read wave* (every node reads every group each round, the nodes'
  context counters aligned, the pausing node starting last so that its counter lags).  When it
  resumes it first serves its clients' reads, then reads what it was sent, in order: a stale
  leader meets late heartbeat answers and reads whose contexts others used before it stopped.
- Reads carry contexts as the pipeline makes them, with the same (empty) prefix on every node,
  so equal bytes across nodes; the checker tells them apart by node and context.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import os
import random
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType

import msgspec

from ctxstore.router import SWEEP_S, Router, RouterConfig
from raft import ConfChange, ConfChangeType, Config, ConfState, RaftError, RawNode, Role
from raft.messages import Message
from raft.multi import HostConfig, MultiRaft
from raft.pipeline import DriverConfig, Pipeline, Round
from raft.wal import GroupWrite, Written

from .app import Clients, History, SimApp, Submission, owner, told_failure
from .checker import Checker, Violation
from .disk import Durable, MemoryDisk, SimDisk, WalDisk, allowed_outcomes
from .membership import Membership, initial_members
from .routing import APP_LANE, SimDriver, SimLoop, SimTransport

ROUNDS_PER_TICK = 4
ELECTION_TICKS = 10
HEARTBEAT_TICKS = 3
# Rounds until a transport reports a connection change: a dead connection is noticed after a
# read timeout or a failed write (a few rounds), a new one after its handshake.
PEER_DOWN_ROUNDS = (2, 12)
PEER_UP_ROUNDS = (1, 4)
# A read wave (before a node pauses): every node reads the group in each
# of READ_WAVE_ROUNDS rounds, starting 0..READ_WAVE_STAGGER rounds in, with the nodes' context
# counters aligned first (``SimCluster.read_wave``).
READ_WAVE_ROUNDS = 24
READ_WAVE_STAGGER = 12
TORN_WRITE = 0.5  # with a WAL: the chance that a crash happens during a pending Ready's write

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Message).decode
_decode_commits = msgspec.msgpack.Decoder(list[int]).decode
COMMIT_LANE = -2  # a Packet's group for a batch's commit notices (raft/multi.py)


def wal_default(seed: int) -> bool:
    """Seeds that run on the real WAL unless told otherwise."""
    return seed % 3 == 0


def quiesce_default(seed: int) -> bool:
    """Seeds whose hosts quiesce idle groups unless told otherwise (the others run the bare
    core's timers, so that path stays covered)."""
    return seed % 7 != 0


@dataclass
class Faults:
    drop: float = 0.03
    duplicate: float = 0.02
    max_delay: int = 6  # rounds
    max_persist_delay: int = 3  # rounds
    crash: float = 0.002  # per round
    restart: float = 0.01  # per round
    partition: float = 0.003  # per round
    heal: float = 0.006  # per round
    max_size_per_msg: int = 256
    pause: float = 0.0005  # per round: a node stops (a GC pause, SIGSTOP) and resumes later
    fifo: bool = False  # no reordering between two nodes (as on one TCP connection)


PROFILES = {
    "calm": Faults(),
    "crashy": Faults(crash=0.03, restart=0.08, max_persist_delay=6),
    "partitioned": Faults(partition=0.02, heal=0.02, max_size_per_msg=48),
    "trickle": Faults(  # one entry per AppendEntries: old-term entries travel alone
        crash=0.02,
        restart=0.06,
        partition=0.015,
        heal=0.02,
        max_persist_delay=6,
        max_size_per_msg=1,
    ),
    "chaotic": Faults(
        drop=0.1,
        duplicate=0.05,
        crash=0.02,
        restart=0.06,
        partition=0.015,
        heal=0.02,
        max_persist_delay=6,
        max_size_per_msg=48,
    ),
}


def profile_for(seed: int) -> Faults:
    """Each seed runs under one fault profile, in turn."""
    name = sorted(PROFILES)[seed % len(PROFILES)]
    return dataclasses.replace(PROFILES[name])


@dataclass(order=True)
class Packet:
    due: int
    order: int
    src: int = field(compare=False)
    dst: int = field(compare=False)
    group: int = field(compare=False)
    data: bytes = field(compare=False)
    conn: tuple[int, int] | None = field(default=None, compare=False)  # (app lane) see send_app


class Network:
    def __init__(self, rng: random.Random, faults: Faults) -> None:
        self.rng = rng
        self.faults = faults
        self.queue: list[Packet] = []
        self.blocked: set[tuple[int, int]] = set()
        self.counter = itertools.count()
        self.sent = self.dropped = self.sent_app = self.sent_commits = 0
        self.sent_by: Counter[int] = Counter()
        self.last_due: dict[tuple[int, int], int] = {}  # (src, dst) -> latest due, for fifo
        self.on_send: Callable[[int, Message], None] = lambda g, m: None

    def send(self, now: int, src: int, group: int, m: Message) -> None:
        self.sent += 1
        self.sent_by[src] += 1
        self.on_send(group, m)
        if not self._lost(src, m.to):
            self._schedule(now, src, m.to, group, _encode(m), self._copies())

    def send_commits(self, now: int, src: int, dst: int, notices: list[int]) -> None:
        """Commit notices (the trailing list of a transport batch): delayed, reordered,
        dropped and duplicated as a Raft message (they are idempotent)."""
        self.sent_commits += 1
        if not self._lost(src, dst):
            self._schedule(now, src, dst, COMMIT_LANE, _encode(notices), self._copies())

    def send_app(
        self, now: int, src: int, dst: int, data: bytes, conn: tuple[int, int] | None
    ) -> None:
        """A router envelope on the peer connection's application lane: delayed, reordered,
        dropped and cut as a Raft message, never duplicated (TCP does not), and lost with the
        connection it was sent on (``conn``, ``Links.connection``; see ``arrives``)."""
        self.sent_app += 1
        if conn is None:
            self.dropped += 1
        elif not self._lost(src, dst):
            self._schedule(now, src, dst, APP_LANE, data, 1, conn)

    def _lost(self, src: int, dst: int) -> bool:
        """Whether a packet from ``src`` to ``dst`` is lost: their link is cut, or by chance."""
        if (src, dst) in self.blocked or self.rng.random() < self.faults.drop:
            self.dropped += 1
            return True
        return False

    def _copies(self) -> int:
        return 2 if self.rng.random() < self.faults.duplicate else 1

    def _schedule(
        self, now: int, src: int, dst: int, group: int, data: bytes, copies: int,
        conn: tuple[int, int] | None = None,
    ) -> None:  # fmt: skip
        """Queue ``copies`` of a packet, each after a random delay (none before the link's
        latest with ``faults.fifo``)."""
        for _ in range(copies):
            due = now + self.rng.randint(0, self.faults.max_delay)
            if self.faults.fifo:
                due = max(due, self.last_due.get((src, dst), 0))
            self.last_due[(src, dst)] = due
            heapq.heappush(self.queue, Packet(due, next(self.counter), src, dst, group, data, conn))

    def due(self, now: int) -> list[Packet]:
        out: list[Packet] = []
        while self.queue and self.queue[0].due <= now:
            p = heapq.heappop(self.queue)
            if (p.src, p.dst) in self.blocked:
                self.dropped += 1
                continue
            out.append(p)
        self.rng.shuffle(out)
        if self.faults.fifo:  # the pairs interleave at random, each pair's packets in order
            slots: dict[tuple[int, int], list[int]] = {}
            for k, p in enumerate(out):
                slots.setdefault((p.src, p.dst), []).append(k)
            ordered = list(out)
            for ks in slots.values():
                for k, p in zip(ks, sorted(out[k] for k in ks), strict=True):
                    ordered[k] = p
            out = ordered
        return out


@dataclass(order=True)
class PeerReport:
    """``observer``'s transport reports its connection to ``peer`` up or down at ``due``."""

    due: int
    order: int
    observer: int = field(compare=False)
    incarnation: int = field(compare=False)  # the observer's; a crash voids the report
    peer: int = field(compare=False)
    up: bool = field(compare=False)


class Links:
    """The connection between each pair of nodes, and what each end's transport reports.

    A connection is up while both nodes live and neither direction of their link is blocked
    (a one-way cut kills a TCP connection too).  It is identified by the two incarnations, so a
    crash and restart between two looks is a break and a reconnection.  When it breaks, each
    end that saw it established (and still runs) gets ``peer_down`` after ``PEER_DOWN_ROUNDS``;
    when one is established, both ends get ``peer_up`` after ``PEER_UP_ROUNDS``.  One node's
    reports about one peer keep their order.
    """

    def __init__(self, rng: random.Random, ids: list[int]) -> None:
        self.rng = rng
        self.pairs = list(itertools.combinations(ids, 2))
        self.conn: dict[tuple[int, int], tuple[int, int] | None] = {}
        self.queue: list[PeerReport] = []
        self.last_due: dict[tuple[int, int], int] = {}
        self.counter = itertools.count()

    def update(
        self, now: int, incarnations: dict[int, int], blocked: set[tuple[int, int]]
    ) -> list[PeerReport]:
        """Notice connection changes (``incarnations`` of the live nodes); the reports due."""
        for a, b in self.pairs:
            ia, ib = incarnations.get(a), incarnations.get(b)
            conn = None
            if ia is not None and ib is not None and not {(a, b), (b, a)} & blocked:
                conn = (ia, ib)
            was = self.conn.get((a, b))
            if conn == was:
                continue
            self.conn[(a, b)] = conn
            if was is not None:  # it broke: the ends that knew it notice
                for me, peer, inc_then in ((a, b, was[0]), (b, a, was[1])):
                    if incarnations.get(me) == inc_then:
                        self._report(now, me, inc_then, peer, False, PEER_DOWN_ROUNDS)
            if conn is not None:
                self._report(now, a, conn[0], b, True, PEER_UP_ROUNDS)
                self._report(now, b, conn[1], a, True, PEER_UP_ROUNDS)
        out: list[PeerReport] = []
        while self.queue and self.queue[0].due <= now:
            r = heapq.heappop(self.queue)
            if incarnations.get(r.observer) == r.incarnation:
                out.append(r)
        return out

    def _report(
        self, now: int, me: int, inc: int, peer: int, up: bool, delay: tuple[int, int]
    ) -> None:
        due = max(now + self.rng.randint(*delay), self.last_due.get((me, peer), 0))
        self.last_due[(me, peer)] = due
        heapq.heappush(self.queue, PeerReport(due, next(self.counter), me, inc, peer, up))

    def settled(self) -> bool:
        return not self.queue

    def connection(self, a: int, b: int) -> tuple[int, int] | None:
        """The connection between ``a`` and ``b`` now (their incarnations), None while down."""
        return self.conn.get((min(a, b), max(a, b)))

    def arrives(self, packet: Packet) -> bool:
        """Whether a packet can be read: a router envelope only on the connection it was sent
        on (one sent before a break or a restart is gone with it, as on TCP; a process's
        forward ids are its own, so a reply meant for an earlier process never arrives)."""
        return packet.group != APP_LANE or self.connection(packet.src, packet.dst) == packet.conn


SIM_TICK_S = 0.05  # the pipeline's clock: seconds per tick
SIM_DRIVER = DriverConfig(
    tick_s=SIM_TICK_S,
    snapshot_entries=50,  # a snapshot every 50 applied entries of a group
    wal_segments_max=6,  # 4 KiB segments: the groups pinning the oldest are compacted often
    proposal_timeout_s=100 * SIM_TICK_S,  # proposals a stuck group holds fail after 100 ticks
)


# The routers' settings: a request's deadline is the pipeline's proposal timeout, as in
# ctxstore/node.py; the rest are the product's defaults.
SIM_ROUTER = RouterConfig(request_timeout_s=SIM_DRIVER.proposal_timeout_s)


def fid_start(incarnation: int) -> int:
    """A router's first forward id: unique per process, as the router's random start makes
    them (tests/sim/test_routing.py shows what a reused one does)."""
    return incarnation << 32


class Replica:
    """One group's replica on one node, as seen from outside (the node's pipeline and app)."""

    def __init__(self, node: SimNode, group: int) -> None:
        self.node = node
        self.node_id = node.id
        self.group = group

    @property
    def rn(self) -> RawNode | None:
        p = self.node.pipeline
        return p.host.node(self.group) if p is not None else None

    @property
    def app_index(self) -> int:
        app = self.node.app
        return app.index[self.group] if app is not None else 0


class _Outbox:
    """A node's peer messages into the simulated network (the transport's part)."""

    def __init__(self, node_id: int, cluster: SimCluster) -> None:
        self.id = node_id
        self.cluster = cluster

    def send(self, to: int, items: list[tuple[int, Message]]) -> None:
        c = self.cluster
        for g, m in items:
            c.net.send(c.now, self.id, g, m)

    def send_commits(self, to: int, notices: list[int]) -> None:
        c = self.cluster
        c.net.send_commits(c.now, self.id, to, notices)

    def flush_now(self) -> None:
        pass  # (the simulated disk never blocks the node: nothing to hurry)


class SimNode:
    """One node: the production pipeline (raft/pipeline.py) over a simulated disk, running
    ctxstore's state machine.  A crash loses the pipeline and the application, never the disk."""

    def __init__(
        self, node_id: int, groups: list[int], disk: SimDisk, config: HostConfig, c: SimCluster
    ) -> None:
        self.id = node_id
        self.groups = groups
        self.disk = disk
        self.config = config
        self.cluster = c
        self.incarnation = 0
        self.pipeline: Pipeline | None = None
        self.app: SimApp | None = None
        self.waiting: deque[tuple[Round, Future[Written]]] = deque()
        self.kicked = False
        self.replicas = {g: Replica(self, g) for g in groups}
        self.acked: dict[int, Durable] = {}  # at the last crash: each group's durable state
        # Read contexts as the driver makes them, with one prefix for all nodes (b""): two
        # nodes' reads carry the same bytes.  The counter is kept across restarts (a driver's
        # contexts are unique per process through its random prefix).
        self._read_seq = 0
        self.torn: list[GroupWrite] | None = None  # the write the last crash interrupted
        self.snapshots_taken = 0  # by earlier incarnations
        # ctxstore's router over the pipeline (tests/sim/routing.py), lost with it in a crash,
        # with its timers; the peers its transport reports up.
        self.router: Router | None = None
        self.loop: SimLoop | None = None
        self.connected: set[int] = set()
        self.routed = Counter[str]()  # the routers' counters of earlier incarnations

    @property
    def host(self) -> MultiRaft | None:
        return self.pipeline.host if self.pipeline is not None else None

    @property
    def read_seq(self) -> int:
        return self.pipeline.read_seq if self.pipeline is not None else self._read_seq

    @read_seq.setter
    def read_seq(self, value: int) -> None:
        self._read_seq = value
        if self.pipeline is not None:
            self.pipeline.read_seq = value

    def start(self) -> None:
        c = self.cluster
        self.incarnation += 1
        cfg = dataclasses.replace(self.config.group, seed=c.seed * 1000 + self.incarnation)
        host = MultiRaft(dataclasses.replace(self.config, group=cfg))
        app = self.app = SimApp(
            self.id, len(c.groups), c.checker, c.history, lambda g: host.node(g).raft.term
        )
        app.on_command = self._applied
        p = Pipeline(host, self.disk, app, SIM_DRIVER, c.clock, read_prefix=b"")
        p.read_seq = self._read_seq
        p.outbox = _Outbox(self.id, c)
        p.wait_for_write = lambda rnd, future: self.waiting.append((rnd, future))
        p.want_pass = self._kick
        self.kicked = True
        p.on_leader_change = self._leader_change
        p.on_snapshot_installed = self._installed
        if c.archive_lag:  # an archive that lags the applied index holds the compactions
            p.snapshots.floor = lambda g: app.index[g] - c.archive_lag
        self.pipeline = p
        p.add_groups(self.groups, ())  # (the disks were bootstrapped: no group starts here)
        self.loop = SimLoop(c.clock)
        fids = fid_start(self.incarnation)
        router = Router(self.id, SimDriver(p, self._kick), SIM_ROUTER, self.loop, fids)
        self.router = router
        router.attach(SimTransport(self))
        router.start()
        self.connected = set()

    def peer_report(self, peer: int, up: bool) -> None:
        """The transport reports its connection to ``peer`` (ctxstore/node.py's order)."""
        p, router = self.pipeline, self.router
        assert p is not None and router is not None
        if up:
            p.peer_up(peer)
            self.connected.add(peer)
            router.on_peer_up(peer)
        else:
            p.peer_down(peer)
            self.connected.discard(peer)
            router.on_peer_down(peer)

    def deliver(self, packet: Packet) -> None:
        """What a peer sent: a Raft message to the pipeline, a router envelope to the router."""
        if packet.group == APP_LANE:
            assert self.router is not None
            self.router.on_app(packet.src, [packet.data])
        elif packet.group == COMMIT_LANE:
            assert self.pipeline is not None
            self.pipeline.commit_notices(packet.src, _decode_commits(packet.data))
        else:
            assert self.pipeline is not None
            self.pipeline.step([(packet.group, _decode(packet.data))])

    def run_pass(self) -> None:
        """The driver's pass: the router's append batches first (``before_pass``), then the
        pipeline's; what they propose joins this pass."""
        assert self.pipeline is not None and self.router is not None
        self.router.propose_batches()
        self.kicked = False
        self.pipeline.run_pass()

    def routed_counts(self) -> Counter[str]:
        """The routers' counters, over every incarnation so far."""
        out = Counter(self.routed)
        if self.router is not None:
            out += _router_counts(self.router)
        return out

    def _leader_change(self, group: int, lead: int) -> None:
        if self.router is not None:
            self.router.on_leader_change(group, lead)
        if lead == self.id:
            assert self.host is not None
            self.cluster.log(f"g{group} n{self.id} leads term {self.host.node(group).raft.term}")

    def _kick(self) -> None:
        self.kicked = True  # a pass in this round (the driver: one in the next loop iteration)

    def _applied(self) -> None:
        self.cluster.stats.committed += 1

    def _installed(self, group: int, index: int) -> None:
        self.cluster.stats.snapshots_installed += 1

    def finish_writes(self) -> None:
        """The disk's writes due by now are durable: the pipeline finishes their rounds."""
        p = self.pipeline
        assert p is not None
        self.disk.complete()
        while self.waiting and self.waiting[0][1].done():
            rnd, future = self.waiting.popleft()
            p.written(rnd, future)

    def crash(self, tear: bool, rng: random.Random) -> str | None:
        """Stop the node; with ``tear``, the crash interrupts the write in flight (disk.py)."""
        assert self.pipeline is not None
        self.acked = {g: Durable.of(self.disk.storage(g)) for g in self.replicas}
        self.torn, what = self.disk.crash(tear, rng)
        self.snapshots_taken += self.pipeline.stats.snapshots_taken
        self._read_seq = self.pipeline.read_seq
        self.pipeline = None
        self.app = None
        if self.router is not None:  # (its requests die with it: the clients time out)
            self.routed += _router_counts(self.router)
        self.router = None
        self.loop = None
        self.connected = set()
        self.waiting.clear()
        return what

    def restart(self, checker: Checker) -> None:
        """Recover the disk, judge what it recovered, and start a new pipeline over it."""
        self.disk.recover()
        for g in self.replicas:
            st = self.disk.storage(g)
            got = Durable.of(st)
            base = self.acked[g]
            torn = [w for w in self.torn or () if w.group == g]
            allowed = allowed_outcomes(base, torn) if torn else [base]
            if got not in allowed:
                raise Violation(
                    f"g{g} n{self.id}: the disk recovered {got.describe()}, but acknowledged "
                    f"was {base.describe()} (torn write: {bool(torn)})"
                )
            if got != base:  # part of the torn write survived: it is on disk now
                checker.on_persist(self.id, g, st, list(got.entries))
        self.torn = None
        self.start()


def _router_counts(router: Router) -> Counter[str]:
    return Counter(
        forwarded=router.forwarded,
        batches=router.batches_proposed,
        batched=router.appends_batched,
    )


@dataclass
class Stats:
    proposals: int = 0
    committed: int = 0
    crashes: int = 0
    torn_writes: int = 0
    partitions: int = 0
    conf_changes: int = 0
    transfers: int = 0
    snapshots_taken: int = 0
    snapshots_installed: int = 0
    reads: int = 0
    client_reads: int = 0  # read barriers answered to clients through a router
    forwarded: int = 0  # requests a router forwarded to its group's leader
    append_batches: int = 0  # AppendBatch entries the routers proposed
    acks: int = 0  # appends acknowledged to clients
    dedupes: int = 0  # of which answered by a dedupe
    pauses: int = 0
    peer_reports: int = 0
    quiesced: int = 0  # times a group went quiescent on a host, summed over incarnations
    awake_outsiders: int = 0  # replicas outside their group's configuration (runner.py)
    zombie_groups: int = 0  # groups with an outsider that counts itself a voter (runner.py)
    quiesce_ticks: int = 0  # ticks from the liveness phase's progress to quiescence (runner.py)
    joins: int = 0  # membership events (tests/sim/membership.py)
    drains: int = 0
    removals: int = 0
    refused: int = 0  # restarts of a retired node, refused


class Ticket:
    """Whether any command of a submission was answered with a result (not an error)."""

    def __init__(self) -> None:
        self.ok = False

    def watch(self, done: Callable[[object, object], None]) -> Callable[[object, object], None]:
        def watched(result: object, exc: object) -> None:
            if exc is None:
                self.ok = True
            done(result, exc)

        return watched


def _ignore(result: object, exc: BaseException | None) -> None:
    """(A membership change's outcome: the checker judges what was applied.)"""


class SimCluster:
    """The cluster; use it as a context manager (or ``close`` it): a WAL lives in a directory."""

    def __init__(
        self,
        seed: int,
        nodes: int,
        groups: int,
        faults: Faults | None = None,
        trace: Callable[[str], None] | None = None,
        wal: bool | None = None,
        quiesce: bool | None = None,
        membership: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.ids = list(range(1, nodes + 1))
        self.groups = list(range(groups))
        self.faults = faults or profile_for(seed)
        self.wal = wal_default(seed) if wal is None else wal
        self.quiesce = quiesce_default(seed) if quiesce is None else quiesce
        self.net = Network(self.rng, self.faults)
        self.links = Links(self.rng, self.ids)
        self.checker = Checker()
        self.net.on_send = self.checker.on_send
        self.stats = Stats()
        self.trace = trace
        self.now = 0
        self.alive: set[int] = set(self.ids)
        self.read_waves: dict[tuple[int, int], tuple[int, int]] = {}  # (n, g) -> rounds
        self.paused: dict[int, int] = {}  # node -> round it resumes
        self.pausing: dict[int, tuple[int, int]] = {}  # node -> (round it stops, for how long)
        self.held: list[Packet] = []  # sent to a paused node
        self.history = History()
        self.clients = Clients(self.rng, groups, self.history)
        # The clients' requests not answered yet, oldest first: (id, node, its deadline).
        self.requests: dict[int, tuple[int, float]] = {}
        self._request_ids = itertools.count()
        # Seeds where an archive lags the applied index by this many entries (the compaction
        # floor, ctxstore's archived index): snapshots are held until it catches up.
        self.archive_lag = 20 if seed % 5 == 1 else 0
        self.dir: str | None = None
        if self.wal:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self.dir = tempfile.mkdtemp(prefix=f"sim-wal-{seed}-", dir=shm)
        config = HostConfig(
            Config(
                id=1,
                election_ticks=ELECTION_TICKS,
                heartbeat_ticks=HEARTBEAT_TICKS,
                max_size_per_msg=self.faults.max_size_per_msg,
                max_inflight_msgs=4,
                max_uncommitted_bytes=4096,
                snapshot_timeout_ticks=4 * ELECTION_TICKS,
                commit_broadcast=seed % 2 == 0,  # odd seeds: followers learn commits lazily
                skip_busy_heartbeats=seed % 4 >= 2,  # half the seeds: as ctxstore runs
            ),
            quiesce=self.quiesce,
        )
        self.nodes: dict[int, SimNode] = {}
        try:
            for n in self.ids:
                disk: SimDisk = MemoryDisk(self.groups, self._now, self._persist_delay)
                if self.dir is not None:
                    path = os.path.join(self.dir, f"n{n}")
                    disk = WalDisk(path, self._now, self._persist_delay)
                disk.on_durable = functools.partial(self.checker.on_persist, n)
                cfg = dataclasses.replace(config, group=dataclasses.replace(config.group, id=n))
                self.nodes[n] = SimNode(n, self.groups, disk, cfg, self)
            placed = initial_members(self.ids, self.groups) if membership else None
            for g in self.groups:
                if placed is not None:
                    members = list(placed[g])
                else:
                    members = self.ids if nodes <= 3 else sorted(self.rng.sample(self.ids, 3))
                for n in members:  # a non-member starts empty and learns from the log
                    self.nodes[n].disk.bootstrap(g, ConfState(tuple(members)))
            for node in self.nodes.values():
                node.start()
        except BaseException:
            self.close()
            raise
        self.replicas = {
            (n, g): node.replicas[g] for n, node in self.nodes.items() for g in self.groups
        }
        # Scale-out (tests/sim/membership.py): the reconciler alone changes memberships.
        self.membership = Membership(self) if membership else None

    def close(self) -> None:
        """Close the disks and delete the WAL directories (idempotent)."""
        for node in self.nodes.values():
            node.disk.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> SimCluster:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _now(self) -> int:
        return self.now

    def _persist_delay(self) -> int:
        return self.rng.randint(0, self.faults.max_persist_delay)

    def clock(self) -> float:
        """The pipelines' clock: simulated seconds."""
        return self.now * SIM_TICK_S / ROUNDS_PER_TICK

    def log(self, what: str) -> None:
        if self.trace is not None:
            self.trace(f"[r{self.now} t{self.now // ROUNDS_PER_TICK}] {what}")

    def host(self, n: int) -> MultiRaft | None:
        return self.nodes[n].host

    def live(self, g: int) -> list[Replica]:
        return [self.replicas[(n, g)] for n in self.ids if n in self.alive]

    def leader(self, g: int) -> Replica | None:
        """The live replica that believes it leads ``g`` with the highest term."""
        leaders = self.leaders(g)
        return max(leaders, key=lambda r: r.rn.raft.term) if leaders else None  # type: ignore[union-attr]

    def leaders(self, g: int) -> list[Replica]:
        """Every live replica that believes it leads ``g`` (stale leaders included)."""
        return [r for r in self.live(g) if r.rn is not None and r.rn.raft.role is Role.LEADER]

    # -- one round -----------------------------------------------------------------------------
    def round(self) -> None:
        """One loop iteration of every node: peer reports, deliveries, the writes that became
        durable, one pipeline pass, a tick every ``ROUNDS_PER_TICK`` rounds; then the checks."""
        self.now += 1
        for n, until in list(self.paused.items()):
            if self.now >= until:
                self.resume(n)
        if self.pausing:
            self._start_pauses()
        incarnations = {n: node.incarnation for n, node in self.nodes.items() if n in self.alive}
        for report in self.links.update(self.now, incarnations, self.net.blocked):
            self.nodes[report.observer].peer_report(report.peer, report.up)
            self.stats.peer_reports += 1
        for packet in self.net.due(self.now):
            if packet.dst in self.paused:
                self.held.append(packet)  # in the paused process's socket buffer
                continue
            if self.nodes[packet.dst].pipeline is not None and self.links.arrives(packet):
                self.nodes[packet.dst].deliver(packet)
        running = [node for node in self.running() if node.pipeline is not None]
        for node in running:
            node.finish_writes()
        for node in running:
            assert node.loop is not None
            node.loop.run_due()  # the routers' timers: deadlines, retries, reads asked again
        for node in running:
            if node.kicked:  # as the driver's loop: a pass only when an input asked for one
                node.run_pass()
        if self.now % ROUNDS_PER_TICK == 0:
            for node in running:
                assert node.pipeline is not None
                node.pipeline.tick()  # the Readies of the groups it ticked: next round's pass
        for rep in self.replicas.values():
            rn = rep.rn
            if rn is not None:
                self.checker.scan(rep.node_id, rep.group, rn)
        if self.clients.violations:
            raise self.clients.violations[0]
        self.check_requests()
        if self.read_waves:
            self._read_waves()

    # -- faults --------------------------------------------------------------------------------
    def crash(self, n: int) -> None:
        node = self.nodes[n]
        if n not in self.alive or node.host is None:
            return
        self.log(f"crash n{n}")
        self.stats.crashes += 1
        self.pausing.pop(n, None)
        if self.paused.pop(n, None) is not None:
            self.held = [p for p in self.held if p.dst != n]  # lost with the process
        self.stats.quiesced += node.host.stats.quiesced
        self.alive.discard(n)
        self.requests = {rid: r for rid, r in self.requests.items() if r[0] != n}  # (cut off)
        tear = self.wal and self.rng.random() < TORN_WRITE
        what = node.crash(tear, self.rng)
        if node.torn is not None:
            self.stats.torn_writes += 1
            groups = sorted({w.group for w in node.torn})
            self.log(f"n{n} crashed writing groups {groups}: {what}")

    def restart(self, n: int) -> None:
        if n in self.alive:
            return
        if self.membership is not None and self.membership.retired(n):
            self.stats.refused += 1  # a removed node's id is retired: it never comes back
            return
        self.log(f"restart n{n}")
        self.alive.add(n)
        self.checker.on_restart(n)
        self.nodes[n].restart(self.checker)

    def block(self, a: int, b: int) -> None:
        self.net.blocked.add((a, b))

    def isolate(self, n: int) -> None:
        self.log(f"isolate n{n}")
        self.stats.partitions += 1
        for m in self.ids:
            if m != n:
                self.block(n, m)
                self.block(m, n)

    def partition(self, side: set[int]) -> None:
        self.log(f"partition {sorted(side)} | {sorted(set(self.ids) - side)}")
        self.stats.partitions += 1
        for a in side:
            for b in set(self.ids) - side:
                self.block(a, b)
                self.block(b, a)

    def cut_one_way(self, a: int, b: int) -> None:
        self.log(f"cut n{a} -> n{b}")
        self.stats.partitions += 1
        self.block(a, b)

    def running(self) -> list[SimNode]:
        """The nodes not paused (crashed ones included: they have no host)."""
        return [node for n, node in self.nodes.items() if n not in self.paused]

    def pause(self, n: int, rounds: int) -> None:
        """Node ``n`` will stop for ``rounds``: no ticks, no Readies, no writes finish, nothing
        it is sent is read.  Its peers' connections stay up; a leader does not know it was
        away.  First a read wave on every group, in which ``n`` starts reading last (so its
        context counter lags the others'); ``n`` stops a few rounds into it, with the answers
        to the heartbeats of the latest reads on their way to it (see ``resume``)."""
        if n not in self.alive or n in self.paused or n in self.pausing:
            return
        for g in self.groups:
            self.read_wave(g, last=n)
        self.pausing[n] = (self.now + READ_WAVE_STAGGER + self.rng.randint(2, 8), rounds)

    def _start_pauses(self) -> None:
        for n, (at, rounds) in list(self.pausing.items()):
            if self.now >= at:
                del self.pausing[n]
                self.log(f"pause n{n} for {rounds} rounds")
                self.stats.pauses += 1
                self.paused[n] = self.now + rounds

    def resume(self, n: int) -> None:
        """The paused node first serves the reads its clients asked meanwhile, then reads what
        its peers sent, in the order it arrived (a stale leader meets late heartbeat answers,
        and reads whose contexts others used just before it stopped: its counter lags)."""
        del self.paused[n]
        self.log(f"resume n{n}")
        for g in self.groups:
            self.read(n, g)
        held = [p for p in self.held if p.dst == n]
        self.held = [p for p in self.held if p.dst != n]
        for p in held:
            if (p.src, p.dst) not in self.net.blocked and self.links.arrives(p):
                self.nodes[n].deliver(p)

    def heal(self) -> None:
        if self.net.blocked:
            self.log("heal")
        self.net.blocked.clear()

    # -- client actions ------------------------------------------------------------------------
    def propose(self, g: int, via: int | None = None, stale: bool = False) -> Ticket | None:
        """A client's next commands for ``g`` (clients in app.py), submitted through a node's
        router (ctxstore/router.py): the newest leader's, a node's that believes it leads
        (``stale``), or ``via`` a given node's, which forwards them to the leader it knows.
        Several appends submitted together share one ``AppendBatch`` entry.  The ticket
        tells whether a client was answered."""
        if via is None:
            if stale:
                leaders = self.leaders(g)
                rep = self.rng.choice(leaders) if leaders else None
            else:
                rep = self.leader(g)
            if rep is None:
                return None
            via = rep.node_id
        if self.nodes[via].router is None or via in self.paused:
            return None
        return self.submit(via, g, self.clients.command(g))

    def submit(self, n: int, g: int, subs: list[Submission]) -> Ticket:
        """Submit commands for ``g`` to node ``n``'s router, together (one loop iteration)."""
        router = self.nodes[n].router
        assert router is not None
        ticket = Ticket()
        for sub in subs:
            done = self._request(n, ticket.watch(sub.done))
            router.submit_then(g, sub.data(), done, sub.append)
            self.stats.proposals += 1
        return ticket

    def _request(
        self, n: int, done: Callable[[object, object], None]
    ) -> Callable[[object, object], None]:
        """A client's request to node ``n``'s router: it must be answered exactly once, by its
        deadline (``check_requests``), unless the node crashes first."""
        rid = next(self._request_ids)
        self.requests[rid] = (n, self.clock() + SIM_ROUTER.request_timeout_s)

        def answered(result: object, exc: object) -> None:
            if self.requests.pop(rid, None) is None:
                self.clients.violations.append(Violation(f"n{n}: a request answered twice"))
            done(result, exc)

        return answered

    def check_requests(self) -> None:
        """Every request is answered by its deadline (the router's rule; ``SWEEP_S`` late at
        most, a round more for the simulated loop), but on a paused node."""
        late = self.clock() - 2 * SWEEP_S
        for n, deadline in self.requests.values():
            if deadline >= late:
                break  # (in the order of their deadlines)
            if n not in self.paused:
                raise Violation(f"n{n}: a request not answered by its deadline ({deadline:.2f} s)")

    def conf_change(self, g: int, pick: random.Random) -> None:
        rep = self.leader(g)
        if rep is None or rep.rn is None or rep.node_id in self.paused:
            return
        r = rep.rn.raft
        voters, learners = set(r.voters), set(r.learners)
        outside = [n for n in self.ids if n not in voters | learners]
        options: list[ConfChange] = []
        options += [ConfChange(ConfChangeType.ADD_LEARNER, n) for n in outside]
        options += [ConfChange(ConfChangeType.ADD_NODE, n) for n in sorted(learners)]
        if len(voters) > 3 or (len(voters) > 1 and pick.random() < 0.3):
            options += [ConfChange(ConfChangeType.REMOVE_NODE, n) for n in sorted(voters)]
        options += [ConfChange(ConfChangeType.REMOVE_NODE, n) for n in sorted(learners)]
        if not options:
            return
        cc = pick.choice(options)
        pipeline = self.nodes[rep.node_id].pipeline
        assert pipeline is not None
        try:
            pipeline.propose_conf_change(g, cc, _ignore)
        except RaftError:
            return
        self.log(f"g{g} n{rep.node_id} proposes {cc.type.name} n{cc.node_id}")
        self.stats.conf_changes += 1

    def transfer(self, g: int, pick: random.Random) -> None:
        rep = self.leader(g)
        if rep is None or rep.rn is None or rep.node_id in self.paused:
            return
        targets = [v for v in rep.rn.raft.voters if v != rep.node_id]
        if not targets:
            return
        to = pick.choice(targets)
        pipeline = self.nodes[rep.node_id].pipeline
        assert pipeline is not None
        try:
            pipeline.transfer_leader(g, to)
        except RaftError:
            return
        self.log(f"g{g} transfer n{rep.node_id} -> n{to}")
        self.stats.transfers += 1

    def read_wave(self, g: int, last: int | None = None) -> None:
        """Every node reads ``g`` in each round of a stretch of READ_WAVE_ROUNDS, each node's
        stretch starting up to READ_WAVE_STAGGER rounds later than another's; the nodes'
        context counters are aligned first.  So one node's read carries the context another
        node's read carried a few rounds earlier, while the leadership may be moving: the
        reads meet old and new leaders with equal contexts, and with heartbeat answers for
        earlier reads still on their way.  Node ``last`` starts after every other."""
        base = max(node.read_seq for node in self.nodes.values())
        for n, node in self.nodes.items():
            node.read_seq = base  # (counters only grow: a node's contexts stay unique)
            if n == last:
                start = self.now + READ_WAVE_STAGGER
            else:
                start = self.now + self.rng.randint(0, READ_WAVE_STAGGER - 1)
            self.read_waves[(n, g)] = (start, start + READ_WAVE_ROUNDS)

    def _read_waves(self) -> None:
        for (n, g), (start, end) in list(self.read_waves.items()):
            if self.now >= end:
                del self.read_waves[(n, g)]
            elif self.now >= start and n in self.alive:
                self.read(n, g)

    def compact(self, n: int, g: int) -> None:
        """Node ``n`` snapshots ``g`` at its applied index (the pipeline's ``compact``)."""
        node = self.nodes[n]
        if node.pipeline is None or n in self.paused:
            return
        node.pipeline.compact(g)
        self.log(f"g{g} n{n} compaction asked")

    def snapshots_taken(self) -> int:
        live = sum(
            node.pipeline.stats.snapshots_taken for node in self.nodes.values() if node.pipeline
        )
        return live + sum(node.snapshots_taken for node in self.nodes.values())

    def read(self, n: int, g: int) -> None:
        """A linearizable read of ``g`` at node ``n`` (a leader's own, or through its leader):
        its answer must be fresh (checker) and the node's state must then hold every append
        acknowledged before the read began (app.py)."""
        node = self.nodes[n]
        p, app = node.pipeline, node.app
        if p is None or app is None or n in self.paused:
            return
        floor = self.clients.read_floor(g)
        key = b""  # the batch's context and this read's number: reads of a batch share one

        def done(index: object, exc: object) -> None:
            if exc is not None:
                self.checker.on_read_dropped(n, key)
                return
            assert isinstance(index, int)
            try:
                self.checker.on_read_answered(n, g, key, index)
                for sid, seq in floor.items():
                    if (app.state.last_seq(sid) or 0) < seq:
                        raise Violation(
                            f"g{g} n{n}: a read answered at {index} misses {sid} seq {seq}, "
                            f"acknowledged before it began"
                        )
            except Violation as v:
                self.clients.violations.append(v)

        try:
            ctx = p.read_index(g, done)
        except RaftError:
            return
        key = ctx + self.stats.reads.to_bytes(8, "big")
        self.checker.on_read_asked(n, g, key)
        self.stats.reads += 1

    def client_read(self, n: int, g: int) -> None:
        """A client's read of ``g`` at node ``n`` through its router (a read barrier: ReadIndex,
        asked of the leader over Raft; retried, timed out): once answered, the node's state
        holds every append acknowledged before the read began, and no session's read cursor
        is behind one a client was told before it began."""
        node = self.nodes[n]
        router, app = node.router, node.app
        if router is None or app is None or n in self.paused:
            return
        floor = self.clients.read_floor(g)
        cursors = {sid: self.history.cursor_acked.get(sid, 0) for sid in self.clients.sessions[g]}

        def done(index: object, exc: object) -> None:
            if exc is not None:
                told_failure(f"g{g} n{n}: read", exc)
                return
            self.stats.client_reads += 1
            for sid, seq in floor.items():
                if (app.state.last_seq(sid) or 0) < seq:
                    raise Violation(
                        f"g{g} n{n}: a client read answered at {index} misses {sid} seq {seq}, "
                        f"acknowledged before it began"
                    )
            for sid, told in cursors.items():
                now = app.state.read_cursor(sid, owner(sid)) or 0
                if now < told:
                    raise Violation(
                        f"g{g} n{n}: a client read answered at {index} has {sid}'s cursor at "
                        f"{now}, behind {told}, which a client was told before (moved back)"
                    )

        router.barrier_then(g, self._request(n, self.clients.guard(done)))

    # -- whole-cluster checks ------------------------------------------------------------------
    def check_logs(self) -> None:
        for g in self.groups:
            logs: dict[int, dict[int, int]] = {}
            for rep in self.live(g):
                assert rep.rn is not None
                log = rep.rn.raft.log
                terms = {}
                for i in range(log.first_index(), log.last_index() + 1):
                    terms[i] = log.term(i)
                logs[rep.node_id] = terms
            self.checker.compare_logs(g, logs)

    def members(self, g: int) -> tuple[set[int], set[int]]:
        """The group's membership as the most advanced live replica has applied it."""
        best = max(self.live(g), key=lambda r: (r.rn.raft.log.applied, r.rn.raft.term))  # type: ignore[union-attr]
        assert best.rn is not None
        return set(best.rn.raft.voters), set(best.rn.raft.learners)

    def quiesced_total(self) -> int:
        """Times groups went quiescent, over every host incarnation so far."""
        live = sum(node.host.stats.quiesced for node in self.nodes.values() if node.host)
        return self.stats.quiesced + live
