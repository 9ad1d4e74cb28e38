"""Which Raft group holds a session, and which nodes hold a group (design §5.2).

``group_of`` is the protocol's hash (``wire.placement``: BLAKE2b of the session id modulo the
number of groups; clients route with it), so nodes and clients always agree.

``replicas`` chooses a group's replicas among the active nodes by rendezvous (highest random
weight) hashing: each (group, node) pair gets a stable 64-bit weight (BLAKE2b, never Python's
salted ``hash()``), and the group goes to the ``count`` nodes of highest weight.  A node that
joins takes exactly the groups where it outweighs one of the current replicas, and a node that
leaves gives up only its own groups, each to the next node in that group's ranking: about
``count/N`` of the groups move, and no group moves between two nodes that both stay.
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b

from wire.placement import group_of as _group_of

GROUPS = 256
"""Number of data groups of a cluster (the meta group of §5.6 is not one of them)."""

META_GROUP = GROUPS
"""The Raft group holding the cluster view (design §5.6): outside the data groups' range."""

REPLICAS = 3
"""Replicas of a data group (fewer while the cluster has fewer active nodes)."""


def group_of(session_id: str, groups: int = GROUPS) -> int:
    """The group in ``range(groups)`` of ``session_id``."""
    return _group_of(session_id, groups)


def weight(group: int, node: int) -> int:
    """The rendezvous weight of ``node`` for ``group``: stable across processes and versions."""
    key = group.to_bytes(4, "big") + node.to_bytes(8, "big")
    return int.from_bytes(blake2b(key, digest_size=8, person=b"ctxstore.hrw").digest(), "big")


def ranking(group: int, nodes: Iterable[int]) -> list[int]:
    """``nodes`` from the highest weight for ``group`` down (ties, impossible in practice for
    distinct ids, by id)."""
    return sorted(set(nodes), key=lambda n: (-weight(group, n), n))


def replicas(group: int, nodes: Iterable[int], count: int = REPLICAS) -> tuple[int, ...]:
    """The ``min(count, len(nodes))`` nodes that hold ``group``, sorted by id."""
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    return tuple(sorted(ranking(group, nodes)[:count]))


def placement(
    nodes: Iterable[int], groups: int = GROUPS, count: int = REPLICAS
) -> dict[int, tuple[int, ...]]:
    """Every group's replicas over ``nodes``."""
    active = sorted(set(nodes))
    return {g: replicas(g, active, count) for g in range(groups)}


__all__ = [
    "GROUPS",
    "META_GROUP",
    "REPLICAS",
    "group_of",
    "placement",
    "ranking",
    "replicas",
    "weight",
]
