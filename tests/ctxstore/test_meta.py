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
    bootstrap_view,
    encode_meta,
)
from ctxstore.meta import Machines, MetaMachine
from ctxstore.placement import META_GROUP
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
