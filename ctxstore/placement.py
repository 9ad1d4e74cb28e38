"""Which Raft group holds a session (design §5.2).

``group_of`` is the protocol's hash (``wire.placement``: BLAKE2b of the session id modulo the
number of groups; clients route with it), so nodes and clients always agree.  The choice of a
group's replicas among the nodes (rendezvous hashing) comes later with cluster membership
(§5.6).
"""

from __future__ import annotations

from wire.placement import group_of as _group_of

GROUPS = 256
"""Number of data groups of a cluster (the meta group of §5.6 is not one of them)."""


def group_of(session_id: str, groups: int = GROUPS) -> int:
    """The group in ``range(groups)`` of ``session_id``."""
    return _group_of(session_id, groups)


__all__ = ["GROUPS", "group_of"]
