"""A deterministic simulated cluster: N nodes x G groups of the pure core, in one thread.

Everything random comes from one ``random.Random(seed)``; the same seed replays the same run.

- Time advances in *rounds*; every ``ROUNDS_PER_TICK`` rounds each live node ticks each group.
- The network (``Network``) delays each message by 0..``max_delay`` rounds (so it reorders),
  drops and duplicates at configured rates, and drops whatever crosses a blocked link when it
  is sent or when it arrives (symmetric and asymmetric partitions, isolating a node).  Every
  message travels encoded through msgspec, so the schema is exercised too.
- The disk: each replica's ``MemoryStorage`` is what is durable.  A Ready is taken at once but
  persisted ``0..max_persist_delay`` rounds later (the fsync); its "after persist" messages,
  applies and ``advance`` happen only then.  A crash drops the node's RawNodes, the Ready being
  persisted and the application's state; a restart rebuilds them from storage alone.
- The application is a hash chain over applied data, snapshotted into the log's snapshots.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from raft import (
    ConfChange,
    ConfChangeType,
    Config,
    ConfState,
    EntryType,
    MemoryStorage,
    RaftError,
    RawNode,
    Ready,
    Role,
)
from raft.messages import Message
from raft.storage import bootstrap

from ..raft.helpers import persist
from .checker import GENESIS, Checker, Violation, chain

ROUNDS_PER_TICK = 4
ELECTION_TICKS = 10
HEARTBEAT_TICKS = 3

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Message).decode


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
        self.on_send: Callable[[int, Message], None] = lambda g, m: None

    def send(self, now: int, src: int, group: int, m: Message) -> None:
        self.sent += 1
        self.on_send(group, m)
        if (src, m.to) in self.blocked or self.rng.random() < self.faults.drop:
            self.dropped += 1
            return
        data = _encode(m)
        copies = 2 if self.rng.random() < self.faults.duplicate else 1
        for _ in range(copies):
            due = now + self.rng.randint(0, self.faults.max_delay)
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
        return out


class Replica:
    """One group's replica on one node: its disk survives crashes, the rest does not."""

    def __init__(
        self, node_id: int, group: int, conf: ConfState, seed: int, max_size_per_msg: int
    ) -> None:
        self.max_size_per_msg = max_size_per_msg
        self.node_id = node_id
        self.group = group
        self.seed = seed
        self.storage = MemoryStorage()
        if conf.voters:
            bootstrap(self.storage, conf)  # a non-member starts empty and learns from the log
        self.incarnation = 0
        self.rn: RawNode | None = None
        self.pending: Ready | None = None
        self.pending_due = 0
        self.app_state = GENESIS
        self.app_index = 0
        self.start()

    def start(self) -> None:
        self.incarnation += 1
        snap = self.storage.snapshot()
        self.app_index = snap.meta.index
        self.app_state = snap.data if snap.meta.index else GENESIS
        cfg = Config(
            id=self.node_id,
            election_ticks=ELECTION_TICKS,
            heartbeat_ticks=HEARTBEAT_TICKS,
            seed=self.seed * 1000 + self.group * 10 + self.incarnation,
            max_size_per_msg=self.max_size_per_msg,
            max_inflight_msgs=4,
            max_uncommitted_bytes=4096,
            snapshot_timeout_ticks=4 * ELECTION_TICKS,
            applied=snap.meta.index,
        )
        self.rn = RawNode(cfg, self.storage)
        self.pending = None

    def stop(self) -> None:
        self.rn = None
        self.pending = None


@dataclass
class Stats:
    proposals: int = 0
    committed: int = 0
    crashes: int = 0
    partitions: int = 0
    conf_changes: int = 0
    transfers: int = 0
    snapshots_taken: int = 0
    snapshots_installed: int = 0
    reads: int = 0


