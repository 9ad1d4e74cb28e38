"""ctxstore.history: one history over the hot tail and the real SQLite archive."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from ctxstore import commands as c
from ctxstore.archive import Archive, ArchiveConfig, Retention
from ctxstore.history import History, HistoryUnavailable, Page, TailMiss
from ctxstore.placement import group_of
from ctxstore.records import StoredMessage
from ctxstore.state import ConversationState, StateLimits
from raft.messages import Entry
from wire.protocol import Session

GROUPS = 8


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(asyncio.wait_for(coro, 30))


class Feed:
    """A state whose observer hands evicted messages to the archive, as the node does."""

    def __init__(self, path: Path, tail: int = 10, retention: Retention | None = None) -> None:
        self.retention = retention or Retention()
        self.archive = Archive(
            str(path / "a.sqlite3"),
            ArchiveConfig(flush_interval_s=0.001, retention=self.retention),
            clock_ms=lambda: self.now,
        )
        self.state = ConversationState(StateLimits(tail_messages_max=tail), GROUPS, self)
        self.history = History(self.state, self.archive, self.retention, lambda: self.now)
        self.index: dict[int, int] = {}
        self.now = 1_000_000

    def on_message(self, group: int, index: int, user_id: str, message: StoredMessage) -> None:
        pass

    def on_evict(self, group: int, index: int, message: StoredMessage) -> None:
        self.archive.add(group, index, message)

    def on_session(self, group: int, index: int, session: Session) -> None:
        pass

    def on_cursor(self, session_id: str, owner_id: str, user_id: str, seq: int) -> None:
        pass

    def on_applied(self, group: int, index: int) -> None:
        self.archive.applied(group, index)

    def on_agent(self, agent_id: str) -> None:
        pass

    def run(self, cmd: c.Command) -> object:
        g = group_of(cmd.session_id, GROUPS)
        self.index[g] = self.index.get(g, 0) + 1
        return self.state.apply(g, [Entry(1, self.index[g], data=c.encode_command(cmd))])[0]

    def append(self, sid: str, n: int) -> None:
        for _ in range(n):
            self.now += 1000
            self.run(c.Append(sid, "user", "u", "text", f"t{self.now}", {}, None, None, None,
                              self.now))  # fmt: skip

    async def all(
        self, sid: str, after: int = 0, limit: int = 7
    ) -> list[StoredMessage | tuple[int, int, str]]:
        out: list[StoredMessage | tuple[int, int, str]] = []
        while True:
            page = await self.history.read(sid, after, limit)
            assert isinstance(page, Page)
            if page.gap is not None:
                out.append(page.gap)
                assert page.gap[0] == after + 1
                after = page.gap[1]
            if page.messages:
                assert page.messages[0].seq == after + 1
                out += page.messages
                after = page.messages[-1].seq
            if after >= page.last_seq:
                return out


def seqs(items: list[Any]) -> list[Any]:
    return [m.seq if isinstance(m, StoredMessage) else m for m in items]


def test_history_spans_archive_and_tail_in_pages(tmp_path: Path) -> None:
    async def main() -> None:
        f = Feed(tmp_path)
        await f.archive.start()
        f.run(c.CreateSession("s", "u", "a", {}, 1))
        f.append("s", 95)  # the tail holds 86..95; 1..85 only in the archive (maybe queued)
        assert seqs(await f.all("s")) == list(range(1, 96))
        assert seqs(await f.all("s", after=80, limit=3)) == list(range(81, 96))
        page = await f.history.read("s", 95, 5)
        assert page == Page([], None, 95)
        assert await f.history.read("nope", 0, 5) is None
        await f.archive.stop()

    run(main())


def test_retention_by_count_and_age_shows_as_one_gap(tmp_path: Path) -> None:
    async def main() -> None:
        f = Feed(tmp_path, retention=Retention(max_messages=30))
        await f.archive.start()
        f.run(c.CreateSession("s", "u", "a", {}, 1))
        f.append("s", 100)
        await f.archive.barrier()
        assert seqs(await f.all("s")) == [(1, 70, "retention"), *range(71, 101)]
        assert seqs(await f.all("s", after=90)) == list(range(91, 101))
        await f.archive.stop()

        g = Feed(tmp_path / "age", retention=Retention(max_age_s=20))
        (tmp_path / "age").mkdir()
        await g.archive.start()
        g.run(c.CreateSession("s", "u", "a", {}, 1))
        g.append("s", 40)  # one per simulated second: 20 s back from seq 40 is seq 20 (kept)
        assert seqs(await g.all("s")) == [(1, 19, "retention"), *range(20, 41)]
        g.now += 100_000  # everything expired: one gap, nothing else
        assert seqs(await g.all("s")) == [(1, 40, "retention")]
        await g.archive.stop()

    run(main())


class Older:
    """``History.older`` as Postgres would answer: every message evicted so far (``keep``),
    in pages; ``down``: it cannot answer."""

    def __init__(self, f: Feed) -> None:
        self.rows: dict[int, StoredMessage] = {}
        self.calls: list[tuple[int, int, int]] = []
        self.down = False
        evict = f.on_evict

        def keep(group: int, index: int, message: StoredMessage) -> None:
            self.rows[message.seq] = message
            evict(group, index, message)

        f.on_evict = keep  # type: ignore[method-assign]
        f.history.older = self.read

    async def read(
        self, sid: str, after: int, to_seq: int, limit: int, bytes_max: int
    ) -> list[StoredMessage]:
        self.calls.append((after, to_seq, limit))
        if self.down:
            raise HistoryUnavailable("Postgres did not answer")
        out: list[StoredMessage] = []
        for seq in range(after + 1, to_seq + 1):
            if seq in self.rows:
                out.append(self.rows[seq])
            elif out:
                break
            if len(out) == limit:
                break
        return out


def test_with_older_retention_deleted_history_comes_from_it(tmp_path: Path) -> None:
    async def main() -> None:
        f = Feed(tmp_path, retention=Retention(max_messages=30))
        older = Older(f)
        await f.archive.start()
        f.run(c.CreateSession("s", "u", "a", {}, 1))
        f.append("s", 100)  # the tail: 91..100; the archive keeps 30 of its own: 61..90
        await f.archive.barrier()
        assert [m.seq for m in await f.archive.read("s", 0, 100)] == list(range(61, 91))
        got = await f.all("s")
        assert seqs(got) == list(range(1, 101))  # retention hides nothing: no gap
        assert got[:90] == [older.rows[s] for s in range(1, 91)]
        assert all(a >= 0 and to == 60 for a, to, _ in older.calls)  # only what the archive lacks
        # a page that starts in Postgres goes on in the archive, then the tail
        page = await f.history.read("s", 55, 40)
        assert page is not None and page.gap is None
        assert [m.seq for m in page.messages] == list(range(56, 96))
        page = await f.history.read("s", 0, 50, bytes_max=1)  # about 1 byte: one message
        assert page is not None and [m.seq for m in page.messages] == [1]
        # what Postgres lacks too is a gap, as without it
        for s in (*range(1, 11), 30, 31):
            del older.rows[s]
        assert seqs(await f.all("s")) == [
            (1, 10, "retention"),
            *range(11, 30),
            (30, 31, "retention"),
            *range(32, 101),
        ]
        # Postgres down: unavailable (never a gap); what this node holds is still served
        older.down = True
        with pytest.raises(HistoryUnavailable):
            await f.history.read("s", 20, 10)
        assert seqs(await f.all("s", after=70)) == list(range(71, 101))
        await f.archive.stop()

        g = Feed(tmp_path / "age", retention=Retention(max_age_s=20))
        (tmp_path / "age").mkdir()
        Older(g)
        await g.archive.start()
        g.run(c.CreateSession("s", "u", "a", {}, 1))
        g.append("s", 40)
        g.now += 100_000  # every message is older than max_age_s: hidden only without older
        assert seqs(await g.all("s")) == list(range(1, 41))
        assert g.history.read_tail("s", 35, 10) != TailMiss.NEEDS_READ
        await g.archive.stop()

    run(main())


def test_a_range_being_copied_from_a_peer_is_unavailable_not_a_gap(tmp_path: Path) -> None:
    async def main() -> None:
        f = Feed(tmp_path)
        await f.archive.start()
        f.run(c.CreateSession("s", "u", "a", {}, 1))
        f.append("s", 30)
        g = group_of("s", GROUPS)
        # As after an InstallSnapshot: the state has seqs up to 80 (its tail 71..80); the archive
        # holds what this replica evicted (1..20): 21..70 are missing.
        other = ConversationState(StateLimits(tail_messages_max=10), GROUPS)
        other.apply(g, [Entry(1, 1, data=c.encode_command(c.CreateSession("s", "u", "a", {}, 1)))])
        for i in range(80):
            cmd = c.Append("s", "user", "u", "text", f"x{i}", {}, None, None, None, 5 + i)
            other.apply(g, [Entry(1, 2 + i, data=c.encode_command(cmd))])
        f.state.restore(g, other.snapshot(g))
        sessions, tail = f.state.group_tails(g)
        f.archive.restore(g, 500, sessions, tail)
        await f.archive.barrier()
        assert f.archive.backfill_ranges("s") == [(g, "s", 21, 70)]
        with pytest.raises(HistoryUnavailable):
            await f.all("s")
        assert seqs(await f.all("s", after=70)) == list(range(71, 81))
        rows = await other_rows("s")
        await f.archive.fill("s", rows)
        assert seqs(await f.all("s")) == list(range(1, 81))
        await f.archive.stop()

    run(main())


async def other_rows(sid: str) -> list[StoredMessage]:
    """Messages 21..70 as the other replica would serve them (made again: same commands)."""
    return [StoredMessage(sid, s, "user", "u", "text", f"x{s - 1}", {}, None, 4 + s, None)
            for s in range(21, 71)]  # fmt: skip


def test_read_tail_serves_the_tail_without_waiting_and_defers_the_rest(tmp_path: Path) -> None:
    async def main() -> None:
        f = Feed(tmp_path)
        await f.archive.start()
        f.run(c.CreateSession("s", "u", "a", {}, 1))
        f.append("s", 30)  # the tail holds 21..30
        page = f.history.read_tail("s", 25, 3)
        assert isinstance(page, Page) and seqs(page.messages) == [26, 27, 28]
        assert f.history.read_tail("s", 30, 3) == Page([], None, 30)
        assert f.history.read_tail("s", 5, 3) is TailMiss.NEEDS_READ  # the archive is needed
        assert f.history.read_tail("nope", 0, 3) is TailMiss.UNKNOWN_SESSION
        assert await f.history.read("s", 25, 3) == page
        await f.archive.stop()

    run(main())
