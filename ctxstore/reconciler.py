"""What to change next so that every group's replicas are its target (design §5.6): pure.

The meta leader observes each data group (its voters, learners, leader, and which learners
have caught up) and asks ``plan`` for the next steps; it carries them out (a membership change
proposed by the group's leader, a leadership transfer, a meta command) and asks again once it
has observed their effect.  So each step is decided on fresh observations, and a step that
was lost (a leader change, a crash) is simply decided again.

Per group, one membership change at a time, in this order (``_group_step``):

1. a learner that is no target is removed (a move abandoned when the targets changed);
2. a target learner that caught up is promoted; one that has not is waited for;
3. a voter that is no target and whose node was retired (``admin remove``) is removed first,
   while the group keeps at least one voter: it can never catch up, its peers refuse it, and
   removing it shrinks the quorum the promotion below needs; nothing else changes before it
   has gone (a node that is merely down now is waited for, never removed);
4. a missing target that is live is added as a learner (a new *move*; at most ``moves_max``
   groups move at once); while every missing target is down, nothing;
5. once every target votes, an extra voter is removed: after its leadership is transferred to
   a target voter, if it leads; never while the voters left would lack a live quorum.

A node marked removed in the view is dead whatever the observations say (``admin remove``).

A leaving node whose groups have all moved away is then marked removed (``admin drain``), and a
joining node that is live is made active (``serve --join``).

``balance_leaders`` is separate: leadership transfers so that each live voter leads about
``groups / nodes`` of the groups, a few per call.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping, Set
from dataclasses import dataclass

from raft.rawnode import Status

from .membership import ClusterView, NodeState

MOVES_MAX = 4  # groups moving at once, by default (each streams a snapshot to a new replica)
TRANSFERS_MAX = 16  # leadership transfers started per call of balance_leaders, by default


@dataclass(frozen=True)
class GroupStatus:
    """One group as its leader sees it (``leader`` 0: none known; then nothing is planned,
    nor while ``changing``)."""

    voters: frozenset[int]
    learners: frozenset[int]
    leader: int
    caught_up: frozenset[int] = frozenset()  # learners whose log matches the leader's
    changing: bool = False  # a membership change is proposed, not yet applied: wait for it

    @classmethod
    def of_leader(cls, st: Status) -> GroupStatus:
        """From the ``status()`` of the group's leader: a learner has caught up once its log
        matches the leader's commit index."""
        caught_up = frozenset(n for n in st.learners if st.progress[n][1] >= st.commit)
        return cls(frozenset(st.voters), frozenset(st.learners), st.id, caught_up, st.conf_pending)


class Action(enum.Enum):
    ADD_LEARNER = "add_learner"
    PROMOTE = "promote"
    REMOVE = "remove"
    TRANSFER = "transfer"  # leadership of ``group`` to ``node``
    ACTIVATE = "activate"  # meta: a joining node becomes active (``group`` is -1)
    RETIRE = "retire"  # meta: a drained (leaving) node is removed (``group`` is -1)


@dataclass(frozen=True)
class Step:
    action: Action
    group: int
    node: int


def moving(targets: Mapping[int, tuple[int, ...]], groups: Mapping[int, GroupStatus]) -> int:
    """Groups whose replicas differ from their target (a move in progress or to start)."""
    return sum(1 for g, st in groups.items() if _moving(st, targets.get(g)))


def _moving(st: GroupStatus, target: tuple[int, ...] | None) -> bool:
    return target is not None and (
        st.changing or bool(st.learners) or st.voters != frozenset(target)
    )


def plan(
    view: ClusterView,
    groups: Mapping[int, GroupStatus],
    live: Set[int],
    moves_max: int = MOVES_MAX,
) -> list[Step]:
    """The next steps, at most one per group (see the module's docstring)."""
    targets = view.targets()
    retired = frozenset(view.in_state(NodeState.REMOVED))  # admin remove: dead for good
    live = frozenset(live) - retired
    steps: list[Step] = []
    started = 0
    in_progress = sum(
        1
        for g, st in groups.items()
        if (st.learners or st.changing) and _moving(st, targets.get(g))
    )
    for g in sorted(groups):
        st, target = groups[g], targets.get(g)
        if target is None or st.leader == 0 or st.changing:
            continue
        step = _group_step(g, st, frozenset(target), live, retired)
        if step is None:
            continue
        if step.action is Action.ADD_LEARNER:
            if in_progress + started >= moves_max:
                continue
            started += 1
        steps.append(step)
    steps.extend(_node_steps(view, groups, targets, live))
    return steps