class SimCluster:
    def __init__(
        self,
        seed: int,
        nodes: int,
        groups: int,
        faults: Faults | None = None,
        trace: Callable[[str], None] | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.ids = list(range(1, nodes + 1))
        self.groups = list(range(groups))
        self.faults = faults or profile_for(seed)
        self.net = Network(self.rng, self.faults)
        self.checker = Checker()
        self.net.on_send = self.checker.on_send
        self.stats = Stats()
        self.trace = trace
        self.now = 0
        self.alive: set[int] = set(self.ids)
        self.proposal_counter = itertools.count(1)
        self.read_counter = itertools.count(1)
        self.replicas: dict[tuple[int, int], Replica] = {}
        self.dirty: dict[tuple[int, int], Replica] = {}  # replicas with new input, in order
        for g in self.groups:
            members = self.ids if nodes <= 3 else sorted(self.rng.sample(self.ids, 3))
            conf = ConfState(tuple(members))
            for n in self.ids:
                c = conf if n in members else ConfState()
                self.replicas[(n, g)] = Replica(n, g, c, seed, self.faults.max_size_per_msg)

    def log(self, what: str) -> None:
        if self.trace is not None:
            self.trace(f"[r{self.now} t{self.now // ROUNDS_PER_TICK}] {what}")

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
    def touch(self, rep: Replica) -> None:
        """``rep`` received input: look for a Ready (and scan it) this round."""
        self.dirty[(rep.node_id, rep.group)] = rep

    def round(self) -> None:
        self.now += 1
        for p in self.net.due(self.now):
            if p.dst not in self.alive:
                continue
            rep = self.replicas[(p.dst, p.group)]
            assert rep.rn is not None
            rep.rn.step(_decode(p.data))
            self.touch(rep)
        for rep in self.replicas.values():
            if rep.pending is not None and rep.pending_due <= self.now:
                self._complete(rep)
                self.touch(rep)
        work, self.dirty = self.dirty, {}
        for rep in work.values():
            if rep.rn is not None and rep.pending is None and rep.rn.has_ready():
                self._take_ready(rep)
        if self.now % ROUNDS_PER_TICK == 0:
            for rep in self.replicas.values():
                if rep.rn is not None:
                    rep.rn.tick()
                    self.touch(rep)  # its Ready is taken next round
            work = self.replicas
        for rep in work.values():
            if rep.rn is not None:
                self.checker.scan(rep.node_id, rep.group, rep.rn)

    def _take_ready(self, rep: Replica) -> None:
        assert rep.rn is not None
        rd = rep.rn.ready()
        if rd.soft_state is not None and rd.soft_state.role is Role.LEADER:
            self.log(f"g{rep.group} n{rep.node_id} leads term {rep.rn.raft.term}")
        for m in rd.messages:
            self.net.send(self.now, rep.node_id, rep.group, m)
        rep.pending = rd
        rep.pending_due = self.now + self.rng.randint(0, self.faults.max_persist_delay)
        if rep.pending_due <= self.now:
            self._complete(rep)

    def _complete(self, rep: Replica) -> None:
        """The Ready's write is durable: send, apply, advance (the driver's contract)."""
        rd, rn = rep.pending, rep.rn
        assert rd is not None and rn is not None
        rep.pending = None
        st = rep.storage
        persist(st, rd)
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
        rn.advance(rd)

    # -- faults --------------------------------------------------------------------------------
    def crash(self, n: int) -> None:
        if n not in self.alive:
            return
        self.log(f"crash n{n}")
        self.stats.crashes += 1
        self.alive.discard(n)
        for g in self.groups:
            self.replicas[(n, g)].stop()

    def restart(self, n: int) -> None:
        if n in self.alive:
            return
        self.log(f"restart n{n}")
        self.alive.add(n)
        self.checker.on_restart(n)
        for g in self.groups:
            self.replicas[(n, g)].start()
            self.touch(self.replicas[(n, g)])

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
        if rep is None or rep.rn is None:
            return None
        data = f"g{g}:n{rep.node_id}:p{next(self.proposal_counter)}".encode()
        self.touch(rep)
        try:
            index = rep.rn.propose(data)
        except RaftError:
            return None
        self.stats.proposals += 1
        return rep.rn.raft.term, index

    def conf_change(self, g: int, pick: random.Random) -> None:
        rep = self.leader(g)
        if rep is None or rep.rn is None:
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
        self.touch(rep)
        try:
            rep.rn.propose_conf_change(cc)
        except RaftError:
            return
        self.log(f"g{g} n{rep.node_id} proposes {cc.type.name} n{cc.node_id}")
        self.stats.conf_changes += 1

    def transfer(self, g: int, pick: random.Random) -> None:
        rep = self.leader(g)
        if rep is None or rep.rn is None:
            return
        targets = [v for v in rep.rn.raft.voters if v != rep.node_id]
        if not targets:
            return
        to = pick.choice(targets)
        self.touch(rep)
        try:
            rep.rn.transfer_leader(to)
        except RaftError:
            return
        self.log(f"g{g} transfer n{rep.node_id} -> n{to}")
        self.stats.transfers += 1

    def compact(self, n: int, g: int) -> None:
        rep = self.replicas[(n, g)]
        if rep.rn is None:
            return
        r = rep.rn.raft
        index = rep.app_index
        if index <= rep.storage.snapshot().meta.index or index != r.log.applied:
            return
        rep.storage.create_snapshot(index, r.conf_state(), rep.app_state)
        rep.storage.compact(index)
        self.stats.snapshots_taken += 1
        self.log(f"g{g} n{n} snapshot+compact at {index}")

    def read(self, n: int, g: int) -> None:
        rep = self.replicas[(n, g)]
        if rep.rn is None:
            return
        ctx = f"read{next(self.read_counter)}".encode()
        self.touch(rep)
        self.checker.on_read_asked(g, ctx)
        try:
            rep.rn.read_index(ctx)
        except RaftError:
            self.checker.reads.pop(ctx, None)
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
