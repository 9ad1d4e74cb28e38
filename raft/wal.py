"""The write-ahead log of a node, shared by all its Raft groups (design §3.3, docs/raft.md "WAL").

One directory holds numbered segment files (``0000000000000001.wal`` ...) and one file per
snapshot.  Records, their format and checksums: raft/wal_records.py.  Segments, group commit and
snapshot files: raft/wal_segments.py.  Each group's durable view (``GroupStorage``, the core's
``Storage``): raft/wal_storage.py.

Threads and the view-update rule:

- One *owner* thread (the driver's event loop) calls ``submit``, ``publish``, ``write_sync``,
  ``save_snapshot`` and reads the views.  ``submit`` is also safe from other threads, except for
  a batch with a ``compact`` write (checked against the views).
- ``submit(batch)`` checks the batch against what was submitted before (as ``MemoryStorage``
  would: ``SnapshotOutOfDate``, gaps), queues it and returns a Future.  The writer thread writes
  every batch queued since its last round in one write and one fdatasync, then resolves their
  Futures with a ``Written``.
- ``publish(written)``, on the owner thread and in submission order, applies the durable batch
  to the views.  The driver publishes a batch before it calls ``RawNode.advance`` for the
  Readies in it.  Until then the views show the state before the batch: they never show data
  that is not yet durable, and reads need no lock.
- Files that are no longer needed (obsolete segments, superseded snapshots) are deleted by the
  writer thread after the publish that made them obsolete.
- A group that leaves the node is written a tombstone (``GroupWrite(g, remove=True)``): once
  published, its view is forgotten (``storage(g)`` is a new, empty one) and ``removed(g)`` is
  true until something is written for the group again; recovery replays the same (records
  before a tombstone are void), so a restart never brings the group back.  Tombstones are
  re-written at the head of every new segment while they hold, so deleting old segments never
  forgets one.

``inline=True`` (``WAL.open``) has no writer thread (``mode`` is ``WriteMode.INLINE``, where it
is ``THREAD`` otherwise): ``submit`` writes and fdatasyncs the batch on the calling thread
before it returns an already-resolved Future, and deletes the files that earlier publishes made
obsolete first.  It saves the hand-offs between the two threads (waking the writer, the GIL
passed back and forth around each system call, waking the event loop; measured in
docs/benchmarks.md, "The WAL on the loop's thread") and costs the overlap: the caller waits for
the disk.  Everything else
(checks, views, publish, failure) is the same.

A failed write or fsync is not retried (its outcome on disk is unknown): the WAL stops and every
pending and later ``submit`` fails with ``WalFailed``.  The node must restart and recover.
"""

from __future__ import annotations

import fcntl
import itertools
import mmap
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from types import TracebackType

from .errors import InvariantViolation, SnapshotOutOfDate, WalFailed, check
from .messages import ConfState, Entry, HardState, Snapshot
from .storage import MemoryStorage, bootstrap
from .wal_records import (
    FORMAT_VERSION,
    GROUP_MAX,
    RECORD_BYTES_MAX,
    EntriesRecord,
    GroupTombstone,
    Record,
    RecordType,
    Scanner,
    SegmentHeader,
    SnapshotRecord,
    parse,
)
from .wal_segments import (
    Done,
    GroupWrite,
    SegmentWriter,
    Stats,
    WriteMode,
    Written,
    load_snapshot_file,
    parse_segment_name,
    parse_snapshot_name,
    segment_name,
)
from .wal_storage import CacheAccount, GroupStorage, Location, evict

__all__ = [
    "WAL",
    "Done",
    "GroupStorage",
    "GroupWrite",
    "Stats",
    "WalFailed",
    "WriteMode",
    "Written",
]

SEGMENT_BYTES = 64 << 20
CACHE_BYTES_MAX = 64 << 20
ROUND_BATCHES_MAX = 4096  # batches coalesced into one write at most


class _Shape:
    """A group's log as submitted so far (durable or not): what the next batch is checked on.
    Hot-path records are plain classes: compiled, their ``__init__`` is native; a dataclass's
    stays interpreted."""

    __slots__ = ("last", "snap")

    def __init__(self, snap: int, last: int) -> None:
        self.snap = snap
        self.last = last


class _Pending:
    __slots__ = ("future", "seq", "writes")

    def __init__(self, seq: int, writes: list[GroupWrite], future: Future[Written]) -> None:
        self.seq = seq
        self.writes = writes
        self.future = future


