"""Copying the archive rows an InstallSnapshot skipped (design §5.4).

A follower restored from a leader's snapshot holds the snapshot's hot tails, but not the older
messages it missed while it was away.  ``Archive.restore`` records those ranges durably
(``backfill_ranges``); this worker asks peers for them (``Router.fetch_history``: the group's
leader first, then any connected peer), one page at a time, and hands the rows to
``Archive.fill``, which shrinks the ranges in the same transaction.  A range the peer's retention
already deleted is dropped.  Until a range is filled, reads that need it answer ``unavailable``
(``History``), never a gap.

With ``source`` (``postgres_serve_history``: ``ctxstore/pg/history.py``), each range is asked
of Postgres first, and of the peers only for what Postgres does not hold (yet).

Bounds: one fetch in flight per node, pages of ``page_messages`` messages.  A round in which
no peer could serve any range is retried after ``retry_s``, doubled after each such round up to
``retry_max_s`` (back to ``retry_s`` once a page lands), so a range no peer can serve costs a
fetch per peer every 30 s, not a stream of them.  Failures are counted (``fetch_failures``)
and logged as a warning naming the range, the peer and its answer, at most once per
``FAILURE_LOG_INTERVAL_S`` with the count since the last line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from raft.driver import Driver
from wire.flow import CountedLog

from .archive import Archive
from .history import History, HistoryUnavailable
from .peer_messages import HistoryFetch, HistoryRows
from .records import StoredMessage
from .router import RouteError, Router

logger = logging.getLogger(__name__)

# (session_id, after_seq, to_seq, limit) -> consecutive messages from after_seq + 1, or []
HistorySource = Callable[[str, int, int, int], Awaitable[list[StoredMessage]]]

FAILURE_LOG_INTERVAL_S = 60.0


class Backfill:
    def __init__(
        self,
        node_id: int,
        archive: Archive,
        router: Router,
        driver: Driver,
        *,
        page_messages: int = 1000,
        retry_s: float = 0.5,
        retry_max_s: float = 30.0,
    ) -> None:
        self.node_id = node_id
        self.archive = archive
        self.router = router
        self.driver = driver
        self.page_messages = page_messages
        self.retry_s = retry_s
        self.retry_max_s = retry_max_s
        self.rows_copied = 0
        self.fetch_failures = 0
        self.source: HistorySource | None = None
        self._failure_log = CountedLog(logger, logging.WARNING, FAILURE_LOG_INTERVAL_S)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def kick(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        delay_s = self.retry_s
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.archive.barrier()  # a restore just queued records its ranges
            ranges = self.archive.backfill_ranges()
            if not ranges:
                continue
            progress = False
            for group, session_id, lo, hi in ranges:
                try:
                    progress |= await self._one(group, session_id, lo, hi)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # keep going: the range stays recorded
                    self._failed(session_id, lo, hi, f"{e!r}")
            if progress:
                delay_s = self.retry_s
            if self.archive.backfill_ranges():
                if not progress:
                    await asyncio.sleep(delay_s)
                    delay_s = min(2 * delay_s, self.retry_max_s)
                self._wake.set()

    def _failed(self, session_id: str, lo: int, hi: int, why: str) -> None:
        self.fetch_failures += 1
        self._failure_log.note(f"backfill of {session_id} {lo}..{hi} failed: {why}")

    def _peers(self, group: int) -> list[int]:
        transport = self.router.transport
        if transport is None:
            return []
        leader = self.driver.leader(group)
        peers = [p for p in transport.connected_peers() if p != self.node_id]
        peers.sort(key=lambda p: p != leader)
        return peers

    async def _one(self, group: int, session_id: str, lo: int, hi: int) -> bool:
        if self.source is not None:
            try:
                messages = await self.source(session_id, lo - 1, hi, self.page_messages)
            except Exception as e:  # Postgres down or slow: the peers
                self._failed(session_id, lo, hi, f"postgres: {e!r}")
                messages = []
            if messages:
                await self.archive.fill(session_id, messages)
                self.rows_copied += len(messages)
                return True
        for peer in self._peers(group):
            try:
                rows = await self.router.fetch_history(
                    peer, session_id, lo - 1, hi, self.page_messages
                )
            except RouteError as e:
                self._failed(session_id, lo, hi, f"node {peer}: {e.code}: {e}")
                continue
            if rows.code:
                self._failed(session_id, lo, hi, f"node {peer}: {rows.code}: {rows.message}")
                continue
            if rows.gap_to >= lo:
                await self.archive.forget(session_id, min(rows.gap_to, hi))
            messages = [m for m in rows.messages if lo <= m.seq <= hi]
            if messages:
                await self.archive.fill(session_id, messages)
                self.rows_copied += len(messages)
            if messages or rows.gap_to >= lo:
                return True
        return False


async def serve_history(history: History, fetch: HistoryFetch) -> HistoryRows:
    """A peer's ``HistoryFetch``, answered from this node's history."""
    try:
        page = await history.read(fetch.session_id, fetch.after_seq, max(1, min(fetch.limit, 1000)))
    except HistoryUnavailable as e:
        return HistoryRows(fetch.fid, [], 0, "unavailable", str(e))
    if page is None:
        return HistoryRows(fetch.fid, [], 0, "unavailable", "no such session here")
    gap_to = 0
    if page.gap is not None:
        if page.gap[2] != "retention":
            return HistoryRows(fetch.fid, [], 0, "unavailable", "a hole in this node's history")
        gap_to = page.gap[1]
    messages = [m for m in page.messages if m.seq <= fetch.to_seq]
    return HistoryRows(fetch.fid, messages, gap_to, "", "")


__all__ = ["Backfill", "serve_history"]
