"""Group tombstones in the write-ahead log (raft/wal.py): a group that left the node stays gone
across restarts, its segments and snapshot file are freed, and it can be hosted again from
nothing.  Also the format: a WAL written before tombstones existed reads unchanged (golden
files), and the tombstone record's bytes are pinned.  Regenerate the pinned record after a
deliberate change with ``REGEN_GOLDEN=1``; never the ``v1_*`` files (written by the code before
tombstones, they are what an old node left on disk)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from raft.errors import InvariantViolation
from raft.messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta
from raft.storage import MemoryStorage
from raft.wal import WAL, GroupWrite
from raft.wal_records import GroupTombstone, RecordType, Scanner
from raft.wal_segments import append_record

from .test_wal import Model, assert_same, entries, segments, settle, snap, snapshot_files

GOLDEN = Path(__file__).parent / "golden_wal"
REGEN = os.environ.get("REGEN_GOLDEN") == "1"


class TombModel(Model):
    """The model with tombstones: a removed group is a new, empty MemoryStorage."""

    def write(self, batch: Sequence[GroupWrite]) -> None:
        for w in batch:
            if w.remove:
                self.groups[w.group] = MemoryStorage()
            else:
                super().write([w])


def tomb(group: int, last_index: int = 0) -> GroupWrite:
    return GroupWrite(group, remove=True, last_index=last_index)


def write(wal: WAL, model: TombModel, batch: list[GroupWrite]) -> None:
    wal.write_sync(batch)
    model.write(batch)


def two_groups(wal: WAL, model: TombModel, rounds: int, size: int = 20) -> None:
    """Groups 1 and 2 append ``rounds`` entries each, one round per batch, from index 1."""
    for i in range(1, rounds + 1):
        write(
            wal, model, [GroupWrite(g, entries(1, i, 1, size), HardState(1, 1, i)) for g in (1, 2)]
        )


# -- format ----------------------------------------------------------------------------------------


def test_a_wal_written_before_tombstones_reads_unchanged(tmp_path: Path) -> None:
    """Golden files written by the code before this record type existed: group 1 (entries 1-4
    in two terms, a suffix replaced) and group 7 (two entries, then compacted at 2)."""
    for f in GOLDEN.glob("v1_*.hex"):
        (tmp_path / f.name[3:-4]).write_bytes(bytes.fromhex(f.read_text()))
    with WAL.open(str(tmp_path), preallocate=False) as wal:
        assert wal.groups() == [1, 7] and wal.removed_groups() == []
        s1 = wal.storage(1)
        assert s1.initial_state()[0] == HardState(2, 1, 4)
        assert s1.entries(1, 5, None) == [
            Entry(1, 1, data=b"a-1"), Entry(1, 2, data=b"a-2"),
            Entry(2, 3, data=b"c-3"), Entry(2, 4, data=b"c-4"),
        ]  # fmt: skip
        s7 = wal.storage(7)
        assert s7.initial_state() == (HardState(1, 2, 1), ConfState((1, 2, 3)))
        assert s7.snapshot() == Snapshot(SnapshotMeta(2, 1, ConfState((1, 2, 3))), b"state of 7")
        assert (s7.first_index(), s7.last_index()) == (3, 2)


def test_the_tombstone_record_bytes_are_pinned() -> None:
    buf = bytearray()
    length = append_record(buf, 42, GroupTombstone(1234))
    path = GOLDEN / "tombstone_record.hex"
    if REGEN:
        path.write_text(buf.hex() + "\n")
    assert buf.hex() == path.read_text().strip()
    assert length == len(buf) == 13 + 4  # msgpack [1234]: 0x91 0xcd 0x04 0xd2
    (record,) = Scanner(memoryview(bytes(buf)), 1 << 20).records()
    assert (record.type, record.group, record.payload) == (
        RecordType.TOMBSTONE, 42, GroupTombstone(1234),
    )  # fmt: skip


# -- removal and recovery --------------------------------------------------------------------------


def test_a_removed_group_is_empty_and_stays_removed_after_a_restart(tmp_path: Path) -> None:
    model = TombModel()
    with WAL.open(str(tmp_path), segment_bytes=4096) as wal:
        two_groups(wal, model, 5)
        write(wal, model, [GroupWrite(1, compact=snap(3, 1, b"app 1"))])
        assert len(snapshot_files(tmp_path)) == 1
        write(wal, model, [tomb(1, 5)])
        assert wal.removed(1) and not wal.removed(2) and wal.removed_groups() == [1]
        assert wal.groups() == [2]
        assert_same(wal, model)  # group 1: an empty storage, as a new group's
        settle(wal)
        assert snapshot_files(tmp_path) == []  # its snapshot file went with it
    with WAL.open(str(tmp_path), segment_bytes=4096) as wal:
        assert wal.removed_groups() == [1] and wal.groups() == [2]
        assert_same(wal, model)
        assert wal.storage(1).initial_state() == (HardState(), ConfState())


def test_a_crash_before_the_tombstone_is_durable_keeps_the_group(tmp_path: Path) -> None:
    """Cut the segment at every byte of the tombstone's write: the group comes back whole (the
    removal never happened: the node applies its removal again and writes it again); cut after
    it, the group is gone."""
    src = tmp_path / "src"
    before, after = TombModel(), TombModel()
    with WAL.open(str(src), preallocate=False) as wal:
        two_groups(wal, before, 4)
        after.groups = {g: s for g, s in before.copy().groups.items()}
        seg = src / f"{max(segments(src)):016x}.wal"
        start = seg.stat().st_size
        write(wal, after, [tomb(1, 4)])
        end = seg.stat().st_size
    assert end - start == 13 + 2
    for cut in range(start, end + 1):
        dst = tmp_path / f"cut{cut}"
        shutil.copytree(src, dst)
        os.truncate(dst / seg.name, cut)
        with WAL.open(str(dst), preallocate=False) as wal:
            durable = cut == end
            assert wal.removed(1) is durable, cut
            assert_same(wal, after if durable else before)
        shutil.rmtree(dst)


def test_a_group_hosted_again_after_its_tombstone_starts_empty(tmp_path: Path) -> None:
    """Records after the tombstone count, and only they: the group comes back as a learner
    does, from the leader's snapshot and the entries after it (or from index 1)."""
    model = TombModel()
    with WAL.open(str(tmp_path), segment_bytes=4096) as wal:
        two_groups(wal, model, 6)
        write(wal, model, [tomb(1, 6)])
        assert wal.storage(1).last_index() == 0
        # Hosted again: the leader's snapshot at 9, then entries from 10, in one batch.
        write(wal, model, [
            GroupWrite(1, snapshot=snap(9, 3, b"leader's state at 9")),
            GroupWrite(1, entries(3, 10, 3), HardState(3, 0, 12)),
        ])  # fmt: skip
        assert not wal.removed(1) and wal.groups() == [1, 2]
        assert_same(wal, model)
        # Removed and hosted again in one batch (a tombstone, then entries from 1).
        write(wal, model, [tomb(2, 6), GroupWrite(2, entries(4, 1, 2, tag=b"new"))])
        assert not wal.removed(2)
        assert_same(wal, model)
    with WAL.open(str(tmp_path), segment_bytes=4096) as wal:
        assert wal.removed_groups() == []
        assert_same(wal, model)
        assert wal.storage(2).entries(1, 3, None)[0].data.startswith(b"new")


