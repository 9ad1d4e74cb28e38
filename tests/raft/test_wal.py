"""The write-ahead log (raft/wal.py) on real files with real fsyncs.

Every test checks the WAL's views against ``MemoryStorage`` models fed the same writes
(``Model``), so "what survives" is always a comparison of every observable answer: hard state,
membership, snapshot, first/last index, every term, every entry (with and without a byte limit)
and the errors at the edges.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raft import Config, RawNode, wal_segments, wal_storage
from raft.errors import Compacted, InvariantViolation, SnapshotOutOfDate, Unavailable
from raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from raft.storage import MemoryStorage, Storage, bootstrap
from raft.wal import WAL, GroupWrite, WalFailed, Written
from raft.wal_records import RECORD_BYTES_MAX, Scanner
from raft.wal_segments import append_record, parse_segment_name, parse_snapshot_name

SMALL = {"segment_bytes": 4096, "cache_bytes_max": 512}


class _InlineWAL:
    """``WAL`` for this module's tests in inline mode (no writer thread)."""

    open = staticmethod(partial(WAL.open, inline=True))


WRITERS = ("thread", "inline")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test of this module runs with both writers, except one marked
    ``@pytest.mark.wal_writer(name)``: about that writer alone, it runs once, with it."""
    marker = metafunc.definition.get_closest_marker("wal_writer")
    writers = marker.args if marker is not None else WRITERS
    metafunc.parametrize("writer", writers, indirect=True)


@pytest.fixture(autouse=True)
def writer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The writer of this run: ``WAL.open`` here is the inline one in the ``inline`` run."""
    if request.param == "inline":
        monkeypatch.setattr(sys.modules[__name__], "WAL", _InlineWAL)
    return str(request.param)


# -- helpers -------------------------------------------------------------------------------------


class Model:
    """MemoryStorage per group, written exactly as a driver writes a batch."""

    def __init__(self) -> None:
        self.groups: dict[int, MemoryStorage] = {}

    def storage(self, group: int) -> MemoryStorage:
        return self.groups.setdefault(group, MemoryStorage())

    def write(self, batch: Sequence[GroupWrite]) -> None:
        for w in batch:
            s = self.storage(w.group)
            if w.snapshot is not None:
                s.apply_snapshot(w.snapshot)
            if w.compact is not None:
                meta = w.compact.meta
                s.create_snapshot(meta.index, meta.conf_state, w.compact.data)
                s.compact(meta.index)
            s.append(list(w.entries))
            if w.hard_state is not None:
                s.set_hard_state(w.hard_state)

    def copy(self) -> Model:
        out = Model()
        for g, s in self.groups.items():
            c = out.storage(g)
            c.hard_state, c.snap, c.ents = s.hard_state, s.snap, list(s.ents)
        return out


def attempt(f: Callable[[], Any]) -> Any:
    try:
        return f()
    except (Compacted, Unavailable) as e:
        return type(e).__name__


def observe(s: Storage) -> tuple[Any, ...]:
    """Every answer a Storage gives (errors as their names)."""
    first, last = s.first_index(), s.last_index()
    return (
        s.initial_state(),
        s.snapshot(),
        first,
        last,
        [attempt(lambda i=i: s.term(i)) for i in range(max(0, first - 2), last + 2)],
        [attempt(lambda m=m: s.entries(first, last + 1, m)) for m in (None, 0, 150)],
        attempt(lambda: s.entries(first - 1, last + 1, None)),
        [attempt(lambda i=i: s.entries(i, min(last + 1, i + 3), None)) for i in range(first, last)],
    )


def assert_same(wal: WAL, model: Model) -> None:
    for g, s in model.groups.items():
        assert observe(wal.storage(g)) == observe(s), f"group {g}"


def entries(term: int, first: int, n: int, size: int = 20, tag: bytes = b"") -> list[Entry]:
    return [
        Entry(term, i, data=(tag + f"{i}:".encode()).ljust(size, b".")[:size])
        for i in range(first, first + n)
    ]


def snap(
    index: int, term: int, data: bytes = b"state", voters: tuple[int, ...] = (1, 2, 3)
) -> Snapshot:
    return Snapshot(SnapshotMeta(index, term, ConfState(voters)), data)


