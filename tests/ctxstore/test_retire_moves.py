"""A group moves away from a node and back, over real sockets and WALs, while appends go on:
the node that left drops the group's Raft log, state and archive rows (ctxstore/retire.py,
wired as ``ctxstore.node`` will wire it: ``Driver.on_removed`` -> ``Retirer.retire``), keeps it
gone across a restart, then hosts it again from nothing and ends up with every acknowledged
append exactly once, read through its history (hot tail and archive)."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import Counter
from pathlib import Path

from ctxstore import commands as c
from ctxstore.archive import Archive, ArchiveConfig, Retention
from ctxstore.history import History
from ctxstore.retire import Retirer
from ctxstore.state import ConversationState, StateLimits
from raft import ConfChange, ConfChangeType, RaftError, Role
from raft.core import Config
from raft.driver import Driver, DriverConfig
from raft.multi import HostConfig, MultiRaft
from raft.transport import Transport
from raft.wal import WAL
from tests.raft.test_driver import SECRET, run, until

from .test_retire import ToArchive

GROUP = 0
SID = "s"


class Replica:
    """One node of group 0: WAL, driver, transport, state with tails of 8 messages (the rest
    goes to the archive), archive, history, and a node's start-up with a ``Retirer``."""

    def __init__(self, path: Path, node_id: int, voters: tuple[int, ...]) -> None:
        self.id = node_id
        self.path = path / f"n{node_id}"
        self.voters = voters
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, sock: socket.socket, peers: dict[int, tuple[str, int]]) -> None:
        self.path.mkdir(exist_ok=True)
        self.archive = Archive(
            str(self.path / "archive.sqlite3"), ArchiveConfig(flush_interval_s=0.005)
        )
        await self.archive.start()
        self.wal = WAL.open(self.path / "wal", segment_bytes=1 << 20, preallocate=False)
        limits = StateLimits(tail_messages_max=8)
        self.state = ConversationState(limits, None, ToArchive(self.archive))
        self.history = History(self.state, self.archive, Retention(), lambda: 0)
        self.host = MultiRaft(HostConfig(self.raft_config()))
        self.driver = Driver(self.host, self.wal, self.state, DriverConfig(tick_s=0.01))
        self.driver.compact_floor = self.archive.archived_index
        self.retirer = Retirer(self.driver, self.state, self.archive)
        self.driver.on_removed = self._removed
        removed = self.driver.removed_groups()
        await self.retirer.recover(removed)
        self.driver.add_groups([g for g in [GROUP] if g not in removed], self.voters)
        on_batch, up, down, snap = self.driver.transport_callbacks()
        self.transport = Transport(
            self.id, "c", SECRET, sock, peers, on_batch, up, down, snap,
            backoff_min_s=0.01, backoff_max_s=0.1,
        )  # fmt: skip
        self.driver.attach(self.transport)
        await self.transport.start()
        await self.driver.start()

    def raft_config(self) -> Config:
        return Config(self.id, election_ticks=10, seed=3)

    def _removed(self, group: int) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(self.retirer.retire(group)))

    async def stop(self) -> None:
        await asyncio.gather(*self.tasks)
        await self.driver.stop()
        await self.transport.close()
        self.wal.close()
        await self.archive.stop()

    def hosts(self) -> bool:
        return GROUP in self.host

    def leads(self) -> bool:
        return self.hosts() and self.host.node(GROUP).raft.role is Role.LEADER

    async def contents(self) -> list[str]:
        """Every message of the session, in seq order, through the history."""
        out: list[str] = []
        while True:
            page = await self.history.read(SID, len(out), 100)
            assert page is not None and page.gap is None, page
            if not page.messages:
                return out
            assert [m.seq for m in page.messages] == list(
                range(len(out) + 1, len(out) + 1 + len(page.messages))
            )
            out += [m.content for m in page.messages]


def relisten(address: tuple[str, int]) -> socket.socket:
    """A listening socket on ``address`` again (a restarted node keeps its peer address)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(address)
    s.listen()
    return s


def leader(replicas: list[Replica]) -> Replica | None:
    leads = [r for r in replicas if r.leads()]
    return leads[0] if len(leads) == 1 else None


async def change(replicas: list[Replica], kind: ConfChangeType, node: int) -> None:
    """A membership change of group 0 through its leader, asked again until it applies."""
    for _ in range(200):
        lead = leader(replicas)
        if lead is not None:
            try:
                await lead.driver.propose_conf_change(GROUP, ConfChange(kind, node))
                return
            except RaftError:
                pass
        await asyncio.sleep(0.02)
    raise AssertionError(f"{kind} of {node} never applied")


async def caught_up(replicas: list[Replica], node: int) -> None:
    def done() -> bool:
        lead = leader(replicas)
        if lead is None:
            return False
        st = lead.host.status(GROUP)
        return node in st.progress and st.progress[node][1] >= st.commit

    await until(done, timeout=30, what=f"node {node} caught up")


async def move(replicas: list[Replica], to: int, away: int) -> None:
    """The reconciler's steps: ``to`` as a learner, caught up, promoted; ``away`` removed."""
    await change(replicas, ConfChangeType.ADD_LEARNER, to)
    await caught_up(replicas, to)
    await change(replicas, ConfChangeType.ADD_NODE, to)
    await change(replicas, ConfChangeType.REMOVE_NODE, away)


