"""A node leaving a group (ctxstore/retire.py): the state forgets the group, the archive
deletes its rows, the history stops serving it, and a crash between the steps leaves neither a
resurrected group nor orphan rows after the restart."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ctxstore import commands as c
from ctxstore.archive import Archive, ArchiveConfig, Retention
from ctxstore.history import History, TailMiss
from ctxstore.records import StoredMessage
from ctxstore.retire import Retirer
from ctxstore.state import ConversationState, StateLimits
from raft import GroupNotHosted, NodeStopped
from raft.core import Config
from raft.driver import Driver, DriverConfig
from raft.multi import HostConfig, MultiRaft
from raft.wal import WAL

from .test_archive import FAST, append, msg, opened, run, seqs
from .test_state import Node


# -- the state -------------------------------------------------------------------------------------
def test_drop_group_forgets_sessions_cursors_dedupe_and_agents() -> None:
    node = Node(groups=None)
    for sid, group in (("a", 1), ("b", 1), ("z", 2)):
        node.create(sid, user="u1", group=group)
        node.append(sid, "hello", cmid=f"{sid}-1", group=group)
        node.append(sid, "again", group=group)
    node.run(c.MarkRead("a", "u1", 1), group=1)
    assert node.state.drop_group(1) == ["a", "b"]
    for sid in ("a", "b"):
        assert node.state.get_session(sid) is None and node.state.read(sid, 0, 10) is None
        assert node.state.unread(sid, "u1") is None and node.state.last_seq(sid) is None
        assert node.state.cursors(sid) is None
    assert node.state.user_session_ids("u1") == ["z"]
    assert node.state.hosted_groups == [2] and node.seqs("z") == [1, 2]
    assert node.state.tail_charge(1) == 0
    assert node.state.drop_group(1) == []  # nothing left: a no-op
    # Hosted again, the group starts empty: the same client_msg_id is a new append.
    node.create("a", user="u1", group=1)
    got = node.append("a", "hello", cmid="a-1", group=1)
    assert isinstance(got, c.Appended) and got.seq == 1 and not got.deduped


# -- the archive -----------------------------------------------------------------------------------
def test_drop_group_deletes_its_rows_ranges_and_index_durably(tmp_path: Path) -> None:
    async def main() -> None:
        config = ArchiveConfig(batch_rows_max=4, flush_interval_s=0.001)
        async with opened(tmp_path / "a.db", config) as a:
            append(a, 1, "s", range(1, 11))
            append(a, 1, "t", range(1, 4), index_base=10)
            append(a, 2, "u", range(1, 6))
            # A restore of group 1 that lacks seqs 1..4 of "v": a backfill range of group 1.
            a.restore(1, 30, [("v", 5, 6)], [msg("v", 5), msg("v", 6)])
            await a.barrier()
            assert a.backfill_ranges("v") == [(1, "v", 1, 4)]
            a.add(1, 31, msg("t", 4))  # queued, not yet committed: deleted with the rest
            assert a.holds_group(1) and a.holds_group(2)
            await a.drop_group(1, ["s", "t", "v"])
            for sid in ("s", "t", "v"):
                assert await seqs(a, sid) == []
            assert a.backfill_ranges() == [] and not a.holds_group(1)
            assert a.archived_index(1) == 0 and a.archived_index(2) == 5
            assert await seqs(a, "u") == [1, 2, 3, 4, 5]
            assert a.stats.rows_dropped == 10 + 4 + 2 and a.stats.groups_dropped == 1
        async with opened(tmp_path / "a.db", config) as a:  # durable
            assert not a.holds_group(1) and a.holds_group(2)
            assert await seqs(a, "s") == [] and await seqs(a, "u") == [1, 2, 3, 4, 5]
            assert a.backfill_ranges() == []

    run(main())


def test_drop_group_without_sessions_finds_them_in_the_archive(tmp_path: Path) -> None:
    """After a crash the state no longer knows the group's sessions: the archive scans for
    them.  A group's rows always come with its index row, even before anything is applied
    (``holds_group`` finds a drop cut short)."""

    async def main() -> None:
        async with opened(tmp_path / "a.db") as a:
            a.add(3, 1, msg("p", 1))  # rows, no applied index yet
            a.add(3, 2, msg("q", 1))
            a.add(4, 1, msg("r", 1))
            await a.barrier()
            assert a.holds_group(3) and a.archived_index(3) == 0
        async with opened(tmp_path / "a.db") as a:
            assert a.holds_group(3)
            await a.drop_group(3)
            assert await seqs(a, "p") == [] and await seqs(a, "q") == []
            assert await seqs(a, "r") == [1] and not a.holds_group(3)

    run(main())


# -- the history -----------------------------------------------------------------------------------
def test_the_history_stops_serving_a_dropped_group(tmp_path: Path) -> None:
    async def main() -> None:
        async with opened(tmp_path / "a.db") as a:
            node = Node(StateLimits(tail_messages_max=2), groups=None)
            node.create("s", group=1)
            for i in range(5):
                node.append("s", f"m{i}", group=1)
            append(a, 1, "s", range(1, 4))  # what left the tail is in the archive
            await a.barrier()
            history = History(node.state, a, Retention(), lambda: 0)
            page = await history.read("s", 0, 10)
            assert page is not None and [m.seq for m in page.messages] == [1, 2, 3, 4, 5]
            real = a.read

            async def read_then_leave(*args: Any, **kw: Any) -> list[StoredMessage]:
                rows = await real(*args, **kw)
                node.state.drop_group(1)  # the group leaves while the archive is read
                return rows

            a.read = read_then_leave  # type: ignore[method-assign]
            assert await history.read("s", 0, 10) is None
            a.read = real  # type: ignore[method-assign]
            assert await history.read("s", 0, 10) is None
            assert history.read_tail("s", 3, 10) is TailMiss.UNKNOWN_SESSION

    run(main())


# -- the Retirer on a real driver and WAL (one node; the crash cases) ------------------------------
class ToArchive:
    """The part of ``Node`` that hands messages leaving the tails to the archive."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive

    def on_message(self, *args: Any) -> None:
        pass

    on_session = on_cursor = on_context = on_agent = on_message

    def on_evict(self, group: int, index: int, message: StoredMessage) -> None:
        self.archive.add(group, index, message)

    def on_applied(self, group: int, index: int) -> None:
        self.archive.applied(group, index)


