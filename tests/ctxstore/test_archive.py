"""The node-local SQLite archive (``ctxstore/archive.py``): real SQLite files in tmp_path.

Async tests run in ``run`` (a uvloop loop with a hard timeout), as elsewhere in tests/.  The
crash test kills a writer process with SIGKILL; the model test compares ``read``, the backfill
ranges and the archived indexes with a naive model over random operation sequences.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import msgspec
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxstore.archive import (
    Archive,
    ArchiveConfig,
    ArchiveFailed,
    ArchiveOverflow,
    ArchiveSchemaError,
    Retention,
)
from ctxstore.records import StoredMessage

ROOT = Path(__file__).resolve().parents[2]
FAST = ArchiveConfig(flush_interval_s=0.001)


# -- helpers ---------------------------------------------------------------------------------------
def run(coro: Coroutine[Any, Any, None], timeout_s: float = 15.0) -> None:
    uvloop.run(asyncio.wait_for(coro, timeout_s))


def msg(sid: str, seq: int, *, inserted_at: int | None = None, size: int = 10) -> StoredMessage:
    content = f"{sid}-{seq}-" + "x" * size
    at = seq * 1000 if inserted_at is None else inserted_at
    return StoredMessage(sid, seq, "user", "u1", "text", content, {}, None, at, None)


async def first_seq(a: Archive, sid: str) -> int | None:
    """The lowest archived seq of ``sid`` (None: no rows)."""
    rows = await a.read(sid, 0, 1)
    return rows[0].seq if rows else None


def encoded_bytes(m: StoredMessage) -> int:
    return len(msgspec.msgpack.encode(m))


@contextlib.asynccontextmanager
async def opened(path: Path, config: ArchiveConfig = FAST, **kw: Any) -> AsyncIterator[Archive]:
    archive = Archive(str(path), config, **kw)
    await archive.start()
    try:
        yield archive
    finally:
        await archive.stop()


def append(archive: Archive, group: int, sid: str, seqs: range, index_base: int = 0) -> None:
    """One raft entry per message: index = index_base + seq, then ``applied``."""
    for seq in seqs:
        archive.add(group, index_base + seq, msg(sid, seq))
        archive.applied(group, index_base + seq)


async def seqs(archive: Archive, sid: str) -> list[int]:
    return [m.seq for m in await archive.read(sid, 0, 1000)]


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


# -- batching, indexes, restart --------------------------------------------------------------------
def test_batches_advance_archived_index_and_lag(tmp_path: Path) -> None:
    async def main() -> None:
        config = ArchiveConfig(batch_rows_max=10, flush_interval_s=0.02)
        async with opened(tmp_path / "a.db", config) as a:
            append(a, 1, "s", range(1, 26))
            a.add(2, 7, msg("t", 1))  # no applied(2, ...) yet
            assert a.archived_index(1) == 0 and a.lag(1) == 25 and a.lag(2) == 7
            assert a.stats.queued_rows == 26 and a.backlog_bytes > 0
            await wait_until(lambda: a.archived_index(1) == 25)  # no barrier: the flush interval
            await a.barrier()
            assert a.archived_index(2) == 0 and a.lag(2) == 7  # rows alone do not advance it
            assert a.stats.batches >= 3 and a.stats.rows_written == 26
            assert a.stats.queued_rows == 0 and a.backlog_bytes == 0 and a.lag(1) == 0
            a.applied(2, 9)  # entries without messages advance it too
            await a.barrier()
            assert (a.archived_index(2), a.lag(2)) == (9, 0)
            assert await seqs(a, "s") == list(range(1, 26))

    run(main())


def test_reopen_keeps_rows_and_indexes_and_replays_are_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "a.db"

    async def main() -> None:
        async with opened(path) as a:
            append(a, 1, "s", range(1, 11))
        async with opened(path) as a:
            assert a.archived_index(1) == 10 and a.lag(1) == 0
            assert await seqs(a, "s") == list(range(1, 11))
            a.add(1, 5, msg("s", 5, size=99))  # a replay: queued, written as a no-op
            a.applied(1, 10)  # at the floor: ignored
            assert a.stats.queued_rows == 1 and a.lag(1) == 0
            a.add(1, 11, msg("s", 3, size=99))  # a new index, an existing (session, seq)
            a.add(1, 12, msg("s", 11))
            a.applied(1, 12)
            await a.barrier()
            assert a.stats.rows_written == 1 and a.archived_index(1) == 12
            [fifth] = await a.read("s", 4, 1)
            assert fifth == msg("s", 5)
            [third] = await a.read("s", 2, 1)
            assert third == msg("s", 3)  # INSERT OR IGNORE: the first row stays

    run(main())


def test_stop_flushes_the_queue(tmp_path: Path) -> None:
    path = tmp_path / "a.db"

    async def main() -> None:
        async with opened(path, ArchiveConfig(flush_interval_s=30)) as a:
            append(a, 3, "s", range(1, 6))
            await a.stop()
            await a.stop()  # idempotent
            assert a.archived_index(3) == 5
        async with opened(path) as a:
            assert a.archived_index(3) == 5 and await seqs(a, "s") == [1, 2, 3, 4, 5]

    run(main())


def test_barrier_flushes_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path / "a.db", ArchiveConfig(flush_interval_s=30)) as a:
            await a.barrier()  # nothing queued
            append(a, 1, "s", range(1, 4))
            started = time.monotonic()
            await a.barrier()
            assert time.monotonic() - started < 5
            assert a.archived_index(1) == 3 and await seqs(a, "s") == [1, 2, 3]

    run(main())


# -- reads -----------------------------------------------------------------------------------------
def test_read_pages_by_limit_to_seq_and_bytes(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path / "a.db") as a:
            for seq in range(1, 21):
                a.add(1, seq, msg("s", seq, size=seq * 10))
            a.applied(1, 20)
            await a.barrier()
            assert await seqs(a, "s") == list(range(1, 21))
            assert [m.seq for m in await a.read("s", 0, 5)] == [1, 2, 3, 4, 5]
            assert [m.seq for m in await a.read("s", 5, 100, to_seq=12)] == list(range(6, 13))
            two = encoded_bytes(msg("s", 1, size=10)) + encoded_bytes(msg("s", 2, size=20))
            assert [m.seq for m in await a.read("s", 0, 100, bytes_max=two)] == [1, 2]
            assert [m.seq for m in await a.read("s", 0, 100, bytes_max=two - 1)] == [1]
            assert [m.seq for m in await a.read("s", 9, 100, bytes_max=1)] == [10]  # always one
            assert await a.read("s", 20, 10) == [] and await a.read("nobody", 0, 10) == []
            assert await a.read("s", 3, 10, to_seq=3) == []
            assert await first_seq(a, "s") == 1 and await first_seq(a, "nobody") is None
            with pytest.raises(ValueError):
                await a.read("s", 0, 0)

    run(main())


# -- restore and backfill --------------------------------------------------------------------------
def tail(sid: str, first: int, last: int) -> list[StoredMessage]:
    return [msg(sid, seq) for seq in range(first, last + 1)]


def test_restore_records_durable_ranges_and_fill_shrinks_them(tmp_path: Path) -> None:
    path = tmp_path / "a.db"

    async def main() -> None:
        async with opened(path) as a:
            append(a, 1, "a", range(1, 6))
            sessions = [("a", 20, 25), ("b", 10, 12), ("c", 1, 3), ("d", 1, 0)]
            a.restore(1, 100, sessions, tail("a", 20, 25) + tail("b", 10, 12) + tail("c", 1, 3))
            assert a.lag(1) == 100  # nothing committed yet
            await a.barrier()
            assert a.archived_index(1) == 100
            assert a.backfill_ranges() == [(1, "a", 6, 19), (1, "b", 1, 9)]
        async with opened(path) as a:
            assert a.archived_index(1) == 100
            assert a.backfill_ranges() == [(1, "a", 6, 19), (1, "b", 1, 9)]
            assert await seqs(a, "a") == [1, 2, 3, 4, 5, *range(20, 26)]
            assert await seqs(a, "c") == [1, 2, 3]
            # 6..10 fill the bottom; 3 and 30 exist or lie outside; "b" rows belong elsewhere
            await a.fill("a", [*tail("a", 6, 10), msg("a", 3), msg("a", 30), msg("b", 2)])
            assert a.backfill_ranges("a") == [(1, "a", 11, 19)]
            assert (a.stats.backfill_rows, a.stats.backfill_rows_ignored) == (5, 3)
            await a.fill("a", [msg("a", 15)])  # the middle: the range splits
            assert a.backfill_ranges("a") == [(1, "a", 11, 14), (1, "a", 16, 19)]
        async with opened(path) as a:
            assert a.backfill_ranges("a") == [(1, "a", 11, 14), (1, "a", 16, 19)]
            await a.fill("a", [*tail("a", 11, 14), *tail("a", 16, 19)])
            assert a.backfill_ranges("a") == []
            assert await seqs(a, "a") == list(range(1, 26))
            await a.forget("b", 4)  # the peers' retention deleted 1..4
            assert a.backfill_ranges() == [(1, "b", 5, 9)]
        async with opened(path) as a:
            assert a.backfill_ranges() == [(1, "b", 5, 9)]
            await a.fill("b", tail("b", 1, 9))
            assert a.backfill_ranges() == [] and await seqs(a, "b") == list(range(5, 13))

    run(main())


def test_restore_tail_fills_an_existing_range(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path / "a.db") as a:
            a.restore(1, 10, [("a", 20, 21)], tail("a", 20, 21))
            await a.barrier()
            assert a.backfill_ranges() == [(1, "a", 1, 19)]
            # a later snapshot's tail reaches into the range; a new gap above the tail joins it
            a.restore(1, 20, [("a", 15, 40)], tail("a", 15, 40))
            await a.barrier()
            assert a.backfill_ranges() == [(1, "a", 1, 14)]
            a.restore(1, 30, [("a", 50, 50)], tail("a", 50, 50))
            await a.barrier()
            assert a.backfill_ranges() == [(1, "a", 1, 14), (1, "a", 41, 49)]
            assert a.archived_index(1) == 30

    run(main())


# -- retention -------------------------------------------------------------------------------------
def test_retention_by_count_and_its_clipping_of_ranges(tmp_path: Path) -> None:
    async def main() -> None:
        config = ArchiveConfig(flush_interval_s=0.001, retention=Retention(max_messages=5))
        async with opened(tmp_path / "a.db", config) as a:
            append(a, 1, "a", range(1, 13))
            await a.barrier()
            assert await seqs(a, "a") == list(range(8, 13))
            assert a.stats.rows_deleted_by_retention == 7 and await first_seq(a, "a") == 8
            # the range below the tail (1..49) lies entirely under the floor 60 - 5
            a.restore(1, 100, [("b", 50, 60)], tail("b", 50, 60))
            await a.barrier()
            assert a.backfill_ranges() == [] and await seqs(a, "b") == list(range(56, 61))
        config = ArchiveConfig(flush_interval_s=0.001, retention=Retention(max_messages=20))
        async with opened(tmp_path / "b.db", config) as a:
            a.restore(1, 100, [("b", 50, 60)], tail("b", 50, 60))
            await a.barrier()
            assert a.backfill_ranges() == [(1, "b", 41, 49)]  # clipped to seq > 60 - 20
            append(a, 1, "b", range(61, 66), index_base=100)
            await a.barrier()
            assert a.backfill_ranges() == [(1, "b", 46, 49)]  # the floor moved: 65 - 20
            await a.fill("b", [msg("b", 45), msg("b", 46)])  # 45 lies below the range now
            assert a.backfill_ranges() == [(1, "b", 47, 49)]
            assert a.stats.backfill_rows_ignored == 1

    run(main())


def test_retention_by_age_with_an_injected_clock(tmp_path: Path) -> None:
    now = [0]

    async def main() -> None:
        retention = Retention(max_age_s=10)
        config = ArchiveConfig(
            flush_interval_s=0.001, retention=retention, retention_interval_s=0.01
        )
        async with opened(tmp_path / "a.db", config, clock_ms=lambda: now[0]) as a:
            append(a, 1, "a", range(1, 21))  # inserted_at = seq * 1000
            a.restore(1, 100, [("b", 10, 20)], tail("b", 10, 20))
            await a.barrier()
            assert a.backfill_ranges() == [(1, "b", 1, 9)]
            now[0] = 15_500  # cutoff 5 500: a 1..5
            await wait_until(lambda: a.stats.rows_deleted_by_retention == 5)
            assert await first_seq(a, "a") == 6 and a.backfill_ranges() == [(1, "b", 1, 9)]
            now[0] = 22_500  # cutoff 12 500: a 6..12, b 10..12, and so b's range
            await wait_until(lambda: a.stats.rows_deleted_by_retention == 15)
            assert await first_seq(a, "a") == 13 and await first_seq(a, "b") == 13
            assert a.backfill_ranges() == []
            # a snapshot whose tail is already too old records no range below it
            a.restore(1, 200, [("c", 10, 12)], tail("c", 10, 12))
            await a.barrier()
            assert a.backfill_ranges() == []

    run(main())


# -- failures --------------------------------------------------------------------------------------
def test_a_sqlite_error_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    fatal: list[BaseException] = []

    async def main() -> None:
        async with opened(path, on_fatal=fatal.append) as a:
            append(a, 1, "s", range(1, 4))
            await a.barrier()
            with sqlite3.connect(path) as other:  # every later insert fails
                other.execute(
                    "CREATE TRIGGER fail BEFORE INSERT ON messages"
                    " BEGIN SELECT RAISE(ABORT, 'injected'); END"
                )
            append(a, 1, "s", range(4, 6))
            with pytest.raises(ArchiveFailed) as failed:
                await a.barrier()
            assert isinstance(failed.value.__cause__, sqlite3.Error)
            assert fatal == [failed.value] and "injected" in (a.stats.last_error or "")
            append(a, 1, "s", range(6, 8))  # ignored
            assert a.stats.queued_rows == 0 and a.archived_index(1) == 3
            with pytest.raises(ArchiveFailed):
                await a.barrier()
            with pytest.raises(ArchiveFailed):
                await a.fill("s", [])
            assert await seqs(a, "s") == [1, 2, 3]  # reads go on
        assert len(fatal) == 1

    run(main())


def test_overflow_is_fatal_after_overloaded(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    fatal: list[BaseException] = []

    async def main() -> None:
        config = ArchiveConfig(flush_interval_s=0.001, backlog_bytes_max=20_000)
        async with opened(path, config, on_fatal=fatal.append) as a:
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # the writer blocks on the lock
            try:
                barrier = asyncio.ensure_future(a.barrier())
                seq, overloaded_at = 0, 0
                while not fatal:
                    seq += 1
                    assert seq < 1000
                    a.add(1, seq, msg("s", seq, size=1000))
                    a.applied(1, seq)
                    if not fatal:
                        assert a.backlog_bytes <= 20_000
                        overloaded_at = overloaded_at or (a.overloaded and seq)
                    await asyncio.sleep(0)
                assert isinstance(fatal[0], ArchiveOverflow)
                assert 0 < overloaded_at < seq and 10_000 < overloaded_at * 1080 < 12_000
                with pytest.raises(ArchiveOverflow):
                    await barrier
                a.add(1, seq + 1, msg("s", seq + 1))  # ignored
                assert a.lag(1) == seq
            finally:
                other.execute("ROLLBACK")
                other.close()
        assert len(fatal) == 1

    run(main())


def test_a_newer_schema_or_another_database_is_refused(tmp_path: Path) -> None:
    newer, foreign = tmp_path / "newer.db", tmp_path / "foreign.db"

    async def main() -> None:
        async with opened(newer):
            pass
        with sqlite3.connect(newer) as conn:
            conn.execute("UPDATE meta SET value = 2 WHERE key = 'schema_version'")
        with pytest.raises(ArchiveSchemaError, match="schema version 2"):
            await Archive(str(newer)).start()
        with sqlite3.connect(foreign) as conn:
            conn.execute("CREATE TABLE t (x)")
        archive = Archive(str(foreign))
        with pytest.raises(ArchiveSchemaError, match="not a ctxstore archive"):
            await archive.start()
        await archive.stop()

    run(main())


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        ArchiveConfig(batch_rows_max=0)
    with pytest.raises(ValueError):
        Retention(max_messages=0)


# -- crash consistency -----------------------------------------------------------------------------
CHILD = """
import asyncio, sys
from ctxstore.archive import Archive, ArchiveConfig
from ctxstore.records import StoredMessage

