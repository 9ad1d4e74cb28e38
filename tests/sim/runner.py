"""Seeded runs of the simulated cluster: a safety phase with faults, then a liveness phase.

Safety phase: for ``ticks`` ticks, each round may propose, read, compact, change membership,
transfer leadership, crash (with a WAL, possibly in the middle of a write), pause (preferably a
leader) or restart a node, partition (isolate one node, split the cluster, cut one direction of
a link) or heal, all drawn from the seed's RNG; the checker watches every step, every restart
checks what the disk recovered, and the logs are compared pairwise every 100 ticks.

Liveness phase: heal the network (no more drops, duplicates or reordering between two nodes),
resume paused nodes, restart every node (or keep one node isolated where every group keeps a
working majority without it), and require that within ``liveness_ticks`` every group has a
leader that commits a new proposal and every live member of the group applies everything ever
committed.  Then, when the hosts quiesce, that within ``QUIESCE_TICKS`` more every group sleeps
on every live node with nothing on its way, and that during a further election timeout no node
sends a single message
(see ``_quiescence`` for the replicas exempt).
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from raft import ConfChangeType, EntryType, InvariantViolation
from raft.messages import Message, decode_conf_change
from raft.quorum import majority

from .checker import Violation
from .cluster import (
    ELECTION_TICKS,
    ROUNDS_PER_TICK,
    SIM_ROUTER,
    SIM_TICK_S,
    Faults,
    SimCluster,
    Stats,
    Ticket,
    quiesce_default,
    wal_default,
)
from .membership import RECONCILE_TICKS

LIVENESS_TICKS = 400
# With one entry per AppendEntries ("trickle") a replica far behind catches up one entry per
# round trip; the bound is stretched for it (seeds 509 and 914 on 5 nodes need ~1 500).
LIVENESS_TICKS_TRICKLE = 2000
# Once every group made progress, every group sleeps on every live node, with nothing on its
# way, within this many ticks.  A leader quiesces HostConfig.quiesce_after_ticks (3) idle ticks
# after every live follower acknowledged its whole log (a heartbeat interval, 3 ticks, plus a
# round trip of up to 2 x max_delay rounds after the last apply) and its followers on its
# quiescing heartbeat.  Measured over 800 seeds (3 and 5 nodes, both disks): median 6 ticks,
# at most 24.  Four election timeouts leave room for a follower that must time out once.
QUIESCE_TICKS = 4 * ELECTION_TICKS
# Membership runs (tests/sim/membership.py): of the safety rounds that would change a group's
# membership at random, this share draws a membership event instead (join, drain, remove);
# leadership is balanced within BALANCE_TICKS once placement settled.
EVENT_SHARE = 0.5
BALANCE_TICKS = 400


@dataclass
class SimResult:
    seed: int
    nodes: int
    groups: int
    ticks: int
    violation: str | None
    stats: Stats
    wal: bool
    quiesce: bool
    trace: list[str] = field(default_factory=list)
    membership: bool = False

    def replay(self) -> str:
        """The command that replays this run, with its trace."""
        return (
            f"python -m tests.sim --seeds {self.seed} --nodes {self.nodes} "
            f"--groups {self.groups} --ticks {self.ticks} "
            f"--{'' if self.wal else 'no-'}wal --{'' if self.quiesce else 'no-'}quiesce --verbose"
            + (" --membership" if self.membership else "")
        )


def _safety_round(c: SimCluster) -> None:
    rng, f = c.rng, c.faults
    g = rng.choice(c.groups)
    n = rng.choice(c.ids)
    x = rng.random()
    if x < 0.25:  # at any node (its router forwards), or at a node that believes it leads
        c.propose(g, via=n if rng.random() < 0.2 else None, stale=True)
    elif x < 0.32:
        c.read(n, g)
    elif x < 0.34:
        c.client_read(n, g)
    elif x < 0.35:
        c.compact(n, g)
    elif x < 0.354:
        if c.membership is None:
            c.conf_change(g, rng)
        elif rng.random() < EVENT_SHARE:
            c.membership.event(rng)
    elif x < 0.357:
        c.transfer(g, rng)
    if rng.random() < f.pause:  # preferably a leader: it comes back stale
        lead = c.leader(g)
        who = lead.node_id if lead is not None else n
        c.pause(who, rng.randint(2 * ELECTION_TICKS, 4 * ELECTION_TICKS) * ROUNDS_PER_TICK)
    if rng.random() < f.crash and len(c.alive) > 1:
        c.crash(n)
    if rng.random() < f.restart:
        dead = sorted(set(c.ids) - c.alive)
        if dead:
            c.restart(rng.choice(dead))
    if rng.random() < f.partition:
        kind = rng.randrange(3)
        if kind == 0:
            c.isolate(n)
        elif kind == 1:
            side = set(rng.sample(c.ids, rng.randint(1, len(c.ids) - 1)))
            c.partition(side)
        else:
            other = rng.choice([m for m in c.ids if m != n])
            c.cut_one_way(n, other)
    if rng.random() < f.heal:
        c.heal()


def safety_phase(c: SimCluster, ticks: int) -> None:
    for r in range(ticks * ROUNDS_PER_TICK):
        _safety_round(c)
        if c.membership is not None and r % (RECONCILE_TICKS * ROUNDS_PER_TICK) == 0:
            c.membership.reconcile(balance=r % (50 * ROUNDS_PER_TICK) == 0)
        c.round()
        if r % (100 * ROUNDS_PER_TICK) == 0:
            c.check_logs()


def _pick_isolated(c: SimCluster) -> int | None:
    """A node to leave cut off during liveness, if every group works without it."""
    if len(c.ids) < 5 or c.rng.random() < 0.5:
        return None
    n = c.rng.choice(c.ids)
    for g in c.groups:
        for voters in _voter_sets(c, g):
            if n in voters and len(voters - {n}) < majority(len(voters)) + 1:
                return None
    return n


def _voter_sets(c: SimCluster, g: int) -> list[set[int]]:
    """The group's voters as applied, and as each live log's membership changes not applied
    yet would leave them (one may commit after the isolated node is chosen)."""
    voters, _ = c.members(g)
    out = [voters]
    for rep in c.live(g):
        assert rep.rn is not None
        r = rep.rn.raft
        log = r.log
        vs = set(r.voters)
        lo = max(log.applied + 1, log.first_index())
        for e in log.slice(lo, log.last_index() + 1, None) if lo <= log.last_index() else []:
            if e.type is EntryType.CONF_CHANGE:
                cc = decode_conf_change(e.data)
                if cc.type is ConfChangeType.ADD_NODE:
                    vs.add(cc.node_id)
                else:  # removed, or made a learner
                    vs.discard(cc.node_id)
        out.append(vs)
    return out


def liveness_phase(c: SimCluster, liveness_ticks: int) -> None:
    c.heal()
    c.faults.drop = 0.0
    c.faults.duplicate = 0.0
    c.faults.fifo = True  # one TCP connection per pair (raft/transport.py): in order, no loss
    c.pausing.clear()
    for n in sorted(c.paused):
        c.resume(n)
    for n in sorted(set(c.ids) - c.alive):
        c.restart(n)  # (but a retired node's: refused)
    away = _pick_isolated(c) if c.membership is None else None
    if away is not None:
        c.isolate(away)
    c.log(f"liveness phase (isolated: {away})")
    if c.membership is not None:
        c.membership.settle()  # every group on its target replicas
        c.membership.balance(BALANCE_TICKS)
    _progress(c, liveness_ticks, away)
    if c.membership is not None and (left := c.membership.unsettled()):
        raise Violation(f"membership: unsettled again after progress: {'; '.join(left)}")
    _answered(c)
    _applied(c, liveness_ticks, away)
    _history(c, away)
    if c.quiesce:
        _quiescence(c, away)


def _progress(c: SimCluster, liveness_ticks: int, away: int | None) -> None:
    """Every group commits a new proposal and its reachable members apply all committed."""
    done: set[int] = set()
    markers: dict[int, list[Ticket]] = {}  # group -> its proposals' tickets
    proposed_at: dict[int, int] = {}
    for r in range(liveness_ticks * ROUNDS_PER_TICK):
        tick = r // ROUNDS_PER_TICK
        for g in c.groups:
            if g in done:
                continue
            lead = c.leader(g)
            if lead is None or lead.node_id == away:
                continue
            if tick - proposed_at.get(g, -1000) >= 3 * ELECTION_TICKS:
                marker = c.propose(g)
                if marker is not None:
                    markers.setdefault(g, []).append(marker)
                    proposed_at[g] = tick
            if g in markers and _group_caught_up(c, g, markers[g], away):
                done.add(g)
        if len(done) == len(c.groups):
            c.check_logs()
            return
        c.round()
    missing = sorted(set(c.groups) - done)
    detail = "; ".join(_describe(c, g) for g in missing)
    raise Violation(
        f"liveness: groups {missing} made no progress in {liveness_ticks} ticks: {detail}"
    )


def _history(c: SimCluster, away: int | None) -> None:
    """Every live member of each group (caught up by now) holds every acknowledged append of
    the group's sessions exactly once, at its seq (app.py)."""
    for g in c.groups:
        voters, learners = c.members(g)
        for n in sorted((voters | learners) & c.alive - {away}):
            app = c.nodes[n].app
            assert app is not None
            c.history.check_replica(n, app.state, c.clients.sessions[g])


