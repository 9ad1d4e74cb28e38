"""The writer side of the WAL: segment files, group-commit rounds and snapshot files.

``SegmentWriter`` runs on the WAL's writer thread (and, before that thread starts, on the thread
that opens the WAL and replays it).  It owns the active segment's file descriptor and the
bookkeeping that decides what to write and what may be deleted:

- each group's latest hard state and snapshot record, and the tombstone of each group removed
  from this node (and not hosted again since), re-written at the head of every new segment, so
  that an old segment holds nothing needed but entries;
- per segment, the largest entry index each group has there (lowered when a later record
  replaces that suffix, dropped when a snapshot from the leader replaces the whole log or a
  tombstone the whole group);
- each group's snapshot index.  The oldest segments are obsolete once every group's entries in
  them are covered by that group's snapshot.  Only a prefix of the segments is ever deleted, so
  the surviving ones replay every record written after the first of them, including each
  snapshot that replaced a log.

A round (``write_round``) is all batches submitted since the previous round: snapshot files
first (each written, fsynced and renamed, then one directory fsync), then every record of every
batch in one positional write and one fdatasync.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum

import msgspec
from crc32c import crc32c

from .errors import InvariantViolation, check
from .messages import Entry, HardState, Snapshot
from .wal_records import (
    FORMAT_VERSION,
    GROUP_MAX,
    HEADER,
    HEADER_BYTES,
    RECORD_BYTES_MAX,
    TYPE_CODES,
    EntriesRecord,
    GroupTombstone,
    Payload,
    SegmentHeader,
    SnapshotRecord,
)
from .wal_storage import Location

# a record's effect on the bookkeeping
_Note = SnapshotRecord | HardState | GroupTombstone | tuple[int, int]
ENTRIES_RECORD_BYTES = 1 << 20  # payload per ENTRIES record (an entry may exceed it alone)
_SEGMENT_RE = re.compile(r"^([0-9a-f]{16})\.wal$")
_SNAPSHOT_RE = re.compile(r"^([0-9a-f]{8})-([0-9a-f]{16})-([0-9a-f]{8})\.snap$")
_SNAPSHOT_HEADER = struct.Struct("<4sIQ")  # magic, CRC32C of the data, data length
_SNAPSHOT_MAGIC = b"RSN1"
_ZEROS = bytes(HEADER_BYTES)  # a record's header, before it is filled in
_CRC = struct.Struct("<I")
_COPY_BYTES_MAX = 4096
_encoder = msgspec.msgpack.Encoder()
# Upper bounds of the fsync-time buckets (``Stats.fsync_buckets``; ``le`` semantics, then one
# bucket above the last bound): 0.1 ms (a disk with a write cache) … 5 s (a stalled one).
FSYNC_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip


def segment_name(seq: int) -> str:
    return f"{seq:016x}.wal"


def parse_segment_name(name: str) -> int | None:
    m = _SEGMENT_RE.match(name)
    return int(m.group(1), 16) if m else None


def snapshot_name(group: int, index: int, n: int) -> str:
    return f"{group:08x}-{index:016x}-{n:08x}.snap"


def parse_snapshot_name(name: str) -> int | None:
    """The file's counter ``n`` if ``name`` names a snapshot file."""
    m = _SNAPSHOT_RE.match(name)
    return int(m.group(3), 16) if m else None