async def main(path):
    a = Archive(path, ArchiveConfig(flush_interval_s=0.002, batch_rows_max=64))
    await a.start()
    index = 0
    while True:  # from index 1 again after a restart: the replayed part is ignored
        index += 1
        for g in (1, 2, 3):
            if index % 7 != g:  # some entries carry no message
                m = StoredMessage(f"s{g}", index, "user", "u", "text", "x" * 200, {}, None, 0, None)
                a.add(g, index, m)
            a.applied(g, index)
        if index % 20 == 0:
            print(a.archived_index(1), flush=True)
            await asyncio.sleep(0.001)

asyncio.run(main(sys.argv[1]))
"""


def run_and_kill(path: Path, until: int) -> int:
    """Run the writer process until it reports archived_index(1) >= until; SIGKILL it."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        seen = 0
        while seen < until:
            line = child.stdout.readline()
            assert line, "the writer process ended"
            seen = int(line)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    return seen


async def check_archived_rows(path: Path, seen: int) -> None:
    async with opened(path) as a:
        assert a.archived_index(1) >= seen  # what the writer had reported is durable
        for g in (1, 2, 3):
            top = a.archived_index(g)
            expected = [i for i in range(1, top + 1) if i % 7 != g]
            assert await seqs_upto(a, f"s{g}", top) == expected, g


