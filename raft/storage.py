"""The storage interface the core reads its durable log through, and an in-memory implementation.

Storage holds what the driver has *persisted*: the core never writes to it.  The driver writes
a Ready's snapshot, entries and hard state to storage (and to disk) before calling ``advance``.
``MemoryStorage`` keeps everything in RAM; the simulator uses one per node as its "disk", and the
node's WAL-backed storage (raft/wal.py) implements the same interface.
"""

from __future__ import annotations

from typing import Protocol

from .errors import Compacted, SnapshotOutOfDate, Unavailable, check
from .messages import (
    ConfChange,
    ConfChangeType,
    ConfState,
    Entry,
    EntryType,
    HardState,
    Snapshot,
    SnapshotMeta,
    encode_conf_change,
)


class Storage(Protocol):
    def initial_state(self) -> tuple[HardState, ConfState]:
        """The persisted hard state and the membership as of the latest snapshot."""
        ...

    def entries(self, lo: int, hi: int, max_bytes: int | None) -> list[Entry]:
        """Entries [lo, hi); at least one entry if any, then up to ``max_bytes`` of payload.

        Raises ``Compacted`` when lo <= the snapshot index.
        """
        ...

    def term(self, index: int) -> int:
        """Term of the entry at ``index``; valid for [first_index() - 1, last_index()].

        Raises ``Compacted`` below that range and ``Unavailable`` above it.
        """
        ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot:
        """The most recent snapshot (may raise ``SnapshotTemporarilyUnavailable``)."""
        ...


def entries_bytes(entries: list[Entry]) -> int:
    """The payload bytes of ``entries`` (what flow control and the uncommitted cap count).
    Here rather than in the interpreted ``messages``: the core calls it per append sent."""
    size = 0
    for e in entries:
        size += len(e.data)
    return size


def limit_size(entries: list[Entry], max_bytes: int | None) -> list[Entry]:
    """Keep a prefix of ``entries`` whose payload fits ``max_bytes`` (always at least one)."""
    if max_bytes is None or len(entries) <= 1:
        return entries
    size = len(entries[0].data)
    for n in range(1, len(entries)):
        size += len(entries[n].data)
        if size > max_bytes:
            return entries[:n]
    return entries


class MemoryStorage:
    """Storage in RAM.  ``ents[0]`` is a dummy entry standing for the snapshot index and term."""

    def __init__(self, conf_state: ConfState | None = None) -> None:
        self.hard_state = HardState()
        self.snap = Snapshot(SnapshotMeta(0, 0, conf_state or ConfState()))
        self.ents: list[Entry] = [Entry(0, 0)]

    # -- reads (Storage) ---------------------------------------------------------------------
    def initial_state(self) -> tuple[HardState, ConfState]:
        return self.hard_state, self.snap.meta.conf_state

    def _offset(self) -> int:
        return self.ents[0].index

    def first_index(self) -> int:
        return self._offset() + 1

    def last_index(self) -> int:
        return self.ents[0].index + len(self.ents) - 1

    def term(self, index: int) -> int:
        offset = self._offset()
        if index < offset:
            raise Compacted(f"index {index} is before the snapshot at {offset}")
        if index - offset >= len(self.ents):
            raise Unavailable(f"index {index} is after the last index {self.last_index()}")
        return self.ents[index - offset].term

    def entries(self, lo: int, hi: int, max_bytes: int | None) -> list[Entry]:
        offset = self._offset()
        if lo <= offset:
            raise Compacted(f"entries from {lo} are compacted (snapshot at {offset})")
        check(hi <= self.last_index() + 1, f"entries [{lo}, {hi}) beyond {self.last_index()}")
        return limit_size(self.ents[lo - offset : hi - offset], max_bytes)

    def snapshot(self) -> Snapshot:
        return self.snap

    # -- writes (done by the driver when it persists a Ready) --------------------------------
    def set_hard_state(self, hard_state: HardState) -> None:
        self.hard_state = hard_state

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace the log with a snapshot received from the leader."""
        if snap.meta.index < self.snap.meta.index:
            raise SnapshotOutOfDate(f"{snap.meta.index} < {self.snap.meta.index}")
        self.snap = snap
        self.ents = [Entry(snap.meta.term, snap.meta.index)]

    def append(self, entries: list[Entry]) -> None:
        """Append entries, first removing any stored suffix they replace."""
        if not entries:
            return
        first = self.first_index()
        last = entries[-1].index
        if last < first:
            return  # all of them are already covered by the snapshot
        if first > entries[0].index:
            entries = entries[first - entries[0].index :]
        offset = entries[0].index - self._offset()
        check(
            offset <= len(self.ents), f"gap: appending {entries[0].index} after {self.last_index()}"
        )
        del self.ents[offset:]
        self.ents.extend(entries)

    def create_snapshot(self, index: int, conf_state: ConfState, data: bytes) -> Snapshot:
        """Record an application snapshot taken at ``index`` (must be applied already)."""
        if index <= self.snap.meta.index:
            raise SnapshotOutOfDate(f"{index} <= {self.snap.meta.index}")
        check(index <= self.last_index(), f"snapshot index {index} > last {self.last_index()}")
        self.snap = Snapshot(SnapshotMeta(index, self.term(index), conf_state), data)
        return self.snap

    def compact(self, index: int) -> None:
        """Drop entries up to and including ``index`` (which becomes the dummy entry)."""
        offset = self._offset()
        if index <= offset:
            raise Compacted(f"already compacted up to {offset}")
        check(index <= self.last_index(), f"compact {index} > last {self.last_index()}")
        i = index - offset
        self.ents = [Entry(self.ents[i].term, index), *self.ents[i + 1 :]]


def bootstrap(storage: MemoryStorage, conf_state: ConfState) -> None:
    """Start a new group: its initial membership becomes the log's first committed entries.

    Every initial member bootstraps with the same ``conf_state`` and so writes the same entries
    (term 1, one ADD_NODE per voter, then one ADD_LEARNER per learner).  A node added later
    starts from an empty storage and learns the whole membership history from the log (or
    from a snapshot), never from its own configuration.
    """
    check(storage.last_index() == 0, "bootstrap needs an empty storage")
    check(bool(conf_state.voters), "bootstrap needs at least one voter")
    changes = [ConfChange(ConfChangeType.ADD_NODE, v) for v in sorted(conf_state.voters)]
    changes += [ConfChange(ConfChangeType.ADD_LEARNER, v) for v in sorted(conf_state.learners)]
    entries = [
        Entry(1, i, EntryType.CONF_CHANGE, encode_conf_change(cc))
        for i, cc in enumerate(changes, 1)
    ]
    storage.append(entries)
    storage.set_hard_state(HardState(term=1, vote=0, commit=len(entries)))
