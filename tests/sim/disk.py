"""The simulated disk of one node: what survives its crashes.

- ``MemoryDisk``: one ``MemoryStorage`` per group.  A Ready's write happens whole or not at all.
- ``WalDisk``: the node's real write-ahead log (``raft.wal.WAL``) in a directory of its own, all
  groups in one WAL, each group's ``Storage`` being ``wal.storage(group)``.  A crash may happen
  *during* a write (``crash(torn=...)``): the write reaches the segment, then what it wrote is
  damaged as a torn write would be (the segment cut at a random offset inside the write's bytes,
  or one of those bytes flipped, or left whole but never acknowledged); the WAL is closed with
  nothing else done, and ``recover`` reopens it, which replays and truncates the damaged tail.

``Durable`` is what a group's storage holds; ``allowed_outcomes`` lists what recovery may show
after a torn write: the acknowledged state plus any prefix of the write's records (a snapshot,
then entries, then the hard state), since persisting more than was acknowledged is safe.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Protocol

from raft import ConfState, Entry, HardState, MemoryStorage, Ready, Snapshot, SnapshotMeta, Storage
from raft.storage import bootstrap
from raft.wal import WAL, GroupWrite
from raft.wal_segments import parse_segment_name, segment_name

from ..raft.helpers import persist

# A run writes some 40-100 KiB per node: with 4 KiB segments they roll (and crashes tear their
# heads) and old ones are deleted tens of times per node and run.
WAL_SEGMENT_BYTES = 4 << 10
WAL_CACHE_BYTES = 1 << 10  # small: most entries the core reads are read back from the segments
TORN_KINDS = ("truncate", "flip", "unacknowledged")


@dataclass(frozen=True)
class Durable:
    """One group's durable state: hard state, snapshot (meta and data) and log entries."""

    hard_state: HardState
    snapshot: Snapshot
    entries: tuple[Entry, ...]

    @staticmethod
    def of(st: Storage) -> Durable:
        hs, _ = st.initial_state()
        first, last = st.first_index(), st.last_index()
        entries = st.entries(first, last + 1, None) if last >= first else []
        return Durable(hs, st.snapshot(), tuple(entries))

    def memory(self) -> MemoryStorage:
        ms = MemoryStorage()
        ms.snap = self.snapshot
        ms.ents = [Entry(self.snapshot.meta.term, self.snapshot.meta.index), *self.entries]
        ms.hard_state = self.hard_state
        return ms

    def describe(self) -> str:
        meta = self.snapshot.meta
        last = self.entries[-1] if self.entries else None
        tail = f"last {last.index}@t{last.term}" if last else "no entries"
        return f"{self.hard_state} snap {meta.index}@t{meta.term} {tail}"


def allowed_outcomes(base: Durable, rd: Ready) -> list[Durable]:
    """``base``, then ``base`` with each longer prefix of the write of ``rd`` applied."""
    out = [base]
    ms = base.memory()
    if rd.snapshot is not None:
        ms.apply_snapshot(rd.snapshot)
        out.append(Durable.of(ms))
    for k in range(1, len(rd.entries) + 1):  # a record of entries, or (generously) a prefix
        probe = out[-1].memory()
        probe.append(rd.entries[:k])
        out.append(Durable.of(probe))
    if rd.hard_state is not None:
        probe = out[-1].memory()
        probe.set_hard_state(rd.hard_state)
        out.append(Durable.of(probe))
    return out


def writes_something(rd: Ready) -> bool:
    return bool(rd.entries) or rd.hard_state is not None or rd.snapshot is not None


def _write_of(group: int, rd: Ready) -> GroupWrite:
    return GroupWrite(group, rd.entries, rd.hard_state, rd.snapshot)


class Disk(Protocol):
    def storage(self, group: int) -> Storage: ...

    def bootstrap(self, group: int, conf: ConfState) -> None: ...

    def write(self, readies: list[tuple[int, Ready]]) -> None:
        """Persist the (group, Ready) pairs durably, in one batch (it returns after the fsync)."""
        ...

    def compact(self, group: int, index: int, conf: ConfState, data: bytes) -> None:
        """Save the application's snapshot at ``index`` and drop the entries up to it."""
        ...

    def crash(self, torn: tuple[int, Ready] | None, rng: random.Random) -> str | None:
        """The node dies; with ``torn``, during that write.  Returns what happened to it."""
        ...

    def recover(self) -> None:
        """The node restarts: make its storage readable again (after ``crash``)."""
        ...

    def close(self) -> None:
        """Release the disk for good (the run is over)."""
        ...