@dataclass
class Single:
    """One node hosting groups 0 and 1 alone: driver, WAL, state (tails of 2), archive, as
    ``ctxstore.node`` assembles them, and the start-up a node does with a ``Retirer``."""

    path: Path
    archive: Archive = field(init=False)
    wal: WAL = field(init=False)
    state: ConversationState = field(init=False)
    driver: Driver = field(init=False)
    retirer: Retirer = field(init=False)
    recovered: list[int] = field(init=False)
    clock: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def start(self) -> None:
        self.archive = Archive(str(self.path / "archive.sqlite3"), FAST)
        await self.archive.start()
        self.wal = WAL.open(self.path / "wal", segment_bytes=1 << 20, preallocate=False)
        self.state = ConversationState(
            StateLimits(tail_messages_max=2), None, ToArchive(self.archive)
        )
        host = MultiRaft(HostConfig(Config(1, election_ticks=10, seed=3)))
        self.driver = Driver(host, self.wal, self.state, DriverConfig(tick_s=0.01))
        self.driver.compact_floor = self.archive.archived_index
        self.retirer = Retirer(self.driver, self.state, self.archive)
        removed = self.driver.removed_groups()
        self.recovered = await self.retirer.recover(removed)
        self.driver.add_groups([g for g in (0, 1) if g not in removed], (1,))
        await self.driver.start()
        host = self.driver.host
        for g in host.groups():  # elected, and everything in the log applied again
            while host.leader(g) != 1 or host.status(g).applied < host.status(g).last_index:
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        await self.driver.stop()
        self.wal.close()
        await self.archive.stop()

    async def fill(self, group: int, sid: str, n: int) -> None:
        await self.driver.propose(group, c.encode_command(c.CreateSession(sid, "u", "a", {}, 1)))
        for i in range(n):
            cmd = c.Append(
                sid, "user", "u", "text", f"{sid}{i}", {}, None, None, 1, next(self.clock)
            )
            await self.driver.propose(group, c.encode_command(cmd))
        await self.archive.barrier()


