"""Carries out the reconciler's group steps for the groups this node leads (design §5.6).

``Mover.run_once`` observes every group this node leads (``MultiRaft.status``: voters,
learners, each member's matched index, a pending change), asks ``reconciler.plan`` for the next
steps under the cluster view, and starts them through the driver: a membership change
(``Driver.propose_conf_change``) or a leadership transfer.  It never waits for a step: the next
round observes its effect, and a step that was lost is decided again (the core refuses a second
pending change, which is only counted).  The view's own steps (activating a joiner, retiring a
drained node) belong to the meta leader and are not taken here; nor is leader balancing, which
needs every group's leader.

A learner counts as caught up once its log matches the leader's commit index.  Moves are
capped per node (``moves_max`` groups with a learner among those it leads).

Not yet used by ``ctxstore serve``: the node first needs the meta group and view-driven group
hosting (design §5.6 lists what is left); ``tests/ctxstore/test_mover.py`` runs it over real
sockets and WALs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Set
from dataclasses import dataclass

from raft import RaftError, Role
from raft.driver import Driver
from raft.messages import ConfChange, ConfChangeType

from .membership import ClusterView
from .reconciler import MOVES_MAX, Action, GroupStatus, Step, plan

logger = logging.getLogger(__name__)

_CHANGE = {
    Action.ADD_LEARNER: ConfChangeType.ADD_LEARNER,
    Action.PROMOTE: ConfChangeType.ADD_NODE,
    Action.REMOVE: ConfChangeType.REMOVE_NODE,
}
INTERVAL_S = 0.2  # between rounds


@dataclass
class MoverStats:
    rounds: int = 0
    conf_changes: int = 0  # membership changes proposed
    transfers: int = 0
    refused: int = 0  # steps the core refused (another change pending, leadership lost)
    failed: int = 0  # changes proposed that did not apply (timeout, leader change)


class Mover:
    def __init__(
        self,
        node_id: int,
        driver: Driver,
        view: Callable[[], ClusterView],
        live: Callable[[], Set[int]],
        moves_max: int = MOVES_MAX,
        interval_s: float = INTERVAL_S,
    ) -> None:
        self.id = node_id
        self.driver = driver
        self.view = view
        self.live = live
        self.moves_max = moves_max
        self.interval_s = interval_s
        self.stats = MoverStats()
        self._task: asyncio.Task[None] | None = None

    def observe(self) -> dict[int, GroupStatus]:
        """The groups this node leads, as their leader sees them."""
        host = self.driver.host
        out: dict[int, GroupStatus] = {}
        for g in host.groups():
            if host.node(g).raft.role is not Role.LEADER:
                continue
            out[g] = GroupStatus.of_leader(host.status(g))
        return out

    def run_once(self) -> list[Step]:
        """One round; the steps it started."""
        self.stats.rounds += 1
        view = self.view()
        live = set(self.live()) | {self.id}
        started = []
        for step in plan(view, self.observe(), live, self.moves_max):
            if step.group >= 0 and self._take(step):
                started.append(step)
        return started

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
        while True:
            await asyncio.sleep(self.interval_s)
            self.run_once()


__all__ = ["INTERVAL_S", "Mover", "MoverStats"]
