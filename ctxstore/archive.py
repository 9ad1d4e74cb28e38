"""The node-local SQLite archive of committed messages (design §5.4).

Rules of this file:
- Every replica writes the committed messages it is handed (the node hands over each message as
  it leaves the hot tail: ``ctxstore/node.py``) into one SQLite database of its own, and with
  them, in the same transaction, the highest raft index of each group up to which everything
  was handed over (``applied``).  Writes are idempotent (``INSERT OR IGNORE`` on (session_id,
  seq)): replays after a restart, restores and fills may repeat rows.
- The event loop only queues.  ``add``/``applied``/``restore`` append to an in-memory queue and
  return: no I/O, and rows are encoded by the writer (a queued row's size is estimated from its
  string lengths; only non-empty metadata is encoded to be measured).  All loop-side state
  (archived indexes, backfill ranges, stats, futures) changes on the loop thread only, in
  callbacks the writer posts with ``call_soon_threadsafe`` after each commit.
- One writer thread owns the write connection.  It takes whole queued operations, in order, up to
  ``batch_rows_max`` rows (a batch leaves at most ``flush_interval_s`` after its first row was
  queued; ``barrier``, ``fill`` and ``stop`` flush at once), encodes the rows and commits them,
  the group indexes, restore and fill work and the ``max_messages`` retention of the sessions the
  batch touched in one transaction.  The age sweep runs every ``retention_interval_s``, in
  transactions of at most ``batch_rows_max`` deletions between batches.
- Reads run on a pool of ``READERS`` threads, each with its own ``query_only`` connection; they
  see committed transactions only.
- ``add`` queues every message it is given, even one handed over before (a replay after a
  restart re-adds what it re-evicts: idempotent).  ``applied`` ignores an index at or below
  the floor (the highest index given to ``applied`` or ``restore``, queued or durable).
- Backfill ranges are the seqs a restore (InstallSnapshot) left missing below a session's tail.
  They are recorded in the restore's transaction and shrink as ``fill`` brings rows, or as
  ``forget`` gives up seqs no peer holds any more.  The row just above a range is always
  present, so retention drops or clips a range once the rows above its lower part are deleted
  (``max_messages``: below ``max_seq - N``; age: below the highest seq the sweep deleted,
  inserted_at being non-decreasing along seq).
- ``hold`` (when the node copies to Postgres): retention never deletes a row above
  ``hold(session_id)``, the seq up to which the session is in Postgres (ctxstore/pg/).  It is
  called on the writer thread; a stale answer is lower than the current one (watermarks only
  grow), so it keeps more, never less.
- ``drop_group`` (the node left a group: ctxstore/retire.py) deletes the group's rows, backfill
  ranges and index, session by session in transactions of at most ``batch_rows_max`` rows, the
  index last: a group has an index row whenever it has rows (a batch's rows record their
  group's, at 0 if nothing is applied yet), so ``holds_group`` tells a drop a crash cut short.
  It runs in queue order: what was queued for the group before it is deleted too.
- A failure of the writer (any sqlite3 error) is final, as for the WAL: it is recorded in
  ``stats.last_error``, ``on_fatal`` is called once, pending barriers and fills fail with it, and
  later ``add``/``applied``/``restore`` are ignored.  The node must stop and restart.

Durability: the database runs in WAL mode with ``synchronous=FULL``, so a COMMIT returns only
after its WAL frames are fsynced.  ``applied(g, i)`` is queued after the rows of the entries up
to ``i`` (the caller's order), a batch takes whole operations in queue order, and
``archived_index`` changes only in the callback posted after the commit that recorded it.  So
after any crash, every message handed over for group ``g`` by entries up to the durable
archived index is on disk, was deleted by retention, or lies in a durable backfill range: the
Raft log may be compacted up to ``archived_index`` (what was not handed over is in the
snapshot's tails).

Memory bound: the writer's SQLite page cache is 16 MiB (readers keep SQLite's default, 2 MiB
each); what ``add`` queues is bounded by ``backlog_bytes_max`` (estimated encoded bytes):
above half of it the archive is ``overloaded`` (the node refuses the new writes it leads); above
all of it, ``on_fatal(ArchiveOverflow)``, the queue is dropped and nothing more is queued.
``restore`` and ``fill`` queue what their callers already hold in memory (a snapshot's tail, a
peer's answer): counted in ``backlog_bytes`` but never fatal by themselves.  Besides: one index
pair per group, the backfill ranges (a few per restored session), one batch being encoded in the
writer (<= ``batch_rows_max`` rows, or one restore), and per read at most ``limit`` rows stopping
after ``bytes_max`` bytes.

Threads: the loop thread (the API), the writer thread, ``READERS`` reader threads.  The queue's
lock is held only to append or pop, never across I/O; the loop never waits for the writer except
by awaiting a future.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from .records import StoredMessage

__all__ = [
    "READERS",
    "SCHEMA_VERSION",
    "Archive",
    "ArchiveClosed",
    "ArchiveConfig",
    "ArchiveError",
    "ArchiveFailed",
    "ArchiveOverflow",
    "ArchiveSchemaError",
    "ArchiveStats",
    "Retention",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SCHEMA_VERSION = 1
READERS = 2  # reader threads, each with its own connection
SEQ_MAX = 2**63 - 1
BUSY_TIMEOUT_S = 10.0  # how long a connection waits for a lock held by another one
ROW_OVERHEAD_BYTES = 64  # the fixed part of a row's size estimate (ints, msgpack headers, tuple)

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "CREATE TABLE messages (session_id TEXT NOT NULL, seq INTEGER NOT NULL, grp INTEGER NOT NULL,"
    " inserted_at INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (session_id, seq))"
    " WITHOUT ROWID",
    "CREATE INDEX messages_by_age ON messages (inserted_at)",
    "CREATE TABLE groups (grp INTEGER PRIMARY KEY, archived_index INTEGER NOT NULL)",
    "CREATE TABLE backfill (session_id TEXT NOT NULL, from_seq INTEGER NOT NULL,"
    " grp INTEGER NOT NULL, to_seq INTEGER NOT NULL, PRIMARY KEY (session_id, from_seq))"
    " WITHOUT ROWID",
)
INSERT_ROWS = 500  # rows per INSERT statement (5 variables each; SQLite allows 32 766)


@functools.lru_cache(maxsize=8)
def _insert_sql(rows: int) -> str:
    return "INSERT OR IGNORE INTO messages VALUES " + ",".join(["(?,?,?,?,?)"] * rows)


@functools.lru_cache(maxsize=64)
def _set_index_sql(groups: int) -> str:
    return (
        "INSERT INTO groups VALUES " + ",".join(["(?,?)"] * groups) + " ON CONFLICT (grp)"
        " DO UPDATE SET archived_index = max(archived_index, excluded.archived_index)"
    )


_DROP_ROWS = (
    "DELETE FROM messages WHERE session_id = ? AND seq IN"
    " (SELECT seq FROM messages WHERE session_id = ? AND grp = ? ORDER BY seq LIMIT ?)"
)
_GROUP_SESSIONS = (
    "SELECT DISTINCT session_id FROM messages WHERE grp = ?"
    " UNION SELECT session_id FROM backfill WHERE grp = ?"
)
_READ = (
    "SELECT data FROM messages WHERE session_id = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
)


# -- errors ----------------------------------------------------------------------------------------
class ArchiveError(Exception):
    code = "archive_error"


class ArchiveFailed(ArchiveError):
    """A write of the archive failed (its cause: the sqlite3 error); nothing more is written."""

    code = "archive_failed"


class ArchiveOverflow(ArchiveError):
    """More than ``backlog_bytes_max`` waits for the writer (a stuck or too slow disk)."""

    code = "archive_overflow"


class ArchiveSchemaError(ArchiveError):
    """The database is not an archive of a schema version this code knows."""

    code = "archive_schema"


class ArchiveClosed(ArchiveError):
    """The archive is not started, or is stopping."""

    code = "archive_closed"


# -- configuration and stats -----------------------------------------------------------------------
@dataclass(frozen=True)
class Retention:
    """Per session; off by default (both None)."""

    max_messages: int | None = None  # keep the newest N (seq > max_seq - N)
    max_age_s: float | None = None  # delete messages with inserted_at < now - max_age_s

    def __post_init__(self) -> None:
        if self.max_messages is not None and self.max_messages < 1:
            raise ValueError("Retention.max_messages must be at least 1")
        if self.max_age_s is not None and self.max_age_s <= 0:
            raise ValueError("Retention.max_age_s must be positive")


@dataclass(frozen=True)
class ArchiveConfig:
    batch_rows_max: int = 5000
    flush_interval_s: float = 0.05  # a batch leaves at most this long after its first row
    backlog_bytes_max: int = 64 * 1024 * 1024  # see Archive.backlog_bytes / overloaded
    retention: Retention = field(default_factory=Retention)
    retention_interval_s: float = 60.0  # period of the age sweep

    def __post_init__(self) -> None:
        if self.batch_rows_max < 1:
            raise ValueError("ArchiveConfig.batch_rows_max must be at least 1")
        if self.flush_interval_s < 0:
            raise ValueError("ArchiveConfig.flush_interval_s must not be negative")
        if self.backlog_bytes_max < 1:
            raise ValueError("ArchiveConfig.backlog_bytes_max must be at least 1")
        if self.retention_interval_s <= 0:
            raise ValueError("ArchiveConfig.retention_interval_s must be positive")


@dataclass
class ArchiveStats:
    rows_written: int = 0  # rows inserted (duplicates not counted)
    batches: int = 0  # write transactions committed (batches and sweep steps)
    commit_seconds_total: float = 0.0  # BEGIN .. COMMIT, fsync included
    commit_seconds_max: float = 0.0
    rows_deleted_by_retention: int = 0
    backfill_rows: int = 0  # rows accepted by fill
    backfill_rows_ignored: int = 0  # rows given to fill outside every recorded range
    rows_dropped: int = 0  # rows deleted because their group left the node (drop_group)
    groups_dropped: int = 0
    queued_rows: int = 0  # rows queued and not yet committed
    last_error: str | None = None


# -- queued operations (loop -> writer) ------------------------------------------------------------
Range = tuple[int, int, int]  # (from_seq, to_seq, group), inclusive


@dataclass(eq=False, slots=True)
class _Batch:
    """Rows of ``add`` (group, index, message) and indexes of ``applied``, in call order."""

    rows: list[tuple[int, int, StoredMessage]]
    applied: dict[int, int]
    bytes: int


@dataclass(eq=False, slots=True)
class _Restore:
    group: int
    index: int
    sessions: list[tuple[str, int, int]]  # (session_id, first_seq_in_tail, last_seq)
    tail: list[StoredMessage]
    bytes: int


@dataclass(eq=False, slots=True)
class _Fill:
    session_id: str
    messages: list[StoredMessage]
    bytes: int
    future: asyncio.Future[None]


@dataclass(eq=False, slots=True)
class _Barrier:
    future: asyncio.Future[None]
    bytes: int = 0


@dataclass(eq=False, slots=True)
class _Forget:
    session_id: str
    to_seq: int
    future: asyncio.Future[None]
    bytes: int = 0


@dataclass(eq=False, slots=True)
class _Drop:
    """Delete everything of ``group``: the rows of ``sessions``, its ranges, its index."""

    group: int
    sessions: list[str]
    future: asyncio.Future[None]
    bytes: int = 0


_Op = _Batch | _Restore | _Fill | _Barrier | _Forget | _Drop
_WAITED = (_Fill, _Barrier, _Forget, _Drop)  # operations with a future: they flush at once


def _op_rows(op: _Op) -> int:
    match op:
        case _Batch():
            return len(op.rows)
        case _Restore():
            return len(op.tail)
        case _Fill():
            return len(op.messages)
        case _Barrier() | _Forget() | _Drop():
            return 0


@dataclass(eq=False, slots=True)
class _Done:
    """What one writer transaction did, posted to the loop after its COMMIT."""

    ops: list[_Op]
    indexes: dict[int, int] = field(default_factory=dict)
    ranges: dict[str, tuple[Range, ...]] = field(default_factory=dict)  # changed sessions
    written: int = 0
    deleted: int = 0
    filled: int = 0
    ignored: int = 0
    dropped: int | None = None  # the group drop_group deleted
    dropped_rows: int = 0
    seconds: float = 0.0
    committed: bool = False


def _estimate_bytes(m: StoredMessage, encode: Callable[[Any], bytes]) -> int:
    """A message's encoded size, estimated without encoding it: string lengths (non-ASCII content
    counted 4 bytes a character, the UTF-8 maximum); metadata, when there is any (<= 16 KiB, most
    messages have none), is measured by encoding it; parts are already encoded."""
    content = m.content
    size = ROW_OVERHEAD_BYTES + len(m.session_id) + len(m.sender_id) + len(m.kind)
    size += len(content) if content.isascii() else 4 * len(content)
    if m.client_msg_id is not None:
        size += len(m.client_msg_id)
    if m.metadata:
        size += len(encode(m.metadata))
    return size + len(m.parts)  # raw msgpack: its size is known


# -- ranges (pure) ---------------------------------------------------------------------------------
def _subtract(ranges: list[Range], lo: int, hi: int) -> list[Range]:
    out: list[Range] = []
    for a, b, g in ranges:
        if b < lo or a > hi:
            out.append((a, b, g))
            continue
        if a < lo:
            out.append((a, lo - 1, g))
        if b > hi:
            out.append((hi + 1, b, g))
    return out


def _merge(ranges: list[Range], new: Range) -> list[Range]:
    """``ranges`` with ``new`` added, overlapping or adjacent ranges joined (a session lives in one
    group: the joined range takes ``new``'s)."""
    out: list[Range] = []
    for a, b, g in sorted([*ranges, new]):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b), new[2])
        else:
            out.append((a, b, g))
    return out