def segments(path: Path) -> list[int]:
    return sorted(s for n in os.listdir(path) if (s := parse_segment_name(n)) is not None)


def snapshot_files(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if parse_snapshot_name(n) is not None)


def settle(wal: WAL) -> None:
    """Let the writer thread finish the deletions queued by earlier publishes."""
    wal.write_sync([])


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count os.fdatasync and os.pwritev calls (the WAL looks them up at call time)."""
    counts = {"fdatasync": 0, "pwritev": 0}
    for name in counts:
        real = getattr(os, name)

        def wrapper(*args: Any, _real: Any = real, _name: str = name) -> Any:
            counts[_name] += 1
            return _real(*args)

        monkeypatch.setattr(os, name, wrapper)
    return counts


# -- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("record_bytes", [1 << 20, 50], ids=["one-record", "many-records"])
def test_round_trip_of_several_groups_with_suffix_replacement(
    tmp_path: Path, record_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With small records, one write's entries span several records and are read back across
    record boundaries; suffixes are replaced inside a record."""
    monkeypatch.setattr(wal_segments, "ENTRIES_RECORD_BYTES", record_bytes)
    model = Model()
    batches = [
        [GroupWrite(g, entries(1, 1, 10, tag=b"a"), HardState(1, 1, 3)) for g in (1, 2, 7)],
        [GroupWrite(1, entries(2, 6, 4, tag=b"b"))],  # replaces 6..10 of group 1
        [GroupWrite(2, entries(2, 2, 1, tag=b"c"), HardState(2, 0, 1))],  # leaves 1..2
        [GroupWrite(7, entries(1, 11, 30, size=100, tag=b"d"))],  # evicts older entries
        [GroupWrite(7, entries(3, 5, 2, tag=b"e"))],  # replaces below the cache
        [GroupWrite(1, hard_state=HardState(3, 2, 9))],
    ]
    with WAL.open(str(tmp_path), **SMALL) as wal:
        for batch in batches:
            wal.write_sync(batch)
            model.write(batch)
            assert_same(wal, model)
        assert wal.cached_bytes <= SMALL["cache_bytes_max"]
    with WAL.open(str(tmp_path), **SMALL) as wal:
        assert_same(wal, model)
        assert wal.groups() == [1, 2, 7]
        wal.write_sync([GroupWrite(2, entries(3, 3, 2), HardState(3, 0, 3))])
        model.write([GroupWrite(2, entries(3, 3, 2), HardState(3, 0, 3))])
    with WAL.open(str(tmp_path), **SMALL) as wal:
        assert wal.stats.disk_reads == 0
        assert_same(wal, model)
        assert wal.stats.disk_reads > 0  # the old entries came back from the segments


def test_snapshots_of_both_kinds_round_trip(tmp_path: Path) -> None:
    model = Model()
    batches = [
        [GroupWrite(g, entries(1, 1, 20), HardState(1, 1, 20)) for g in (1, 2)],
        [GroupWrite(1, compact=snap(12, 1, b"app state at 12"))],  # keeps 13..20
        [
            GroupWrite(
                2, snapshot=snap(50, 4, b"leader state at 50"), hard_state=HardState(4, 0, 50)
            )
        ],
        [GroupWrite(2, entries(4, 51, 3))],
        [GroupWrite(1, snapshot=snap(15, 1, b"same log"))],  # replaces even a matching log
    ]
    with WAL.open(str(tmp_path), **SMALL) as wal:
        for batch in batches:
            wal.write_sync(batch)
            model.write(batch)
            assert_same(wal, model)
        settle(wal)
        assert len(snapshot_files(tmp_path)) == 2  # superseded files are gone
    with WAL.open(str(tmp_path), **SMALL) as wal:
        assert_same(wal, model)
        assert wal.storage(2).snapshot().data == b"leader state at 50"
        with pytest.raises(SnapshotOutOfDate):
            wal.save_snapshot(1, snap(15, 1))
        with pytest.raises(SnapshotOutOfDate):
            wal.write_sync([GroupWrite(2, snapshot=snap(49, 4))])
        with pytest.raises(InvariantViolation):
            wal.write_sync([GroupWrite(2, entries(4, 60, 1))])  # a gap
        wal.write_sync([GroupWrite(2, entries(4, 40, 20))])  # covered part ignored, like append
        model.write([GroupWrite(2, entries(4, 40, 20))])
        assert_same(wal, model)


