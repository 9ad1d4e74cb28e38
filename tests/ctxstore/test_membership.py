"""ctxstore.membership: the cluster view and the meta commands that change it."""

from __future__ import annotations

import msgspec
import pytest

from ctxstore.membership import (
    ClusterView,
    Join,
    MetaOk,
    MetaRejected,
    NodeState,
    SetClientAddress,
    SetState,
    apply_meta,
    bootstrap_view,
    decode_meta,
    decode_view,
    encode_meta,
    encode_view,
)
from ctxstore.placement import placement


def three() -> ClusterView:
    return bootstrap_view((i, f"10.0.0.{i}:7000", f"10.0.0.{i}:8000") for i in (1, 2, 3))


def run(view: ClusterView, *cmds: object) -> tuple[ClusterView, list[object]]:
    results: list[object] = []
    for cmd in cmds:
        view, res = apply_meta(view, cmd)  # type: ignore[arg-type]
        results.append(res)
    return view, results


def test_join_activate_drain_remove() -> None:
    view = three()
    assert view.version == 1 and view.active() == [1, 2, 3]
    view, res = run(view, Join(4, "10.0.0.4:7000", ""))
    assert res == [MetaOk(2)] and view.node(4).state is NodeState.JOINING  # type: ignore[union-attr]
    assert view.targets() == placement([1, 2, 3])  # a joining node gets no group yet
    view, res = run(view, SetState(4, NodeState.ACTIVE), SetClientAddress(4, "10.0.0.4:8000"))
    assert res == [MetaOk(3), MetaOk(4)]
    assert view.targets() == placement([1, 2, 3, 4])
    view, _ = run(view, SetState(2, NodeState.LEAVING))
    assert view.targets() == placement([1, 3, 4]) and view.members() == [1, 2, 3, 4]
    view, _ = run(view, SetState(2, NodeState.REMOVED))
    assert view.retired(2) and view.members() == [1, 3, 4]


def test_retried_commands_are_no_ops() -> None:
    view, res = run(three(), Join(4, "h:1", ""), Join(4, "h:1", ""), SetState(1, NodeState.ACTIVE))
    assert res == [MetaOk(2), MetaOk(2), MetaOk(2)]
    assert view.version == 2


def test_a_retired_id_never_comes_back() -> None:
    view, _ = run(three(), SetState(3, NodeState.REMOVED))
    for cmd in (
        Join(3, "10.0.0.3:7000", ""),
        SetState(3, NodeState.ACTIVE),
        SetState(3, NodeState.JOINING),
    ):
        after, res = apply_meta(view, cmd)
        assert isinstance(res, MetaRejected) and res.code == "retired", cmd
        assert after == view
    # Its address may serve a new node, with a new id.
    view, joined = run(view, Join(9, "10.0.0.3:7000", ""))
    assert joined == [MetaOk(view.version)]


@pytest.mark.parametrize(
    ("cmd", "code"),
    [
        (Join(1, "10.0.0.9:7000", ""), "conflict"),  # an id at another address
        (Join(5, "10.0.0.1:7000", ""), "conflict"),  # another node's address
        (Join(0, "h:1", ""), "bad_request"),
        (Join(5, "nohost", ""), "bad_request"),
        (Join(5, "h:99999", ""), "bad_request"),
        (Join(5, "h:1", "bad"), "bad_request"),
        (SetState(7, NodeState.ACTIVE), "not_found"),
        (SetState(1, NodeState.JOINING), "conflict"),
        (SetClientAddress(1, ""), "bad_request"),
    ],
)
def test_refusals(cmd: object, code: str) -> None:
    view = three()
    after, res = apply_meta(view, cmd)  # type: ignore[arg-type]
    assert isinstance(res, MetaRejected) and res.code == code
    assert after is view


def test_the_last_active_node_stays() -> None:
    view = bootstrap_view([(1, "h:1", "")])
    _, res = apply_meta(view, SetState(1, NodeState.LEAVING))
    assert isinstance(res, MetaRejected) and res.code == "conflict"


def test_meta_voters_odd_and_bounded() -> None:
    assert three().meta_voters() == (1, 2, 3)
    four = bootstrap_view((i, f"h:{i}", "") for i in range(1, 5))
    assert four.meta_voters() == (1, 2, 3)
    many = bootstrap_view((i, f"h:{i}", "") for i in range(1, 10))
    assert many.meta_voters() == (1, 2, 3, 4, 5)


def test_round_trips_and_bad_bytes() -> None:
    view, _ = run(three(), Join(4, "h:4", ""))
    assert decode_view(encode_view(view)) == view
    for cmd in (Join(4, "h:4", ""), SetState(2, NodeState.LEAVING), SetClientAddress(1, "h:2")):
        assert decode_meta(encode_meta(cmd)) == cmd
    with pytest.raises(msgspec.DecodeError):
        decode_meta(b"\xc1")
    with pytest.raises(msgspec.ValidationError):
        decode_meta(msgspec.msgpack.encode([2, 1, "bogus"]))
