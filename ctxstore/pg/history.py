"""History paged from Postgres (``postgres_serve_history``): a node that lacks old rows locally
(a new replica, or one rebuilt from a wiped disk, restored from a leader's snapshot) copies the
ranges its archive is missing from Postgres instead of from a peer (``Backfill``), taking the
load off the peers, and from a database that may hold history no live replica still has.

Only what Postgres holds is served: rows with consecutive seqs from the first one asked for; a
range Postgres does not have (not yet flushed) is left to the peers.  Messages come back as they
are stored (a NUL character as U+FFFD: ``rows``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..records import StoredMessage
from .rows import MESSAGE_SELECT, message_from_row

if TYPE_CHECKING:
    from .flusher import Flusher

SELECT_PAGE = (
    f"SELECT {MESSAGE_SELECT} FROM messages WHERE session_id = $1 AND seq > $2 AND seq <= $3"
    " ORDER BY seq LIMIT $4"
)
TIMEOUT_S = 10.0
POOL_WAIT_S = 10.0


class PostgresHistory:
    """Reads through the flusher's pool.  A node restored from a snapshot asks at once, often
    before its flusher's first connection: the first fetch waits up to ``POOL_WAIT_S`` for it
    (later ones, if it timed out, go straight to the peers until Postgres is connected)."""

    def __init__(self, flusher: Flusher) -> None:
        self._flusher = flusher
        self.rows_served = 0
        self.pages = 0
        self._wait_s = POOL_WAIT_S

    async def fetch(
        self, session_id: str, after_seq: int, to_seq: int, limit: int
    ) -> list[StoredMessage]:
        """The messages ``after_seq < seq <= to_seq`` Postgres holds, at most ``limit``, cut at
        the first hole; [] when Postgres is not connected or lacks ``after_seq + 1``."""
        pool = await self._flusher.wait_pool(self._wait_s)
        if pool is None:
            self._wait_s = 0.0
            return []
        found = await pool.fetch(
            SELECT_PAGE, session_id, after_seq, to_seq, limit, timeout=TIMEOUT_S
        )
        out: list[StoredMessage] = []
        for row in found:
            m = message_from_row(row)
            if m.seq != after_seq + 1 + len(out):
                break
            out.append(m)
        self.pages += 1
        self.rows_served += len(out)
        return out


__all__ = ["PostgresHistory"]
