"""A session's history as one sequence: the hot tail in memory, older messages from the local
archive (design §5.4).  Reads, subscription replays and peers backfilling their archive all go
through ``History.read``.

Rules of this module:
- A page holds messages with consecutive seqs, oldest first, starting right after ``after_seq``
  or right after a gap.  A gap (``Page.gap``) is a range the node cannot serve: deleted by the
  retention limit (reason ``retention``) or missing for another reason (``unavailable``).  A
  page is never silent about a missing seq.
- Messages older than the tail were archived before they left the tail, or are still queued
  for the archive: when the archive answers with a hole, the read waits for what is queued
  (``Archive.barrier``) and asks again before calling it a gap.
- A range the archive is still receiving from a peer (after an InstallSnapshot) is not served:
  ``HistoryUnavailable`` (retryable), never a gap.
- Retention hides messages in the tail too: by count (``seq <= last_seq - max_messages``) and by
  age (``inserted_at`` older than ``max_age_s``), so a reader sees one history whichever part
  of the node holds it.
- Pages are bounded by ``limit`` messages and about ``bytes_max`` bytes (at least one message).
- With ``older`` (``postgres_serve_history``: ``ctxstore/pg/history.py``) retention limits what
  the node keeps, not what it serves: nothing is hidden by count or age, and a range the archive
  lacks (retention deleted it, always below the Postgres watermark) is paged from ``older``,
  then merged with what the node still holds.  A range ``older`` does not hold either is a gap
  as before; ``older`` failing (Postgres down, slow, not connected yet) is
  ``HistoryUnavailable`` (retryable), never a gap: the rows are there, only not reachable now.
- A session whose group is not hosted here (never, or no longer: the node left the group and
  dropped it, ctxstore/retire.py) is unknown: ``None``, even for a read that was waiting for
  the archive when the group left.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Literal, NamedTuple

from .archive import Archive, Retention
from .records import StoredMessage
from .state import ConversationState, message_bytes

PAGE_BYTES_MAX = 1024 * 1024

# (session_id, after_seq, to_seq, limit, bytes_max) -> the messages after ``after_seq`` up to
# ``to_seq`` with consecutive seqs from the first one it holds (or []), at most ``limit`` and
# about ``bytes_max`` bytes; raises HistoryUnavailable when it cannot answer now.
OlderSource = Callable[[str, int, int, int, int], Awaitable[list[StoredMessage]]]


class HistoryUnavailable(Exception):
    """The node cannot serve this range yet (retryable)."""


class TailMiss(enum.Enum):
    """Why ``History.read_tail`` served no page."""

    UNKNOWN_SESSION = "unknown session"  # not a session of this node's groups
    NEEDS_READ = "needs read"  # the archive is needed, or retention by age may hide messages


class _Retry(enum.Enum):
    TAIL_MOVED = "tail moved"  # the tail moved on while the archive was read: read again


class Page(NamedTuple):
    messages: list[StoredMessage]
    gap: tuple[int, int, str] | None  # (from_seq, to_seq, reason) just before ``messages``
    last_seq: int  # the session's last seq when the page was read


def _capped(messages: list[StoredMessage], bytes_max: int) -> list[StoredMessage]:
    """The first ``messages`` within about ``bytes_max`` (at least one)."""
    size = 0
    for i, m in enumerate(messages):
        size += message_bytes(m)
        if size > bytes_max and i > 0:
            return messages[:i]
    return messages


class History:
    def __init__(
        self,
        state: ConversationState,
        archive: Archive,
        retention: Retention,
        clock_ms: Callable[[], int],
    ) -> None:
        self.state = state
        self.archive = archive
        self.retention = retention
        self.clock_ms = clock_ms
        self.archive_reads = 0  # pages that needed the archive
        self.archive_barriers = 0  # of those, found a hole and waited for the archive's queue
        self.older: OlderSource | None = None  # what the archive lacks (postgres_serve_history)

    def _gap_reason(self) -> str:
        r = self.retention
        return "unavailable" if r.max_messages is None and r.max_age_s is None else "retention"

    def _age_cut_ms(self) -> int | None:
        age = self.retention.max_age_s
        if age is None or self.older is not None:
            return None
        return self.clock_ms() - int(age * 1000)

    def _keep(self) -> int | None:
        """The newest messages retention lets a reader see (None: all)."""
        return None if self.older is not None else self.retention.max_messages

    def read_tail(
        self, session_id: str, after_seq: int, limit: int, bytes_max: int = PAGE_BYTES_MAX
    ) -> Page | TailMiss:
        """``read`` without awaiting, when the hot tail alone serves the page (the common case:
        a reader near the end): the page, or why not (then ``read``, unless the session is
        unknown)."""
        if self._age_cut_ms() is not None:
            return TailMiss.NEEDS_READ
        r = self.state.read(session_id, after_seq, limit)
        if r is None:
            return TailMiss.UNKNOWN_SESSION
        last_seq = r.last_seq
        if after_seq >= last_seq:
            return Page([], None, last_seq)
        keep = self._keep()
        if after_seq + 1 < r.first_seq or (keep is not None and after_seq < last_seq - keep):
            return TailMiss.NEEDS_READ
        return Page(_capped(r.messages, bytes_max), None, last_seq)

    async def read(
        self, session_id: str, after_seq: int, limit: int, bytes_max: int = PAGE_BYTES_MAX
    ) -> Page | None:
        """The next page after ``after_seq``; None if the session is unknown here.  Pages that
        are all gap (expired by age) are merged into one gap, up to 64 pages at a time."""
        after = after_seq
        gap: tuple[int, int, str] | None = None
        for _ in range(64):
            page = await self._read_page(session_id, after, limit, bytes_max)
            if page is None:
                return None
            if gap is not None:
                lo, reason = gap[0], gap[2]
                page = Page(page.messages, (lo, page.gap[1] if page.gap else after, reason),
                            page.last_seq)  # fmt: skip
            if page.messages or page.gap is None or page.gap[1] >= page.last_seq:
                return page
            gap = page.gap
            after = gap[1]
        return page

    async def _read_page(
        self, session_id: str, after_seq: int, limit: int, bytes_max: int
    ) -> Page | None:
        for _ in range(8):
            page = await self._read_once(session_id, after_seq, limit, bytes_max)
            if page is not _Retry.TAIL_MOVED:
                return page
        raise HistoryUnavailable(f"the tail of {session_id!r} moves faster than it can be read")

    async def _read_once(
        self, session_id: str, after_seq: int, limit: int, bytes_max: int
    ) -> Page | Literal[_Retry.TAIL_MOVED] | None:
        head = self.state.read(session_id, after_seq, 1)
        if head is None:
            return None
        last_seq = head.last_seq
        if after_seq >= last_seq:
            return Page([], None, last_seq)
        start = after_seq + 1
        keep = self._keep()
        if keep is not None:
            start = max(start, last_seq - keep + 1)  # deleted by count, wherever it is held
        messages: list[StoredMessage] = []
        if start < head.first_seq:  # older than the tail: the archive
            messages = await self._from_archive(
                session_id, start, head.first_seq - 1, limit, bytes_max
            )
            if self.older is not None and (not messages or messages[0].seq > start):
                hole_to = messages[0].seq - 1 if messages else head.first_seq - 1
                messages = await self._from_older(
                    session_id, start, hole_to, messages, limit, bytes_max
                )
            if self.state.last_seq(session_id) is None:
                return None  # its group left this node meanwhile: not served here any more
            start = messages[0].seq if messages else head.first_seq
        if not messages or messages[-1].seq == head.first_seq - 1:
            after = messages[-1].seq if messages else start - 1
            room = bytes_max - sum(map(message_bytes, messages))
            more = self._from_tail(session_id, after, limit - len(messages), room)
            if more and more[0].seq != after + 1:  # the tail moved on while the archive read
                if not messages:
                    return _Retry.TAIL_MOVED
                more = []
            if not messages and not more:
                return _Retry.TAIL_MOVED
            messages += more
        cut = self._age_cut_ms()
        if cut is not None:
            old = 0
            while old < len(messages) and messages[old].inserted_at < cut:
                old += 1
            if old == len(messages):  # the whole page has expired: a gap, and read on
                return Page([], (after_seq + 1, messages[-1].seq, "retention"), last_seq)
            del messages[:old]
        first = messages[0].seq
        gap = (after_seq + 1, first - 1, self._gap_reason()) if first > after_seq + 1 else None
        return Page(messages, gap, last_seq)

    def _from_tail(
        self, session_id: str, after: int, limit: int, bytes_max: int
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []
        r = self.state.read(session_id, after, limit)
        return [] if r is None else _capped(r.messages, bytes_max)

    async def _from_older(
        self,
        session_id: str,
        start: int,
        hole_to: int,
        held: list[StoredMessage],
        limit: int,
        bytes_max: int,
    ) -> list[StoredMessage]:
        """``start..hole_to``, which the archive lacks, from ``older`` (from the first seq it
        holds: what it lacks before is the page's gap), followed by ``held`` (the archive's
        messages from ``hole_to + 1``) as far as the page has room; ``held`` alone when
        ``older`` holds none of the range.  ``older`` answers consecutive seqs within the range
        and ``limit`` (``OlderSource``); its byte bound is approximate, the page's exact."""
        assert self.older is not None
        older = await self.older(session_id, start - 1, hole_to, limit, bytes_max)
        if not older:
            return held
        older = _capped(older, bytes_max)
        room = bytes_max - sum(map(message_bytes, older))
        if older[-1].seq != hole_to or room <= 0 or len(older) >= limit:
            return older
        return older + _capped(held[: limit - len(older)], room)

    async def _from_archive(
        self, session_id: str, start: int, to_seq: int, limit: int, bytes_max: int
    ) -> list[StoredMessage]:
        """Archived messages from ``start`` (or the first one after it) up to ``to_seq``, with
        consecutive seqs."""
        for lo, hi in ((r[2], r[3]) for r in self.archive.backfill_ranges(session_id)):
            if lo <= to_seq and hi >= start:
                raise HistoryUnavailable(
                    f"messages {lo}..{hi} of {session_id!r} are being copied to this node"
                )
        archive = self.archive
        self.archive_reads += 1
        rows = await archive.read(session_id, start - 1, limit, to_seq=to_seq, bytes_max=bytes_max)
        if not _complete(rows, start):
            # Evicted from the tail, maybe still queued for the archive: wait for it, ask again.
            self.archive_barriers += 1
            await archive.barrier()
            rows = await archive.read(
                session_id, start - 1, limit, to_seq=to_seq, bytes_max=bytes_max
            )
        out: list[StoredMessage] = rows
        for i in range(1, len(out)):
            if out[i].seq != out[i - 1].seq + 1:
                return out[:i]  # a hole: the next read reports it as a gap
        return out


def _complete(rows: list[StoredMessage], start: int) -> bool:
    return bool(rows) and rows[0].seq == start and rows[-1].seq - start + 1 == len(rows)


__all__ = [
    "PAGE_BYTES_MAX",
    "History",
    "HistoryUnavailable",
    "OlderSource",
    "Page",
    "TailMiss",
    "message_bytes",
]