def _group_step(
    g: int, st: GroupStatus, target: frozenset[int], live: Set[int], retired: Set[int]
) -> Step | None:
    for n in sorted(st.learners - target):
        return Step(Action.REMOVE, g, n)
    for n in sorted(st.learners & target):
        return Step(Action.PROMOTE, g, n) if n in st.caught_up else None
    extra = st.voters - target
    for n in sorted(extra):
        if n in retired and n != st.leader and len(st.voters) > 1:
            return Step(Action.REMOVE, g, n)
    if extra & retired:
        return None  # (its leader is retired: wait for a new one)
    missing = sorted(target - st.voters)
    for n in missing:
        if n in live:  # (a dead target would hold a move slot until it returns)
            return Step(Action.ADD_LEARNER, g, n)
    if missing:
        return None  # every missing target is down: keep the old replicas meanwhile
    for n in sorted(extra):
        rest = st.voters - {n}
        if len(rest & live) <= len(rest) // 2:
            return None  # the voters left would have no live quorum: wait for the dead to go
        if n != st.leader:
            return Step(Action.REMOVE, g, n)
        heirs = sorted(st.voters & target & live)
        return Step(Action.TRANSFER, g, heirs[0]) if heirs else None
    return None


def _node_steps(
    view: ClusterView,
    groups: Mapping[int, GroupStatus],
    targets: Mapping[int, tuple[int, ...]],
    live: Set[int],
) -> list[Step]:
    steps = [Step(Action.ACTIVATE, -1, n) for n in view.in_state(NodeState.JOINING) if n in live]
    if len(groups) < view.groups:
        return steps  # not every group observed: a leaving node may still hold one
    holding = {n for st in groups.values() for n in st.voters | st.learners}
    for n in view.in_state(NodeState.LEAVING):
        if n not in holding and all(n not in t for t in targets.values()):
            steps.append(Step(Action.RETIRE, -1, n))
    return steps


def balance_leaders(
    groups: Mapping[int, GroupStatus], live: Set[int], transfers_max: int = TRANSFERS_MAX
) -> list[Step]:
    """Leadership transfers that bring each live node's count of led groups toward the mean:
    from the node leading the most to the live voter of that group leading the fewest, while
    the two differ by more than one; at most ``transfers_max`` transfers."""
    counts: Counter[int] = Counter({n: 0 for n in live})
    led: dict[int, list[int]] = {}
    for g in sorted(groups):
        st = groups[g]
        if st.leader in live and not st.learners:  # (a moving group is left alone)
            counts[st.leader] += 1
            led.setdefault(st.leader, []).append(g)
    steps: list[Step] = []
    for _ in range(transfers_max):
        best: tuple[int, int, int] | None = None  # (gain, group, to)
        for frm in sorted(led, key=lambda n: (-counts[n], n)):
            for g in led[frm]:
                heirs = [v for v in groups[g].voters if v in live and v != frm]
                if not heirs:
                    continue
                to = min(heirs, key=lambda v: (counts[v], v))
                gain = counts[frm] - counts[to]
                if gain > 1 and (best is None or gain > best[0]):
                    best = (gain, g, to)
            if best is not None:
                break
        if best is None:
            break
        _, g, to = best
        frm = groups[g].leader
        led[frm].remove(g)
        counts[frm] -= 1
        counts[to] += 1
        steps.append(Step(Action.TRANSFER, g, to))
    return steps


__all__ = [
    "MOVES_MAX",
    "TRANSFERS_MAX",
    "Action",
    "GroupStatus",
    "Step",
    "balance_leaders",
    "moving",
    "plan",
]