def _answered(c: SimCluster) -> None:
    """Every client request is answered (by its deadline: ``SimCluster.check_requests``), so
    no router asks for anything more (a read barrier retried until its deadline would)."""
    for _ in range(int(SIM_ROUTER.request_timeout_s / SIM_TICK_S + 2) * ROUNDS_PER_TICK):
        if not c.requests:
            return
        c.round()
    raise Violation(f"liveness: {len(c.requests)} requests never answered")


def _quiescence(c: SimCluster, away: int | None) -> None:
    """Within QUIESCE_TICKS every group sleeps on every live node (but the isolated one) and
    nothing is on its way; then nothing at all is sent for an election timeout.

    Exempt, besides the isolated node: a replica outside its group's configuration (as the
    group's leader has it), e.g. a removed voter or learner that never learnt of its removal.
    No leader quiesces it and the simulation does not drop it (it never calls the pipeline's
    ``remove_group``: only a node that applies its own removal learns it left), so it ticks
    forever; it must still be silent.  A *zombie*, an outsider that still counts
    itself a voter, is not: it campaigns after every (backed-off) election timeout, which wakes
    its former group (Raft thesis §4.2.3), so its whole group is exempt (``zombie_groups``).
    """
    outsiders, zombies = _outsiders(c, away)
    c.stats.awake_outsiders = sum(len(ns) for ns in outsiders.values())
    c.stats.zombie_groups = len(zombies)
    start = c.now
    for _ in range(QUIESCE_TICKS * ROUNDS_PER_TICK):
        if not _awake(c, away, outsiders, zombies) and _settled(c, away, zombies):
            break
        c.round()
    else:
        raise Violation(
            f"quiescence: still awake or busy {QUIESCE_TICKS} ticks after progress: "
            f"{'; '.join(_awake(c, away, outsiders, zombies)) or 'all asleep'}"
        )
    c.stats.quiesce_ticks = -(-(c.now - start) // ROUNDS_PER_TICK)
    c.log(f"every group is quiescent (zombie groups: {sorted(zombies)})")
    sent: list[str] = []
    on_send = c.net.on_send

    def record(g: int, m: Message) -> None:
        if m.frm != away and g not in zombies:
            sent.append(f"r{c.now} g{g} {m!r}")
        on_send(g, m)

    c.net.on_send = record
    try:
        for _ in range(ELECTION_TICKS * ROUNDS_PER_TICK):
            c.round()
    finally:
        c.net.on_send = on_send
    awake = _awake(c, away, outsiders, zombies)
    if sent or awake:
        raise Violation(
            f"quiescence: in an election timeout after quiescing, {len(sent)} messages were "
            f"sent ({'; '.join(sent[:6])}); awake: {'; '.join(awake) or 'none'}"
        )


def _outsiders(c: SimCluster, away: int | None) -> tuple[dict[int, set[int]], set[int]]:
    """Per group, the live nodes (but ``away``) outside its leader's configuration; and the
    groups where such a node counts itself a voter."""
    outsiders: dict[int, set[int]] = {}
    zombies: set[int] = set()
    for g in c.groups:
        lead = c.leader(g)
        assert lead is not None and lead.rn is not None
        members = set(lead.rn.raft.voters) | set(lead.rn.raft.learners)
        outsiders[g] = set(c.alive) - members - {away}
        for n in outsiders[g]:
            rn = c.replicas[(n, g)].rn
            assert rn is not None
            if n in rn.raft.voters:
                zombies.add(g)
    return outsiders, zombies


def _settled(c: SimCluster, away: int | None, zombies: set[int]) -> bool:
    """Nothing is on its way: no peer report, message, Ready or write (but to or from ``away``,
    whose links are cut, or in a zombie's group)."""
    if not c.links.settled():
        return False
    if any((p.src, p.dst) not in c.net.blocked and p.group not in zombies for p in c.net.queue):
        return False
    for (n, g), rep in c.replicas.items():
        if n == away or g in zombies or rep.rn is None:
            continue
        if rep.rn.outstanding or rep.rn.has_ready():  # (outstanding: its write is in flight)
            return False
    return True


def _awake(
    c: SimCluster, away: int | None, outsiders: dict[int, set[int]], zombies: set[int]
) -> list[str]:
    """The groups still ticking on the live nodes that must sleep, described."""
    out = []
    for n in sorted(c.alive - {away}):
        host = c.host(n)
        assert host is not None
        if not host.awake_count():
            continue
        for g in host.groups():
            if host.is_quiescent(g) or g in zombies or n in outsiders[g]:
                continue
            r = host.node(g).raft
            out.append(
                f"g{g}@n{n} {r.role.value[:4]} t{r.term} lead {r.lead} "
                f"v{list(r.voters)} l{list(r.learners)}"
            )
    return out


def _group_caught_up(c: SimCluster, g: int, markers: list[Ticket], away: int | None) -> bool:
    """A client was answered a new proposal's result (through the leader's router) and every
    reachable member applied all that was committed."""
    return any(t.ok for t in markers) and _applied_everywhere(c, g, away)


def _applied(c: SimCluster, liveness_ticks: int, away: int | None) -> None:
    """Every reachable member of every group applies all that was committed (again: requests
    a router still held, retried or forwarded, may have committed after ``_progress``)."""
    for _ in range(liveness_ticks * ROUNDS_PER_TICK):
        if all(_applied_everywhere(c, g, away) for g in c.groups):
            return
        c.round()
    missing = [g for g in c.groups if not _applied_everywhere(c, g, away)]
    detail = "; ".join(_describe(c, g) for g in missing)
    raise Violation(f"liveness: groups {missing} not applied everywhere: {detail}")


def _applied_everywhere(c: SimCluster, g: int, away: int | None) -> bool:
    lead = c.leader(g)
    if lead is None or lead.rn is None:
        return False
    target = c.checker.max_committed.get(g, 0)
    for n in set(lead.rn.raft.voters) | set(lead.rn.raft.learners):
        if n == away:
            continue
        rep = c.replicas[(n, g)]
        if rep.rn is None or rep.app_index < target:
            return False
    return True


def _describe(c: SimCluster, g: int) -> str:
    parts = []
    for rep in c.live(g):
        assert rep.rn is not None
        r = rep.rn.raft
        parts.append(
            f"n{rep.node_id}:{r.role.value[:4]} t{r.term} c{r.log.committed} "
            f"a{rep.app_index} last{r.log.last_index()} v{list(r.voters)} l{list(r.learners)}"
        )
    return f"g{g}[{', '.join(parts)}; max committed {c.checker.max_committed.get(g, 0)}]"


def run_seed(
    seed: int,
    nodes: int,
    groups: int,
    ticks: int,
    faults: Faults | None = None,
    verbose: bool = False,
    liveness_ticks: int = LIVENESS_TICKS,
    trace: Callable[[str], None] | None = None,
    wal: bool | None = None,
    quiesce: bool | None = None,
    membership: bool = False,
) -> SimResult:
    """One seeded run; ``wal``/``quiesce`` None: the seed's default (``wal_default``...)."""
    lines: list[str] = []
    sink = trace if trace is not None else (lines.append if verbose else None)
    wal = wal_default(seed) if wal is None else wal
    quiesce = quiesce_default(seed) if quiesce is None else quiesce
    violation: str | None = None
    with SimCluster(
        seed, nodes, groups, faults, trace=sink, wal=wal, quiesce=quiesce, membership=membership
    ) as c:
        try:
            safety_phase(c, ticks)
            if c.faults.max_size_per_msg < 16:
                liveness_ticks = max(liveness_ticks, LIVENESS_TICKS_TRICKLE)
            liveness_phase(c, liveness_ticks)
        except (Violation, InvariantViolation) as e:
            violation = f"{type(e).__name__}: {e}"
        except Exception:
            violation = f"crash: {traceback.format_exc()}"
        c.stats.quiesced = c.quiesced_total()
        c.stats.snapshots_taken = c.snapshots_taken()
        c.stats.acks = c.history.acks
        routed = sum((node.routed_counts() for node in c.nodes.values()), Counter[str]())
        c.stats.forwarded = routed["forwarded"]
        c.stats.append_batches = routed["batches"]
        c.stats.dedupes = c.history.dedupes
    return SimResult(
        seed, nodes, groups, ticks, violation, c.stats, wal, quiesce, lines, membership
    )
