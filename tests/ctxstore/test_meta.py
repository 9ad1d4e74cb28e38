"""ctxstore.meta: the cluster view as the meta group's state machine, beside the data one."""

from __future__ import annotations

from bench.raft_testnode import LogMachine
from ctxstore.membership import (
    ClusterView,
    Join,
    MetaOk,
    MetaRejected,
    NodeState,
    SetState,
    apply_meta,
    bootstrap_view,
    encode_meta,
)
from ctxstore.meta import Machines, MetaMachine, meta_step
from ctxstore.placement import META_GROUP
from ctxstore.reconciler import Action, GroupStatus, Step
from raft import ConfChange, ConfChangeType
from raft.messages import Entry, EntryType, encode_conf_change


def first() -> ClusterView:
    return bootstrap_view([(1, "h:1", ""), (2, "h:2", ""), (3, "h:3", "")])


def entries(*datas: bytes, start: int = 1) -> list[Entry]:
    return [Entry(term=1, index=start + i, data=d) for i, d in enumerate(datas)]


def test_applies_commands_and_refuses_bad_entries_alike() -> None:
    m = MetaMachine(first())
    seen: list[int] = []
    m.on_view = lambda v: seen.append(v.version)
    conf = Entry(
        term=1,
        index=4,
        type=EntryType.CONF_CHANGE,
        data=encode_conf_change(ConfChange(ConfChangeType.ADD_LEARNER, 4)),
    )
    head = entries(encode_meta(Join(4, "h:4", "")), b"", b"\xc1garbage")
    tail = entries(encode_meta(SetState(9, NodeState.ACTIVE)), start=5)
    out = m.apply([*head, conf, *tail])
    assert out[0] == MetaOk(2) and out[1] is None and out[3] is None
    assert isinstance(out[2], MetaRejected) and out[2].code == "bad_request"
    assert isinstance(out[4], MetaRejected) and out[4].code == "not_found"
    assert m.view.node(4) is not None and seen == [2]
    m.apply(entries(b""))  # nothing changed: no observer call
    assert seen == [2]


def test_snapshot_restore() -> None:
    m = MetaMachine(first())
    m.apply(entries(encode_meta(Join(4, "h:4", ""))))
    other = MetaMachine(first())
    other.restore(m.snapshot())
    assert other.view == m.view
    other.restore(b"")
    assert other.view == first()


def test_machines_route_the_meta_group_apart() -> None:
    data = LogMachine()
    data.restore(0, b"")
    both = Machines(MetaMachine(first()), data)
    both.restore(META_GROUP, b"")
    assert both.apply(0, entries(b"x")) == [1]
    assert both.apply(META_GROUP, entries(encode_meta(Join(5, "h:5", "")))) == [MetaOk(2)]
    assert data.history[0] == [b"x"] and both.meta.view.node(5) is not None
    assert both.snapshot(0) == data.snapshot(0)
    assert both.snapshot(META_GROUP) == both.meta.snapshot()


def _st(voters: set[int], learners: frozenset[int] = frozenset(), leader: int = 1,
        caught: frozenset[int] = frozenset(), changing: bool = False) -> GroupStatus:  # fmt: skip
    return GroupStatus(frozenset(voters), frozenset(learners), leader, frozenset(caught), changing)


def test_meta_step_makes_every_member_follow_the_meta_group() -> None:
    v, _ = apply_meta(first(), Join(4, "h:4", ""))
    g = v.groups
    live = {1, 2, 3, 4}
    assert meta_step(first(), _st({1, 2, 3}), live) is None  # settled
    assert meta_step(v, _st({1, 2, 3}), live) == Step(Action.ADD_LEARNER, g, 4)
    assert meta_step(v, _st({1, 2, 3}), {1, 2, 3}) is None  # a joiner that is down: wait
    assert meta_step(v, _st({1, 2, 3}, changing=True), live) is None
    assert meta_step(v, _st({1, 2, 3}, leader=0), live) is None
    # Active, 4 nodes: the voters stay 3 (an odd number); a fifth makes them 5.
    v, _ = apply_meta(v, SetState(4, NodeState.ACTIVE))
    assert meta_step(v, _st({1, 2, 3}, frozenset({4}), caught=frozenset({4})), live) is None
    v, _ = apply_meta(v, Join(5, "h:5", ""))
    v, _ = apply_meta(v, SetState(5, NodeState.ACTIVE))
    assert meta_step(v, _st({1, 2, 3}, frozenset({4, 5})), live | {5}) is None  # not caught up yet
    caught = _st({1, 2, 3}, frozenset({4, 5}), caught=frozenset({5}))
    assert meta_step(v, caught, live | {5}) == Step(Action.PROMOTE, g, 5)


def test_meta_step_drops_retired_nodes_leader_last() -> None:
    v, _ = apply_meta(first(), SetState(3, NodeState.REMOVED))
    g = v.groups
    assert meta_step(v, _st({1, 2, 3}), {1, 2}) == Step(Action.REMOVE, g, 3)
    assert meta_step(v, _st({1, 2, 3}, leader=3), {1, 2, 3}) == Step(Action.TRANSFER, g, 1)
    v4, _ = apply_meta(first(), Join(4, "h:4", ""))
    v4, _ = apply_meta(v4, SetState(4, NodeState.REMOVED))
    assert meta_step(v4, _st({1, 2, 3}, frozenset({4})), {1, 2, 3}) == Step(Action.REMOVE, g, 4)
