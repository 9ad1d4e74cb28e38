"""Which Raft group holds a session (design §5.2).

``group_of`` is a stable hash of the session id (BLAKE2b, 8 bytes, big-endian, modulo the
number of groups): every node, process and Python version agrees on it.  Never Python's
``hash()``, which is salted per process.  The choice of a group's replicas among the nodes
(rendezvous hashing) comes later with cluster membership (§5.6).
"""

from __future__ import annotations

from hashlib import blake2b

GROUPS = 256
"""Number of data groups of a cluster (the meta group of §5.6 is not one of them)."""


def group_of(session_id: str, groups: int = GROUPS) -> int:
    """The group in ``range(groups)`` of ``session_id``."""
    if groups < 1:
        raise ValueError(f"groups must be at least 1, not {groups}")
    digest = blake2b(session_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % groups


__all__ = ["GROUPS", "group_of"]