class GroupWrite:
    """What one group persists in one loop iteration, written in this order.

    ``snapshot``: a snapshot received from the leader (``Ready.snapshot``): replaces the whole log.
    ``compact``: a snapshot the application took at its applied index: drops entries up to it.
    ``entries``: appended, replacing the stored suffix from ``entries[0].index``.
    ``hard_state``: the group's new hard state.
    ``remove``: the group leaves this node (a tombstone record): everything written for it
    before is void.  Such a write carries nothing else; ``last_index`` is recorded with it.

    Never changed once made.  One or more per append on every node: a plain class, so that
    compiled its ``__init__`` is native (a dataclass's stays interpreted).
    """

    __slots__ = ("compact", "entries", "group", "hard_state", "last_index", "remove", "snapshot")

    def __init__(
        self,
        group: int,
        entries: Sequence[Entry] = (),
        hard_state: HardState | None = None,
        snapshot: Snapshot | None = None,
        compact: Snapshot | None = None,
        remove: bool = False,
        last_index: int = 0,
    ) -> None:
        self.group = group
        self.entries = entries
        self.hard_state = hard_state
        self.snapshot = snapshot
        self.compact = compact
        self.remove = remove
        self.last_index = last_index

    def __repr__(self) -> str:
        if self.remove:
            return f"GroupWrite({self.group}, remove, last_index={self.last_index})"
        return (
            f"GroupWrite({self.group}, {len(self.entries)} entries, {self.hard_state!r}, "
            f"snapshot={self.snapshot is not None}, compact={self.compact is not None})"
        )


class Done:
    """One GroupWrite as written: the snapshot's file and where its entry records lie (a
    plain class, as ``GroupWrite``)."""

    __slots__ = ("locations", "snapshot_file", "write")

    def __init__(self, write: GroupWrite, snapshot_file: str, locations: list[Location]) -> None:
        self.write = write
        self.snapshot_file = snapshot_file
        self.locations = locations


class WriteMode(Enum):
    """How a WAL's ``submit`` writes, reported by the WAL (``WAL.mode``) for its caller to plan
    around: ``THREAD``, a writer thread does, and ``submit`` returns a pending Future;
    ``INLINE``, ``submit`` writes and syncs on the caller's thread and returns a resolved one
    (the caller waits for the disk: what it means to send before the write must leave first)."""

    THREAD = "thread"
    INLINE = "inline"


class Written:
    """A durable batch, to be published to the views (``WAL.publish``) in submission order
    (a plain class, as ``GroupWrite``)."""

    __slots__ = ("done", "obsolete_segments", "seq")

    def __init__(self, seq: int, done: list[Done]) -> None:
        self.seq = seq
        self.done = done
        self.obsolete_segments: list[int] = []


@dataclass(slots=True)
class Stats:
    """Counters of the writer thread (read from anywhere; for metrics)."""

    fsyncs: int = 0  # fdatasyncs of segments (one per round)
    dir_fsyncs: int = 0
    writes: int = 0  # positional writes of segments (one per round)
    rounds: int = 0
    batches: int = 0
    records: int = 0
    bytes: int = 0
    last_round_batches: int = 0  # batches coalesced into the last write
    last_round_bytes: int = 0
    fsync_seconds_last: float = 0.0
    fsync_seconds_max: float = 0.0
    fsync_seconds_total: float = 0.0
    # fsyncs of segments by time: fsync_buckets[i] counts those with FSYNC_BUCKETS_S[i - 1] <
    # seconds <= FSYNC_BUCKETS_S[i]; the last, those above every bound
    fsync_buckets: list[int] = field(default_factory=lambda: [0] * (len(FSYNC_BUCKETS_S) + 1))
    segments_created: int = 0
    segments_deleted: int = 0
    snapshot_files: int = 0
    disk_reads: int = 0  # entries read back from segments (on the owner's thread)