def test_open_removes_temporary_and_orphaned_snapshot_files(tmp_path: Path) -> None:
    """A crash while a snapshot was being written leaves a temporary file, or a complete file no
    record names yet: both go at open; the snapshot a record names stays."""
    with WAL.open(str(tmp_path)) as wal:
        wal.write_sync([GroupWrite(1, entries(1, 1, 5))])
        wal.save_snapshot(1, snap(3, 1, b"kept"))
    (kept,) = snapshot_files(tmp_path)
    (tmp_path / "00000001-0000000000000004-00000009.snap.tmp").write_bytes(b"half")
    (tmp_path / "00000001-0000000000000005-0000000a.snap").write_bytes(b"orphan")
    with WAL.open(str(tmp_path)) as wal:
        # Recovery never appends to an old segment (its head may be torn): a new one starts.
        assert sorted(os.listdir(tmp_path)) == sorted(
            ["LOCK", kept, "0000000000000001.wal", "0000000000000002.wal"]
        )
        assert wal.storage(1).snapshot().data == b"kept"
        wal.save_snapshot(1, snap(4, 1, b"newer"))  # the counter went past the orphan's
        settle(wal)
        assert snapshot_files(tmp_path) == ["00000001-0000000000000004-0000000b.snap"]


def test_a_second_open_of_the_same_directory_is_refused(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path)), pytest.raises(BlockingIOError):
        WAL.open(str(tmp_path))


def test_bootstrap_and_a_raw_node_restart(tmp_path: Path) -> None:
    def run(node: RawNode, wal: WAL) -> None:
        while node.has_ready():
            rd = node.ready()
            wal.write_sync([GroupWrite(5, rd.entries, rd.hard_state, rd.snapshot)])
            node.advance(rd)

    with WAL.open(str(tmp_path)) as wal:
        wal.bootstrap(5, ConfState((1,)))
        expected = MemoryStorage()
        bootstrap(expected, ConfState((1,)))
        assert observe(wal.storage(5)) == observe(expected)
        node = RawNode(Config(id=1), wal.storage(5))
        run(node, wal)  # applies the bootstrap membership
        node.campaign()
        run(node, wal)
        index = node.propose(b"hello")
        run(node, wal)
        assert node.status().commit == index
    with WAL.open(str(tmp_path)) as wal:
        node = RawNode(Config(id=1, applied=index), wal.storage(5))
        assert node.status().last_index == index
        assert node.status().commit == index
        assert wal.storage(5).entries(index, index + 1, None)[0].data == b"hello"


# -- group commit --------------------------------------------------------------------------------


def test_a_batch_for_50_groups_is_one_write_and_one_fdatasync(
    tmp_path: Path, counting: dict[str, int]
) -> None:
    batch = [GroupWrite(g, entries(1, 1, 3), HardState(1, 0, 1)) for g in range(50)]
    with WAL.open(str(tmp_path)) as wal:
        before = dict(counting)
        fsyncs, records = wal.stats.fsyncs, wal.stats.records
        wal.write_sync(batch)
        assert counting["fdatasync"] - before["fdatasync"] == 1
        assert counting["pwritev"] - before["pwritev"] == 1
        assert wal.stats.fsyncs - fsyncs == 1
        assert wal.stats.records - records == 100
        assert wal.stats.last_round_batches == 1
        model = Model()
        model.write(batch)
        assert_same(wal, model)


