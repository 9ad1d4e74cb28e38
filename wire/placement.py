"""Which Raft group holds a session: the hash of docs/protocol.md (``get_routes``), part of the
protocol, since a client uses it to send a session's requests straight to its group's leader.

``group_of`` is a stable hash of the session id (BLAKE2b, 8 bytes, big-endian, modulo the
number of groups): every node, client, process and Python version agrees on it.  Never
Python's ``hash()``, which is salted per process.  The nodes place sessions with it too
(``ctxstore.placement``).
"""

from __future__ import annotations

from hashlib import blake2b


def group_of(session_id: str, groups: int) -> int:
    """The group in ``range(groups)`` of ``session_id``."""
    if groups < 1:
        raise ValueError(f"groups must be at least 1, not {groups}")
    digest = blake2b(session_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % groups


__all__ = ["group_of"]