def test_a_group_moves_away_stays_gone_across_a_restart_and_comes_back_whole(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        socks = {i: relisten(("127.0.0.1", 0)) for i in (1, 2, 3, 4)}
        addrs = {i: s.getsockname()[:2] for i, s in socks.items()}

        def peers(i: int) -> dict[int, tuple[str, int]]:
            return {j: a for j, a in addrs.items() if j != i}

        reps = [Replica(tmp_path, i, (1, 2, 3) if i != 4 else ()) for i in (1, 2, 3, 4)]
        for r in reps:
            await r.start(socks[r.id], peers(r.id))
        acked: list[str] = []
        stop = asyncio.Event()
        counter = itertools.count()

        async def writer() -> None:
            while not stop.is_set():
                lead = leader(reps)
                if lead is None:
                    await asyncio.sleep(0.01)
                    continue
                text = f"m{next(counter)}"  # never resent: unique contents
                cmd = c.Append(SID, "user", "u", "text", text, {}, text, None, 1, 1)
                try:
                    got = await lead.driver.propose(GROUP, c.encode_command(cmd))
                except RaftError:
                    await asyncio.sleep(0.01)
                    continue
                assert isinstance(got, c.Appended) and not got.deduped
                acked.append(text)

        try:
            await until(lambda: leader(reps) is not None, what="a leader")
            create = c.CreateSession(SID, "u", "a", {}, 1)
            lead = leader(reps)
            assert lead is not None
            await lead.driver.propose(GROUP, c.encode_command(create))
            task = asyncio.create_task(writer())
            await until(lambda: len(acked) >= 40, timeout=20, what="appends")
            # Away: a follower leaves, node 4 takes its place.
            out = next(r for r in reps[:3] if not r.leads())
            await move(reps, 4, out.id)
            await until(lambda: out.retirer.retired == 1, timeout=20, what="the group retired")
            assert not out.hosts() and out.wal.removed(GROUP)
            assert out.state.get_session(SID) is None and out.state.hosted_groups == []
            assert not out.archive.holds_group(GROUP) and await out.archive.read(SID, 0, 10) == []
            assert out.archive.stats.rows_dropped > 0  # its tail had spilled to the archive
            assert await out.history.read(SID, 0, 10) is None
            # It restarts: the group stays gone.
            await out.stop()
            socks[out.id].close()
            socks[out.id] = relisten(addrs[out.id])
            again = Replica(tmp_path, out.id, (1, 2, 3))  # (its first voters: not used again)
            await again.start(socks[out.id], peers(out.id))
            reps[reps.index(out)] = again
            assert not again.hosts() and again.state.hosted_groups == []
            assert not again.archive.holds_group(GROUP)
            await until(lambda: len(acked) >= 120, timeout=20, what="more appends")
            # Back: it hosts the group again, empty, and node 4 leaves.
            again.driver.add_groups([GROUP], ())
            assert again.host.node(GROUP).raft.log.last_index() == 0
            new4 = reps[3]
            await move(reps, again.id, 4)
            await until(lambda: new4.retirer.retired == 1, timeout=20, what="node 4 retired")
            assert not new4.hosts() and new4.state.get_session(SID) is None
            await until(lambda: len(acked) >= 160, timeout=20, what="appends after the moves")
            stop.set()
            await task
            lead = leader(reps)
            assert lead is not None
            last = lead.state.last_seq(SID)
            members = [r for r in reps if r.hosts()]
            assert sorted(r.id for r in members) == [1, 2, 3]
            await until(lambda: all(r.state.last_seq(SID) == last for r in members), what="applied")
            want = await lead.contents()
            for r in members:
                got = await r.contents()
                assert got == want, r.id
                counts = Counter(got)
                assert all(counts[t] == 1 for t in acked) and max(counts.values()) == 1
            assert again.archive.stats.rows_written > 0  # its history came back through the log
        finally:
            stop.set()
            for r in reps:
                await r.stop()

    run(main())
