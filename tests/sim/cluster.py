"""A deterministic simulated cluster: N nodes x G groups, in one thread.

Everything random comes from one ``random.Random(seed)``; the same seed replays the same run.

- Each node is one ``MultiRaft`` host (raft/multi.py) holding a replica of every group (a
  non-member's starts empty and learns from the log).  Its inputs go through the host: ticks,
  messages, proposals, membership changes, transfers, reads and the peer liveness reports; its
  outputs are ``host.ready()``.  With ``quiesce`` (every seed but one in 7) idle groups stop
  ticking and heartbeating; without it, every group ticks as the bare core would.
- Time advances in *rounds*; every ``ROUNDS_PER_TICK`` rounds each live host ticks.
- The network (``Network``) delays each message by 0..``max_delay`` rounds (so it reorders),
  drops and duplicates at configured rates, and drops whatever crosses a blocked link when it
  is sent or when it arrives (symmetric and asymmetric partitions, isolating a node).  Every
  message travels encoded through msgspec, so the schema is exercised too.
- Peer liveness (``Links``): what a transport would report.  A connection is up while both
  nodes live and neither direction of their link is blocked; a break reaches each live end as
  ``peer_down`` a few rounds later, a (re)connection reaches both ends as ``peer_up`` soon after.
- The disk (tests/sim/disk.py): a ``MemoryStorage`` per group, or (``wal``, every third seed) the
  node's real ``WAL``.  A Ready is taken at once but persisted ``0..max_persist_delay`` rounds
  later (the fsync); its "after persist" messages, applies and ``advance`` happen only then.  A
  crash drops the host, the Readies being persisted and the application's state; with a WAL it
  may also tear the write of one of those Readies.  A restart recovers the disk, checks that it
  holds everything acknowledged, and rebuilds the host from the disk alone.
- The application is a hash chain over applied data, snapshotted into the log's snapshots.
- Pauses (``Faults.pause``): a node, preferably a leader, stops for 2-4 election timeouts (a GC
  pause, SIGSTOP): nothing it is sent is read, its writes do not finish, it does not tick.  It
  stops a few rounds into a *read wave* (every node reads every group each round, the nodes'
  context counters aligned, the pausing node starting last so that its counter lags).  When it
  resumes it first serves its clients' reads, then reads what it was sent, in order: a stale
  leader meets late heartbeat answers and reads whose contexts others used before it stopped.
- Reads carry contexts as raft/driver.py makes them (a counter per node, so equal bytes across
  nodes); the checker tells them apart by node and context.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import msgspec

from raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    EntryType,
    RaftError,
    RawNode,
    Ready,
    Role,
    Storage,
)
from raft.messages import Message
from raft.multi import HostConfig, MultiRaft

from .checker import GENESIS, Checker, Violation, chain
from .disk import Disk, Durable, MemoryDisk, WalDisk, allowed_outcomes, writes_something

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


class Network:
    def __init__(self, rng: random.Random, faults: Faults) -> None:
        self.rng = rng
        self.faults = faults
        self.queue: list[Packet] = []
        self.blocked: set[tuple[int, int]] = set()
        self.counter = itertools.count()
        self.sent = self.dropped = 0
        self.sent_by: Counter[int] = Counter()
        self.last_due: dict[tuple[int, int], int] = {}  # (src, dst) -> latest due, for fifo
        self.on_send: Callable[[int, Message], None] = lambda g, m: None

    def send(self, now: int, src: int, group: int, m: Message) -> None:
        self.sent += 1
        self.sent_by[src] += 1
        self.on_send(group, m)
        if (src, m.to) in self.blocked or self.rng.random() < self.faults.drop:
            self.dropped += 1
            return
        data = _encode(m)
        copies = 2 if self.rng.random() < self.faults.duplicate else 1
        for _ in range(copies):
            due = now + self.rng.randint(0, self.faults.max_delay)
            if self.faults.fifo:
                due = max(due, self.last_due.get((src, m.to), 0))
            self.last_due[(src, m.to)] = due
            heapq.heappush(self.queue, Packet(due, next(self.counter), src, m.to, group, data))

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


class Replica:
    """One group's replica on one node; only what its node's disk holds survives a crash."""

    def __init__(self, node_id: int, group: int) -> None:
        self.node_id = node_id
        self.group = group
        self.rn: RawNode | None = None
        self.storage: Storage | None = None
        self.pending: Ready | None = None
        self.pending_due = 0
        self.app_state = GENESIS
        self.app_index = 0

    def start(self, host: MultiRaft, storage: Storage) -> None:
        snap = storage.snapshot()
        self.storage = storage
        self.app_index = snap.meta.index
        self.app_state = snap.data if snap.meta.index else GENESIS
        self.rn = host.add_group(self.group, storage, applied=snap.meta.index)
        self.pending = None

    def stop(self) -> None:
        self.rn = None
        self.storage = None
        self.pending = None


class SimNode:
    """One node: a MultiRaft host over a disk.  A crash loses the host, never the disk."""

    def __init__(
        self, node_id: int, groups: list[int], disk: Disk, config: HostConfig, seed: int
    ) -> None:
        self.id = node_id
        self.disk = disk
        self.config = config
        self.seed = seed
        self.incarnation = 0
        self.host: MultiRaft | None = None
        self.replicas = {g: Replica(node_id, g) for g in groups}
        self.acked: dict[int, Durable] = {}  # at the last crash: each group's durable state
        # Read contexts as raft/driver.py makes them: a counter per node, so two nodes' reads
        # carry the same bytes (kept across restarts: a driver's are unique per process).
        self.read_seq = 0
        self.torn: tuple[int, Ready] | None = None  # the write the last crash interrupted

    def start(self) -> None:
        self.incarnation += 1
        cfg = dataclasses.replace(self.config.group, seed=self.seed * 1000 + self.incarnation)
        host = self.host = MultiRaft(dataclasses.replace(self.config, group=cfg))
        for g, rep in self.replicas.items():
            rep.start(host, self.disk.storage(g))

    def crash(self, torn: tuple[int, Ready] | None, rng: random.Random) -> str | None:
        """Stop the node; with ``torn``, the crash interrupts that write (see disk.py)."""
        self.acked = {g: Durable.of(self.disk.storage(g)) for g in self.replicas}
        self.torn = torn
        what = self.disk.crash(torn, rng)
        self.host = None
        for rep in self.replicas.values():
            rep.stop()
        return what

    def restart(self, checker: Checker) -> None:
        """Recover the disk, judge what it recovered, and start a new host over it."""
        self.disk.recover()
        for g in self.replicas:
            st = self.disk.storage(g)
            got = Durable.of(st)
            base = self.acked[g]
            torn = self.torn if self.torn is not None and self.torn[0] == g else None
            allowed = allowed_outcomes(base, torn[1]) if torn is not None else [base]
            if got not in allowed:
                raise Violation(
                    f"g{g} n{self.id}: the disk recovered {got.describe()}, but acknowledged "
                    f"was {base.describe()} (torn write: {torn is not None})"
                )
            if got != base:  # part of the torn write survived: it is on disk now
                checker.on_persist(self.id, g, st, list(got.entries))
        self.torn = None
        self.start()
        for g, rep in self.replicas.items():
            checker.on_restore(self.id, g, rep.app_index, rep.app_state)


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
    pauses: int = 0
    peer_reports: int = 0
    quiesced: int = 0  # times a group went quiescent on a host, summed over incarnations
    awake_outsiders: int = 0  # replicas outside their group's configuration (runner.py)
    zombie_groups: int = 0  # groups with an outsider that counts itself a voter (runner.py)
    quiesce_ticks: int = 0  # ticks from the liveness phase's progress to quiescence (runner.py)


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
        self.proposal_counter = itertools.count(1)
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
                disk: Disk = MemoryDisk(self.groups)
                if self.dir is not None:
                    disk = WalDisk(os.path.join(self.dir, f"n{n}"))
                cfg = dataclasses.replace(config, group=dataclasses.replace(config.group, id=n))
                self.nodes[n] = SimNode(n, self.groups, disk, cfg, seed)
            for g in self.groups:
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
        self.now += 1
        for n, until in list(self.paused.items()):
            if self.now >= until:
                self.resume(n)
        if self.pausing:
            self._start_pauses()
        incarnations = {n: node.incarnation for n, node in self.nodes.items() if n in self.alive}
        for report in self.links.update(self.now, incarnations, self.net.blocked):
            host = self.nodes[report.observer].host
            assert host is not None
            if report.up:
                host.peer_up(report.peer)
            else:
                host.peer_down(report.peer)
            self.stats.peer_reports += 1
        for p in self.net.due(self.now):
            if p.dst in self.paused:
                self.held.append(p)  # in the paused process's socket buffer
                continue
            host = self.nodes[p.dst].host
            if host is not None:
                host.step(p.group, _decode(p.data))
        for node in self.running():  # each node's due writes go in one batch (one fsync)
            due = [
                r
                for r in node.replicas.values()
                if r.pending is not None and r.pending_due <= self.now
            ]
            if due:
                self._complete(node, due)
        for node in self.running():
            if node.host is not None:
                for g, rd in node.host.ready():
                    self._take_ready(node.replicas[g], rd)
        if self.now % ROUNDS_PER_TICK == 0:
            for node in self.running():
                if node.host is not None:
                    node.host.tick()  # the Readies of the groups it ticked are taken next round
        for rep in self.replicas.values():
            if rep.rn is not None:
                self.checker.scan(rep.node_id, rep.group, rep.rn)
        if self.read_waves:
            self._read_waves()

    def _take_ready(self, rep: Replica, rd: Ready) -> None:
        assert rep.rn is not None
        if rd.soft_state is not None and rd.soft_state.role is Role.LEADER:
            self.log(f"g{rep.group} n{rep.node_id} leads term {rep.rn.raft.term}")
        for m in rd.messages:
            self.net.send(self.now, rep.node_id, rep.group, m)
        rep.pending = rd
        rep.pending_due = self.now + self.rng.randint(0, self.faults.max_persist_delay)
        if rep.pending_due <= self.now:
            self._complete(self.nodes[rep.node_id], [rep])

    def _complete(self, node: SimNode, reps: list[Replica]) -> None:
        """Write the pending Readies of ``reps`` (one batch), then finish each of them."""
        writes = []
        for rep in reps:
            assert rep.pending is not None
            writes.append((rep.group, rep.pending))
        node.disk.write(writes)
        for rep in reps:
            self._persisted(node, rep)

    def _persisted(self, node: SimNode, rep: Replica) -> None:
        """The Ready's write is durable: send, apply, advance (the driver's contract)."""
        rd, rn, st = rep.pending, rep.rn, rep.storage
        assert rd is not None and rn is not None and st is not None and node.host is not None
        rep.pending = None
        self.checker.on_persist(rep.node_id, rep.group, st, rd.entries)
        for m in rd.persisted_messages:
            self.net.send(self.now, rep.node_id, rep.group, m)
        if rd.snapshot is not None:
            rep.app_index = rd.snapshot.meta.index
            rep.app_state = rd.snapshot.data
            self.stats.snapshots_installed += 1
            self.checker.on_restore(rep.node_id, rep.group, rep.app_index, rep.app_state)
        if rd.committed_entries:
            self.checker.on_committed(rep.node_id, rep.group, rn.raft.term, rd.committed_entries)
        for e in rd.committed_entries:
            if e.index != rep.app_index + 1:
                raise Violation(
                    f"g{rep.group} n{rep.node_id}: applied {e.index} after {rep.app_index}"
                )
            data = e.data if e.type is EntryType.NORMAL else b"conf:" + e.data
            rep.app_state = chain(rep.app_state, data)
            rep.app_index = e.index
            proposal = bool(e.data) and e.type is EntryType.NORMAL
            self.checker.on_apply(rep.node_id, rep.group, e.index, data, rep.app_state, proposal)
            if proposal:
                self.stats.committed += 1
        for rs in rd.read_states:
            self.checker.on_read_answered(rep.node_id, rep.group, rs.context, rs.index)
        node.host.advance(rep.group, rd)

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
        torn: tuple[int, Ready] | None = None
        if self.wal and self.rng.random() < TORN_WRITE:
            writing = [
                r
                for r in node.replicas.values()
                if r.pending is not None and writes_something(r.pending)
            ]
            if writing:
                rep = min(writing, key=lambda r: (r.pending_due, r.group))
                assert rep.pending is not None
                torn = (rep.group, rep.pending)
        what = node.crash(torn, self.rng)
        if torn is not None:
            self.stats.torn_writes += 1
            self.log(f"n{n} crashed writing g{torn[0]}'s Ready {torn[1].number}: {what}")

    def restart(self, n: int) -> None:
        if n in self.alive:
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
        host = self.nodes[n].host
        assert host is not None
        for p in held:
            if (p.src, p.dst) not in self.net.blocked:
                host.step(p.group, _decode(p.data))

    def heal(self) -> None:
        if self.net.blocked:
            self.log("heal")
        self.net.blocked.clear()

    # -- client actions ------------------------------------------------------------------------
    def propose(
        self, g: int, via: int | None = None, stale: bool = False
    ) -> tuple[int, int] | None:
        """Propose new data: its (term, index).  Sent to the newest leader, to any node that
        believes it leads (``stale``), or ``via`` a given node."""
        if via is not None:
            rep: Replica | None = self.replicas[(via, g)]
        elif stale:
            leaders = self.leaders(g)
            rep = self.rng.choice(leaders) if leaders else None
        else:
            rep = self.leader(g)
        if rep is None or rep.rn is None or rep.node_id in self.paused:
            return None
        host = self.nodes[rep.node_id].host
        assert host is not None
        data = f"g{g}:n{rep.node_id}:p{next(self.proposal_counter)}".encode()
        try:
            index = host.propose(g, data)
        except RaftError:
            return None
        self.stats.proposals += 1
        return rep.rn.raft.term, index

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
        host = self.nodes[rep.node_id].host
        assert host is not None
        try:
            host.propose_conf_change(g, cc)
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
        host = self.nodes[rep.node_id].host
        assert host is not None
        try:
            host.transfer_leader(g, to)
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
        """The application snapshots ``g`` at its applied index and compacts the log to it."""
        rep = self.replicas[(n, g)]
        if rep.rn is None or rep.storage is None or n in self.paused:
            return
        r = rep.rn.raft
        index = rep.app_index
        st = rep.storage
        if index < st.first_index() or index > st.last_index() or index != r.log.applied:
            return
        self.nodes[n].disk.compact(g, index, r.conf_state(), rep.app_state)
        self.stats.snapshots_taken += 1
        self.log(f"g{g} n{n} snapshot+compact at {index}")

    def read(self, n: int, g: int) -> None:
        """A linearizable read of ``g`` at node ``n`` (a leader's own, or through its leader)."""
        rep = self.replicas[(n, g)]
        node = self.nodes[n]
        if rep.rn is None or node.host is None or n in self.paused:
            return
        node.read_seq += 1
        ctx = node.read_seq.to_bytes(8, "big")
        self.checker.on_read_asked(n, g, ctx)
        try:
            node.host.read_index(g, ctx)
        except RaftError:
            self.checker.on_read_dropped(n, ctx)
            return
        self.stats.reads += 1

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