class SegmentWriter:
    def __init__(self, path: str, dir_fd: int, segment_bytes: int, preallocate: bool) -> None:
        self.path = path
        self.dir_fd = dir_fd
        self.segment_bytes = segment_bytes
        self.preallocate = preallocate
        self.stats = Stats()
        self.hard_states: dict[int, HardState] = {}
        self.snapshots: dict[int, SnapshotRecord] = {}
        self.tombstones: dict[int, GroupTombstone] = {}  # groups removed, not hosted again since
        self.maxima: dict[int, dict[int, int]] = {}  # segment -> group -> largest entry index
        self.group_max: dict[int, int] = {}  # group -> largest entry index in any segment
        self.snapshot_counter = 0
        self.active = 0
        self.fd = -1
        self.end = 0  # bytes of records in the active segment
        self.head_end = 0  # where its head (header and re-written records) ends

    # -- bookkeeping (live rounds and recovery) -----------------------------------------------
    def note_entries(self, segment: int, group: int, first: int, last: int) -> None:
        if self.tombstones:
            self.tombstones.pop(group, None)
        if first <= self.group_max.get(group, 0):  # a suffix is replaced: it is dead everywhere
            for maxima in self.maxima.values():
                if maxima.get(group, 0) >= first:
                    maxima[group] = first - 1
        maxima = self.maxima[segment]
        maxima[group] = max(maxima.get(group, 0), last)
        self.group_max[group] = last

    def note_snapshot(self, group: int, record: SnapshotRecord) -> None:
        if self.tombstones:
            self.tombstones.pop(group, None)
        self.snapshots[group] = record
        if record.replace:  # every entry written before is dead
            for maxima in self.maxima.values():
                maxima.pop(group, None)
            self.group_max[group] = record.meta.index

    def note_hard_state(self, group: int, hard_state: HardState) -> None:
        if self.tombstones:
            self.tombstones.pop(group, None)
        self.hard_states[group] = hard_state

    def note_tombstone(self, group: int, record: GroupTombstone) -> None:
        """The group left: none of its records written so far is needed any more."""
        self.tombstones[group] = record
        self.snapshots.pop(group, None)
        self.hard_states.pop(group, None)
        self.group_max.pop(group, None)
        for maxima in self.maxima.values():
            maxima.pop(group, None)

    def obsolete(self) -> list[int]:
        """Forget and return the oldest segments whose entries the snapshots cover."""
        out: list[int] = []
        for seq, maxima in self.maxima.items():
            if seq == self.active or any(
                m > self._snapshot_index(g) for g, m in maxima.items() if m > 0
            ):
                break
            out.append(seq)
        for seq in out:
            del self.maxima[seq]
        return out

    def _snapshot_index(self, group: int) -> int:
        record = self.snapshots.get(group)
        return record.meta.index if record is not None else 0

    # -- segments ----------------------------------------------------------------------------
    def resume(self, seq: int, end: int, head_end: int) -> None:
        """Append to the existing segment ``seq`` from ``end`` (after recovery)."""
        self.active, self.end, self.head_end = seq, end, head_end
        self.fd = os.open(self._file(segment_name(seq)), os.O_WRONLY | os.O_CLOEXEC)
        os.ftruncate(self.fd, end)  # drop a torn tail (and the zero padding: re-allocated below)
        self._allocate()
        os.fsync(self.fd)

    def start_segment(self) -> None:
        """Create the next segment with its head and make it durable (at open)."""
        head = self._roll()
        self._pwrite([head], 0)
        self._sync(dir_too=True)
        self.end = self.head_end = len(head)

    def _roll(self) -> bytearray:
        """Open segment active+1 for writing and return its head (not yet written)."""
        header = SegmentHeader(FORMAT_VERSION, self.active + 1, self.active, self.end)
        if self.fd >= 0:
            os.close(self.fd)
        self.active += 1
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        self.fd = os.open(self._file(segment_name(self.active)), flags, 0o644)
        self.end = self.head_end = 0
        self.maxima[self.active] = {}
        self.stats.segments_created += 1
        self._allocate()
        head = bytearray()
        append_record(head, 0, header)
        for g in sorted(self.snapshots.keys() | self.hard_states.keys() | self.tombstones.keys()):
            tomb = self.tombstones.get(g)
            if tomb is not None:  # (a removed group has nothing else)
                append_record(head, g, tomb)
            snap = self.snapshots.get(g)
            if snap is not None:  # as a compaction: the entries written after it stay
                append_record(head, g, msgspec.structs.replace(snap, replace=False))
            hs = self.hard_states.get(g)
            if hs is not None:
                append_record(head, g, hs)
        self.stats.records += 1 + len(self.snapshots) + len(self.hard_states) + len(self.tombstones)
        return head

    def _allocate(self) -> None:
        if self.preallocate:
            try:
                os.posix_fallocate(self.fd, 0, self.segment_bytes)
            except OSError:
                self.preallocate = False  # e.g. not supported by the file system

    # -- rounds ------------------------------------------------------------------------------
    def write_round(self, batches: list[tuple[int, list[GroupWrite]]]) -> list[Written]:
        """Write ``batches`` (sequence number, writes) durably; one write and one fdatasync."""
        files = iter(self._write_snapshot_files(batches))
        body = bytearray()
        notes: list[tuple[int, _Note]] = []  # one per record, applied once the round is durable
        plans = [(seq, [self._encode(w, files, body, notes) for w in ws]) for seq, ws in batches]
        rolled = bool(body) and self.end + len(body) > self.segment_bytes
        rolled = rolled and self.end > self.head_end  # a head-only segment takes any write
        head = self._roll() if rolled else bytearray()
        base = self.end + len(head)
        if body:
            self._pwrite([head, body], self.end)
            self._sync(dir_too=rolled)
            self.end = base + len(body)
            if rolled:
                self.head_end = len(head)
        for group, note in notes:
            self._note(group, note)
        out = [
            Written(
                seq,
                [
                    Done(w, name, [Location(f, self.active, base + at, n) for f, at, n in spans])
                    for w, name, spans in plan
                ],
            )
            for seq, plan in plans
        ]
        if out and (
            rolled or any(isinstance(n, (SnapshotRecord, GroupTombstone)) for _, n in notes)
        ):
            out[-1].obsolete_segments.extend(self.obsolete())
        st = self.stats
        st.rounds += 1
        st.batches += len(batches)
        st.records += len(notes)
        st.bytes += len(head) + len(body)
        st.last_round_batches = len(batches)
        st.last_round_bytes = len(head) + len(body)
        return out

    def _encode(
        self, w: GroupWrite, files: Iterator[str], body: bytearray, notes: list[tuple[int, _Note]]
    ) -> tuple[GroupWrite, str, list[tuple[int, int, int]]]:
        """Append ``w``'s records to ``body``: (w, snapshot file, [(first index, at, length)])."""
        name = ""
        if w.remove:
            tomb = GroupTombstone(w.last_index)
            append_record(body, w.group, tomb)
            notes.append((w.group, tomb))
            return w, name, []
        snap = w.snapshot if w.snapshot is not None else w.compact
        if snap is not None:
            name = next(files)
            record = SnapshotRecord(snap.meta, name, w.snapshot is not None)
            append_record(body, w.group, record)
            notes.append((w.group, record))
        spans = []
        for chunk in _chunks(w.entries):
            at, first = len(body), chunk.entries[0].index
            spans.append((first, at, append_record(body, w.group, chunk)))
            notes.append((w.group, (first, chunk.entries[-1].index)))
        if w.hard_state is not None:
            append_record(body, w.group, w.hard_state)
            notes.append((w.group, w.hard_state))
        return w, name, spans

    def _note(self, group: int, note: _Note) -> None:
        if isinstance(note, SnapshotRecord):
            self.note_snapshot(group, note)
        elif isinstance(note, HardState):
            self.note_hard_state(group, note)
        elif isinstance(note, GroupTombstone):
            self.note_tombstone(group, note)
        else:
            self.note_entries(self.active, group, note[0], note[1])

    def _pwrite(self, chunks: list[bytearray], offset: int) -> None:
        chunks = [c for c in chunks if c]
        total = sum(len(c) for c in chunks)
        n = os.pwritev(self.fd, chunks, offset)
        self.stats.writes += 1
        if n < total:  # rare (a signal, a full disk): finish the rest
            rest = memoryview(b"".join(chunks))[n:]
            while rest:
                k = os.pwrite(self.fd, rest, offset + n)
                check(k > 0, "short write to a WAL segment")
                rest, n = rest[k:], n + k

    def _sync(self, dir_too: bool) -> None:
        t = time.perf_counter()
        os.fdatasync(self.fd)
        dt = time.perf_counter() - t
        st = self.stats
        st.fsyncs += 1
        st.fsync_seconds_last = dt
        st.fsync_seconds_total += dt
        st.fsync_seconds_max = max(st.fsync_seconds_max, dt)
        st.fsync_buckets[bisect_left(FSYNC_BUCKETS_S, dt)] += 1
        if dir_too:
            self.fsync_dir()

    def fsync_dir(self) -> None:
        os.fsync(self.dir_fd)
        self.stats.dir_fsyncs += 1

    # -- snapshot files and deletion ---------------------------------------------------------
    def _write_snapshot_files(self, batches: list[tuple[int, list[GroupWrite]]]) -> list[str]:
        names = []
        for _, writes in batches:
            for w in writes:
                snap = w.snapshot if w.snapshot is not None else w.compact
                if snap is not None:
                    self.snapshot_counter += 1
                    name = snapshot_name(w.group, snap.meta.index, self.snapshot_counter)
                    self._write_snapshot_file(name, snap.data)
                    names.append(name)
        if names:
            self.fsync_dir()  # the renames are durable before any record names the files
        return names

    def _write_snapshot_file(self, name: str, data: bytes) -> None:
        tmp = self._file(name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            header = _SNAPSHOT_HEADER.pack(_SNAPSHOT_MAGIC, crc32c(data), len(data))
            os.write(fd, header)
            view = memoryview(data)
            while view:
                # Not view[os.write(fd, view):]: mypyc (2.4) evaluates a memoryview slice's
                # start twice, which wrote the data twice (the simulation caught it).
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self._file(name))
        self.stats.snapshot_files += 1

    def unlink(self, names: list[str]) -> None:
        """Delete files no longer needed (oldest segments first), then fsync the directory."""
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._file(name))
            if parse_segment_name(name) is not None:
                self.stats.segments_deleted += 1
        self.fsync_dir()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)


