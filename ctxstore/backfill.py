"""Copying the archive rows an InstallSnapshot skipped (design §5.4).

A follower restored from a leader's snapshot holds the snapshot's hot tails, but not the older
messages it missed while it was away.  ``Archive.restore`` records those ranges durably
(``backfill_ranges``); this worker asks peers for them (``Router.fetch_history``: the group's
leader first, then any connected peer), one page at a time, and hands the rows to
``Archive.fill``, which shrinks the ranges in the same transaction.  A range the peer's retention
already deleted is dropped.  Until a range is filled, reads that need it answer ``unavailable``
(``History``), never a gap.

Bounds: one fetch in flight per node, pages of ``page_messages`` messages; a failed fetch is
retried after ``retry_s`` with the next peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from raft.driver import Driver

from .archive import Archive
from .history import History, HistoryUnavailable
from .router import HistoryFetch, HistoryRows, RouteError, Router

logger = logging.getLogger(__name__)


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
    ) -> None:
        self.node_id = node_id
        self.archive = archive
        self.router = router
        self.driver = driver
        self.page_messages = page_messages
        self.retry_s = retry_s
        self.rows_copied = 0
        self.fetch_failures = 0
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
                    self.fetch_failures += 1
                    logger.info("backfill of %s %d..%d: %r", session_id, lo, hi, e)
            if self.archive.backfill_ranges():
                if not progress:
                    await asyncio.sleep(self.retry_s)
                self._wake.set()

    def _peers(self, group: int) -> list[int]:
        transport = self.router.transport
        if transport is None:
            return []
        leader = self.driver.leader(group)
        peers = [p for p in transport.connected_peers() if p != self.node_id]
        peers.sort(key=lambda p: p != leader)
        return peers

    async def _one(self, group: int, session_id: str, lo: int, hi: int) -> bool:
        for peer in self._peers(group):
            try:
                rows = await self.router.fetch_history(
                    peer, session_id, lo - 1, hi, self.page_messages
                )
            except RouteError:
                self.fetch_failures += 1
                continue
            if rows.code:
                self.fetch_failures += 1
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
