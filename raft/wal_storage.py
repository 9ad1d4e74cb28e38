"""GroupStorage: one group's view of the WAL, implementing ``Storage`` like ``MemoryStorage``.

The view holds only what is durable.  It is changed by the WAL on its owner's thread, when a
batch is published (raft/wal.py) or replayed at recovery, and never by the writer thread, so
reading it needs no lock.  It keeps, in memory:

- the hard state, the snapshot's meta and the name of the file holding the snapshot's data;
- the log's shape: ``offset`` (the index before the first entry; the snapshot index) and
  ``last``; the terms as runs (``run_first[k]`` starts a run of ``run_term[k]``); the records
  that hold the entries as arrays (``rec_first[k]`` is the first index record k supplies, then
  its segment, file offset and length), so an index costs nothing per entry;
- a cache of the most recent entries: a contiguous suffix of the log, trimmed from its front by
  ``evict`` to keep all groups' caches within one byte budget.  Entries before the cache are
  read back from their record (``Disk.read_entries``).

This module does no I/O itself: the WAL passes a ``Disk``.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from typing import Protocol

from .errors import Compacted, InvariantViolation, Unavailable, check
from .messages import ConfState, Entry, HardState, Snapshot, SnapshotMeta


class Disk(Protocol):
    def read_entries(self, group: int, segment: int, offset: int, length: int) -> list[Entry]: ...

    def load_snapshot(self, file: str) -> bytes: ...


class Location:
    """Where a record of entries lies: ``first`` is the index of its first entry.  Never
    changed once made.  A plain class, so that compiled its ``__init__`` is native (a
    dataclass's stays interpreted): one per record of entries, on every node."""

    __slots__ = ("first", "length", "offset", "segment")

    def __init__(self, first: int, segment: int, offset: int, length: int) -> None:
        self.first = first
        self.segment = segment
        self.offset = offset
        self.length = length

    def __repr__(self) -> str:
        return f"Location({self.first}, {self.segment}, {self.offset}, {self.length})"


class CacheAccount:
    """The cached payload bytes of all views of one WAL."""

    def __init__(self) -> None:
        self.bytes = 0


class GroupStorage:
    def __init__(self, group: int, disk: Disk, account: CacheAccount) -> None:
        self.group = group
        self._disk = disk
        self._account = account
        self.hard_state = HardState()
        self.snap_meta = SnapshotMeta()
        self.snap_file: str | None = None
        self.offset = 0  # index before the first entry; == snap_meta.index outside recovery
        self.last = 0
        self._run_first = array("q")
        self._run_term = array("q")
        self._rec_first = array("q")
        self._rec_segment = array("q")
        self._rec_offset = array("q")
        self._rec_length = array("q")
        self._cache: list[Entry] = []  # entries [cache_first, last] from _cache_head on
        self._cache_head = 0
        self.cache_bytes = 0

    # -- reads (Storage) ---------------------------------------------------------------------
    def initial_state(self) -> tuple[HardState, ConfState]:
        return self.hard_state, self.snap_meta.conf_state

    def first_index(self) -> int:
        return self.offset + 1

    def last_index(self) -> int:
        return self.last

    def term(self, index: int) -> int:
        if index < self.offset:
            raise Compacted(f"index {index} is before the snapshot at {self.offset}")
        if index > self.last:
            raise Unavailable(f"index {index} is after the last index {self.last}")
        if index == self.offset:
            check(self.offset == self.snap_meta.index, "log does not start at its snapshot")
            return self.snap_meta.term
        return self._run_term[bisect_right(self._run_first, index) - 1]

    def entries(self, lo: int, hi: int, max_bytes: int | None) -> list[Entry]:
        if lo <= self.offset:
            raise Compacted(f"entries from {lo} are compacted (snapshot at {self.offset})")
        if hi > self.last + 1:
            raise InvariantViolation(f"entries [{lo}, {hi}) beyond {self.last}")
        out: list[Entry] = []
        budget = [max_bytes]
        cache_first = self.cache_first()
        i = lo
        while i < min(hi, cache_first):
            k = bisect_right(self._rec_first, i) - 1
            end = self._rec_first[k + 1] if k + 1 < len(self._rec_first) else self.last + 1
            stop = min(end, hi, cache_first)
            got = self._disk.read_entries(
                self.group, self._rec_segment[k], self._rec_offset[k], self._rec_length[k]
            )
            base = got[0].index
            if not (base <= i and stop - base <= len(got)):
                raise InvariantViolation(f"record at {base} lacks [{i}, {stop})")
            if not _take(out, got[i - base : stop - base], budget):
                return out
            i = stop
        if i < hi:
            start = self._cache_head + i - cache_first
            _take(out, self._cache[start : start + hi - i], budget)
        return out

    def snapshot(self) -> Snapshot:
        if self.snap_file is None:
            return Snapshot(self.snap_meta)
        return Snapshot(self.snap_meta, self._disk.load_snapshot(self.snap_file))

    def cache_first(self) -> int:
        return self.last + 1 - (len(self._cache) - self._cache_head)

    # -- changes (by the WAL, with what is durable) -------------------------------------------
    def append(self, entries: list[Entry], locations: list[Location], lenient: bool) -> None:
        """Store durable ``entries`` (held by the records at ``locations``), replacing a suffix.

        ``lenient`` (recovery): the log may restart after a gap, because the segments holding
        the entries in between were deleted; a later snapshot record must cover the gap.
        """
        if not entries or entries[-1].index <= self.snap_meta.index:
            return
        first = entries[0].index
        if first <= self.snap_meta.index:
            entries = entries[self.snap_meta.index + 1 - first :]
            first = entries[0].index
        if first > self.last + 1 or first <= self.offset:
            check(lenient, f"gap: appending {first} to [{self.offset + 1}, {self.last}]")
            self._clear(first - 1)
        elif first <= self.last:
            self._truncate_from(first)
        for e in entries:
            if not self._run_term or self._run_term[-1] != e.term:
                self._run_first.append(e.index)
                self._run_term.append(e.term)
        self.last = entries[-1].index
        for k, loc in enumerate(locations):
            end = locations[k + 1].first if k + 1 < len(locations) else self.last + 1
            if end > first:  # else the record holds only entries the snapshot covers
                self._rec_first.append(max(loc.first, first))
                self._rec_segment.append(loc.segment)
                self._rec_offset.append(loc.offset)
                self._rec_length.append(loc.length)
        self._cache.extend(entries)
        self._cached(sum(len(e.data) for e in entries))

    def set_snapshot(self, meta: SnapshotMeta, file: str, replace: bool, lenient: bool) -> None:
        """The durable snapshot is now ``meta`` (data in ``file``); drop the entries it covers."""
        index = meta.index
        if index < self.snap_meta.index:
            raise InvariantViolation(f"snapshot {index} < {self.snap_meta.index}")
        if replace or index > self.last:
            self._clear(index)
        elif index >= self.offset:
            check(
                index == self.offset or self.term(index) == meta.term,
                f"snapshot term {meta.term} differs from the log's at {index}",
            )
            self._drop_through(index)
        else:
            check(lenient, f"snapshot {index} before the log's start {self.offset}")
        self.snap_meta = meta
        self.snap_file = file

    def drop(self) -> None:
        """Forget everything (the group left this node: a tombstone was published or
        replayed); the WAL then forgets this view, and a later one of the group starts empty."""
        self._clear(0)
        self.hard_state = HardState()
        self.snap_meta = SnapshotMeta()
        self.snap_file = None

    def evict_front(self, goal_bytes: int) -> None:
        """Drop cached entries from the front until this cache holds at most ``goal_bytes``."""
        while self.cache_bytes > goal_bytes and self._cache_head < len(self._cache):
            self._evict_one()
        self._compact_cache()

    # -- helpers -------------------------------------------------------------------------------
    def _clear(self, offset: int) -> None:
        self.offset = self.last = offset
        for a in (self._run_first, self._run_term, *self._rec_arrays()):
            del a[:]
        self._cached(-self.cache_bytes)
        self._cache = []
        self._cache_head = 0

    def _truncate_from(self, index: int) -> None:
        """Drop entries >= ``index`` (offset < index <= last)."""
        k = bisect_left(self._run_first, index)
        del self._run_first[k:], self._run_term[k:]
        k = bisect_left(self._rec_first, index)
        for a in self._rec_arrays():
            del a[k:]
        cut = self._cache_head + max(0, index - self.cache_first())
        self._cached(-sum(len(e.data) for e in self._cache[cut:]))
        del self._cache[cut:]
        self.last = index - 1

    def _drop_through(self, index: int) -> None:
        """Drop entries <= ``index`` (offset <= index <= last)."""
        if index == self.last:
            self._clear(index)
            return
        k = bisect_right(self._run_first, index + 1) - 1
        del self._run_first[:k], self._run_term[:k]
        self._run_first[0] = index + 1
        k = bisect_right(self._rec_first, index + 1) - 1
        for a in self._rec_arrays():
            del a[:k]
        self._rec_first[0] = index + 1
        for _ in range(index + 1 - self.cache_first()):
            self._evict_one()
        self._compact_cache()
        self.offset = index

    def _evict_one(self) -> None:
        e = self._cache[self._cache_head]
        self._cache[self._cache_head] = _GONE
        self._cache_head += 1
        self._cached(-len(e.data))

    def _cached(self, nbytes: int) -> None:
        self.cache_bytes += nbytes
        self._account.bytes += nbytes

    def _compact_cache(self) -> None:
        if self._cache_head > 64 and self._cache_head * 2 > len(self._cache):
            del self._cache[: self._cache_head]
            self._cache_head = 0

    def _rec_arrays(self) -> tuple[array[int], ...]:
        return (self._rec_first, self._rec_segment, self._rec_offset, self._rec_length)


_GONE = Entry(0, 0)  # fills an evicted cache slot until the list is compacted


def _take(out: list[Entry], more: list[Entry], budget: list[int | None]) -> bool:
    """Extend ``out`` like ``limit_size`` would; False once ``budget[0]`` bytes are spent."""
    left = budget[0]
    for e in more:
        if left is not None:
            if out and len(e.data) > left:
                return False
            left -= len(e.data)
            budget[0] = left
        out.append(e)
    return True


EVICT_SLICE = 32
"""An eviction frees 1/32 of the budget (2 MiB of the default 64 MiB), often: freeing much more at
once stalls every node of a cluster at about the same moment (docs/benchmarks.md, "Cache
evictions in slices")."""


def evict(views: Iterable[GroupStorage], account: CacheAccount, budget_bytes: int) -> None:
    """Once over ``budget_bytes``, trim the largest caches (oldest entries first) to one level
    so that all of them together hold at most ``budget_bytes - budget_bytes // EVICT_SLICE``."""
    if account.bytes <= budget_bytes:
        return
    goal = budget_bytes - budget_bytes // EVICT_SLICE
    sizes = sorted((v for v in views if v.cache_bytes), key=lambda v: -v.cache_bytes)
    rest = account.bytes
    for k, v in enumerate(sizes):
        rest -= v.cache_bytes
        level = (goal - rest) // (k + 1)
        below = sizes[k + 1].cache_bytes if k + 1 < len(sizes) else 0
        if level >= below:
            for w in sizes[: k + 1]:
                w.evict_front(level)
            return