def load_snapshot_file(path: str) -> bytes:
    with open(path, "rb") as f:
        header = f.read(_SNAPSHOT_HEADER.size)
        data = f.read()
    check(len(header) == _SNAPSHOT_HEADER.size, f"snapshot file {path} is short")
    magic, crc, length = _SNAPSHOT_HEADER.unpack(header)
    check(magic == _SNAPSHOT_MAGIC and length == len(data), f"snapshot file {path} is damaged")
    check(crc32c(data) == crc, f"snapshot file {path} fails its CRC")
    return data


def append_record(buf: bytearray, group: int, payload: Payload) -> int:
    """Encode one record at the end of ``buf`` (the format of raft/wal_records.py); return its
    length, header included.  Here rather than there so that it is compiled: every round
    writes one or two records for each group it carries."""
    if not 0 <= group <= GROUP_MAX:
        raise InvariantViolation(f"group {group} out of range")
    start = len(buf)
    buf += _ZEROS
    _encoder.encode_into(payload, buf, -1)
    length = len(buf) - start
    if length > RECORD_BYTES_MAX:
        raise InvariantViolation(f"record of {length} bytes is too long")
    HEADER.pack_into(buf, start, length - HEADER_BYTES, 0, TYPE_CODES[type(payload)], group)
    # (a small record's copy costs less than a memoryview and its slice)
    tail = buf[start + 8 :] if length <= _COPY_BYTES_MAX else memoryview(buf)[start + 8 :]
    _CRC.pack_into(buf, start + 4, crc32c(tail))
    return length


def _chunks(entries: Sequence[Entry]) -> list[EntriesRecord]:
    """Split entries into records of about ENTRIES_RECORD_BYTES of payload each."""
    out: list[EntriesRecord] = []
    start, size = 0, 0
    for k, e in enumerate(entries):
        if size and size + len(e.data) > ENTRIES_RECORD_BYTES:
            out.append(EntriesRecord(list(entries[start:k])))
            start, size = k, 0
        size += len(e.data)
    if start < len(entries):
        out.append(EntriesRecord(list(entries[start:])))
    return out
