"""The cluster view held by the meta Raft group (design §5.6), and the commands that change it.

Rules of this file:
- Pure and deterministic (as ctxstore/state.py): every node applies the same meta commands in
  the same order and holds the same view, from which each data group's target replicas follow
  (``ClusterView.targets``: rendezvous hashing over the active nodes, ctxstore/placement.py).
- A node's life, one table (``TRANSITIONS``): ``joining`` (known, not yet given groups) →
  ``active`` (a placement target) → ``leaving`` (drained: its groups move away, it still
  serves them meanwhile) → ``removed``.  ``admin remove`` of a dead node goes to ``removed``
  from any state.  A removed id is **retired**: it never joins again, whatever data it holds.
- Commands are msgspec Structs (``array_like``, integer tags, frozen) in the union
  ``MetaCommand``; a refusal is a result (``MetaRejected`` with a stable code), never an
  exception, since it is part of the replicated outcome.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import msgspec
import msgspec.msgpack

from .placement import GROUPS, REPLICAS, placement


class NodeState(enum.Enum):
    JOINING = "joining"
    ACTIVE = "active"
    LEAVING = "leaving"
    REMOVED = "removed"


TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    NodeState.JOINING: frozenset({NodeState.ACTIVE, NodeState.REMOVED}),
    NodeState.ACTIVE: frozenset({NodeState.LEAVING, NodeState.REMOVED}),
    NodeState.LEAVING: frozenset({NodeState.ACTIVE, NodeState.REMOVED}),
    NodeState.REMOVED: frozenset(),  # retired for good
}

NODES_MAX = 1024  # node ids known to a view (removed ones included): bounded like everything
ADDRESS_BYTES_MAX = 255
META_VOTERS_MAX = 5  # the meta group's voters (the other nodes follow it as learners)


class NodeInfo(msgspec.Struct, array_like=True, frozen=True, gc=False):
    id: int
    peer_address: str  # host:port of its peer (Raft) listener
    client_address: str  # host:port of its client listener ("" until it told us)
    state: NodeState


# -- commands (tags 1..; never reuse one) --------------------------------------------------------
class Join(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=1):
    """A node asks to join (``joining``); again with the same addresses it is a no-op."""

    node_id: int
    peer_address: str
    client_address: str


class SetState(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=2):
    """Move a node along ``TRANSITIONS`` (activate, drain, undrain, remove)."""

    node_id: int
    state: NodeState


class SetClientAddress(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=3):
    node_id: int
    client_address: str


MetaCommand = Join | SetState | SetClientAddress


class MetaOk(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=1):
    version: int  # the view's version after the command


class MetaRejected(msgspec.Struct, array_like=True, frozen=True, gc=False, tag=2):
    code: str  # "retired", "conflict", "not_found", "bad_request"
    message: str


MetaResult = MetaOk | MetaRejected

_command_encoder = msgspec.msgpack.Encoder()
_command_decoder = msgspec.msgpack.Decoder(MetaCommand)


def encode_meta(cmd: MetaCommand) -> bytes:
    return _command_encoder.encode(cmd)


def decode_meta(data: bytes) -> MetaCommand:
    """Raises ``msgspec.ValidationError``/``DecodeError`` for bytes that are no meta command."""
    return _command_decoder.decode(data)


def _address_ok(address: str, empty_ok: bool) -> bool:
    if not address:
        return empty_ok
    host, sep, port = address.rpartition(":")
    return (
        bool(host and sep)
        and port.isdigit()
        and 0 < int(port) < 65536
        and len(address.encode()) <= ADDRESS_BYTES_MAX
    )


class ClusterView(msgspec.Struct, frozen=True, gc=False):
    """Every node ever known (removed ones stay, retired), at a version that grows by one with
    each change."""

    version: int = 0
    nodes: dict[int, NodeInfo] = msgspec.field(default_factory=dict)
    groups: int = GROUPS
    replicas: int = REPLICAS

    def node(self, node_id: int) -> NodeInfo | None:
        return self.nodes.get(node_id)

    def in_state(self, *states: NodeState) -> list[int]:
        return sorted(n.id for n in self.nodes.values() if n.state in states)

    def active(self) -> list[int]:
        return self.in_state(NodeState.ACTIVE)

    def members(self) -> list[int]:
        """The nodes that are not removed (they may hold replicas and talk to peers)."""
        return self.in_state(NodeState.JOINING, NodeState.ACTIVE, NodeState.LEAVING)

    def retired(self, node_id: int) -> bool:
        n = self.nodes.get(node_id)
        return n is not None and n.state is NodeState.REMOVED

    def targets(self) -> dict[int, tuple[int, ...]]:
        """Each data group's target replicas: rendezvous over the active nodes.  With no active
        node (only while the cluster is first formed) the members hold what they hold."""
        return placement(self.active(), self.groups, self.replicas) if self.active() else {}

    def meta_voters(self) -> tuple[int, ...]:
        """The meta group's target voters: the lowest ``META_VOTERS_MAX`` active ids (an odd
        number of them where possible); every other member follows it as a learner."""
        active = self.active()[:META_VOTERS_MAX]
        if len(active) % 2 == 0 and len(active) > 1:
            active = active[:-1]
        return tuple(active)


def bootstrap_view(
    nodes: Iterable[tuple[int, str, str]], groups: int = GROUPS, replicas: int = REPLICAS
) -> ClusterView:
    """The first view of a cluster formed from ``(id, peer_address, client_address)``: every
    node active."""
    infos = {i: NodeInfo(i, peer, client, NodeState.ACTIVE) for i, peer, client in nodes}
    return ClusterView(1, infos, groups, replicas)


def apply_meta(view: ClusterView, cmd: MetaCommand) -> tuple[ClusterView, MetaResult]:
    """The view after ``cmd`` and the command's result (the view unchanged when refused)."""
    match cmd:
        case Join(node_id=i, peer_address=peer, client_address=client):
            if i <= 0 or not _address_ok(peer, False) or not _address_ok(client, True):
                return view, MetaRejected("bad_request", f"node {i}: bad id or address")
            known = view.nodes.get(i)
            if known is not None:
                if known.state is NodeState.REMOVED:
                    return view, MetaRejected("retired", f"node id {i} was removed: retired")
                if known.peer_address != peer:
                    return view, MetaRejected(
                        "conflict", f"node {i} is known at {known.peer_address}, not {peer}"
                    )
                return view, MetaOk(view.version)  # a retried join
            if any(n.peer_address == peer and n.state is not NodeState.REMOVED
                   for n in view.nodes.values()):  # fmt: skip
                return view, MetaRejected("conflict", f"{peer} is another node's address")
            if len(view.nodes) >= NODES_MAX:
                return view, MetaRejected("bad_request", f"a view holds {NODES_MAX} nodes")
            info = NodeInfo(i, peer, client, NodeState.JOINING)
            return _changed(view, info)
        case SetState(node_id=i, state=state):
            known = view.nodes.get(i)
            if known is None:
                return view, MetaRejected("not_found", f"no node {i}")
            if known.state is state:
                return view, MetaOk(view.version)
            if state not in TRANSITIONS[known.state]:
                code = "retired" if known.state is NodeState.REMOVED else "conflict"
                return view, MetaRejected(
                    code, f"node {i} is {known.state.value}: cannot become {state.value}"
                )
            last = known.state is NodeState.ACTIVE and len(view.active()) == 1
            if last and state is not NodeState.ACTIVE:
                return view, MetaRejected("conflict", f"node {i} is the last active node")
            return _changed(view, msgspec.structs.replace(known, state=state))
        case SetClientAddress(node_id=i, client_address=client):
            known = view.nodes.get(i)
            if known is None or known.state is NodeState.REMOVED:
                return view, MetaRejected("not_found", f"no node {i}")
            if not _address_ok(client, False):
                return view, MetaRejected("bad_request", f"bad address {client!r}")
            if known.client_address == client:
                return view, MetaOk(view.version)
            return _changed(view, msgspec.structs.replace(known, client_address=client))
    raise AssertionError(f"unknown meta command {cmd!r}")  # (the union is exhaustive)


def _changed(view: ClusterView, info: NodeInfo) -> tuple[ClusterView, MetaResult]:
    nodes = dict(view.nodes)
    nodes[info.id] = info
    version = view.version + 1
    return msgspec.structs.replace(view, version=version, nodes=nodes), MetaOk(version)


_view_encoder = msgspec.msgpack.Encoder()
_view_decoder = msgspec.msgpack.Decoder(ClusterView)


def encode_view(view: ClusterView) -> bytes:
    return _view_encoder.encode(view)


def decode_view(data: bytes) -> ClusterView:
    return _view_decoder.decode(data)


__all__ = [
    "META_VOTERS_MAX",
    "NODES_MAX",
    "TRANSITIONS",
    "ClusterView",
    "Join",
    "MetaCommand",
    "MetaOk",
    "MetaRejected",
    "MetaResult",
    "NodeInfo",
    "NodeState",
    "SetClientAddress",
    "SetState",
    "apply_meta",
    "bootstrap_view",
    "decode_meta",
    "decode_view",
    "encode_meta",
    "encode_view",
]
