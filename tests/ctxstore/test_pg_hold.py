"""The archive's retention never deletes a row Postgres lacks (``Archive(hold=...)``): by count
and by age, and the age sweep does not spin on rows it must keep."""

from __future__ import annotations

from pathlib import Path

from ctxstore.archive import ArchiveConfig, Retention

from .test_archive import append, opened, run, seqs, wait_until


def test_retention_by_count_stops_at_the_hold(tmp_path: Path) -> None:
    held = {"a": 3}

    async def main() -> None:
        config = ArchiveConfig(flush_interval_s=0.001, retention=Retention(max_messages=5))
        async with opened(tmp_path / "a.db", config, hold=lambda sid: held[sid]) as a:
            append(a, 1, "a", range(1, 21))
            await a.barrier()
            assert await seqs(a, "a") == list(range(4, 21))  # not 16..20: Postgres has 1..3
            held["a"] = 20
            append(a, 1, "a", range(21, 22))
            await a.barrier()
            assert await seqs(a, "a") == list(range(17, 22))

    run(main())


def test_retention_by_age_stops_at_the_hold(tmp_path: Path) -> None:
    now, held, asked = [0], {"a": 4}, [0]

    def hold(sid: str) -> int:
        asked[0] += 1
        return held[sid]

    async def main() -> None:
        retention = Retention(max_age_s=10)
        config = ArchiveConfig(
            flush_interval_s=0.001, retention=retention, retention_interval_s=0.05, batch_rows_max=4
        )
        async with opened(tmp_path / "a.db", config, clock_ms=lambda: now[0], hold=hold) as a:
            append(a, 1, "a", range(1, 21))  # inserted_at = seq * 1000
            await a.barrier()
            now[0] = 100_000  # every row is too old
            await wait_until(lambda: a.stats.rows_deleted_by_retention == 4)
            calls = asked[0]
            await wait_until(lambda: asked[0] > calls + 2)  # sweeps go on, a step at a time
            assert await seqs(a, "a") == list(range(5, 21))
            held["a"] = 20
            await wait_until(lambda: a.stats.rows_deleted_by_retention == 20)
            assert await seqs(a, "a") == []

    run(main())