def test_fsyncs_are_counted_by_their_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Stats.fsync_buckets`` (the ``ctxstore_wal_fsync_seconds`` histogram): one count per
    fsync, in the bucket of its time."""
    real = os.fdatasync

    def slow(fd: int) -> None:
        time.sleep(0.06)
        real(fd)

    with WAL.open(str(tmp_path)) as wal:
        st = wal.stats
        before, fsyncs = list(st.fsync_buckets), st.fsyncs
        wal.write_sync([GroupWrite(1, entries(1, 1, 3), HardState(1, 0, 1))])
        monkeypatch.setattr(os, "fdatasync", slow)
        wal.write_sync([GroupWrite(1, entries(1, 4, 3), HardState(1, 0, 1))])
        delta = [n - b for n, b in zip(st.fsync_buckets, before, strict=True)]
    bounds = [*wal_segments.FSYNC_BUCKETS_S, float("inf")]
    assert len(delta) == len(bounds) and sum(delta) == st.fsyncs - fsyncs == 2
    assert sum(n for n, bound in zip(delta, bounds, strict=True) if bound > 0.05) >= 1
    assert st.fsync_seconds_max >= 0.06


@pytest.mark.wal_writer("thread")  # its coalescing; inline: test_an_inline_wal_writes_...
def test_submits_during_a_write_coalesce_and_stay_invisible_until_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    real = os.fdatasync
    calls = [0]

    def gated(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 1:
            entered.set()
            assert release.wait(10)
        real(fd)

    with WAL.open(str(tmp_path)) as wal:
        monkeypatch.setattr(os, "fdatasync", gated)
        first = wal.submit([GroupWrite(0, entries(1, 1, 1))])
        assert entered.wait(10)  # the writer is inside the first fdatasync
        futures: list[Future[Written]] = []
        lock = threading.Lock()

        def submitter(g: int) -> None:
            for k in range(5):
                f = wal.submit([GroupWrite(g, entries(1, k + 1, 1))])
                with lock:
                    futures.append(f)

        threads = [threading.Thread(target=submitter, args=(g,)) for g in range(1, 5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not first.done() and wal.storage(0).last_index() == 0
        release.set()
        written = [first.result(10)] + [f.result(10) for f in futures]
        assert calls[0] == 2  # 21 batches, two fdatasyncs
        assert wal.stats.last_round_batches == 20
        assert wal.storage(0).last_index() == 0  # durable, but not yet published
        for w in sorted(written, key=lambda w: w.seq):
            wal.publish(w)
        assert [wal.storage(g).last_index() for g in range(5)] == [1, 5, 5, 5, 5]


@pytest.mark.wal_writer("inline")
def test_an_inline_wal_writes_in_submit_on_the_calling_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inline: ``submit`` returns a resolved Future, having written and synced on the caller's
    thread; the views change only at ``publish``; files made obsolete by a publish go at the
    next submit; there is no writer thread."""
    threads: list[str] = []
    real = os.fdatasync

    def recording(fd: int) -> None:
        threads.append(threading.current_thread().name)
        real(fd)

    before = {t.name for t in threading.enumerate()}
    with WAL.open(str(tmp_path), segment_bytes=2048, cache_bytes_max=1024) as wal:
        assert {t.name for t in threading.enumerate()} == before  # no wal-writer
        monkeypatch.setattr(os, "fdatasync", recording)
        first = wal.submit([GroupWrite(1, entries(1, 1, 2, size=60), HardState(1, 1, 0))])
        assert first.done() and threads == [threading.current_thread().name]
        second = wal.submit([GroupWrite(1, entries(1, 3, 1, size=60))])
        assert second.done() and len(threads) == 2  # one fdatasync per submit: no coalescing
        assert wal.storage(1).last_index() == 0  # durable, not yet published
        wal.publish(first.result())
        wal.publish(second.result())
        assert wal.storage(1).last_index() == 3
        monkeypatch.undo()
        for k in range(4, 80):  # roll segments, then compact them away
            wal.write_sync([GroupWrite(1, entries(1, k, 1, size=60))])
        old = segments(tmp_path)
        assert len(old) > 2
        wal.save_snapshot(1, snap(70, 1, b"app"))
        assert segments(tmp_path) == old  # obsolete, but deleted by the next submit
        settle(wal)
        assert len(segments(tmp_path)) < len(old)


def test_a_failed_fdatasync_stops_the_wal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    wal = WAL.open(str(tmp_path))
    monkeypatch.setattr(os, "fdatasync", broken)
    with pytest.raises(WalFailed):
        wal.submit([GroupWrite(1, entries(1, 1, 1))]).result(10)
    with pytest.raises(WalFailed):
        wal.submit([GroupWrite(1, entries(1, 1, 1))])
    monkeypatch.undo()
    wal.close()