@asynccontextmanager
async def single(path: Path) -> AsyncIterator[Single]:
    node = Single(path)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def archived(path: Path) -> int:
    import sqlite3

    with sqlite3.connect(path / "archive.sqlite3") as db:
        return int(db.execute("SELECT count(*) FROM messages WHERE grp = 0").fetchone()[0])


def test_a_retired_group_stays_gone_after_a_restart(tmp_path: Path) -> None:
    async def main() -> None:
        async with single(tmp_path) as node:
            await node.fill(0, "a", 6)
            await node.fill(1, "b", 3)
            assert archived(tmp_path) == 4  # seqs 1-4 left the tails of 2
            await node.retirer.retire(0)
            assert 0 not in node.driver.host and node.wal.removed(0)
            assert node.state.hosted_groups == [1] and node.state.get_session("a") is None
            assert not node.archive.holds_group(0) and archived(tmp_path) == 0
            with pytest.raises(GroupNotHosted):
                node.driver.propose(0, b"")
            assert node.retirer.retiring == set() and node.retirer.retired == 1
        async with single(tmp_path) as node:
            assert node.recovered == [] and node.driver.removed_groups() == [0]
            assert list(node.driver.host.groups()) == [1] and node.state.hosted_groups == [1]
            assert node.state.last_seq("b") == 3

    run(main())


def test_a_crash_after_the_tombstone_before_the_archive_leaves_no_orphan_rows(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        async with single(tmp_path) as node:
            await node.fill(0, "a", 6)
            await node.driver.remove_group(0)  # step 1 done, durable ...
            node.state.drop_group(0)  # ... then the process dies before the archive's step
        assert archived(tmp_path) == 4
        async with single(tmp_path) as node:
            assert node.recovered == [0]  # the restart finishes it
            assert archived(tmp_path) == 0 and not node.archive.holds_group(0)
            assert node.state.get_session("a") is None and 0 not in node.driver.host
        async with single(tmp_path) as node:
            assert node.recovered == []

    run(main())


def test_a_crash_before_the_tombstone_keeps_the_whole_group(tmp_path: Path) -> None:
    """The removal was asked but the process died before the pass that writes the tombstone:
    nothing was deleted, and the group comes back whole (the node applies its removal again,
    tests/raft/test_remove_group.py)."""

    async def main() -> None:
        node = Single(tmp_path)
        await node.start()
        await node.fill(0, "a", 6)
        future = node.driver.remove_group(0)
        node.state.drop_group(0)
        await node.stop()  # no pass runs any more: the tombstone is never submitted
        with pytest.raises(NodeStopped):
            await future
        async with single(tmp_path) as node:
            assert node.driver.removed_groups() == [] and node.recovered == []
            assert node.state.last_seq("a") == 6 and archived(tmp_path) == 4

    run(main())


def test_a_group_is_not_hosted_again_while_it_retires(tmp_path: Path) -> None:
    async def main() -> None:
        async with single(tmp_path) as node:
            task = asyncio.ensure_future(node.retirer.retire(0))
            await asyncio.sleep(0)
            assert node.retirer.retiring == {0}
            await task
            node.driver.add_groups([0], (1,))  # hosted again: empty, never bootstrapped
            assert node.driver.host.node(0).raft.voters == ()
            assert os.path.exists(tmp_path / "wal")

    run(main())
