"""Carries out the reconciler's group steps for the groups this node leads (design §5.6).

``Mover.run_once`` observes every group this node leads (``MultiRaft.status``: voters,
learners, each member's matched index, a pending change), asks ``reconciler.plan`` for the next
steps under the cluster view, and starts them through the driver: a membership change
(``Driver.propose_conf_change``) or a leadership transfer.  It never waits for a step: the next
round observes its effect, and a step that was lost is decided again (the core refuses a second
pending change, which is only counted).

On the meta group's leader (``meta_group`` given and led here) a round also takes the view's
own steps, as meta commands through ``propose_meta``: a live joiner is activated, a drained
node every group of which was observed here is retired (``reconciler.plan``); and the meta
group's own membership (``meta.meta_step``: every member follows it).  A meta command is not
proposed again for ``META_RETRY_S`` while the first may still be applied.

Leader balancing (``balance``, every ``balance_interval_s`` and on ``admin rebalance``): from
what this node knows of every group it hosts (its voters, its leader), ``balance_leaders``
plans transfers toward the mean, and the node starts those of the groups it leads.  Every node
does so for its own, so leadership spreads without a central plan.

A learner counts as caught up once its log matches the leader's commit index.  Moves are
capped per node (``moves_max`` groups with a learner among those it leads).  ``ctxstore
serve`` runs one mover per node (ctxstore/node.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Set
from dataclasses import dataclass

from raft import NONE, RaftError, Role
from raft.core import Raft
from raft.driver import Driver
from raft.messages import ConfChange, ConfChangeType

from .membership import ClusterView, MetaCommand, NodeState, SetState
from .meta import meta_step
from .reconciler import (
    MOVES_MAX,
    TRANSFERS_MAX,
    Action,
    GroupStatus,
    Step,
    balance_leaders,
    moving,
    plan,
)

logger = logging.getLogger(__name__)

_CHANGE = {
    Action.ADD_LEARNER: ConfChangeType.ADD_LEARNER,
    Action.PROMOTE: ConfChangeType.ADD_NODE,
    Action.REMOVE: ConfChangeType.REMOVE_NODE,
}
INTERVAL_S = 0.2  # between rounds
META_RETRY_S = 2.0  # a meta command is not proposed again sooner
_NODE_STATES = {Action.ACTIVATE: NodeState.ACTIVE, Action.RETIRE: NodeState.REMOVED}


@dataclass
class MoverStats:
    rounds: int = 0
    conf_changes: int = 0  # membership changes proposed
    transfers: int = 0
    refused: int = 0  # steps the core refused (another change pending, leadership lost)
    failed: int = 0  # changes proposed that did not apply (timeout, leader change)
    meta_commands: int = 0  # view changes proposed (activations, retirements)
    balance_rounds: int = 0
    moving: int = 0  # groups led here whose replicas differ from their target (last round)


class Mover:
    def __init__(
        self,
        node_id: int,
        driver: Driver,
        view: Callable[[], ClusterView],
        live: Callable[[], Set[int]],
        moves_max: int = MOVES_MAX,
        interval_s: float = INTERVAL_S,
        *,
        meta_group: int | None = None,
        propose_meta: Callable[[MetaCommand], None] | None = None,
        balance_interval_s: float = 0.0,
        transfers_max: int = TRANSFERS_MAX,
        led: Callable[[], Set[int]] | None = None,
    ) -> None:
        self.id = node_id
        self.driver = driver
        self.view = view
        self.live = live
        self.moves_max = moves_max
        self.interval_s = interval_s
        self.meta_group = meta_group
        self.propose_meta = propose_meta
        self.balance_interval_s = balance_interval_s
        self.transfers_max = transfers_max
        self.led = led  # the groups led here, if the caller tracks them (else looked up)
        self.stats = MoverStats()
        self._task: asyncio.Task[None] | None = None
        self._proposed: dict[tuple[Action, int], float] = {}  # meta command -> when
        self._balanced_at = 0.0
        self._quiet: object = None  # the inputs of the last round that found nothing to do
        self._balance_quiet: object = None  # the led counts that planned no transfer
        self._now = 0.0
        self.peer_led: dict[int, int] = {}  # peer -> the data groups it says it leads (Led)

    def observe(self) -> dict[int, GroupStatus]:
        """The groups this node leads, as their leader sees them."""
        host = self.driver.host
        out: dict[int, GroupStatus] = {}
        for g in host.groups():
            if host.node(g).raft.role is not Role.LEADER:
                continue
            out[g] = GroupStatus.of_leader(host.status(g))
        return out

    def run_once(self, now: float = 0.0) -> list[Step]:
        """One round at ``now`` (seconds, monotonic); the steps it started.  A round whose
        inputs (the view's version, the groups led here, the live peers) are those of a round
        that found nothing to do and nothing in progress is skipped: an idle node's mover
        costs next to nothing."""
        self.stats.rounds += 1
        self._now = now
        view = self.view()
        live = set(self.live()) | {self.id}
        host = self.driver.host
        if self.led is not None:
            led = frozenset(self.led())
        else:
            led = frozenset(g for g in host.groups() if host.node(g).raft.role is Role.LEADER)
        inputs = (view.version, led, frozenset(live))
        started: list[Step] = []
        if inputs != self._quiet:
            started = self._round(view, live, led, inputs)
        if self.balance_interval_s > 0 and now - self._balanced_at >= self.balance_interval_s:
            started.extend(self.balance(now))
        return started

    def _round(
        self, view: ClusterView, live: set[int], led: frozenset[int], inputs: object
    ) -> list[Step]:
        host = self.driver.host
        observed = {
            g: GroupStatus.of_leader(host.status(g))
            for g in led
            if g in host and host.node(g).raft.role is Role.LEADER
        }
        busy = any(st.learners or st.changing for st in observed.values())
        meta = None if self.meta_group is None else observed.pop(self.meta_group, None)
        started = []
        steps = plan(view, observed, live, self.moves_max)
        for step in steps:
            if step.group >= 0:
                taken = self._take(step)
            else:
                taken = meta is not None and self._take_meta(step, self._now)
            if taken:
                started.append(step)
        change = None if meta is None else meta_step(view, meta, live)
        if change is not None and self._take(change):
            started.append(change)
        self.stats.moving = moving(view.targets(), observed)
        idle = not (steps or change or busy or self.stats.moving)
        self._quiet = inputs if idle else None
        return started

    def balance(self, now: float = 0.0) -> list[Step]:
        """Start the leadership transfers ``balance_leaders`` plans for the groups led here,
        from what this node knows of every group it hosts.  Nothing is planned while the live
        nodes' counts of led groups differ by one at most, nor again for counts that planned
        nothing before.  A node that does not host every group sheds its excess over its fair
        share instead (``_shed``)."""
        self._balanced_at = now
        self.stats.balance_rounds += 1
        host = self.driver.host
        live = set(self.live()) | {self.id}
        leaders = {g: _leader(host.node(g).raft) for g in host.groups() if g != self.meta_group}
        counts = Counter({n: 0 for n in live})
        counts.update(lead for lead in leaders.values() if lead in live)
        view = self.view()
        if len(leaders) < view.groups:
            return self._shed(leaders, counts, view, live)
        if max(counts.values()) - min(counts.values()) <= 1:
            return []
        key = frozenset(counts.items())
        if key == self._balance_quiet:
            return []
        groups: dict[int, GroupStatus] = {}
        for g, lead in leaders.items():
            if lead != 0:
                r = host.node(g).raft
                groups[g] = GroupStatus(frozenset(r.voters), frozenset(r.learners), lead)
                # (a group being transferred counts at its heir, and is not planned again)
        steps = balance_leaders(groups, live, self.transfers_max)
        self._balance_quiet = None if steps else key
        return [s for s in steps if groups[s.group].leader == self.id and self._take(s)]

    def _shed(
        self,
        leaders: dict[int, int],
        counts: Counter[int],
        view: ClusterView,
        live: set[int],
    ) -> list[Step]:
        """Balancing where this node hosts only some of the groups (more than 3 nodes): of
        another node it knows only how many of the groups both host it leads, so it balances on
        the counts its peers send (``Led``, ``peer_led``; a peer not heard from yet gets
        nothing).  A node leading at least its fair share (``ceil(groups / live active
        nodes)``) transfers groups, at most ``transfers_max`` per round and while it keeps one
        less than that share, each to the voter of that group leading the fewest, only to one
        two or more under the fair share, and to each such heir at most its shortfall divided
        among the other nodes (at least one; they may give to it too).  Once every node leads
        its share or one less, nothing moves."""
        active = [n for n in view.active() if n in live] or [self.id]
        fair = -(-view.groups // len(active))
        mine = sorted(g for g, lead in leaders.items() if lead == self.id)
        if len(mine) < fair:
            return []
        known = {n: self.peer_led[n] for n in active if n != self.id and n in self.peer_led}
        givers = max(1, len(active) - 1)
        quota = {n: max(1, (fair - 1 - c) // givers) for n, c in known.items()}
        started: list[Step] = []
        host = self.driver.host
        for g in mine:
            if len(started) >= self.transfers_max or len(mine) - len(started) < fair:
                break
            heirs = [v for v in host.node(g).raft.voters if v in known and quota[v] > 0]
            if not heirs:
                continue
            to = min(heirs, key=lambda v: (known[v], v))
            if known[to] > fair - 2:
                continue
            if self._take(Step(Action.TRANSFER, g, to)):
                quota[to] -= 1
                started.append(Step(Action.TRANSFER, g, to))
        return started

    def _take_meta(self, step: Step, now: float) -> bool:
        key = (step.action, step.node)
        if self.propose_meta is None or now - self._proposed.get(key, -META_RETRY_S) < META_RETRY_S:
            return False
        self._proposed = {k: t for k, t in self._proposed.items() if now - t < META_RETRY_S}
        self._proposed[key] = now
        self.propose_meta(SetState(step.node, _NODE_STATES[step.action]))
        self.stats.meta_commands += 1
        logger.info("view: %s node %d", step.action.value, step.node)
        return True

    def _take(self, step: Step) -> bool:
        try:
            if step.action is Action.TRANSFER:
                self.driver.transfer_leader(step.group, step.node)
                self.stats.transfers += 1
            else:
                change = ConfChange(_CHANGE[step.action], step.node)
                future = self.driver.propose_conf_change(step.group, change)
                future.add_done_callback(self._settled)
                self.stats.conf_changes += 1
        except RaftError as e:
            self.stats.refused += 1
            logger.debug(
                "group %d: %s of node %d refused: %r", step.group, step.action, step.node, e
            )
            return False
        logger.info("group %d: %s node %d", step.group, step.action.value, step.node)
        return True

    def _settled(self, future: asyncio.Future[object]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.stats.failed += 1

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.run_once(loop.time())
            except Exception:  # (a bug here must not stop the node: logged, next round)
                logger.exception("mover round failed")


def _leader(r: Raft) -> int:
    """The group's leader as balancing counts it: a transfer this node started and that has
    not finished yet (``lead_transferee``) counts at its heir, so the next rounds (each
    ``balance_interval_s``) do not plan more transfers than are needed."""
    if r.role is Role.LEADER and r.lead_transferee != NONE:
        return r.lead_transferee
    return r.lead


__all__ = ["INTERVAL_S", "META_RETRY_S", "Mover", "MoverStats"]
