"""History paged from Postgres (``postgres_serve_history``): a node that lacks old rows locally
(a new replica, or one rebuilt from a wiped disk, restored from a leader's snapshot) copies the
ranges its archive is missing from Postgres instead of from a peer (``fetch``, for
``Backfill``), taking the load off the peers, and from a database that may hold history no live
replica still has; and reads of history its archive's retention deleted are served from
Postgres (``read``, for ``History``), a page at a time.

``read`` is bounded: ``limit`` rows and about ``bytes_max`` bytes (the query stops adding rows
once their content, metadata and parts pass it), within ``read_timeout_s`` for the pool and the
query together (below the request deadline); a connection whose query was cut short is closed,
not waited for.  At most ``pool_size - 1`` reads hold a connection at once (1 with a pool of
one), so that reads never take every connection from the flusher; the others wait, within
their timeout.  It raises ``HistoryUnavailable`` when Postgres
cannot answer (not connected, down, slow): the caller answers ``unavailable``, never a gap.

Only what Postgres holds is served: rows with consecutive seqs from the first one asked for; a
range Postgres does not have (not yet flushed) is left to the peers.  Messages come back as they
are stored (a NUL character as U+FFFD: ``rows``)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..history import HistoryUnavailable
from ..records import StoredMessage
from .rows import MESSAGE_SELECT, message_from_row

if TYPE_CHECKING:
    from .flusher import Flusher

SELECT_PAGE = (
    f"SELECT {MESSAGE_SELECT} FROM messages WHERE session_id = $1 AND seq > $2 AND seq <= $3"
    " ORDER BY seq LIMIT $4"
)
# A read's page: rows in order while the bytes before each (content, metadata, parts as text)
# are under $5, so at least one row and about $5 bytes (``History`` cuts it exactly).
SELECT_READ = (
    f"SELECT * FROM (SELECT {MESSAGE_SELECT}, sum(size) OVER (ORDER BY seq) - size AS before"
    " FROM (SELECT *, octet_length(content) + octet_length(metadata::text)"
    " + coalesce(octet_length(parts::text), 0) AS size FROM messages"
    " WHERE session_id = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4) AS page) AS run"
    " WHERE before < $5 ORDER BY seq"
)
TIMEOUT_S = 10.0
POOL_WAIT_S = 10.0
READ_TIMEOUT_S = 10.0


class PostgresHistory:
    """Reads through the flusher's pool.  A node restored from a snapshot asks at once, often
    before its flusher's first connection: the first fetch waits up to ``POOL_WAIT_S`` for it
    (later ones, if it timed out, go straight to the peers until Postgres is connected)."""

    def __init__(self, flusher: Flusher, read_timeout_s: float = READ_TIMEOUT_S) -> None:
        self._flusher = flusher
        self.rows_served = 0
        self.pages = 0
        self._wait_s = POOL_WAIT_S
        self.read_timeout_s = read_timeout_s
        self._readers = asyncio.Semaphore(max(1, flusher.config.pool_size - 1))
        self.reads = 0  # ``read`` pages Postgres answered
        self.read_rows = 0  # messages they held
        self.read_failures = 0  # ``read`` calls Postgres could not answer

    async def read(
        self, session_id: str, after_seq: int, to_seq: int, limit: int, bytes_max: int
    ) -> list[StoredMessage]:
        """The messages ``after_seq < seq <= to_seq`` Postgres holds, from the first one, at most
        ``limit`` and about ``bytes_max`` bytes, cut at the next hole.
        ``HistoryUnavailable`` when Postgres does not answer within ``read_timeout_s``."""
        try:
            async with asyncio.timeout(self.read_timeout_s):
                pool = await self._flusher.wait_pool(self.read_timeout_s)
                if pool is None:
                    raise HistoryUnavailable("Postgres is not connected")
                async with self._readers:
                    conn = await pool.acquire()
                    try:
                        found = await conn.fetch(
                            SELECT_READ, session_id, after_seq, to_seq, max(1, limit), bytes_max
                        )
                    except BaseException:
                        # cut short (the timeout): close it rather than wait, in ``release``,
                        # for the statement's cancellation (a black-holed server never answers)
                        conn.terminate()
                        raise
                    finally:
                        await pool.release(conn)
        except HistoryUnavailable:
            self.read_failures += 1
            raise
        except Exception as e:  # down, refusing, slow (TimeoutError), a failed statement
            self.read_failures += 1
            raise HistoryUnavailable(f"Postgres did not answer: {e!r}") from e
        out: list[StoredMessage] = []
        for row in found:
            m = message_from_row(row)
            if out and m.seq != out[-1].seq + 1:
                break
            out.append(m)
        self.reads += 1
        self.read_rows += len(out)
        return out

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