# -- recovery ------------------------------------------------------------------------------------


def build(path: Path, batches: list[list[GroupWrite]], **kw: Any) -> list[Written]:
    with WAL.open(str(path), **kw) as wal:
        return [wal.write_sync(b) for b in batches]


def reopened(src: Path, dst: Path, damage: Callable[[Path], None], **kw: Any) -> WAL:
    shutil.copytree(src, dst)
    damage(dst)
    return WAL.open(str(dst), **kw)


def history() -> list[list[GroupWrite]]:
    """A few groups' batches; each batch is one record."""
    out: list[list[GroupWrite]] = []
    for k in range(6):
        out.append([GroupWrite(k % 3, entries(1, k // 3 * 4 + 1, 4, tag=b"%d" % k))])
        out.append([GroupWrite(k % 3, hard_state=HardState(1, 1, k // 3 * 4 + 2))])
    return out


def models_after(batches: list[list[GroupWrite]]) -> list[Model]:
    """models_after(b)[n] is the state after the first n batches."""
    model, out = Model(), [Model()]
    for b in batches:
        model.write(b)
        out.append(model.copy())
    return out


@pytest.mark.parametrize("preallocate", [False, True], ids=["truncated", "zeroed"])
def test_torn_tail_at_every_byte_of_the_last_batch(tmp_path: Path, preallocate: bool) -> None:
    """The last batch is an entries record then a hard-state record.  Cut the file at every byte
    (or, in a preallocated file, zero everything from there; the last byte of each record is not
    zero): exactly the whole records before the cut survive, and the WAL goes on from there."""
    kw = {"preallocate": preallocate, "segment_bytes": 1 << 16}
    last = [GroupWrite(1, entries(2, 9, 2)), GroupWrite(2, hard_state=HardState(2, 3, 7))]
    batches = [*history(), last]
    models = models_after([*batches[:-1], batches[-1][:1], batches[-1][1:]])
    src = tmp_path / "src"
    written = build(src, batches, **kw)
    (segment,) = segments(src)
    name = f"{segment:016x}.wal"
    loc = written[-1].done[0].locations[0]
    end_of_entries = loc.offset + loc.length
    end = end_of_entries + append_record(bytearray(), 2, HardState(2, 3, 7))
    for cut in range(loc.offset, end):

        def damage(d: Path, cut: int = cut) -> None:
            if preallocate:
                with open(d / name, "r+b") as f:
                    f.seek(cut)
                    f.write(bytes(end - cut))
            else:
                os.truncate(d / name, cut)

        with reopened(src, tmp_path / f"cut{cut}", damage, **kw) as wal:
            model = models[len(batches) - 1 + (cut >= end_of_entries)]
            assert_same(wal, model)
            if cut % 8 == 0:  # and the log goes on from there
                more = [GroupWrite(0, entries(5, 9, 1), HardState(5, 1, 9))]
                wal.write_sync(more)
                model = model.copy()
                model.write(more)
        if cut % 8 == 0:
            with WAL.open(str(tmp_path / f"cut{cut}"), **kw) as wal:
                assert_same(wal, model)
        shutil.rmtree(tmp_path / f"cut{cut}")


def test_random_byte_flips_in_the_last_records(tmp_path: Path) -> None:
    batches = [[GroupWrite(k % 3, entries(1, k // 3 + 1, 1, tag=b"%d" % k))] for k in range(12)]
    models = models_after(batches)
    src = tmp_path / "src"
    written = build(src, batches, preallocate=False)
    (segment,) = segments(src)
    name = f"{segment:016x}.wal"
    rng = random.Random(3)
    for trial in range(40):
        r = rng.randrange(len(batches) - 4, len(batches))  # one of the last four records
        loc = written[r].done[0].locations[0]
        at = loc.offset + rng.randrange(loc.length)
        flip = rng.randrange(1, 256)

        def damage(d: Path, at: int = at, flip: int = flip) -> None:
            with open(d / name, "r+b") as f:
                f.seek(at)
                byte = f.read(1)[0]
                f.seek(at)
                f.write(bytes([byte ^ flip]))

        with reopened(src, tmp_path / f"flip{trial}", damage, preallocate=False) as wal:
            assert_same(wal, models[r])
        shutil.rmtree(tmp_path / f"flip{trial}")


def test_a_torn_new_segment_and_a_lost_tail_before_a_later_segment(tmp_path: Path) -> None:
    batches = [[GroupWrite(k % 2, entries(1, k // 2 + 1, 1, size=300))] for k in range(30)]
    models = models_after(batches)
    src = tmp_path / "src"
    written = build(src, batches, segment_bytes=2048, preallocate=False)
    segs = segments(src)
    assert len(segs) >= 3
    # The newest segment is cut inside its first record (its header): it goes, nothing else.
    last_seg = [k for k, w in enumerate(written) if w.done[0].locations[0].segment == segs[-1]]

    def cut_header(d: Path) -> None:
        os.truncate(d / f"{segs[-1]:016x}.wal", 5)

    with reopened(src, tmp_path / "a", cut_header, preallocate=False) as wal:
        assert_same(wal, models[last_seg[0]])

    def empty(d: Path) -> None:  # created, but nothing written reached the disk
        os.truncate(d / f"{segs[-1]:016x}.wal", 0)

    with reopened(src, tmp_path / "a0", empty, preallocate=False) as wal:
        assert_same(wal, models[last_seg[0]])
    # A record in the middle segment is lost: recovery keeps what was before it and drops the rest.
    mid = [k for k, w in enumerate(written) if w.done[0].locations[0].segment == segs[1]]
    loc = written[mid[1]].done[0].locations[0]

    def cut_middle(d: Path) -> None:
        os.truncate(d / f"{segs[1]:016x}.wal", loc.offset)

    with reopened(src, tmp_path / "b", cut_middle, preallocate=False) as wal:
        assert_same(wal, models[mid[1]])
        assert segments(tmp_path / "b") == [*segs[:2], segs[1] + 1]  # and a fresh segment


# -- snapshots, compaction and segment deletion --------------------------------------------------


def test_snapshot_compaction_and_segment_deletion_cycle(tmp_path: Path) -> None:
    """Groups 1 and 2 snapshot every 10 rounds (keeping 3 entries), group 3 gets a snapshot from
    its leader every 20: old segments go, and so do superseded snapshot files."""
    model = Model()
    seen: set[int] = set()
    wal = WAL.open(str(tmp_path), segment_bytes=2048, cache_bytes_max=1024)
    for rnd in range(1, 121):
        batch = [GroupWrite(g, entries(1, rnd, 1, size=60), HardState(1, 1, rnd)) for g in (1, 2)]
        if rnd % 20 == 0:
            batch.append(GroupWrite(3, snapshot=snap(rnd + 5, 2, b"from leader %d" % rnd)))
        else:
            batch.append(GroupWrite(3, entries(2, rnd + 5 if rnd > 20 else rnd, 1, size=60)))
        wal.write_sync(batch)
        model.write(batch)
        if rnd % 10 == 0:
            for g in (1, 2):
                s = snap(rnd - 3, 1, b"app %d at %d" % (g, rnd - 3))
                wal.save_snapshot(g, s)
                model.write([GroupWrite(g, compact=s)])
        if rnd % 7 == 0:  # reads from old segments, whose files are later deleted
            assert_same(wal, model)
        settle(wal)
        seen.update(segments(tmp_path))
        assert len(segments(tmp_path)) <= 7
        assert len(snapshot_files(tmp_path)) <= 3
    assert_same(wal, model)
    assert wal.stats.segments_deleted >= 10
    assert min(segments(tmp_path)) > min(seen)
    wal.close()
    with WAL.open(str(tmp_path), segment_bytes=2048, cache_bytes_max=1024) as wal:
        assert_same(wal, model)


# -- memory --------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_an_eviction_frees_a_slice_of_the_cache_budget_not_a_quarter(tmp_path: Path) -> None:
    """Crossing the budget trims the caches to ``budget - budget // EVICT_SLICE``, levelled over
    the largest ones: small, frequent evictions instead of one long stall (docs/raft.md)."""
    budget, size, groups = 64 << 10, 100, 4
    goal = budget - budget // wal_storage.EVICT_SLICE
    with WAL.open(str(tmp_path), cache_bytes_max=budget, preallocate=False) as wal:
        index, evictions, before = 0, 0, 0
        while evictions < 3:
            index += 1
            wal.write_sync([GroupWrite(g, entries(1, index, 1, size=size)) for g in range(groups)])
            now = wal.cached_bytes
            if now < before:  # an eviction: levelled down to the goal, each cache within an entry
                evictions += 1
                assert before - now <= budget // 16 + groups * size  # a slice, not a quarter
                assert goal - groups * size < now <= goal
                sizes = [wal.storage(g).cache_bytes for g in range(groups)]
                assert max(sizes) - min(sizes) <= size
            else:
                assert now <= budget
            before = now
        # every entry is still readable: from the cache or, evicted, from the segment
        for g in range(groups):
            got = wal.storage(g).entries(1, index + 1, None)
            assert [e.index for e in got] == list(range(1, index + 1))
            assert got[0].data == entries(1, 1, 1, size=size)[0].data


@pytest.mark.slow
def test_memory_stays_bounded_while_1_gib_is_appended(tmp_path: Path) -> None:
    size, groups, per_batch = 256 << 10, 4, 4
    total = 1 << 30
    rounds = total // (size * groups * per_batch)
    filler = bytes(size - 8)
    cache = 8 << 20
    path = tmp_path / "wal"
    try:
        with WAL.open(str(path), cache_bytes_max=cache) as wal:
            base = rss_bytes()
            peak = base
            for r in range(rounds):
                first = r * per_batch + 1
                batch = [
                    GroupWrite(
                        g,
                        [
                            Entry(1, i, data=struct.pack("<II", g, i) + filler)
                            for i in range(first, first + per_batch)
                        ],
                    )
                    for g in range(groups)
                ]
                wal.publish(wal.submit(batch).result())
                del batch
                peak = max(peak, rss_bytes())
            assert wal.stats.bytes >= total
            assert wal.cached_bytes <= cache
            # The cache, a batch or two in flight (entries and their encoding), allocator slack.
            assert peak - base < cache + (40 << 20), f"RSS grew by {(peak - base) >> 20} MiB"
            rng = random.Random(1)
            for _ in range(20):
                g, i = rng.randrange(groups), rng.randrange(1, rounds * per_batch // 2)
                got = wal.storage(g).entries(i, i + 2, None)
                assert [struct.unpack_from("<II", e.data) for e in got] == [(g, i), (g, i + 1)]
                assert all(len(e.data) == size for e in got)
            assert wal.stats.disk_reads >= 20
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- against MemoryStorage -----------------------------------------------------------------------


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    ops: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 18))):
        kind = draw(
            st.sampled_from(["append", "append", "append", "hs", "compact", "apply", "reopen"])
        )
        group = draw(st.sampled_from([1, 2]))
        ops.append((kind, group, draw(st.randoms(use_true_random=False))))
    return ops


def pick(rng: random.Random, lo: int, hi: int) -> int:
    """An index in [lo, hi], often at an edge."""
    lo = min(lo, hi)
    return (
        rng.choice([lo, lo + 1, hi - 1, hi, rng.randint(lo, hi)])
        if rng.random() < 0.7
        else (rng.randint(lo, hi))
    )


def run_operation(
    wal: WAL, model: MemoryStorage, group: int, kind: str, rng: random.Random
) -> None:
    first, last = model.first_index(), model.last_index()
    error: type[Exception] | None = None
    batch: list[GroupWrite] = []
    if kind == "append":
        start = max(1, pick(rng, first - 2, last + 1))
        term = rng.randint(1, 4)
        es = [
            Entry(term + (k > 1), start + k, data=rng.randbytes(rng.randint(0, 90)))
            for k in range(rng.randint(1, 5))
        ]
        model.append(es)
        batch = [GroupWrite(group, es)]
    elif kind == "hs":
        hs = HardState(rng.randint(0, 5), rng.randint(0, 3), rng.randint(0, 9))
        model.set_hard_state(hs)
        batch = [GroupWrite(group, hard_state=hs)]
    elif kind == "compact":
        index = max(0, pick(rng, first - 2, last))
        s = snap(index, model.term(index) if index >= first - 1 else 0, rng.randbytes(8))
        try:
            model.create_snapshot(index, s.meta.conf_state, s.data)
            model.compact(index)
        except SnapshotOutOfDate as e:
            error = type(e)
        batch = [GroupWrite(group, compact=s)]
    elif kind == "apply":
        index = max(0, pick(rng, first - 3, last + 4))
        term = model.term(index) if first - 1 <= index <= last and rng.random() < 0.5 else 7
        s = snap(index, term, rng.randbytes(5), (1,))
        try:
            model.apply_snapshot(s)
        except SnapshotOutOfDate as e:
            error = type(e)
        batch = [GroupWrite(group, snapshot=s)]
    if error is not None:
        with pytest.raises(error):
            wal.write_sync(batch)
    else:
        wal.write_sync(batch)


@settings(max_examples=40, deadline=None)
@given(operations())
def test_wal_storage_matches_memory_storage(ops: list[tuple[Any, ...]]) -> None:
    """Tiny segments (rolls and deletions), a tiny cache (reads from disk) and tiny records
    (a write spans several) against MemoryStorage, across reopens."""
    options = {"segment_bytes": 700, "cache_bytes_max": 100}
    models = {1: MemoryStorage(), 2: MemoryStorage()}
    with (
        tempfile.TemporaryDirectory() as path,
        mock.patch.object(wal_segments, "ENTRIES_RECORD_BYTES", 120),
    ):
        wal = WAL.open(path, **options)
        try:
            for kind, group, rng in ops:
                if kind == "reopen":
                    wal.close()
                    wal = WAL.open(path, **options)
                else:
                    run_operation(wal, models[group], group, kind, rng)
                for g, model in models.items():
                    assert observe(wal.storage(g)) == observe(model), (kind, g)
        finally:
            wal.close()


def test_a_torn_segment_head_does_not_lose_idle_groups_state(tmp_path: Path) -> None:
    """(found by the simulation, seeds 32, 142) A crash tore the head of a new segment (where
    every group's hard state and snapshot are re-written) at a record boundary; recovery went on
    appending to it, and once the previous segment was deleted an idle group's vote was lost."""
    path = str(tmp_path / "wal")

    def opened() -> WAL:
        return WAL.open(path, segment_bytes=4096, cache_bytes_max=1 << 20, preallocate=False)

    w = opened()
    for g in (1, 2):
        w.bootstrap(g, ConfState((1, 2, 3)))
    w.write_sync([GroupWrite(2, hard_state=HardState(7, 3, 3))])
    w.save_snapshot(2, Snapshot(SnapshotMeta(3, 1, ConfState((1, 2, 3))), b"g2"))
    i = 4
    while True:  # fill the active segment with group 1 until a write rolls to a new one
        before = segments(tmp_path / "wal")
        written = w.submit([GroupWrite(1, [Entry(1, i, data=b"x" * 200)], HardState(1, 0, i))])
        done = written.result()
        i += 1
        if segments(tmp_path / "wal") != before:
            break  # the crash happens during this write: never published
        w.publish(done)
    w.close()
    name = tmp_path / "wal" / f"{segments(tmp_path / 'wal')[-1]:016x}.wal"
    data = name.read_bytes()
    first = next(iter(Scanner(memoryview(data), RECORD_BYTES_MAX).records()))
    os.truncate(name, first.offset + first.length)  # only the segment header reached the disk
    w = opened()
    assert w.storage(2).hard_state == HardState(7, 3, 3)
    i = w.storage(1).last_index() + 1
    covered = i - 1
    for _ in range(3):
        w.write_sync([GroupWrite(1, [Entry(1, i, data=b"y" * 200)], HardState(1, 0, i))])
        i += 1
    w.save_snapshot(1, Snapshot(SnapshotMeta(covered, 1, ConfState((1, 2, 3))), b"g1"))
    w.close()
    w = opened()
    assert w.storage(2).hard_state == HardState(7, 3, 3)
    assert w.storage(2).snap_meta.index == 3
    w.close()
