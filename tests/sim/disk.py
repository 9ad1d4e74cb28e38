"""The simulated disk of one node: the durable log the driver's pipeline writes, and what
survives the node's crashes.

Both disks are the pipeline's ``DurableLog`` (raft/pipeline.py), and report the writer-thread
mode: ``submit`` returns a pending Future that the simulation resolves ``0..max_persist_delay``
rounds later (the fsync), in submission order; a write due at once is written inside ``submit``
and its Future returned resolved, as an inline WAL's is.  ``publish`` makes a write visible
to the group's ``Storage``, as the WAL's does.

- ``MemoryDisk``: one ``MemoryStorage`` per group; a write happens whole or not at all.
- ``WalDisk``: the node's real write-ahead log (``raft.wal.WAL``, inline: the simulation is
  its writer thread) in a directory of its own.  A crash may happen *during* the write at the
  head of the queue (``crash(tear=True)``): it reaches the segment, then what it wrote is
  damaged as a torn write would be (the segment cut at a random offset inside the write's
  bytes, or one of those bytes flipped, or left whole but never acknowledged); the WAL is
  closed with nothing else done, and ``recover`` reopens it, which replays and truncates the
  damaged tail.

``Durable`` is what a group's storage holds; ``allowed_outcomes`` lists what recovery may show
after a torn write: the acknowledged state plus any prefix of the write's records for the
group (per group write: a snapshot, then entries, then the hard state), since persisting more
than was acknowledged is safe.
"""

from __future__ import annotations

import os
import random
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from raft import ConfState, Entry, HardState, MemoryStorage, Snapshot, Storage
from raft.storage import bootstrap
from raft.wal import WAL, Done, GroupWrite, WriteMode, Written
from raft.wal_segments import parse_segment_name, segment_name

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


def apply_write(ms: MemoryStorage, w: GroupWrite) -> None:
    """Write ``w`` to ``ms`` as the WAL's views take it (``WAL.publish``)."""
    if w.snapshot is not None:
        ms.apply_snapshot(w.snapshot)
    if w.compact is not None:
        meta = w.compact.meta
        ms.create_snapshot(meta.index, meta.conf_state, w.compact.data)
        ms.compact(meta.index)
    ms.append(list(w.entries))
    if w.hard_state is not None:
        ms.set_hard_state(w.hard_state)


def allowed_outcomes(base: Durable, writes: Sequence[GroupWrite]) -> list[Durable]:
    """``base``, then ``base`` with each longer prefix of the records of ``writes`` (one
    group's, in write order) applied."""
    out = [base]
    for w in writes:
        if w.snapshot is not None or w.compact is not None:
            probe = out[-1].memory()
            apply_write(probe, GroupWrite(w.group, snapshot=w.snapshot, compact=w.compact))
            out.append(Durable.of(probe))
        for k in range(1, len(w.entries) + 1):  # a record of entries, or (generously) a prefix
            probe = out[-1].memory()
            probe.append(list(w.entries[:k]))
            out.append(Durable.of(probe))
        if w.hard_state is not None:
            probe = out[-1].memory()
            probe.set_hard_state(w.hard_state)
            out.append(Durable.of(probe))
    return out


class _Pending:
    __slots__ = ("batch", "due", "future")

    def __init__(self, batch: list[GroupWrite], future: Future[Written], due: int) -> None:
        self.batch = batch
        self.future = future
        self.due = due