def test_kill_9_mid_stream_keeps_everything_up_to_archived_index(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    seen = 0
    for _ in range(3):  # each round replays from index 1 (ignored up to the archived index)
        seen = run_and_kill(path, seen + 500)
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        run(check_archived_rows(path, seen))


async def seqs_upto(archive: Archive, sid: str, to_seq: int) -> list[int]:
    out: list[int] = []
    while page := await archive.read(sid, out[-1] if out else 0, 1000, to_seq=to_seq):
        out.extend(m.seq for m in page)
    return out


# -- model check -----------------------------------------------------------------------------------
SIDS = ("a", "b")
Op = tuple[Any, ...]
ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.sampled_from(SIDS), st.integers(1, 6)),
        st.tuples(st.just("restore"), st.sampled_from(SIDS), st.integers(0, 8), st.integers(1, 3)),
        st.tuples(st.just("fill"), st.sampled_from(SIDS), st.integers(1, 30), st.integers(0, 8)),
        st.tuples(
            st.just("read"),
            st.sampled_from(SIDS),
            st.integers(0, 12),
            st.integers(1, 8),
            st.none() | st.integers(0, 30),
            st.integers(0, 4),  # bytes_max: the size of this many rows ...
            st.integers(-1, 1),  # ... plus this
        ),
        st.tuples(st.just("forget"), st.sampled_from(SIDS), st.integers(0, 30)),
        st.tuples(st.just("reopen")),
    ),
    max_size=25,
)