def _clip(ranges: list[Range], floor: int) -> list[Range]:
    """Drop the seqs <= ``floor`` (deleted by retention) from ``ranges``."""
    return [(max(a, floor + 1), b, g) for a, b, g in ranges if b > floor]


def _runs(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, distinct ``seqs`` as inclusive runs of consecutive values."""
    out: list[tuple[int, int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out


# -- the writer (its own thread) -------------------------------------------------------------------
class _Writer:
    """The write connection and the writer's copy of the backfill ranges.  Thread: the writer."""

    def __init__(
        self,
        path: str,
        config: ArchiveConfig,
        clock_ms: Callable[[], int],
        hold: Callable[[str], int] | None = None,
    ) -> None:
        self.path = path
        self.config = config
        self.clock_ms = clock_ms
        self.hold = hold
        self.ranges: dict[str, list[Range]] = {}
        self._encoder = msgspec.msgpack.Encoder()
        self._conn: sqlite3.Connection | None = None
        self._touched: dict[str, int] = {}  # this transaction: session -> highest seq
        self._changed: set[str] = set()  # this transaction: sessions whose ranges changed

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "archive writer not open"
        return self._conn

    def open(self) -> dict[int, int]:
        """Open (creating the schema), check the version, load the ranges; the group indexes."""
        conn = self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise ArchiveError(f"archive {self.path!r}: journal mode {mode!r}, not WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA cache_size=-16384")  # KiB: 16 MiB of pages for the writer
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._check_schema(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        for sid, a, g, b in conn.execute("SELECT * FROM backfill ORDER BY session_id, from_seq"):
            self.ranges.setdefault(sid, []).append((a, b, g))
        return dict(conn.execute("SELECT grp, archived_index FROM groups").fetchall())

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            return
        row = None
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise ArchiveSchemaError(f"{self.path!r} is not a ctxstore archive (no schema_version)")
        if row[0] != SCHEMA_VERSION:
            raise ArchiveSchemaError(
                f"archive {self.path!r} has schema version {row[0]!r}; this ctxstore reads "
                f"version {SCHEMA_VERSION} only (a newer ctxstore wrote it?)"
            )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("archive: rollback failed")

    # -- one batch ---------------------------------------------------------------------------------
    def commit(self, ops: list[_Op]) -> _Done:
        done = _Done(ops)
        if all(type(op) is _Barrier for op in ops):
            return done
        if type(ops[0]) is _Drop:  # (always alone: _pop_locked)
            return self._drop(ops[0], done)
        started = time.perf_counter()
        conn = self.conn
        self._touched, self._changed = {}, set()
        conn.execute("BEGIN IMMEDIATE")
        for op in ops:
            match op:
                case _Batch():
                    done.written += self._insert((g, m) for g, _, m in op.rows)
                    for g in {g for g, _, _ in op.rows}:  # a group with rows has an index row
                        done.indexes.setdefault(g, 0)
                    for g, i in op.applied.items():
                        done.indexes[g] = max(done.indexes.get(g, 0), i)
                case _Restore():
                    self._restore(op, done)
                    done.indexes[op.group] = max(done.indexes.get(op.group, 0), op.index)
                case _Fill():
                    self._fill(op, done)
                case _Forget():
                    if op.session_id in self.ranges:
                        self._set_ranges(
                            op.session_id, _clip(self.ranges[op.session_id], op.to_seq)
                        )
                case _Barrier() | _Drop():
                    pass
        self._retain_count(done)
        if done.indexes:  # one statement (one GIL handoff) for all groups of the batch
            values = [x for pair in done.indexes.items() for x in pair]
            conn.execute(_set_index_sql(len(done.indexes)), values)
        self._save_ranges(done)
        conn.execute("COMMIT")
        done.seconds = time.perf_counter() - started
        done.committed = True
        return done

    def _drop(self, op: _Drop, done: _Done) -> _Done:
        """Delete the group's rows session by session, committing every ``batch_rows_max``
        rows, then its backfill ranges and its index row (last: while it is there, the drop is
        not finished, and a restart does it again)."""
        started = time.perf_counter()
        conn, group, limit = self.conn, op.group, self.config.batch_rows_max
        self._touched, self._changed = {}, set()
        conn.execute("BEGIN IMMEDIATE")
        uncommitted = 0
        for sid in op.sessions:
            while True:
                n = conn.execute(_DROP_ROWS, (sid, sid, group, limit)).rowcount
                done.dropped_rows += n
                uncommitted += n
                if uncommitted >= limit:
                    conn.execute("COMMIT")
                    conn.execute("BEGIN IMMEDIATE")
                    uncommitted = 0
                if n < limit:
                    break
        for sid in [
            sid for sid, ranges in self.ranges.items() if any(r[2] == group for r in ranges)
        ]:
            self._set_ranges(sid, [r for r in self.ranges[sid] if r[2] != group])
        self._save_ranges(done)
        conn.execute("DELETE FROM backfill WHERE grp = ?", (group,))
        conn.execute("DELETE FROM groups WHERE grp = ?", (group,))
        conn.execute("COMMIT")
        done.dropped = group
        done.seconds = time.perf_counter() - started
        done.committed = True
        return done

    def _insert(self, rows: Iterable[tuple[int, StoredMessage]]) -> int:
        """Insert (idempotently) in statements of up to ``INSERT_ROWS`` rows each: one SQLite
        step per statement, so the writer drops and retakes the GIL once per statement instead
        of once per row (per-row handoffs slowed the event loop by a third)."""
        encode, touched = self._encoder.encode, self._touched
        params: list[Any] = []
        for g, m in rows:
            params += (m.session_id, m.seq, g, m.inserted_at, encode(m))
            if m.seq > touched.get(m.session_id, 0):
                touched[m.session_id] = m.seq
        written = 0
        conn = self.conn
        step = INSERT_ROWS * 5
        for start in range(0, len(params), step):
            chunk = params[start : start + step]
            written += conn.execute(_insert_sql(len(chunk) // 5), chunk).rowcount
        return written

    def _restore(self, op: _Restore, done: _Done) -> None:
        done.written += self._insert((op.group, m) for m in op.tail)
        oldest: dict[str, StoredMessage] = {}
        seqs: dict[str, list[int]] = {}
        for m in op.tail:
            seqs.setdefault(m.session_id, []).append(m.seq)
            if m.session_id not in oldest or m.seq < oldest[m.session_id].seq:
                oldest[m.session_id] = m
        for sid, sid_seqs in seqs.items():
            if sid in self.ranges:
                for lo, hi in _runs(sid_seqs):
                    self._set_ranges(sid, _subtract(self.ranges[sid], lo, hi))
        retention = self.config.retention
        cutoff = self._cutoff_ms()
        for sid, first, last in op.sessions:
            below = self.conn.execute(
                "SELECT max(seq) FROM messages WHERE session_id = ? AND seq < ?", (sid, first)
            ).fetchone()[0]
            below = below or 0
            if below + 1 < first:
                self._set_ranges(
                    sid, _merge(self.ranges.get(sid, []), (below + 1, first - 1, op.group))
                )
            floor = 0
            if retention.max_messages is not None:
                floor = last - retention.max_messages
                self._touched[sid] = max(self._touched.get(sid, 0), last)
            head = oldest.get(sid)
            if cutoff is not None and head is not None and head.inserted_at < cutoff:
                floor = max(floor, head.seq - 1)  # everything below the tail is older still
            if floor > 0 and sid in self.ranges:
                self._set_ranges(sid, _clip(self.ranges[sid], floor))

    def _fill(self, op: _Fill, done: _Done) -> None:
        sid, ranges = op.session_id, self.ranges.get(op.session_id, [])
        accepted: dict[int, tuple[int, StoredMessage]] = {}
        for m in op.messages:
            g = next((g for a, b, g in ranges if a <= m.seq <= b), None)
            if m.session_id != sid or g is None or m.seq in accepted:
                done.ignored += 1
            else:
                accepted[m.seq] = (g, m)
        if not accepted:
            return
        self._insert(accepted.values())
        done.filled += len(accepted)
        for lo, hi in _runs(accepted):
            ranges = _subtract(ranges, lo, hi)
        self._set_ranges(sid, ranges)

    def _retain_count(self, done: _Done) -> None:
        n = self.config.retention.max_messages
        if n is None:
            return
        for sid, top in self._touched.items():
            floor = top - n
            if self.hold is not None:
                floor = min(floor, self.hold(sid))
            if floor <= 0:
                continue
            done.deleted += self.conn.execute(
                "DELETE FROM messages WHERE session_id = ? AND seq <= ?", (sid, floor)
            ).rowcount
            if sid in self.ranges:
                self._set_ranges(sid, _clip(self.ranges[sid], floor))

    def _set_ranges(self, sid: str, ranges: list[Range]) -> None:
        if ranges:
            self.ranges[sid] = ranges
        else:
            self.ranges.pop(sid, None)
        self._changed.add(sid)

    def _save_ranges(self, done: _Done) -> None:
        conn = self.conn
        for sid in sorted(self._changed):
            ranges = self.ranges.get(sid, [])
            conn.execute("DELETE FROM backfill WHERE session_id = ?", (sid,))
            conn.executemany(
                "INSERT INTO backfill VALUES (?, ?, ?, ?)", [(sid, a, g, b) for a, b, g in ranges]
            )
            done.ranges[sid] = tuple(ranges)

    # -- the age sweep -----------------------------------------------------------------------------
    def _cutoff_ms(self) -> int | None:
        max_age_s = self.config.retention.max_age_s
        return None if max_age_s is None else self.clock_ms() - round(max_age_s * 1000)

    def sweep(self) -> tuple[_Done, bool]:
        """One step of the age sweep: at most ``batch_rows_max`` deletions; whether more remain."""
        done = _Done([])
        cutoff = self._cutoff_ms()
        if cutoff is None:
            return done, False
        limit = self.config.batch_rows_max
        conn = self.conn
        keys = conn.execute(
            "SELECT session_id, seq FROM messages WHERE inserted_at < ? LIMIT ?", (cutoff, limit)
        ).fetchall()
        selected = len(keys)
        if self.hold is not None:
            hold, held = self.hold, dict[str, int]()
            keys = [k for k in keys if k[1] <= held.setdefault(k[0], hold(k[0]))]
        if not keys:
            return done, False
        started = time.perf_counter()
        self._touched, self._changed = {}, set()
        conn.execute("BEGIN IMMEDIATE")
        done.deleted = conn.executemany(
            "DELETE FROM messages WHERE session_id = ? AND seq = ?", keys
        ).rowcount
        floors: dict[str, int] = {}
        for sid, seq in keys:
            floors[sid] = max(floors.get(sid, 0), seq)
        for sid, floor in floors.items():
            if sid in self.ranges:
                self._set_ranges(sid, _clip(self.ranges[sid], floor))
        self._save_ranges(done)
        conn.execute("COMMIT")
        done.seconds = time.perf_counter() - started
        done.committed = True
        return done, selected == limit


# -- the asyncio-facing archive -------------------------------------------------------------------
class Archive:
    """See the module docstring.  Every method but the ``async`` ones is called on the loop thread,
    is O(1) (``restore``, ``fill``: O(rows given)) and does no I/O."""

    def __init__(
        self,
        path: str,
        config: ArchiveConfig = ArchiveConfig(),
        *,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        on_fatal: Callable[[BaseException], None] | None = None,
        hold: Callable[[str], int] | None = None,
    ) -> None:
        self.path = path
        self._hold = hold
        self.config = config
        self.stats = ArchiveStats()
        self._clock_ms = clock_ms
        self._on_fatal = on_fatal
        self._encode = msgspec.msgpack.Encoder().encode  # metadata sizes, on the loop thread
        # loop-side state (loop thread only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._archived: dict[int, int] = {}  # durable
        self._floor: dict[int, int] = {}  # highest index of applied/restore, queued or durable
        self._handed: dict[int, int] = {}  # highest index handed over (add/applied/restore)
        # Applied indexes not yet queued: handed over once per loop iteration (one lock, not
        # one per applied batch of entries), and before any operation queued after them.
        self._applied_pending: dict[int, int] = {}
        self._ranges: dict[str, tuple[Range, ...]] = {}  # durable backfill ranges
        self._backlog_bytes = 0
        self._added_bytes = 0  # the part of the backlog queued by add() (the overflow bound)
        self._fatal: ArchiveError | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._closing = False
        self._stop_task: asyncio.Future[None] | None = None
        self._thread: threading.Thread | None = None
        self._exited: asyncio.Future[None] | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._reader_local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_conns_lock = threading.Lock()
        # the queue (loop and writer, under _cond)
        self._cond = threading.Condition(threading.Lock())
        self._ops: deque[_Op] = deque()
        self._ops_rows = 0
        self._ops_urgent = 0  # barriers and fills in _ops
        self._first_at = 0.0  # monotonic time the queue became non-empty
        self._stopping = False  # writer: drain, then exit
        self._halted = False  # writer: exit now (fatal)
        # writer thread only
        self._sweep_at: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._loop is not None:
            raise ArchiveError("archive started twice")
        loop = self._loop = asyncio.get_running_loop()
        opened: asyncio.Future[dict[int, int]] = loop.create_future()
        self._exited = loop.create_future()
        writer = _Writer(self.path, self.config, self._clock_ms, self._hold)
        self._thread = threading.Thread(
            target=self._writer_main, args=(writer, opened), name="archive-writer", daemon=True
        )
        self._thread.start()
        try:
            indexes = await opened
        except BaseException:
            self._closing = True
            with self._cond:  # if it opened after all (start was cancelled): let it exit
                self._stopping = True
                self._cond.notify()
            await asyncio.shield(self._exited)
            raise
        self._archived = dict(indexes)
        self._floor = dict(indexes)
        self._handed = dict(indexes)
        self._ranges = {sid: tuple(r) for sid, r in writer.ranges.items()}
        self._readers = ThreadPoolExecutor(
            READERS, thread_name_prefix="archive-reader", initializer=self._open_reader
        )

    async def stop(self) -> None:
        """Flush everything queued (unless the writer failed), then close.  Idempotent."""
        if self._thread is None:
            return
        if self._stop_task is None:
            self._stop_task = asyncio.ensure_future(self._stop())
        await asyncio.shield(self._stop_task)

    async def _stop(self) -> None:
        assert self._exited is not None and self._thread is not None
        self._closing = True
        with self._cond:
            self._attach_applied_locked()
            self._stopping = True
            self._cond.notify()
        await asyncio.shield(self._exited)
        await asyncio.to_thread(self._thread.join)
        if self._readers is not None:
            await asyncio.to_thread(self._readers.shutdown)
        with self._reader_conns_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    # -- queries (memory) --------------------------------------------------------------------------
    def archived_index(self, group: int) -> int:
        return self._archived.get(group, 0)

    def holds_group(self, group: int) -> bool:
        """Whether the archive durably holds anything of ``group`` (its index row)."""
        return group in self._archived

    def lag(self, group: int) -> int:
        return self._handed.get(group, 0) - self._archived.get(group, 0)

    def backfill_ranges(self, session_id: str | None = None) -> list[tuple[int, str, int, int]]:
        """(group, session_id, from_seq, to_seq) of the durable ranges, by session and seq."""
        if session_id is not None:
            return [(g, session_id, a, b) for a, b, g in self._ranges.get(session_id, ())]
        return [(g, sid, a, b) for sid in sorted(self._ranges) for a, b, g in self._ranges[sid]]

    @property
    def backlog_bytes(self) -> int:
        return self._backlog_bytes

    @property
    def overloaded(self) -> bool:
        return self._backlog_bytes > self.config.backlog_bytes_max / 2

    # -- writes ------------------------------------------------------------------------------------
    def add(self, group: int, index: int, message: StoredMessage) -> None:
        """Queue ``message`` (handed over by applying the entry at ``index`` of ``group``, or 0
        when no entry did).  Rows are idempotent: adding one again (a replay after a restart)
        costs a write, nothing else."""
        if self._fatal is not None:
            return
        self._check_open()
        size = _estimate_bytes(message, self._encode)
        with self._cond:
            if self._applied_pending:
                self._attach_applied_locked()
            ops = self._ops
            last = ops[-1] if ops else None
            if type(last) is _Batch and len(last.rows) < self.config.batch_rows_max:
                last.rows.append((group, index, message))
                last.bytes += size
                self._ops_rows += 1
                if self._ops_rows >= self.config.batch_rows_max:
                    self._cond.notify()
            else:
                self._push_locked(_Batch([(group, index, message)], {}, size), 1, False)
        if index > self._handed.get(group, 0):
            self._handed[group] = index
        self._account(size, 1)
        self._added_bytes += size
        if self._added_bytes > self.config.backlog_bytes_max:
            self._fail(
                ArchiveOverflow(
                    f"archive backlog of {self._added_bytes} bytes exceeds backlog_bytes_max "
                    f"({self.config.backlog_bytes_max}): the writer cannot keep up"
                )
            )

    def applied(self, group: int, index: int) -> None:
        if self._fatal is not None or index <= self._floor.get(group, 0):
            return
        self._check_open()
        self._floor[group] = index
        if index > self._handed.get(group, 0):
            self._handed[group] = index
        pending = self._applied_pending
        if not pending:
            assert self._loop is not None
            self._loop.call_soon(self._hand_applied)
        pending[group] = index

    def _hand_applied(self) -> None:
        if self._applied_pending and not self._halted:
            with self._cond:
                self._attach_applied_locked()

    def _attach_applied_locked(self) -> None:
        """Queue the pending applied indexes with the last batch (they follow every row added
        before them, and precede every operation queued after)."""
        pending = self._applied_pending
        if not pending:
            return
        self._applied_pending = {}
        last = self._ops[-1] if self._ops else None
        if type(last) is _Batch:
            last.applied.update(pending)
        else:
            self._push_locked(_Batch([], pending, 0), 0, False)

    def restore(
        self,
        group: int,
        index: int,
        sessions: list[tuple[str, int, int]],
        tail: list[StoredMessage],
    ) -> None:
        if self._fatal is not None:
            return
        self._check_open()
        self._floor[group] = max(self._floor.get(group, 0), index)
        self._handed[group] = max(self._handed.get(group, 0), index)
        size = sum(_estimate_bytes(m, self._encode) for m in tail)
        with self._cond:
            self._push_locked(_Restore(group, index, sessions, tail, size), len(tail), False)
        self._account(size, len(tail))

    async def fill(self, session_id: str, messages: list[StoredMessage]) -> None:
        """Insert rows a peer sent for ``session_id``'s backfill ranges and shrink the ranges, in
        one transaction.  Rows outside every range are ignored (``backfill_rows_ignored``)."""
        size = sum(_estimate_bytes(m, self._encode) for m in messages)
        future = self._new_waiter()
        with self._cond:
            self._push_locked(_Fill(session_id, messages, size, future), len(messages), True)
        self._account(size, len(messages))
        await future

    async def forget(self, session_id: str, to_seq: int) -> None:
        """Drop the seqs <= ``to_seq`` from ``session_id``'s backfill ranges, durably: no peer
        holds them any more (its retention deleted them)."""
        future = self._new_waiter()
        with self._cond:
            self._push_locked(_Forget(session_id, to_seq, future), 0, True)
        await future

    async def drop_group(self, group: int, sessions: Iterable[str] | None = None) -> None:
        """Delete every row, backfill range and the index of ``group`` (this node left it),
        durably, after everything queued before the call.  ``sessions``: the group's session
        ids (the state's, which holds all of them); None: found by scanning the archive on a
        reader thread (a drop a crash cut short, whose group the state no longer knows).  The
        caller queues nothing more for the group until this returns."""
        if sessions is None:
            sessions = await self._run_reader(self._group_sessions, group)
        future = self._new_waiter()
        with self._cond:
            self._push_locked(_Drop(group, sorted(set(sessions)), future), 0, True)
        self._floor.pop(group, None)
        self._handed.pop(group, None)
        await future

    async def barrier(self) -> None:
        """Return once everything queued before the call is committed (or raise the fatal error)."""
        future = self._new_waiter()
        with self._cond:
            self._push_locked(_Barrier(future), 0, True)
        await future

    # -- reads -------------------------------------------------------------------------------------
    async def read(
        self,
        session_id: str,
        after_seq: int,
        limit: int,
        *,
        to_seq: int | None = None,
        bytes_max: int = 2 * 1024 * 1024,
    ) -> list[StoredMessage]:
        """Rows with ``after_seq < seq <= to_seq``, ascending: at most ``limit``, and no more
        encoded bytes than ``bytes_max`` in total, except that the first row always comes."""
        if limit < 1 or bytes_max < 1:
            raise ValueError(f"limit and bytes_max must be at least 1, not {limit}, {bytes_max}")
        to = SEQ_MAX if to_seq is None else to_seq
        return await self._run_reader(self._read, session_id, after_seq, to, limit, bytes_max)

    # -- internals: loop side ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._loop is None or self._closing:
            raise ArchiveClosed("archive is not running")

    def _push_locked(self, op: _Op, rows: int, urgent: bool) -> None:
        if self._applied_pending:
            self._attach_applied_locked()  # they came first
        if not self._ops:
            self._first_at = time.monotonic()
            self._cond.notify()
        self._ops.append(op)
        self._ops_rows += rows
        if urgent:
            self._ops_urgent += 1
            self._cond.notify()
        elif self._ops_rows >= self.config.batch_rows_max:
            self._cond.notify()

    def _account(self, size: int, rows: int) -> None:
        self._backlog_bytes += size
        self.stats.queued_rows += rows

    def _new_waiter(self) -> asyncio.Future[None]:
        if self._fatal is not None:
            raise self._fatal
        self._check_open()
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiters.add(future)
        return future

    def _on_done(self, done: _Done) -> None:
        if done.dropped is not None:
            self._archived.pop(done.dropped, None)
            self.stats.rows_dropped += done.dropped_rows
            self.stats.groups_dropped += 1
        for g, i in done.indexes.items():
            if i > self._archived.get(g, -1):
                self._archived[g] = i
        for sid, ranges in done.ranges.items():
            if ranges:
                self._ranges[sid] = ranges
            else:
                self._ranges.pop(sid, None)
        stats = self.stats
        for op in done.ops:
            self._backlog_bytes -= op.bytes
            stats.queued_rows -= _op_rows(op)
            if type(op) is _Batch:
                self._added_bytes -= op.bytes
            elif isinstance(op, _WAITED):
                self._waiters.discard(op.future)
                if not op.future.done():
                    op.future.set_result(None)
        stats.rows_written += done.written
        stats.rows_deleted_by_retention += done.deleted
        stats.backfill_rows += done.filled
        stats.backfill_rows_ignored += done.ignored
        if done.committed:
            stats.batches += 1
            stats.commit_seconds_total += done.seconds
            stats.commit_seconds_max = max(stats.commit_seconds_max, done.seconds)

    def _fail(self, exc: ArchiveError, lost: list[_Op] | None = None) -> None:
        """The writer stops for good (``lost``: the operations its failed transaction took)."""
        with self._cond:
            self._halted = True
            dropped = [*(lost or ()), *self._ops]
            self._ops.clear()
            self._ops_rows = self._ops_urgent = 0
            self._cond.notify()
        for op in dropped:  # they will never be written: forget them
            self._backlog_bytes -= op.bytes
            self.stats.queued_rows -= _op_rows(op)
            if type(op) is _Batch:
                self._added_bytes -= op.bytes
        if self._fatal is not None:
            return
        self._fatal = exc
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        for future in self._waiters:
            if not future.done():
                future.set_exception(exc)
        self._waiters.clear()
        if self._on_fatal is None:
            log.error("archive failed: %s", self.stats.last_error)
            return
        try:
            self._on_fatal(exc)
        except Exception:
            log.exception("archive: on_fatal raised")

    # -- internals: writer thread ------------------------------------------------------------------
    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            self._loop.call_soon_threadsafe(callback, *args)

    def _writer_main(self, writer: _Writer, opened: asyncio.Future[dict[int, int]]) -> None:
        try:
            try:
                indexes = writer.open()
            except BaseException as exc:
                self._post(_settle, opened, None, exc)
                return
            self._post(_settle, opened, indexes, None)
            if self.config.retention.max_age_s is not None:
                self._sweep_at = time.monotonic()
            self._writer_loop(writer)
        finally:
            writer.close()
            assert self._exited is not None
            self._post(_settle, self._exited, None, None)

    def _writer_loop(self, writer: _Writer) -> None:
        taken: list[_Op] = []  # operations of the transaction under way
        try:
            while (work := self._take()) is not None:
                taken, sweep = work
                if taken:
                    self._post(self._on_done, writer.commit(taken))
                    taken = []
                if sweep:
                    done, more = writer.sweep()
                    self._post(self._on_done, done)
                    if not more:
                        self._sweep_at = time.monotonic() + self.config.retention_interval_s
        except Exception as exc:
            writer.rollback()
            failure = ArchiveFailed(f"archive writer failed: {type(exc).__name__}: {exc}")
            failure.__cause__ = exc
            self._post(self._fail, failure, taken)

    def _take(self) -> tuple[list[_Op], bool] | None:
        """Wait for work: (operations to commit, whether to run an age-sweep step); None: exit."""
        config = self.config
        with self._cond:
            while not self._halted:
                now = time.monotonic()
                sweep_at = None if self._stopping else self._sweep_at
                sweep = sweep_at is not None and now >= sweep_at
                timeout: float | None = None
                if self._ops:
                    deadline = self._first_at + config.flush_interval_s
                    if (
                        self._stopping
                        or self._ops_urgent
                        or self._ops_rows >= config.batch_rows_max
                        or now >= deadline
                    ):
                        return self._pop_locked(), sweep
                    timeout = deadline - now
                elif self._stopping:
                    return None
                if sweep:
                    return [], True
                if sweep_at is not None:
                    timeout = sweep_at - now if timeout is None else min(timeout, sweep_at - now)
                self._cond.wait(timeout)
            return None

    def _pop_locked(self) -> list[_Op]:
        ops, rows = self._ops, 0
        taken: list[_Op] = []
        limit = self.config.batch_rows_max
        while ops and (not taken or rows + _op_rows(ops[0]) <= limit):
            if taken and type(ops[0]) is _Drop:
                break  # a drop is committed alone (in transactions of its own)
            op = ops.popleft()
            rows += _op_rows(op)
            taken.append(op)
            if isinstance(op, _WAITED):
                self._ops_urgent -= 1
            if type(op) is _Drop:
                break
        self._ops_rows -= rows
        return taken

    # -- internals: reader threads -----------------------------------------------------------------
    async def _run_reader(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._readers is None or self._closing:
            raise ArchiveClosed("archive is not running")
        assert self._loop is not None
        return await self._loop.run_in_executor(self._readers, fn, *args)

    def _open_reader(self) -> None:
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        conn.execute("PRAGMA query_only=1")
        self._reader_local.conn = conn
        self._reader_local.decoder = msgspec.msgpack.Decoder(StoredMessage)
        with self._reader_conns_lock:
            self._reader_conns.append(conn)

    def _group_sessions(self, group: int) -> list[str]:
        conn: sqlite3.Connection = self._reader_local.conn
        return [sid for (sid,) in conn.execute(_GROUP_SESSIONS, (group, group))]

    def _read(
        self, sid: str, after: int, to: int, limit: int, bytes_max: int
    ) -> list[StoredMessage]:
        conn: sqlite3.Connection = self._reader_local.conn
        decode = self._reader_local.decoder.decode
        out: list[StoredMessage] = []
        total = 0
        cursor = conn.execute(_READ, (sid, after, to, limit))
        try:
            for (data,) in cursor:
                total += len(data)
                if out and total > bytes_max:
                    break
                out.append(decode(data))
        finally:
            cursor.close()
        return out


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
