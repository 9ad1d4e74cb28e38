"""The backfill worker (ctxstore/backfill.py) against a real archive and peers that fail."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, cast

import pytest

from ctxstore.backfill import Backfill
from ctxstore.peer_messages import HistoryRows
from ctxstore.router import RouteError

from .test_archive import opened, run, tail, wait_until


class Peers:
    """The router's side of the worker: peers 2 and 3, each failing its fetches until
    ``serving`` (then it answers from ``rows``)."""

    def __init__(self) -> None:
        self.fetches = 0
        self.serving = False
        self.transport = self

    def connected_peers(self) -> list[int]:
        return [1, 2, 3]

    async def fetch_history(
        self, peer: int, session_id: str, after_seq: int, last_seq: int, limit: int
    ) -> HistoryRows:
        self.fetches += 1
        if self.serving:
            return HistoryRows(1, tail(session_id, after_seq + 1, last_seq), 0, "", "")
        if peer == 3:
            raise RouteError("unavailable", "no connection to node 3")
        return HistoryRows(1, [], 0, "unavailable", "rows 1..9 are being copied here")


class Leader:
    def leader(self, group: int) -> int:
        return 2


def test_failing_fetches_back_off_and_are_logged_once_with_the_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A range no peer can serve is asked for with a doubling delay (not every retry_s), each
    failure counted, and logged once per interval naming the peer and its answer; once a peer
    serves it, the range is filled."""
    caplog.set_level(logging.WARNING, logger="ctxstore.backfill")

    async def main() -> None:
        async with opened(tmp_path / "a.db") as archive:
            archive.restore(1, 100, [("a", 10, 12)], tail("a", 10, 12))
            await archive.barrier()
            assert archive.backfill_ranges() == [(1, "a", 1, 9)]
            peers = Peers()
            worker = Backfill(
                1, archive, cast(Any, peers), cast(Any, Leader()), retry_s=0.02, retry_max_s=0.16
            )
            worker.start()
            try:
                await asyncio.sleep(1.0)
                # 0.02 + 0.04 + 0.08 + 0.16 ... : about 9 rounds of 2 fetches in 1 s, not 50
                assert 6 <= peers.fetches <= 24, peers.fetches
                assert worker.fetch_failures == peers.fetches
                lines = [r.getMessage() for r in caplog.records]
                assert len(lines) == 1, lines
                assert "backfill of a 1..9 failed: node 2: unavailable: rows 1..9" in lines[0]
                peers.serving = True
                await wait_until(lambda: worker.rows_copied == 9, timeout_s=2)
                assert not archive.backfill_ranges()
            finally:
                await worker.stop()

    run(main())