def model_msg(sid: str, seq: int) -> StoredMessage:
    return msg(sid, seq, size=(seq * 37) % 200)


class Model:
    """What the archive should hold: rows, missing seqs (the backfill ranges), indexes."""

    def __init__(self) -> None:
        self.last = dict.fromkeys(SIDS, 0)
        self.rows: dict[str, dict[int, StoredMessage]] = {s: {} for s in SIDS}
        self.missing: dict[str, set[int]] = {s: set() for s in SIDS}
        self.index = 0  # of the one group

    def restore(self, sid: str, jump: int, tail_len: int) -> list[tuple[str, int, int]]:
        self.last[sid] += jump
        sessions = []
        for s in SIDS:
            last = self.last[s]
            first = max(1, last - (tail_len if s == sid else 2) + 1)
            sessions.append((s, first, last))
            for seq in range(first, last + 1):
                self.rows[s][seq] = model_msg(s, seq)
                self.missing[s].discard(seq)
            below = max((q for q in self.rows[s] if q < first), default=0)
            self.missing[s] |= set(range(below + 1, first))
        return sessions

    def candidates(self, sid: str, after: int, to: int | None) -> list[StoredMessage]:
        top = to if to is not None else 10**9
        return [self.rows[sid][q] for q in sorted(self.rows[sid]) if after < q <= top]

    def read(self, sid: str, after: int, limit: int, to: int | None, bytes_max: int) -> list[int]:
        out: list[int] = []
        total = 0
        for m in self.candidates(sid, after, to)[:limit]:
            total += encoded_bytes(m)
            if out and total > bytes_max:
                break
            out.append(m.seq)
        return out


