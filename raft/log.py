"""The Raft log as the core sees it: persisted entries in Storage, newer ones still in memory.

``Unstable`` holds what the core has accepted but the driver has not yet persisted (an incoming
snapshot and/or entries).  ``RaftLog`` joins it with Storage and keeps the commit and applied
indexes.  Rules kept here:
- ``committed`` never decreases and never exceeds ``last_index()``;
- an entry at or below ``committed`` is never overwritten (InvariantViolation);
- ``applied`` never exceeds ``committed``.
"""

from __future__ import annotations

from .errors import Compacted, InvariantViolation, Unavailable
from .messages import Entry, Snapshot
from .storage import Storage, limit_size


class Unstable:
    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset  # index of entries[0]

    def maybe_first_index(self) -> int | None:
        return self.snapshot.meta.index + 1 if self.snapshot is not None else None

    def maybe_last_index(self) -> int | None:
        if self.entries:
            return self.offset + len(self.entries) - 1
        if self.snapshot is not None:
            return self.snapshot.meta.index
        return None

    def maybe_term(self, index: int) -> int | None:
        if index < self.offset:
            if self.snapshot is not None and self.snapshot.meta.index == index:
                return self.snapshot.meta.term
            return None
        last = self.maybe_last_index()
        if last is None or index > last:
            return None
        return self.entries[index - self.offset].term

    def stable_to(self, index: int, term: int) -> None:
        """Entries up to ``index`` (with ``term``) are now persisted; forget them."""
        t = self.maybe_term(index)
        if t is None or t != term or index < self.offset:
            return  # replaced by a newer leader's entries since the Ready was taken
        del self.entries[: index + 1 - self.offset]
        self.offset = index + 1

    def stable_snap_to(self, index: int) -> None:
        if self.snapshot is not None and self.snapshot.meta.index == index:
            self.snapshot = None

    def restore(self, snap: Snapshot) -> None:
        self.offset = snap.meta.index + 1
        self.entries = []
        self.snapshot = snap

    def truncate_and_append(self, entries: list[Entry]) -> None:
        first = entries[0].index
        if first == self.offset + len(self.entries):
            self.entries.extend(entries)
        elif first <= self.offset:
            # Replace everything unstable; the stored suffix from `first` is overwritten too.
            self.offset = first
            self.entries = list(entries)
        else:
            del self.entries[first - self.offset :]
            self.entries.extend(entries)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        if not self.offset <= lo <= hi <= self.offset + len(self.entries):
            raise InvariantViolation(f"unstable [{lo},{hi})")  # (no f-string built when it holds)
        return self.entries[lo - self.offset : hi - self.offset]