class SimDisk:
    """A ``DurableLog`` whose writes finish when the simulation says (see the module doc).

    ``now()`` is the simulation's round, ``delay()`` draws a write's rounds to durability;
    ``on_durable(group, storage, entries)`` is told each write's entries once published."""

    mode = WriteMode.THREAD

    def __init__(self, now: Callable[[], int], delay: Callable[[], int]) -> None:
        self.now = now
        self.delay = delay
        self.on_durable: Callable[[int, Storage, list[Entry]], None] = lambda g, st, es: None
        self.pending: deque[_Pending] = deque()
        self._seq = 0
        self._last_due = 0

    # -- what the pipeline calls ---------------------------------------------------------------
    def submit(self, batch: Sequence[GroupWrite]) -> Future[Written]:
        future: Future[Written] = Future()
        future.set_running_or_notify_cancel()
        due = max(self.now() + self.delay(), self._last_due)
        self._last_due = due
        if not self.pending and due <= self.now():
            future.set_result(self._write(list(batch)))  # durable before submit returns
        else:
            self.pending.append(_Pending(list(batch), future, due))
        return future

    def write_sync(self, batch: Sequence[GroupWrite]) -> Written:
        assert not self.pending, "write_sync with writes in flight"
        written = self._write(list(batch))
        self.publish(written)
        return written

    def publish(self, written: Written) -> None:
        self._publish(written)
        for done in written.done:
            w = done.write
            if w.entries:
                self.on_durable(w.group, self.storage(w.group), list(w.entries))

    def segment_count(self) -> int:
        return 0

    def oldest_segment_groups(self) -> list[int]:
        return []

    def removed(self, group: int) -> bool:
        return False

    # -- what the simulation calls -------------------------------------------------------------
    def complete(self) -> None:
        """Resolve the writes due by now, in order."""
        now = self.now()
        while self.pending and self.pending[0].due <= now:
            p = self.pending.popleft()
            p.future.set_result(self._write(p.batch))

    def bootstrap(self, group: int, conf: ConfState) -> None:
        memory = MemoryStorage()
        bootstrap(memory, conf)
        self.write_sync([GroupWrite(group, memory.ents[1:], memory.hard_state)])

    def crash(self, tear: bool, rng: random.Random) -> tuple[list[GroupWrite] | None, str | None]:
        """The node dies; with ``tear``, during the write at the head of the queue (if any).
        Returns that write and what happened to it."""
        head = self.pending[0].batch if tear and self.pending else None
        self.pending.clear()
        self._last_due = 0
        what = self._crash(head, rng)
        return (head, what) if what is not None else (None, None)

    # -- the medium ------------------------------------------------------------------------------
    def storage(self, group: int) -> Storage:
        raise NotImplementedError

    def _write(self, batch: list[GroupWrite]) -> Written:
        raise NotImplementedError

    def _publish(self, written: Written) -> None:
        raise NotImplementedError

    def _crash(self, head: list[GroupWrite] | None, rng: random.Random) -> str | None:
        raise NotImplementedError

    def recover(self) -> None:
        """The node restarts: make its storage readable again (after ``crash``)."""

    def close(self) -> None:
        """Release the disk for good (the run is over)."""


class MemoryDisk(SimDisk):
    def __init__(self, groups: list[int], now: Callable[[], int], delay: Callable[[], int]):
        super().__init__(now, delay)
        self.stores = {g: MemoryStorage() for g in groups}

    def storage(self, group: int) -> Storage:
        return self.stores[group]

    def _write(self, batch: list[GroupWrite]) -> Written:
        self._seq += 1
        return Written(self._seq, [Done(w, "", []) for w in batch])

    def _publish(self, written: Written) -> None:
        for done in written.done:
            apply_write(self.stores[done.write.group], done.write)

    def _crash(self, head: list[GroupWrite] | None, rng: random.Random) -> str | None:
        return None  # a MemoryStorage write cannot be torn


class WalDisk(SimDisk):
    """A real WAL in ``path``; open from construction until ``crash`` or ``close``."""

    def __init__(self, path: str, now: Callable[[], int], delay: Callable[[], int]) -> None:
        super().__init__(now, delay)
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
            inline=True,
        )

    def _open(self) -> WAL:
        assert self.wal is not None, "the node is down"
        return self.wal

    def storage(self, group: int) -> Storage:
        return self._open().storage(group)

    def segment_count(self) -> int:
        return self._open().segment_count()

    def oldest_segment_groups(self) -> list[int]:
        return self._open().oldest_segment_groups()

    def removed(self, group: int) -> bool:
        return self._open().removed(group)

    def _write(self, batch: list[GroupWrite]) -> Written:
        return self._open().submit(batch).result()  # inline: written and synced

    def _publish(self, written: Written) -> None:
        self._open().publish(written)

    def _crash(self, head: list[GroupWrite] | None, rng: random.Random) -> str | None:
        wal = self._open()
        self.wal = None
        written = 0
        if head is not None:
            # Written and fsynced, but never published: the node dies before it learns so.  (A
            # publish could also let the writer delete segments this write made obsolete.)
            wal.submit(head).result()
            written = wal.stats.last_round_bytes
        wal.close()
        return self._damage(written, rng) if written else None

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