async def check_model(path: Path, ops: list[Op]) -> None:
    model = Model()
    a = Archive(str(path), FAST)
    await a.start()
    try:
        for op in ops:
            match op:
                case ("append", sid, n):
                    for _ in range(n):
                        seq = model.last[sid] = model.last[sid] + 1
                        model.index += 1
                        a.add(1, model.index, model_msg(sid, seq))
                        a.applied(1, model.index)
                        model.rows[sid][seq] = model_msg(sid, seq)
                case ("restore", sid, jump, tail_len):
                    model.index += 1
                    sessions = model.restore(sid, jump, tail_len)
                    rows = [model_msg(s, q) for s, lo, hi in sessions for q in range(lo, hi + 1)]
                    a.restore(1, model.index, sessions, rows)
                case ("fill", sid, lo, n):
                    given_ = [model_msg(sid, q) for q in range(lo, lo + n)]
                    accepted = {q for q in range(lo, lo + n) if q in model.missing[sid]}
                    for q in accepted:
                        model.rows[sid][q] = model_msg(sid, q)
                    model.missing[sid] -= accepted
                    await a.fill(sid, given_)
                case ("read", sid, after, limit, to, rows, delta):
                    sizes = [encoded_bytes(m) for m in model.candidates(sid, after, to)[:rows]]
                    bytes_max = max(1, sum(sizes) + delta)
                    await a.barrier()
                    got = await a.read(sid, after, limit, to_seq=to, bytes_max=bytes_max)
                    assert [m.seq for m in got] == model.read(sid, after, limit, to, bytes_max)
                    assert all(m == model.rows[sid][m.seq] for m in got)
                case ("forget", sid, to):
                    model.missing[sid] = {q for q in model.missing[sid] if q > to}
                    await a.forget(sid, to)
                case ("reopen",):
                    await a.stop()
                    a = Archive(str(path), FAST)
                    await a.start()
        await a.barrier()
        assert (a.archived_index(1), a.lag(1)) == (model.index, 0)
        for sid in SIDS:
            ranges = a.backfill_ranges(sid)
            assert all(a_ <= b for _, _, a_, b in ranges)
            assert all(r[3] + 1 < n[2] for r, n in itertools.pairwise(ranges))
            assert {q for _, _, lo, hi in ranges for q in range(lo, hi + 1)} == model.missing[sid]
            assert await seqs(a, sid) == sorted(model.rows[sid])
    finally:
        await a.stop()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_strategy)
def test_reads_and_ranges_match_a_naive_model(ops: list[Op]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run(check_model(Path(tmp) / "a.db", ops))
