"""Seeded runs of the simulated cluster: a safety phase with faults, then a liveness phase.

Safety phase: for ``ticks`` ticks, each round may propose, read, compact, change membership,
transfer leadership, crash or restart a node, partition (isolate one node, split the cluster,
cut one direction of a link) or heal, all drawn from the seed's RNG; the checker watches every
step and the logs are compared pairwise every 100 ticks.

Liveness phase: heal the network, stop dropping and duplicating, restart every node (or keep one
node isolated where every group keeps a working majority without it), and require that within
``liveness_ticks`` every group has a leader that commits a new proposal and every live member
of the group applies everything ever committed.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from raft import InvariantViolation
from raft.quorum import majority

from .checker import Violation
from .cluster import ELECTION_TICKS, ROUNDS_PER_TICK, Faults, SimCluster, Stats

LIVENESS_TICKS = 400
# With one entry per AppendEntries ("trickle") a replica far behind catches up one entry per
# round trip; the bound is stretched for it (seeds 509 and 914 on 5 nodes need ~1 500).
LIVENESS_TICKS_TRICKLE = 2000


@dataclass
class SimResult:
    seed: int
    nodes: int
    groups: int
    ticks: int
    violation: str | None
    stats: Stats
    trace: list[str] = field(default_factory=list)


def _safety_round(c: SimCluster) -> None:
    rng, f = c.rng, c.faults
    g = rng.choice(c.groups)
    n = rng.choice(c.ids)
    x = rng.random()
    if x < 0.30:
        c.propose(g, via=n if rng.random() < 0.1 else None, stale=True)
    elif x < 0.34:
        c.read(n, g)
    elif x < 0.35:
        c.compact(n, g)
    elif x < 0.354:
        c.conf_change(g, rng)
    elif x < 0.357:
        c.transfer(g, rng)
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
        c.round()
        if r % (100 * ROUNDS_PER_TICK) == 0:
            c.check_logs()


def _pick_isolated(c: SimCluster) -> int | None:
    """A node to leave cut off during liveness, if every group works without it."""
    if len(c.ids) < 5 or c.rng.random() < 0.5:
        return None
    n = c.rng.choice(c.ids)
    for g in c.groups:
        voters, _ = c.members(g)
        if n in voters and len(voters - {n}) < majority(len(voters)) + 1:
            return None
    return n


def liveness_phase(c: SimCluster, liveness_ticks: int) -> None:
    c.heal()
    c.faults.drop = 0.0
    c.faults.duplicate = 0.0
    for n in sorted(set(c.ids) - c.alive):
        c.restart(n)
    away = _pick_isolated(c)
    if away is not None:
        c.isolate(away)
    c.log(f"liveness phase (isolated: {away})")
    done: set[int] = set()
    markers: dict[int, tuple[int, int]] = {}  # group -> (term, index) of the latest proposal
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
                    markers[g], proposed_at[g] = marker, tick
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


def _group_caught_up(c: SimCluster, g: int, marker: tuple[int, int], away: int | None) -> bool:
    """The marker is committed and every reachable member applied all that was committed."""
    term, index = marker
    committed = c.checker.committed.get((g, index))
    if committed is None or committed[0] != term:
        return False
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
) -> SimResult:
    lines: list[str] = []
    sink = trace if trace is not None else (lines.append if verbose else None)
    c = SimCluster(seed, nodes, groups, faults, trace=sink)
    violation: str | None = None
    try:
        safety_phase(c, ticks)
        if c.faults.max_size_per_msg < 16:
            liveness_ticks = max(liveness_ticks, LIVENESS_TICKS_TRICKLE)
        liveness_phase(c, liveness_ticks)
    except (Violation, InvariantViolation) as e:
        violation = f"{type(e).__name__}: {e}"
    except Exception:
        violation = f"crash: {traceback.format_exc()}"
    return SimResult(seed, nodes, groups, ticks, violation, c.stats, lines)
