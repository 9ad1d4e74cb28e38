"""The meta group's state machine: the cluster view, replicated (design §5.6).  Pure.

``MetaMachine`` holds the view of one meta group (``placement.META_GROUP``) and applies its
committed entries: a normal entry is a meta command (ctxstore/membership.py), answered with
``MetaOk`` or ``MetaRejected``; bytes that are no meta command are refused as ``bad_request``
(a replica never crashes on a bad entry, and every replica refuses it alike); membership
changes and empty entries answer None.  ``Machines`` puts it beside the conversation state
behind the one ``StateMachine`` a node's driver takes: the meta group's entries go to the
meta machine, every other group's to the data state machine.

The first view of a cluster is bootstrapped, not proposed: every founding node starts the
meta group with the same view (``bootstrap_view``), as it starts each group with the same
voters.  Observers (``on_view``) hear of each new view once it is applied.  A node that joins
later starts the meta group empty and is added to it as a learner by the meta leader
(``meta_step``); it learns the founders' first view from the node it asked to join (kept in
its ``node.json``), since the meta log it replays begins after that view.

``meta_step`` is the meta group's own reconciler (pure, like ctxstore/reconciler.py's for the
data groups): every member of the view follows the meta group, as a learner unless it is one of
the view's ``meta_voters``; a retired node leaves it; one membership change at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from raft.messages import Entry, EntryType
from raft.pipeline import StateMachine

from .membership import (
    META_VOTERS_MAX,
    ClusterView,
    MetaRejected,
    NodeState,
    apply_meta,
    decode_meta,
    decode_view,
    encode_view,
)
from .placement import META_GROUP
from .reconciler import Action, GroupStatus, Step


class MetaMachine:
    def __init__(self, initial: ClusterView) -> None:
        self.initial = initial
        self.view = initial
        self.on_view: Callable[[ClusterView], None] | None = None

    def apply(self, entries: list[Entry]) -> list[object]:
        out: list[object] = []
        before = self.view
        for e in entries:
            if e.type is not EntryType.NORMAL or not e.data:
                out.append(None)
                continue
            try:
                cmd = decode_meta(e.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                out.append(MetaRejected("bad_request", f"entry {e.index}: {exc}"))
                continue
            self.view, result = apply_meta(self.view, cmd)
            out.append(result)
        if self.view is not before and self.on_view is not None:
            self.on_view(self.view)
        return out

    def snapshot(self) -> bytes:
        return encode_view(self.view)

    def restore(self, data: bytes) -> None:
        """A snapshot's view (``b""``: the bootstrapped one)."""
        self.view = decode_view(data) if data else self.initial
        if self.on_view is not None:
            self.on_view(self.view)


class Machines:
    """The node's one state machine: the meta group's entries to ``meta``, others to
    ``data``."""

    def __init__(self, meta: MetaMachine, data: StateMachine, meta_group: int = META_GROUP):
        self.meta = meta
        self.data = data
        self.meta_group = meta_group

    def apply(self, group: int, entries: list[Entry]) -> list[object]:
        if group == self.meta_group:
            return self.meta.apply(entries)
        return self.data.apply(group, entries)

    def snapshot(self, group: int) -> bytes:
        if group == self.meta_group:
            return self.meta.snapshot()
        return self.data.snapshot(group)

    def restore(self, group: int, data: bytes) -> None:
        if group == self.meta_group:
            self.meta.restore(data)
        else:
            self.data.restore(group, data)


def meta_step(view: ClusterView, st: GroupStatus, live: frozenset[int] | set[int]) -> Step | None:
    """The next membership change of the meta group as its leader sees it (``st``), or None.

    In order: a learner that is no member any more (retired) is removed; a retired voter is
    removed while other voters remain (its leadership first handed to a live target voter); a
    retired node still connected is kept until its connection is closed (``RETIRE_GRACE_S``
    after the view retired it, ctxstore/node.py), so that it hears of its retirement; a
    learner that is a target voter (``ClusterView.meta_voters``) and has caught up is promoted
    while there are fewer than ``META_VOTERS_MAX`` voters; a live member that does not follow
    the group yet is added as a learner."""
    if st.leader == 0 or st.changing:
        return None
    g = view.groups  # (the meta group's id; the Step names it)
    members = set(view.members())
    retired = set(view.in_state(NodeState.REMOVED))
    wanted = set(view.meta_voters())
    for n in sorted(st.learners - members - set(live)):
        return Step(Action.REMOVE, g, n)
    for n in sorted(st.voters & retired):
        if n == st.leader:
            heirs = sorted((st.voters - retired) & set(live))
            return Step(Action.TRANSFER, g, heirs[0]) if heirs else None
        if len(st.voters) > 1 and n not in live:
            return Step(Action.REMOVE, g, n)
    if len(st.voters) < META_VOTERS_MAX:
        for n in sorted(st.learners & wanted & st.caught_up):
            return Step(Action.PROMOTE, g, n)
    for n in sorted(members - st.voters - st.learners):
        if n in live:
            return Step(Action.ADD_LEARNER, g, n)
    return None


__all__ = ["Machines", "MetaMachine", "meta_step"]