def test_a_tombstone_write_carries_nothing_else(tmp_path: Path) -> None:
    with WAL.open(str(tmp_path)) as wal:
        bad = GroupWrite(1, entries(1, 1, 1), remove=True)
        with pytest.raises(InvariantViolation, match="tombstone"):
            wal.submit([bad])


def test_segments_held_only_by_a_removed_group_are_deleted_and_it_stays_removed(
    tmp_path: Path,
) -> None:
    """Group 1 fills several segments; group 2 is small and compacts as it goes.  Removing
    group 1 frees every old segment; more writes roll segments past the tombstone's own, which
    is deleted too: the tombstone lives on in the new segments' heads, so a restart still
    knows that group 1 left (and a node bootstrapping its groups does not bring it back)."""
    model = TombModel()
    kw: dict[str, Any] = {"segment_bytes": 2048, "cache_bytes_max": 1024}
    with WAL.open(str(tmp_path), **kw) as wal:
        for i in range(1, 61):
            write(wal, model, [GroupWrite(1, entries(1, i, 1, 100), HardState(1, 1, i))])
            if i % 10 == 0:
                write(wal, model, [GroupWrite(2, entries(1, i // 10, 1), HardState(1, 1, i // 10))])
                write(wal, model, [GroupWrite(2, compact=snap(i // 10, 1, b"two"))])
        settle(wal)
        held = segments(tmp_path)
        assert len(held) >= 4  # group 1's entries hold them all
        write(wal, model, [tomb(1, 60)])
        settle(wal)
        assert segments(tmp_path) == [held[-1]]  # only the active one is left
        tomb_segment = held[-1]
        for i in range(7, 60):  # group 2 rolls and compacts past the tombstone's segment
            write(wal, model, [GroupWrite(2, entries(1, i, 1, 100), HardState(1, 1, i))])
            write(wal, model, [GroupWrite(2, compact=snap(i, 1, b"two"))])
        settle(wal)
        assert min(segments(tmp_path)) > tomb_segment
        assert_same(wal, model)
    with WAL.open(str(tmp_path), **kw) as wal:
        assert wal.removed_groups() == [1]
        assert_same(wal, model)