class RaftLog:
    def __init__(self, storage: Storage, max_committed_bytes_per_ready: int) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(last + 1)
        self.committed = first - 1
        self.applied = first - 1
        self.max_committed_bytes_per_ready = max_committed_bytes_per_ready

    def __repr__(self) -> str:
        return (
            f"RaftLog(committed={self.committed}, applied={self.applied}, "
            f"unstable.offset={self.unstable.offset}, len(unstable)={len(self.unstable.entries)})"
        )

    # -- indexes and terms -------------------------------------------------------------------
    def first_index(self) -> int:
        i = self.unstable.maybe_first_index()
        return i if i is not None else self.storage.first_index()

    def last_index(self) -> int:
        i = self.unstable.maybe_last_index()
        return i if i is not None else self.storage.last_index()

    def persisted_index(self) -> int:
        """The last index known to be on disk (everything before the unstable entries)."""
        return self.unstable.offset - 1

    def term(self, index: int) -> int:
        """Term at ``index``; raises Compacted / Unavailable outside [first-1, last]."""
        dummy = self.first_index() - 1
        if index < dummy:
            raise Compacted(f"index {index} compacted (first index {dummy + 1})")
        if index > self.last_index():
            raise Unavailable(f"index {index} > last index {self.last_index()}")
        return self._term_held(index)

    def _term_held(self, index: int) -> int:
        """Term at an ``index`` within [first-1, last]: the unstable part's, else storage's."""
        t = self.unstable.maybe_term(index)
        return t if t is not None else self.storage.term(index)

    def term_or_zero(self, index: int) -> int:
        try:
            return self.term(index)
        except (Compacted, Unavailable):
            return 0

    def last_term(self) -> int:
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        """Whether our entry at ``index`` has ``term`` (False outside [first-1, last]).  Out of
        range is the common case of a follower checking new entries: no exception for it."""
        if index > self.last_index() or index < self.first_index() - 1:
            return False
        try:
            return self._term_held(index) == term
        except (Compacted, Unavailable):
            return False

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """§5.4.1: a candidate's log is at least as up to date as ours."""
        my_term = self.last_term()
        return term > my_term or (term == my_term and last_index >= self.last_index())

    # -- reading entries ---------------------------------------------------------------------
    def entries(self, lo: int, max_bytes: int | None) -> list[Entry]:
        """Entries from ``lo`` to the end, limited in payload size; raises Compacted."""
        if lo > self.last_index():
            return []
        return self.slice(lo, self.last_index() + 1, max_bytes)

    def slice(self, lo: int, hi: int, max_bytes: int | None) -> list[Entry]:
        if lo == hi:
            return []
        if lo < self.first_index():
            raise Compacted(f"entries from {lo} are compacted (first index {self.first_index()})")
        if hi > self.last_index() + 1:
            raise InvariantViolation(f"slice [{lo},{hi}) beyond {self.last_index()}")
        out: list[Entry] = []
        if lo < self.unstable.offset:
            out = self.storage.entries(lo, min(hi, self.unstable.offset), max_bytes)
            if len(out) < min(hi, self.unstable.offset) - lo:
                return out  # limited by size
        if hi > self.unstable.offset:
            out = out + self.unstable.slice(max(lo, self.unstable.offset), hi)
        return limit_size(out, max_bytes)

    def all_entries(self) -> list[Entry]:
        return self.entries(self.first_index(), None)

    # -- changes -----------------------------------------------------------------------------
    def find_conflict(self, entries: list[Entry]) -> int:
        """Index of the first entry whose term differs from ours (or is new); 0 if none."""
        for e in entries:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= ``index`` whose term is <= ``term``, with that term."""
        while index > 0:
            try:
                t = self.term(index)
            except Compacted:
                return index, 0
            except Unavailable:
                index = self.last_index()
                continue
            if t <= term:
                return index, t
            index -= 1
        return 0, 0

    def maybe_append(
        self, prev_index: int, prev_term: int, commit: int, entries: list[Entry]
    ) -> int | None:
        """AppendEntries at a follower (§5.3).  Returns the last new index, or None on mismatch."""
        if not self.match_term(prev_index, prev_term):
            return None
        last_new = prev_index + len(entries)
        ci = self.find_conflict(entries)
        if ci:
            if ci <= self.committed:  # (per append on a follower: no message built eagerly)
                raise InvariantViolation(f"conflict at {ci} <= committed {self.committed}")
            self.append(entries[ci - prev_index - 1 :])
        self.commit_to(min(commit, last_new))
        return last_new

    def append(self, entries: list[Entry]) -> int:
        if not entries:
            return self.last_index()
        first = entries[0].index
        if first <= self.committed:
            raise InvariantViolation(f"append at {first} overwrites committed {self.committed}")
        if first > self.last_index() + 1:
            raise InvariantViolation(f"gap: append at {first} after {self.last_index()}")
        self.unstable.truncate_and_append(entries)
        return self.last_index()

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            if index > self.last_index():
                raise InvariantViolation(
                    f"commit {index} is beyond the last index {self.last_index()}: "
                    "was the log truncated or lost?"
                )
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        """Commit ``index`` if it is newer and holds an entry of ``term`` (Figure 8 rule)."""
        if index > self.committed and self.term_or_zero(index) == term:
            self.commit_to(index)
            return True
        return False

    def applied_to(self, index: int) -> None:
        if index == 0:
            return
        if not self.applied <= index <= self.committed:
            raise InvariantViolation(
                f"applied {index} out of range [{self.applied}, {self.committed}]"
            )
        self.applied = index

    def has_next_committed(self) -> bool:
        return self.committed > max(self.applied, self.first_index() - 1)

    def next_committed(self) -> list[Entry]:
        lo = max(self.applied + 1, self.first_index())
        if self.committed < lo:
            return []
        return self.slice(lo, self.committed + 1, self.max_committed_bytes_per_ready)

    def restore(self, snap: Snapshot) -> None:
        self.committed = snap.meta.index
        self.unstable.restore(snap)

    def snapshot(self) -> Snapshot:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()