class WAL:
    def __init__(
        self,
        path: str | os.PathLike[str],
        segment_bytes: int,
        cache_bytes_max: int,
        preallocate: bool,
        inline: bool,
    ) -> None:
        """Use ``WAL.open``."""
        self.mode = WriteMode.INLINE if inline else WriteMode.THREAD
        check(segment_bytes > 0 and cache_bytes_max >= 0, "segment and cache sizes")
        path = self.path = os.fspath(path)
        self.cache_bytes_max = cache_bytes_max
        if not os.path.isdir(path):
            os.makedirs(path)
            _fsync_dir(os.path.dirname(os.path.abspath(path)))  # the new directory's entry
        self._dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._lock_fd = os.open(os.path.join(path, "LOCK"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            os.close(self._dir_fd)
            raise
        self._writer = SegmentWriter(path, self._dir_fd, segment_bytes, preallocate)
        self._account = CacheAccount()
        self._views: dict[int, GroupStorage] = {}
        self._removed: set[int] = set()  # groups whose last record is a tombstone (published)
        self._read_fds: dict[int, int] = {}
        self._shapes: dict[int, _Shape] = {}
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._unlinks: list[str] = []
        self._submitted = 0
        self._published = 0
        self._failed: BaseException | None = None
        self._closing = False
        self._closed = False
        self._writer_thread: threading.Thread | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        segment_bytes: int = SEGMENT_BYTES,
        cache_bytes_max: int = CACHE_BYTES_MAX,
        preallocate: bool = True,
        inline: bool = False,
    ) -> WAL:
        """Open (or create) the WAL in directory ``path``, recover it and start its writer
        (none with ``inline``: ``submit`` writes on the caller's thread)."""
        wal = cls(path, segment_bytes, cache_bytes_max, preallocate, inline)
        try:
            wal._recover()
        except BaseException:
            wal._close_files()
            raise
        if inline:
            return wal
        wal._writer_thread = threading.Thread(target=wal._run, name="wal-writer", daemon=True)
        wal._writer_thread.start()
        return wal

    def close(self) -> None:
        """Write what was submitted, delete what was published as obsolete, stop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._writer_thread is not None:
            self._writer_thread.join()
            self._writer_thread = None
        elif self.mode is WriteMode.INLINE:
            with self._cond:
                unlinks = self._take_unlinks()
                if unlinks and self._failed is None:
                    self._writer.unlink(unlinks)
        self._close_files()

    def __enter__(self) -> WAL:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def stats(self) -> Stats:
        return self._writer.stats

    @property
    def cached_bytes(self) -> int:
        return self._account.bytes

    # -- views -------------------------------------------------------------------------------
    def storage(self, group: int) -> GroupStorage:
        """The durable view of ``group`` (empty if nothing was written for it)."""
        view = self._views.get(group)
        if view is None:
            check(0 <= group <= GROUP_MAX, f"group {group} out of range")
            view = self._views[group] = GroupStorage(group, self, self._account)
        return view

    def groups(self) -> list[int]:
        return sorted(self._views)

    def removed(self, group: int) -> bool:
        """Whether ``group`` left this node: its last durable record is a tombstone."""
        return group in self._removed

    def removed_groups(self) -> list[int]:
        return sorted(self._removed)

    def segment_count(self) -> int:
        """Segments on disk that are still needed (for a WAL-size compaction trigger)."""
        return len(self._writer.maxima)

    def oldest_segment_groups(self) -> list[int]:
        """The groups whose entries keep the oldest segment alive: compacting them frees it.
        Empty while only the active segment exists."""
        items = list(self._writer.maxima.items())  # one C-level copy: safe beside the writer
        if len(items) < 2:
            return []
        return sorted(g for g, m in dict(items[0][1]).items() if m > 0)

    # -- writes ------------------------------------------------------------------------------
    def submit(self, batch: Sequence[GroupWrite]) -> Future[Written]:
        """Queue ``batch`` for the next group commit; the Future resolves once it is durable."""
        with self._cond:
            if self._failed is not None:
                raise WalFailed("the WAL failed earlier") from self._failed
            check(not self._closing, "submit to a closed WAL")
            writes = self._normalize(batch)
            self._submitted += 1
            future: Future[Written] = Future()
            future.set_running_or_notify_cancel()  # a write cannot be cancelled
            if self.mode is WriteMode.INLINE:
                self._round([_Pending(self._submitted, writes, future)], self._take_unlinks())
                return future
            self._pending.append(_Pending(self._submitted, writes, future))
            self._cond.notify()
        return future

    def publish(self, written: Written) -> None:
        """Apply a durable batch to the views (owner thread, in order, before ``advance``)."""
        if written.seq != self._published + 1:
            raise InvariantViolation(f"publish {written.seq} after {self._published}")
        self._published = written.seq
        doomed: list[str] = []
        for done in written.done:
            w = done.write
            if w.remove:
                self._forget(w.group, doomed)
                continue
            if self._removed:
                self._removed.discard(w.group)
            view = self.storage(w.group)
            snap = w.snapshot if w.snapshot is not None else w.compact
            if snap is not None:
                if view.snap_file is not None:
                    doomed.append(view.snap_file)
                replace = w.snapshot is not None
                view.set_snapshot(snap.meta, done.snapshot_file, replace, lenient=False)
            if w.entries:
                view.append(list(w.entries), done.locations, lenient=False)
            if w.hard_state is not None:
                view.hard_state = w.hard_state
        evict(self._views.values(), self._account, self.cache_bytes_max)
        for seq in written.obsolete_segments:
            fd = self._read_fds.pop(seq, None)
            if fd is not None:
                os.close(fd)
            doomed.append(segment_name(seq))
        if doomed:
            with self._cond:
                self._unlinks.extend(doomed)
                self._cond.notify()

    def _forget(self, group: int, doomed: list[str] | None) -> None:
        """A tombstone of ``group`` is durable: drop its view (and its snapshot file)."""
        view = self._views.pop(group, None)
        if view is not None:
            if view.snap_file is not None and doomed is not None:
                doomed.append(view.snap_file)
            view.drop()
        self._removed.add(group)

    def write_sync(self, batch: Sequence[GroupWrite]) -> Written:
        """Submit, wait and publish (when nothing else is in flight: tests, tools, bootstrap)."""
        check(self._submitted == self._published, "write_sync with unpublished batches")
        written = self.submit(batch).result()
        self.publish(written)
        return written

    def save_snapshot(self, group: int, snapshot: Snapshot) -> None:
        """Persist an application snapshot taken at its applied index and compact up to it."""
        self.write_sync([GroupWrite(group, compact=snapshot)])

    def bootstrap(self, group: int, conf_state: ConfState) -> None:
        """Start a new group exactly as ``raft.storage.bootstrap`` starts a MemoryStorage."""
        memory = MemoryStorage()
        bootstrap(memory, conf_state)
        view = self.storage(group)
        check(view.last_index() == 0 and view.snap_meta.index == 0, "bootstrap of a used group")
        self.write_sync([GroupWrite(group, memory.ents[1:], memory.hard_state)])

    def _normalize(self, batch: Sequence[GroupWrite]) -> list[GroupWrite]:
        """Check ``batch`` as MemoryStorage would and drop entries the snapshots cover."""
        shapes: dict[int, _Shape] = {}
        out: list[GroupWrite] = []
        for w in batch:
            shape = shapes.get(w.group)
            if shape is None:
                known = self._shape(w.group)
                shape = shapes[w.group] = _Shape(known.snap, known.last)
            if w.snapshot is not None and w.compact is not None:  # (per write: no check call)
                raise InvariantViolation("a write with two snapshots")
            if w.remove:
                snapshot = w.snapshot if w.snapshot is not None else w.compact
                if w.entries or w.hard_state is not None or snapshot is not None:
                    raise InvariantViolation(f"group {w.group}: a tombstone with more in its write")
                shape.snap = shape.last = 0  # what follows starts the group anew
                out.append(w)
                continue
            if w.snapshot is not None:
                index = w.snapshot.meta.index
                if index < shape.snap:
                    raise SnapshotOutOfDate(f"{index} < {shape.snap}")
                shape.snap = shape.last = index
            if w.compact is not None:
                self._check_compact(w.group, w.compact, shape)
                shape.snap = w.compact.meta.index
            entries = _trim(w.entries, shape.snap)
            if entries:
                first = entries[0].index
                if first > shape.last + 1:
                    raise InvariantViolation(f"gap: appending {first} after {shape.last}")
                shape.last = entries[-1].index
            snapshot = w.snapshot if w.snapshot is not None else w.compact
            if entries or w.hard_state is not None or snapshot is not None:
                if entries is w.entries:  # nothing trimmed: the write as it came
                    out.append(w)
                else:
                    out.append(GroupWrite(w.group, entries, w.hard_state, w.snapshot, w.compact))
        self._shapes.update(shapes)
        return out

    def _shape(self, group: int) -> _Shape:
        """Every group with durable state got its shape at recovery; others start empty."""
        if not 0 <= group <= GROUP_MAX:
            raise InvariantViolation(f"group {group} out of range")
        return self._shapes.get(group) or _Shape(0, 0)

    def _check_compact(self, group: int, snap: Snapshot, shape: _Shape) -> None:
        index = snap.meta.index
        if index <= shape.snap:
            raise SnapshotOutOfDate(f"{index} <= {shape.snap}")
        check(index <= shape.last, f"snapshot index {index} > last {shape.last}")
        view = self.storage(group)
        check(index <= view.last, f"snapshot index {index} is not durable yet")
        check(view.term(index) == snap.meta.term, f"snapshot term differs at {index}")

    # -- rounds: on the writer thread, or inline on the caller's ------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._pending or self._unlinks or self._closing):
                    self._cond.wait()
                items = self._pending[:ROUND_BATCHES_MAX]
                del self._pending[: len(items)]
                unlinks = self._take_unlinks()
                if not items and not unlinks:
                    return  # closing, and nothing left to do
            self._round(items, unlinks)

    def _round(self, items: list[_Pending], unlinks: list[str]) -> None:
        """One group commit: delete ``unlinks``, write and sync ``items`` (one write, one
        fdatasync), resolve their Futures — or fail them, and the WAL for good.  Inline, the
        caller holds ``_cond`` (a re-entrant lock) throughout."""
        try:
            check(self._failed is None, "the WAL failed earlier")
            if unlinks:
                self._writer.unlink(unlinks)
            written = self._writer.write_round([(p.seq, p.writes) for p in items])
        except BaseException as e:
            with self._cond:
                self._failed = self._failed or e
            for p in items:
                error = WalFailed(f"WAL write failed: {self._failed!r}")
                error.__cause__ = self._failed
                p.future.set_exception(error)
            return
        for p, w in zip(items, written, strict=True):
            p.future.set_result(w)

    def _take_unlinks(self) -> list[str]:
        """The files earlier publishes made obsolete, handed to one round (under ``_cond``)."""
        unlinks, self._unlinks = self._unlinks, []
        return unlinks

    # -- Disk (reads for the views, on the owner thread) -------------------------------------
    def read_entries(self, group: int, segment: int, offset: int, length: int) -> list[Entry]:
        fd = self._read_fds.get(segment)
        if fd is None:
            name = os.path.join(self.path, segment_name(segment))
            fd = self._read_fds[segment] = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        payload = parse(os.pread(fd, length, offset), group, RecordType.ENTRIES)
        check(isinstance(payload, EntriesRecord), "entries record expected")
        self._writer.stats.disk_reads += 1
        return payload.entries if isinstance(payload, EntriesRecord) else []

    def load_snapshot(self, file: str) -> bytes:
        return load_snapshot_file(os.path.join(self.path, file))

    # -- recovery ----------------------------------------------------------------------------
    def _recover(self) -> None:
        names = os.listdir(self.path)
        for name in names:
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.path, name))
        counters = [n for name in names if (n := parse_snapshot_name(name)) is not None]
        self._writer.snapshot_counter = max(counters, default=0)
        segments = sorted(s for name in names if (s := parse_segment_name(name)) is not None)
        kept: tuple[int, int, int] | None = None  # (segment, end, head end) of the last good one
        doomed: list[int] = []
        for k, seq in enumerate(segments):
            result = self._replay_segment(seq, kept)
            if result is None:  # no valid header, or the previous segment lost its tail
                doomed = segments[k:]
                break
            end, clean, head_end = result
            kept = (seq, end, head_end)
            if not clean:  # a torn or corrupt record: it and everything after it are gone
                doomed = segments[k + 1 :]
                break
        for seq in reversed(doomed):
            os.unlink(os.path.join(self.path, segment_name(seq)))
            self._writer.maxima.pop(seq, None)
        if kept is not None:
            self._writer.resume(*kept)  # cut the torn tail, if any
            # A crash may have cut the segment's head at a record boundary (which looks like a
            # clean end): new records go to a new segment, whose head is whole.
            self._writer.start_segment()
        else:
            self._writer.active = max(segments, default=0)
            self._writer.start_segment()
        self._check_recovered(names)
        obsolete = [segment_name(seq) for seq in self._writer.obsolete()]
        self._writer.unlink(obsolete)
        for view in self._views.values():
            self._shapes[view.group] = _Shape(view.snap_meta.index, view.last)

    def _replay_segment(
        self, seq: int, prev: tuple[int, int, int] | None
    ) -> tuple[int, bool, int] | None:
        """Replay one segment's good records; (end, clean, head end) or None if it is unusable."""
        fd = os.open(os.path.join(self.path, segment_name(seq)), os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return None
            with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm, memoryview(mm) as data:
                scanner = Scanner(data, RECORD_BYTES_MAX)
                records = scanner.records()
                try:
                    first = next(records, None)
                    if first is None or not self._chains(seq, first, prev):
                        return None
                    self._writer.maxima[seq] = {}
                    for record in records:
                        self._replay(seq, record)
                finally:
                    records.close()
                return scanner.end, scanner.clean, first.length
        finally:
            os.close(fd)

    def _chains(self, seq: int, first: Record, prev: tuple[int, int, int] | None) -> bool:
        """Whether ``first`` is this segment's header and follows the previous segment's end."""
        header = first.payload
        check(isinstance(header, SegmentHeader), f"segment {seq} does not start with a header")
        if not isinstance(header, SegmentHeader):
            return False
        check(header.version == FORMAT_VERSION, f"segment {seq}: version {header.version}")
        check(header.seq == seq, f"segment {seq} names itself {header.seq}")
        return prev is None or (header.prev_seq, header.prev_end) == prev[:2]

    def _replay(self, seq: int, record: Record) -> None:
        payload = record.payload
        if isinstance(payload, GroupTombstone):
            self._forget(record.group, None)  # (its snapshot file goes with the unwanted ones)
            self._writer.note_tombstone(record.group, payload)
            return
        if self._removed:
            self._removed.discard(record.group)
        view = self.storage(record.group)
        if isinstance(payload, EntriesRecord):
            entries = payload.entries
            check(bool(entries), "empty entries record")
            location = Location(entries[0].index, seq, record.offset, record.length)
            view.append(entries, [location], lenient=True)
            self._writer.note_entries(seq, record.group, entries[0].index, entries[-1].index)
        elif isinstance(payload, HardState):
            view.hard_state = payload
            self._writer.note_hard_state(record.group, payload)
        elif isinstance(payload, SnapshotRecord):
            view.set_snapshot(payload.meta, payload.file, payload.replace, lenient=True)
            self._writer.note_snapshot(record.group, payload)
        else:
            check(False, f"segment header inside segment {seq}")
        if self._account.bytes > self.cache_bytes_max:
            evict(self._views.values(), self._account, self.cache_bytes_max)

    def _check_recovered(self, names: list[str]) -> None:
        """Every log starts at its snapshot, whose file exists; other snapshot files go."""
        wanted: set[str] = set()
        for view in self._views.values():
            check(
                view.offset == view.snap_meta.index,
                f"group {view.group}: entries up to {view.offset} are missing",
            )
            if view.snap_file is not None:
                path = os.path.join(self.path, view.snap_file)
                check(os.path.exists(path), f"group {view.group}: {view.snap_file} is missing")
                wanted.add(view.snap_file)
        for name in names:
            if parse_snapshot_name(name) is not None and name not in wanted:
                os.unlink(os.path.join(self.path, name))

    def _close_files(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.close()
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()
        os.close(self._lock_fd)  # releases the flock
        os.close(self._dir_fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _trim(entries: Sequence[Entry], snap: int) -> Sequence[Entry]:
    """Entries after ``snap`` (MemoryStorage.append ignores those a snapshot covers): the same
    list when none is covered, else a new one."""
    for a, b in itertools.pairwise(entries):
        if b.index != a.index + 1:
            raise InvariantViolation(f"entries not contiguous: {a.index} then {b.index}")
    if entries and entries[0].index <= snap:
        return entries[snap + 1 - entries[0].index :]
    return entries