class MemoryDisk:
    def __init__(self, groups: list[int]) -> None:
        self.stores = {g: MemoryStorage() for g in groups}

    def storage(self, group: int) -> Storage:
        return self.stores[group]

    def bootstrap(self, group: int, conf: ConfState) -> None:
        bootstrap(self.stores[group], conf)

    def write(self, readies: list[tuple[int, Ready]]) -> None:
        for group, rd in readies:
            persist(self.stores[group], rd)

    def compact(self, group: int, index: int, conf: ConfState, data: bytes) -> None:
        st = self.stores[group]
        st.create_snapshot(index, conf, data)
        st.compact(index)

    def crash(self, torn: tuple[int, Ready] | None, rng: random.Random) -> str | None:
        assert torn is None, "a MemoryStorage write cannot be torn"
        return None

    def recover(self) -> None:
        pass

    def close(self) -> None:
        pass


class WalDisk:
    """A real WAL in ``path``; open from construction until ``crash`` or ``close``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.wal: WAL | None = None
        self.recover()

    def recover(self) -> None:
        assert self.wal is None
        self.wal = WAL.open(
            self.path,
            segment_bytes=WAL_SEGMENT_BYTES,
            cache_bytes_max=WAL_CACHE_BYTES,
            preallocate=False,
        )

    def _open(self) -> WAL:
        assert self.wal is not None, "the node is down"
        return self.wal

    def storage(self, group: int) -> Storage:
        return self._open().storage(group)

    def bootstrap(self, group: int, conf: ConfState) -> None:
        self._open().bootstrap(group, conf)

    def write(self, readies: list[tuple[int, Ready]]) -> None:
        batch = [_write_of(g, rd) for g, rd in readies if writes_something(rd)]
        if batch:
            self._open().write_sync(batch)

    def compact(self, group: int, index: int, conf: ConfState, data: bytes) -> None:
        wal = self._open()
        meta = SnapshotMeta(index, wal.storage(group).term(index), conf)
        wal.save_snapshot(group, Snapshot(meta, data))

    def crash(self, torn: tuple[int, Ready] | None, rng: random.Random) -> str | None:
        wal = self._open()
        self.wal = None
        what = None
        written = 0
        if torn is not None:
            group, rd = torn
            # Written and fsynced, but never published: the node dies before it learns so.  (A
            # publish could also let the writer delete segments this write made obsolete.)
            wal.submit([_write_of(group, rd)]).result()
            written = wal.stats.last_round_bytes
        wal.close()
        if written:
            what = self._damage(written, rng)
        return what

    def _damage(self, written: int, rng: random.Random) -> str:
        """Damage the last ``written`` bytes of the newest segment as a crash mid-write would."""
        seq = max(s for n in os.listdir(self.path) if (s := parse_segment_name(n)) is not None)
        name = os.path.join(self.path, segment_name(seq))
        size = os.path.getsize(name)  # no preallocation: the file ends where its data ends
        start = size - written
        assert start >= 0, f"segment {seq} holds {size} bytes, the last write {written}"
        kind = rng.choice(TORN_KINDS)
        if kind == "truncate":
            at = rng.randrange(start, size)
            os.truncate(name, at)
            return f"segment {seq} cut at {at} (write [{start}, {size}))"
        if kind == "flip":
            at = rng.randrange(start, size)
            with open(name, "r+b") as f:
                f.seek(at)
                byte = f.read(1)[0]
                f.seek(at)
                f.write(bytes([byte ^ rng.randrange(1, 256)]))
            return f"segment {seq} byte {at} flipped (write [{start}, {size}))"
        return f"segment {seq} write [{start}, {size}) whole but unacknowledged"

    def close(self) -> None:
        if self.wal is not None:
            self.wal.close()
            self.wal = None
