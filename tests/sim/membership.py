"""Scale-out in the simulation: nodes join, drain and are removed while the reconciler moves
groups under faults (design §5.6; ctxstore/membership.py, ctxstore/reconciler.py).

The cluster view is held here, as the meta group would hold it once committed (the meta group
is one more Raft group, exercised like any other by the plain sweeps; here its commands apply
at once).  Every ``RECONCILE_TICKS`` the reconciler observes each group through its newest
leader (voters, learners, and the learners whose log matches the leader's commit index) and
carries out ``reconciler.plan``'s steps: membership changes proposed through the group
leader's host, leadership transfers through its pipeline, node states in the view.  It sees the
live nodes as a meta leader would (those running); a paused node counts as live, as it would.

Membership events, drawn from the seed's RNG during the safety phase:
- **join**: a node that holds no group yet joins (``Join``; the reconciler activates it);
- **drain**: an active node leaves (``leaving``) while at least ``REPLICAS`` others stay
  active; the reconciler retires it once its groups moved, and the node stops for good;
- **remove**: a crashed member is removed (``admin remove``); its id is retired and the
  simulation never restarts it (a retired node is refused: ``SimCluster.restart``).  Only
  while its groups' other replicas run (``removable``): two replicas of a group lost for good
  are lost data, whatever the reconciler does.

Liveness (``settle``): once the network is healed and every non-retired node runs, every group
must reach its target replicas (its leader's voters are the target, no learners) and no node
may be left joining or leaving, within ``SETTLE_TICKS``.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from ctxstore.membership import (
    ClusterView,
    Join,
    MetaCommand,
    MetaRejected,
    NodeState,
    SetState,
    apply_meta,
    bootstrap_view,
)
from ctxstore.placement import REPLICAS, placement
from ctxstore.reconciler import Action, GroupStatus, Step, balance_leaders, plan
from raft import ConfChange, ConfChangeType, RaftError
from raft.quorum import majority

from .checker import Violation

if TYPE_CHECKING:
    from .cluster import SimCluster

INITIAL_NODES = 3  # active at the start; the others join during the run
RECONCILE_TICKS = 2
MOVES_MAX = 2
SETTLE_TICKS = 1500
EVENT = 0.004  # chance per round of a membership event

_CHANGE = {
    Action.ADD_LEARNER: ConfChangeType.ADD_LEARNER,
    Action.PROMOTE: ConfChangeType.ADD_NODE,
    Action.REMOVE: ConfChangeType.REMOVE_NODE,
}


def _ignore(result: object, exc: BaseException | None) -> None:
    """(The reconciler learns a change's outcome by observing the group again.)"""


def initial_members(ids: list[int], groups: list[int]) -> dict[int, tuple[int, ...]]:
    """Each group's first replicas: rendezvous over the first ``INITIAL_NODES`` nodes."""
    first = placement(ids[:INITIAL_NODES], max(groups) + 1)
    return {g: first[g] for g in groups}


class Membership:
    def __init__(self, c: SimCluster) -> None:
        self.c = c
        self.view: ClusterView = bootstrap_view(
            ((n, f"n{n}:1", "") for n in c.ids[:INITIAL_NODES]), groups=max(c.groups) + 1
        )
        self.outside = list(c.ids[INITIAL_NODES:])  # may still join
        self.stopped: set[int] = set()  # drained and retired: stopped for good
        self.steps = 0

    # -- the view ------------------------------------------------------------------------------
    def meta(self, cmd: MetaCommand) -> bool:
        self.view, res = apply_meta(self.view, cmd)
        if isinstance(res, MetaRejected):
            self.c.log(f"meta {cmd} refused: {res.code}")
            return False
        self.c.log(f"meta {cmd} -> view v{self.view.version}")
        return True

    def retired(self, n: int) -> bool:
        return self.view.retired(n)

    def event(self, rng: random.Random) -> None:
        c = self.c
        kind = rng.randrange(3)
        active = self.view.active()
        if kind == 0 and self.outside:
            n = self.outside.pop(0)
            if self.meta(Join(n, f"n{n}:1", "")):
                c.stats.joins += 1
        elif kind == 1 and len(active) > REPLICAS:
            n = rng.choice(active)
            if self.meta(SetState(n, NodeState.LEAVING)):
                c.stats.drains += 1
        elif kind == 2:
            dead = [n for n in self.view.members() if n not in c.alive and self.removable(n)]
            others = [n for n in active if n in c.alive]
            if dead and len(others) >= REPLICAS:
                n = rng.choice(dead)
                if self.meta(SetState(n, NodeState.REMOVED)):
                    c.stats.removals += 1

    def removable(self, n: int) -> bool:
        """Whether ``n`` may be lost for good now: in every group, each configuration that is
        applied or still in a live log (``runner._voter_sets``) has every other voter running
        and keeps a majority without ``n``.  (Then a newer configuration, committed by a
        majority of which ``n`` is at most one, is in some live log.  An operator removes a
        dead node while its groups' other replicas are healthy: losing a second replica for
        good before the first was replaced is losing data, whatever the reconciler does.)"""
        from .runner import _voter_sets  # (runner.py imports this module)

        c = self.c
        for g in c.groups:
            if not c.live(g):
                return False
            for voters in _voter_sets(c, g):
                if not voters:
                    continue  # a replica that was never a member (it starts empty)
                others = voters - {n}
                if any(m not in c.alive for m in others):
                    return False
                if len(others) < majority(len(voters)):
                    return False
        return True

    # -- the reconciler ------------------------------------------------------------------------
    def live(self) -> set[int]:
        return {n for n in self.c.alive if not self.view.retired(n)}

    def observe(self) -> dict[int, GroupStatus]:
        """Each group through its newest leader's ``status()``: a learner has caught up once
        its log matches the leader's commit index."""
        out = {}
        for g in self.c.groups:
            rep = self.c.leader(g)
            if rep is None or rep.rn is None:
                continue
            out[g] = GroupStatus.of_leader(rep.rn.status())
        return out

    def reconcile(self, balance: bool = False) -> None:
        groups = self.observe()
        steps = plan(self.view, groups, self.live(), MOVES_MAX)
        if balance and not steps:
            steps = balance_leaders(groups, self.live())
        for step in steps:
            self._take(step)

    def _take(self, step: Step) -> None:
        c = self.c
        if step.action is Action.ACTIVATE:
            self.meta(SetState(step.node, NodeState.ACTIVE))
            return
        if step.action is Action.RETIRE:
            if self.meta(SetState(step.node, NodeState.REMOVED)):
                self.stopped.add(step.node)
                c.crash(step.node)  # a drained node is shut down
            return
        rep = c.leader(step.group)
        if rep is None or rep.rn is None or rep.node_id in c.paused:
            return
        pipeline = c.nodes[rep.node_id].pipeline
        assert pipeline is not None
        try:
            if step.action is Action.TRANSFER:
                pipeline.transfer_leader(step.group, step.node)
                c.stats.transfers += 1
            else:
                change = ConfChange(_CHANGE[step.action], step.node)
                pipeline.propose_conf_change(step.group, change, _ignore)
                c.stats.conf_changes += 1
        except RaftError as e:
            c.log(f"g{step.group} {step.action.value} n{step.node} refused: {e!r}")
            return
        self.steps += 1
        c.log(f"g{step.group} n{rep.node_id}: {step.action.value} n{step.node}")

    # -- liveness --------------------------------------------------------------------------------
    def unsettled(self) -> list[str]:
        """What still differs from the view's targets (empty once placement is done)."""
        targets = self.view.targets()
        out = [f"n{n} {self.view.nodes[n].state.value}"
               for n in self.view.in_state(NodeState.JOINING, NodeState.LEAVING)]  # fmt: skip
        for g in self.c.groups:
            rep = self.c.leader(g)
            if rep is None or rep.rn is None:
                out.append(f"g{g} no leader")
                continue
            r = rep.rn.raft
            if set(r.voters) != set(targets[g]) or r.learners or r.log.applied < r.log.committed:
                out.append(f"g{g} v{list(r.voters)} l{list(r.learners)} target {list(targets[g])}")
        return out

    def settle(self) -> None:
        from .cluster import ROUNDS_PER_TICK  # (cluster.py imports this module)

        c = self.c
        for r in range(SETTLE_TICKS * ROUNDS_PER_TICK):
            if r % (RECONCILE_TICKS * ROUNDS_PER_TICK) == 0:
                if not self.unsettled():
                    c.log(f"placement settled on {self.view.active()}")
                    return
                self.reconcile()
            c.round()
        raise Violation(
            f"membership: not settled after {SETTLE_TICKS} ticks: {'; '.join(self.unsettled()[:8])}"
        )

    def balance(self, ticks: int) -> None:
        """Leadership balancing on the settled placement: within ``ticks`` no live node leads
        more than one group more than another could (``balance_leaders`` has nothing left)."""
        from .cluster import ROUNDS_PER_TICK  # (cluster.py imports this module)

        c = self.c
        for r in range(ticks * ROUNDS_PER_TICK):
            if r % (RECONCILE_TICKS * ROUNDS_PER_TICK) == 0:
                groups = self.observe()
                if len(groups) == len(c.groups) and not balance_leaders(groups, self.live()):
                    return
                self.reconcile(balance=True)
            c.round()
        raise Violation(f"membership: leaders not balanced after {ticks} ticks")


__all__ = ["INITIAL_NODES", "Membership", "initial_members"]
