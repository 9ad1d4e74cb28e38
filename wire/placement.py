"""Which Raft group holds a session: the hash of docs/protocol.md (``get_routes``), part of the
protocol, since a client uses it to send a session's requests straight to its group's leader.

``group_of`` is a stable hash of the session id (BLAKE2b, 8 bytes, big-endian, modulo the
number of groups): every node, client, process and Python version agrees on it.  Never
Python's ``hash()``, which is salted per process.  The nodes place sessions with it too
(``ctxstore.placement``).
"""

from __future__ import annotations

from functools import lru_cache
from hashlib import blake2b

CACHED_IDS = 16_384
"""The ids whose group is kept (least recently used first out): a node asks for the group of
the session (and of its agent) of every request several times over its path, and BLAKE2b costs
about 1.6 us a call here against about 0.1 us for a hit (docs/benchmarks.md).  At most this
many ids are held (a few MiB with ids of the longest size the protocol allows)."""


@lru_cache(maxsize=CACHED_IDS)
def group_of(session_id: str, groups: int) -> int:
    """The group in ``range(groups)`` of ``session_id``."""
    if groups < 1:
        raise ValueError(f"groups must be at least 1, not {groups}")
    digest = blake2b(session_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % groups


__all__ = ["CACHED_IDS", "group_of"]
