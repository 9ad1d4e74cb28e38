"""The Postgres write-behind: on each group's leader, copy what the group committed to Postgres,
then record through Raft how far it got (design §5.4, docs/postgres.md).

Rules of this file:
- Nothing on the append path waits for Postgres.  The state keeps, per group, the sessions not
  yet entirely in Postgres and their watermarks (``ConversationState``, "Postgres
  watermarks"); ``on_message`` only counts, to wake the flusher early.
- One task per node.  Every ``flush_interval_s``, or as soon as ``flush_rows`` messages of the
  groups it leads were applied since the last flush, it takes those groups and, for their pending
  sessions (oldest change first), up to ``flush_rows`` rows and ``FLUSH_BYTES_MAX`` bytes: each
  session's row, its read cursors, and its messages after its watermark, read from the hot tail or,
  older, from the local archive (on disk).  It writes them in one transaction: the messages
  ``COPY``-ed straight into ``messages`` in a savepoint (rows above the watermarks are normally not
  in Postgres), or, if one is there already (a unique violation: back to the savepoint, counted in
  ``copy_fallbacks``), ``COPY`` into a temporary table then ``INSERT ... ON CONFLICT DO NOTHING`` (a
  message never changes); sessions and cursors through temporary tables and ``INSERT ... ON CONFLICT
  DO UPDATE`` of ``last_seq`` and cursors, only forward. After the COMMIT it proposes
  ``PostgresFlushed`` with the new watermarks to each group and waits for them to apply, then starts
  over at once if rows were left.
- Idempotent: a leader killed between its COMMIT and the watermark's commit, an old leader
  flushing after a new one was elected, a retried transaction: each copies rows already there,
  which the direct ``COPY`` refuses and the fallback's INSERT skips.  A message is the same
  on every replica (Raft), so "already there" means "equal".  So no gap (a watermark only
  moves past rows a COMMIT holds) and no duplicate.
- Postgres down, refusing or slow (every statement has a timeout): the transaction fails, the
  watermarks stay, the flusher retries with exponential backoff (``BACKOFF_MIN_S`` to
  ``BACKOFF_MAX_S``, jittered) and logs a warning when the outage starts and every
  ``WARN_EVERY_S`` while it lasts.  Appends go on: the backlog is what the state's watermarks
  say, held in the hot tails (in snapshots, on disk) and in the local archive, whose retention
  keeps every row above its session's watermark (``hold``).  No backlog in memory only.
- A hole below the hot tail that the archive cannot fill: the rows a peer is still copying to
  this node (backfill ranges) are waited for; rows that no longer exist here (deleted by a
  retention limit before Postgres was configured) are skipped, counted (``skipped``) and logged.
- Agents (the registry, docs/agents.md) are not in the watermarks: the registry is small, so
  each flush compares the agents of the groups this node leads with what this node last wrote
  of them *as their leader* (``_agents_written``: the records, in memory, per group and
  (term, epoch)), and writes those that differ, at most ``AGENTS_PER_FLUSH`` (the rest: the
  next flush, which starts at once), in the flush's transaction.  A new term (this node became
  leader again) or a new epoch (a backfill's reset) starts that memory over: every agent of the
  group is written once.  The registry is listed only when an agent changed here
  (``on_agent``) or such a memory started over.  Each row carries ``source_index``, the
  group's applied raft index when the state was read (an agent lives in one group, and there
  the applied index orders the states), and the upsert only replaces a row of a lower one: a
  deposed leader still flushing cannot put back an older agent over a newer one.  A header's
  value (credentials) is never copied: its name only.
- A flush never holds the loop for long: it yields to it after reading each ``STEP_ROWS``
  rows, and copies the messages in ``COPY``s of at most ``STEP_ROWS`` rows (in one
  transaction), so the appends beside it wait for at most a step (a flush of 5 000 rows in one
  piece held a node's loop for 20-25 ms on a 2-core box: every append arriving meanwhile
  waited).
- Schema migrations (``schema.migrate``) run at the first connection, before any flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from raft.driver import Driver
from raft.errors import RaftError

from ..archive import Archive
from ..commands import PostgresFlushed, encode_command
from ..history import message_bytes
from ..placement import group_of
from ..records import AgentRecord, StoredMessage
from ..state import ConversationState
from . import schema
from .rows import (
    AGENT_COLUMNS,
    CURSOR_COLUMNS,
    MESSAGE_COLUMNS,
    SESSION_COLUMNS,
    agent_record,
    cursor_records,
    message_record,
    session_record,
    use_millis,
)

log = logging.getLogger(__name__)

FLUSH_BYTES_MAX = 32 * 1024 * 1024  # message bytes (history.message_bytes) of one transaction
AGENTS_PER_FLUSH = 1000  # agent rows of one transaction (each at most ~6.5 KiB)
STEP_ROWS = 500  # rows a flush reads, or copies in one COPY, before the loop runs other work
MARKS_PER_COMMAND = 1000  # watermarks per PostgresFlushed entry (<= ~150 KiB)
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
WARN_EVERY_S = 30.0
CONNECT_TIMEOUT_S = 10.0
STATEMENT_TIMEOUT_S = 30.0  # each statement; a black-holed server fails a flush after this
TRANSACTION_TIMEOUT_S = 120.0  # a whole flush transaction

CLOSE_TIMEOUT_S = 2.0  # stopping: then the pool's connections are aborted
DRAIN_TIMEOUT_S = 2.0  # stopping: a last flush of what this node leads, within this long
# What Postgres being down, slow, refusing or of a newer schema looks like (logged as an outage).
EXPECTED_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    schema.SchemaTooNew,
)

TEMP_TABLES = (
    "CREATE TEMP TABLE flush_sessions (LIKE sessions) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE flush_messages (LIKE messages) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE flush_cursors (LIKE read_cursors) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE flush_agents (LIKE agents INCLUDING DEFAULTS) ON COMMIT DELETE ROWS",
)
INSERT_SESSIONS = (
    "INSERT INTO sessions SELECT * FROM flush_sessions ON CONFLICT (id) DO UPDATE"
    " SET last_seq = EXCLUDED.last_seq WHERE sessions.last_seq < EXCLUDED.last_seq"
)
INSERT_MESSAGES = "INSERT INTO messages SELECT * FROM flush_messages ON CONFLICT DO NOTHING"
INSERT_CURSORS = (
    "INSERT INTO read_cursors SELECT * FROM flush_cursors ON CONFLICT (session_id, user_id)"
    " DO UPDATE SET last_read_seq = EXCLUDED.last_read_seq"
    " WHERE read_cursors.last_read_seq < EXCLUDED.last_read_seq"
)
# Only over a row read at a lower applied index of the agent's group (a newer state).
INSERT_AGENTS = (
    "INSERT INTO agents SELECT * FROM flush_agents ON CONFLICT (id) DO UPDATE SET"
    " url = EXCLUDED.url, header_names = EXCLUDED.header_names,"
    " timeout_ms = EXCLUDED.timeout_ms, idle_timeout_ms = EXCLUDED.idle_timeout_ms,"
    " debounce_ms = EXCLUDED.debounce_ms, history = EXCLUDED.history,"
    " max_attempts = EXCLUDED.max_attempts, status = EXCLUDED.status,"
    " protocol = EXCLUDED.protocol, source_index = EXCLUDED.source_index,"
    " updated_at = EXCLUDED.updated_at"
    " WHERE agents.source_index < EXCLUDED.source_index"
)
_ALL = 1 << 62  # list_agents' limit for the whole registry of this node's groups


@dataclass(frozen=True)
class PostgresConfig:
    dsn: str
    flush_interval_s: float = 5.0
    flush_rows: int = 5000
    pool_size: int = 2
    propose_timeout_s: float = 5.0  # waiting for the watermarks to apply

    def __post_init__(self) -> None:
        if self.flush_interval_s <= 0 or self.flush_rows < 1 or self.pool_size < 1:
            raise ValueError("PostgresConfig: interval, rows and pool size must be positive")


@dataclass
class FlusherStats:
    flushes: int = 0  # transactions committed
    messages: int = 0  # message rows copied (including rows Postgres already had)
    messages_inserted: int = 0  # of those, rows Postgres did not have
    copy_fallbacks: int = 0  # message COPYs that met rows already there (then ON CONFLICT)
    sessions: int = 0
    cursors: int = 0
    agents: int = 0  # agent rows written (including those a newer row kept out)
    failures: int = 0  # flushes that failed (Postgres down, refusing, too slow)
    skipped: int = 0  # messages no longer on this node when their turn came
    seconds_total: float = 0.0  # time in flush transactions
    migrated: list[int] = field(default_factory=list)  # versions this node applied
    last_error: str | None = None
    connected: bool = False


@dataclass
class _Batch:
    sessions: list[tuple[Any, ...]] = field(default_factory=list)
    messages: list[tuple[Any, ...]] = field(default_factory=list)
    cursors: list[tuple[Any, ...]] = field(default_factory=list)
    agents: list[tuple[Any, ...]] = field(default_factory=list)
    # (group, its (term, epoch) when read, the agent) of each row of ``agents``
    agents_read: list[tuple[int, tuple[int, int], AgentRecord]] = field(default_factory=list)
    marks: dict[int, list[tuple[str, int, int]]] = field(default_factory=dict)
    epochs: dict[int, int] = field(default_factory=dict)  # group -> its epoch when read
    bytes: int = 0

    @property
    def rows(self) -> int:
        return len(self.sessions) + len(self.messages) + len(self.cursors)


class Flusher:
    def __init__(
        self,
        node_id: int,
        state: ConversationState,
        archive: Archive,
        driver: Driver,
        config: PostgresConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_id = node_id
        self.state = state
        self.archive = archive
        self.driver = driver
        self.config = config
        self.stats = FlusherStats()
        self._clock = clock
        self._pool: Any = None
        self._connected = asyncio.Event()  # set once the pool exists (it then reconnects itself)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._applied_since = 0  # messages applied since the last flush began
        self._caught_up_at = clock()  # wall time of the last flush that left nothing behind
        self._down_since: float | None = None
        self._warned_at = 0.0
        # group this node leads -> ((term, epoch), agent id -> the agent as last written)
        self._agents_written: dict[int, tuple[tuple[int, int], dict[str, AgentRecord]]] = {}
        self._agents_dirty = True  # an agent may have changed since the registry was listed

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        assert self._task is None, "flusher started twice"
        self._caught_up_at = self._clock()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="postgres-flusher")

    async def stop(self, drain_s: float = 0.0) -> None:
        """Stop flushing; first, with ``drain_s``, copy what waits in the groups this node still
        leads, for at most that long (a flush cut short by the stop is done again: rows are
        idempotent), so that a cluster stopped as a whole leaves most of it in Postgres instead
        of waiting for its next start.  Whatever does not make it (a group whose leadership
        moved to a peer that had already stopped flushing) waits in the archive, as in an
        outage."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if drain_s > 0 and self._pool is not None:
            await self._drain(drain_s)
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                pool.terminate()
        self.stats.connected = False

    async def _drain(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                while await self.flush():
                    pass
        except Exception as e:  # (the stop goes on: the rows wait for the next start)
            log.warning(
                "postgres: the last flush before stopping did not finish (%s: %s); %d messages "
                "wait in the local archive for the next start",
                type(e).__name__,
                e,
                self.backlog_rows(),
            )

    @property
    def pool(self) -> Any:
        """The asyncpg pool once connected and migrated (None before)."""
        return self._pool

    async def wait_pool(self, timeout_s: float) -> Any:
        """The pool, waiting up to ``timeout_s`` for the first connection (None: not yet)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        return self._pool

    # -- called by the node ------------------------------------------------------------------------
    def on_message(self, group: int) -> None:
        """A message was applied to ``group``: wake the flusher once ``flush_rows`` messages of
        the groups this node leads wait (a follower's messages are another node's to copy:
        counting them would start transactions of a third of ``flush_rows`` with 3 replicas)."""
        if self.driver.leader(group) != self.node_id:
            return
        self._applied_since += 1
        if self._applied_since == self.config.flush_rows:
            self._wake.set()

    def on_agent(self) -> None:
        """An agent was saved (any group), or a snapshot replaced a group's agents."""
        self._agents_dirty = True

    def led_groups(self) -> list[int]:
        me, driver = self.node_id, self.driver
        groups = self.state.group_count or 1 << 30  # (the meta group, beyond: no conversations)
        return [g for g in driver.host.groups() if g < groups and driver.leader(g) == me]

    def backlog_rows(self) -> int:
        """Messages of the groups this node leads not yet in Postgres."""
        return sum(self.state.postgres_backlog(g) for g in self.led_groups())

    def lag_seconds(self, backlog: int | None = None) -> float:
        """0 without a backlog; else the time since the last flush that left none (an upper
        bound on the age of the oldest message not yet in Postgres)."""
        if (self.backlog_rows() if backlog is None else backlog) == 0:
            return 0.0
        return max(0.0, self._clock() - self._caught_up_at)

    # -- the task ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                if self._pool is None:
                    await self._connect()
                more = await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # whatever it is, the store goes on; retried with backoff
                if not isinstance(e, EXPECTED_ERRORS):
                    log.exception("postgres: the flush failed unexpectedly")
                failures += 1
                self._failed(e)
                delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(failures - 1, 16))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            if failures or self._down_since is not None:
                log.warning(
                    "postgres: flushing again after %d failed attempts; %d messages wait",
                    failures,
                    self.backlog_rows(),
                )
            failures = 0
            self._down_since = None
            if not more:
                await self._sleep(self.config.flush_interval_s)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    def _failed(self, e: BaseException) -> None:
        s = self.stats
        s.failures += 1
        s.last_error = f"{type(e).__name__}: {e}"
        s.connected = False
        now = self._clock()
        if self._down_since is None:
            self._down_since = now
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning(
                "postgres: flush failed (%s); appends go on, %d messages wait in the local "
                "archive for Postgres (down for %.0f s)",
                s.last_error,
                self.backlog_rows(),
                now - self._down_since,
            )

    async def _connect(self) -> None:
        conn = await asyncpg.connect(self.config.dsn, timeout=CONNECT_TIMEOUT_S)
        try:
            applied = await asyncio.wait_for(schema.migrate(conn), TRANSACTION_TIMEOUT_S)
        finally:
            await conn.close(timeout=CONNECT_TIMEOUT_S)
        if applied:
            log.warning("postgres: applied schema migrations %s", applied)
            self.stats.migrated += applied
        self._pool = await asyncpg.create_pool(
            self.config.dsn,
            min_size=1,
            max_size=self.config.pool_size,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=STATEMENT_TIMEOUT_S,
            init=_init_connection,
        )
        self._connected.set()
        self.stats.connected = True

    # -- one flush ---------------------------------------------------------------------------------
    async def flush(self) -> bool:
        """Copy one transaction's worth of pending rows; whether more wait that it had no room
        for (rows waiting for a peer's copy to this node are not "more": they wait for the next
        interval)."""
        started = self._clock()
        self._applied_since = 0
        try:
            batch, more, drained = await self._collect()
            t0, inserted = time.perf_counter(), 0
            if batch.rows or batch.agents:
                inserted = await asyncio.wait_for(self._write(batch), TRANSACTION_TIMEOUT_S)
        except BaseException:
            self._agents_dirty = True  # the agents it read may not be written: list them again
            raise
        if batch.rows or batch.agents:
            self._wrote_agents(batch)
            s = self.stats
            s.seconds_total += time.perf_counter() - t0
            s.flushes += 1
            s.messages += len(batch.messages)
            s.messages_inserted += inserted
            s.sessions += len(batch.sessions)
            s.cursors += len(batch.cursors)
            s.agents += len(batch.agents)
            s.connected = True
            await self._record(batch)
        if drained:
            self._caught_up_at = started
        return more

    async def _collect(self) -> tuple[_Batch, bool, bool]:
        """The rows of one flush; whether it ran out of room; whether it took every pending
        message (none left, none waiting for a peer's copy)."""
        batch = _Batch()
        rows_max, state = self.config.flush_rows, self.state
        groups = self.led_groups()
        more = self._collect_agents(batch, groups)
        drained = True
        step = 0  # rows read since the loop last ran
        for group in groups:
            batch.epochs[group] = state.postgres_epoch(group)
            for sid, changed, flushed, last in state.postgres_pending(group):
                if batch.rows >= rows_max or batch.bytes >= FLUSH_BYTES_MAX:
                    return batch, True, False
                session = state.get_session(sid)
                cursors = state.cursors(sid)
                if session is None or cursors is None:  # the group left this node meanwhile
                    break
                room = rows_max - batch.rows - 1 - len(cursors)  # for messages
                if room < 1 and batch.rows:
                    return batch, True, False
                batch.sessions.append(session_record(session))
                batch.cursors += cursor_records(sid, cursors)
                budget = FLUSH_BYTES_MAX - batch.bytes
                messages, upto, size = await self._messages(
                    sid, flushed, last, max(1, room), budget
                )
                batch.messages += map(message_record, messages)
                batch.bytes += size
                if upto < last:
                    drained = False
                    more = more or len(messages) >= max(1, room) or size >= budget
                batch.marks.setdefault(group, []).append((sid, upto, changed))
                step += len(messages) + 1
                if step >= STEP_ROWS:  # (what was read stays valid: committed rows, and a
                    step = 0  # session or group that changes meanwhile is flushed again)
                    await asyncio.sleep(0)
        return batch, more, drained

    def _collect_agents(self, batch: _Batch, groups: list[int]) -> bool:
        """Into ``batch``: the agents of ``groups`` (led here) that differ from what this node
        last wrote of them in the group's current (term, epoch), at most ``AGENTS_PER_FLUSH``;
        whether some were left for the next flush.  No await: each group's agents are read as
        of its applied index, the rows' ``source_index``."""
        written, state, host = self._agents_written, self.state, self.driver.host
        for g in [g for g in written if g not in groups]:
            del written[g]  # led no more: a later leadership writes them all again
        stale = False
        applied: dict[int, int] = {}
        for g in groups:
            raft = host.node(g).raft
            key = (raft.term, state.postgres_epoch(g))
            applied[g] = raft.log.applied
            if g not in written or written[g][0] != key:
                written[g] = (key, {})
                stale = True
        count = state.group_count
        if count is None or not written or not (stale or self._agents_dirty):
            return False  # (leading no group: the registry is listed once it leads one)
        self._agents_dirty = False
        agents, _ = state.list_agents(None, _ALL)  # by id, this node's groups
        for a in agents:
            g = group_of(a.id, count)
            entry = written.get(g)
            if entry is None or entry[1].get(a.id) == a:
                continue  # not led here; written as it is
            if len(batch.agents) >= AGENTS_PER_FLUSH:
                self._agents_dirty = True
                return True
            batch.agents.append(agent_record(a, applied[g]))
            batch.agents_read.append((g, entry[0], a))
        return False

    def _wrote_agents(self, batch: _Batch) -> None:
        """After the COMMIT: remember what was written (unless the group's leadership or epoch
        changed meanwhile: then it is written again)."""
        written = self._agents_written
        for g, key, a in batch.agents_read:
            entry = written.get(g)
            if entry is not None and entry[0] == key:
                entry[1][a.id] = a

    async def _messages(
        self, sid: str, after: int, last: int, limit: int, bytes_max: int
    ) -> tuple[list[StoredMessage], int, int]:
        """Consecutive messages of ``sid`` from ``after + 1`` up to ``last`` (at most ``limit``,
        about ``bytes_max`` bytes: ``history.message_bytes``), from the hot tail or the archive;
        the seq up to which every message is in them or skipped as gone; their bytes."""
        out: list[StoredMessage] = []
        upto, size = after, 0
        while upto < last and len(out) < limit and size < bytes_max:
            r = self.state.read(sid, upto, limit - len(out))
            if r is None:
                break
            found = r.messages
            if upto + 1 < r.first_seq:
                to = min(r.first_seq - 1, last)
                archived = await self._archived(sid, upto, to, limit - len(out))
                if archived is None:  # being copied from a peer: later
                    break
                found = archived
                if not found or found[0].seq != upto + 1:
                    to = min(found[0].seq if found else r.first_seq, last + 1)
                    log.warning(
                        "postgres: messages %d..%d of session %r are gone from this node "
                        "(retention); they cannot be copied to Postgres",
                        upto + 1,
                        to - 1,
                        sid,
                    )
                    self.stats.skipped += to - upto - 1
                    upto = to - 1
                    continue
            took = 0
            for m in found:
                if m.seq != upto + 1 or m.seq > last or len(out) >= limit:
                    break
                if size >= bytes_max:
                    break
                out.append(m)
                upto = m.seq
                size += message_bytes(m)
                took += 1
            if not took:
                break
        return out, upto, size

    async def _archived(
        self, sid: str, after: int, to: int, limit: int
    ) -> list[StoredMessage] | None:
        """Archived messages of ``sid`` in ``after+1..to`` (waiting for the archive's queue if
        the first is missing); None while a backfill range covers ``after + 1``."""
        for _, _, lo, hi in self.archive.backfill_ranges(sid):
            if lo <= after + 1 <= hi:
                return None
        bytes_max = FLUSH_BYTES_MAX
        rows = await self.archive.read(sid, after, limit, to_seq=to, bytes_max=bytes_max)
        if not rows or rows[0].seq != after + 1:
            await self.archive.barrier()  # evicted from the tail, still queued for the archive?
            rows = await self.archive.read(sid, after, limit, to_seq=to, bytes_max=bytes_max)
        return rows

    async def _write(self, batch: _Batch) -> int:
        """One transaction; the message rows Postgres did not have."""
        async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn, conn.transaction():
            if batch.sessions:
                await conn.copy_records_to_table(
                    "flush_sessions", records=batch.sessions, columns=SESSION_COLUMNS
                )
                await conn.execute(INSERT_SESSIONS)
            inserted = 0
            if batch.messages:
                inserted = await self._write_messages(conn, batch.messages)
            if batch.cursors:
                await conn.copy_records_to_table(
                    "flush_cursors", records=batch.cursors, columns=CURSOR_COLUMNS
                )
                await conn.execute(INSERT_CURSORS)
            if batch.agents:
                await conn.copy_records_to_table(
                    "flush_agents", records=batch.agents, columns=AGENT_COLUMNS
                )
                await conn.execute(INSERT_AGENTS)
        return inserted

    async def _write_messages(self, conn: Any, messages: list[tuple[Any, ...]]) -> int:
        """The message rows, in the flush's transaction; those Postgres did not have.  Rows
        above the watermarks are normally not in Postgres: ``COPY`` them straight into
        ``messages``, in a savepoint.  A row already there (a lost watermark, a backfill's
        reset) fails the ``COPY`` with a unique violation: back to the savepoint, and the rows
        go through a temporary table and ``ON CONFLICT DO NOTHING`` (counted:
        ``copy_fallbacks``)."""
        try:
            async with conn.transaction():  # a savepoint
                await _copy_in_steps(conn, "messages", messages)
            return len(messages)
        except asyncpg.UniqueViolationError:
            self.stats.copy_fallbacks += 1
        await _copy_in_steps(conn, "flush_messages", messages)
        status = await conn.execute(INSERT_MESSAGES)
        return int(status.rsplit(" ", 1)[-1])

    async def _record(self, batch: _Batch) -> None:
        """Propose the new watermarks to each group and wait for them (a failure is left to
        the next flush, by this node or the group's next leader: the rows are idempotent)."""
        futures: list[asyncio.Future[object]] = []
        for group, marks in batch.marks.items():
            for i in range(0, len(marks), MARKS_PER_COMMAND):
                chunk = marks[i : i + MARKS_PER_COMMAND]
                command = encode_command(PostgresFlushed(chunk, batch.epochs[group]))
                with contextlib.suppress(RaftError):  # no longer the leader
                    futures.append(self.driver.propose(group, command))
        if not futures:
            return
        done, pending = await asyncio.wait(futures, timeout=self.config.propose_timeout_s)
        for f in pending:
            f.cancel()
        for f in done:
            if not f.cancelled() and f.exception() is not None:
                log.info("postgres: a watermark was not recorded: %r", f.exception())


async def _copy_in_steps(conn: Any, table: str, messages: list[tuple[Any, ...]]) -> None:
    """``messages`` into ``table``, ``STEP_ROWS`` rows a ``COPY``: asyncpg encodes a COPY's
    rows without yielding, and each COPY's answer lets the loop run."""
    for start in range(0, len(messages), STEP_ROWS):
        await conn.copy_records_to_table(
            table, records=messages[start : start + STEP_ROWS], columns=MESSAGE_COLUMNS
        )


async def _init_connection(conn: Any) -> None:
    await use_millis(conn)  # timestamps as ms, no datetime per row (rows.py)
    for statement in TEMP_TABLES:
        await conn.execute(statement)


__all__ = ["AGENTS_PER_FLUSH", "FLUSH_BYTES_MAX", "Flusher", "FlusherStats", "PostgresConfig"]
