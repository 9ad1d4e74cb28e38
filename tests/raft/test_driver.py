"""The asyncio driver with the real WAL and, for clusters, the real transport on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from bench.raft_testnode import LogMachine
from raft import NotLeader, ProposalDropped, Role
from raft.core import Config
from raft.driver import Driver, DriverConfig, NodeStopped, OutcomeUnknown
from raft.messages import AppendEntries, ConfChange, ConfChangeType
from raft.multi import HostConfig, MultiRaft
from raft.transport import Transport
from raft.wal import WAL

SECRET = b"driver-test"
TICK_S = 0.01


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(asyncio.wait_for(coro, 60))


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


BOTH_WRITERS = pytest.mark.parametrize("inline", [False, True], ids=["thread-wal", "inline-wal"])


class Member:
    def __init__(
        self,
        path: Path,
        node_id: int,
        voters: tuple[int, ...],
        groups: int,
        inline: bool = False,
        raft: dict[str, Any] | None = None,
        **driver_kw: Any,
    ) -> None:
        self.id = node_id
        self.sm = LogMachine()
        self.wal = WAL.open(
            path / f"n{node_id}", segment_bytes=1 << 20, preallocate=False, inline=inline
        )
        cfg = Config(node_id, **{"election_ticks": 10, "seed": 3, **(raft or {})})
        self.host = MultiRaft(HostConfig(cfg))
        self.driver = Driver(self.host, self.wal, self.sm, DriverConfig(tick_s=TICK_S, **driver_kw))
        self.driver.add_groups(range(groups), voters)
        self.transport: Transport | None = None

    async def start(self, listen: socket.socket | None, peers: dict[int, tuple[str, int]]) -> None:
        if peers:
            assert listen is not None
            on_batch, up, down, snap = self.driver.transport_callbacks()
            self.transport = Transport(
                self.id, "c", SECRET, listen, peers, on_batch, up, down, snap,
                backoff_min_s=0.01, backoff_max_s=0.1,
            )  # fmt: skip
            self.driver.attach(self.transport)
            await self.transport.start()
        await self.driver.start()

    async def stop(self) -> None:
        await self.driver.stop()
        if self.transport is not None:
            await self.transport.close()
        self.wal.close()

    def leads(self, group: int) -> bool:
        return self.host.node(group).raft.role is Role.LEADER


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


async def cluster(
    path: Path, n: int, groups: int, **kw: Any
) -> tuple[list[Member], Callable[[], Awaitable[None]]]:
    ids = tuple(range(1, n + 1))
    socks = {i: listener() for i in ids}
    addrs = {i: socks[i].getsockname()[:2] for i in ids}
    members = [Member(path, i, ids, groups, **kw) for i in ids]
    for m in members:
        await m.start(socks[m.id], {j: a for j, a in addrs.items() if j != m.id})

    async def stop() -> None:
        for m in members:
            await m.stop()

    return members, stop


def leader_of(members: list[Member], group: int) -> Member | None:
    leads = [m for m in members if m.leads(group)]
    return leads[0] if len(leads) == 1 else None


def test_an_inline_wal_round_is_finished_in_the_pass_that_wrote_it(tmp_path: Path) -> None:
    """With an inline WAL the pass that wrote a Ready also finishes it (advance, the leader's
    own acknowledgement, "after persist" messages): no loop iteration in between."""

    async def main() -> None:
        m = Member(tmp_path, 1, (1,), groups=1, inline=True)
        await m.start(None, {})
        await until(lambda: m.leads(0), what="leader")
        log = m.host.node(0).raft.log
        await until(lambda: log.applied == log.last_index(), what="idle")
        future = m.driver.propose(0, b"x")
        fsyncs = m.wal.stats.fsyncs
        m.driver._pass()  # the pass the proposal scheduled, run now, outside the loop
        assert m.wal.stats.fsyncs == fsyncs + 1
        # persisted, counted by the (single-voter) leader and committed in that same pass
        assert log.persisted_index() == log.committed == log.last_index()
        assert not future.done()  # applied by the next pass (a commit-only Ready)
        m.driver._pass()
        assert future.done() and future.result() == 1
        await m.stop()

    run(main())


def test_an_inline_wal_leader_writes_its_appends_to_the_peers_before_it_fsyncs(
    tmp_path: Path,
) -> None:
    """The leader's AppendEntries leave in the pass, before its own inline fsync blocks the
    loop, so the followers' fsyncs overlap the leader's (not after it, at the end of the loop
    iteration)."""

    async def main() -> None:
        members, stop = await cluster(tmp_path, 3, groups=1, inline=True)
        await until(lambda: leader_of(members, 0) is not None, what="a leader")
        leader = leader_of(members, 0)
        assert leader is not None and leader.transport is not None
        await leader.driver.propose(0, b"warm")  # every follower's progress is replicating
        written: list[tuple[int, list[int]]] = []  # (the leader's fsyncs then, entry indexes)
        real = leader.transport._write_batch

        def recording(peer: Any, conn: Any, items: list[Any], commits: list[int]) -> None:
            indexes = [e.index for _, m in items if isinstance(m, AppendEntries) for e in m.entries]
            written.append((leader.wal.stats.fsyncs, indexes))
            real(peer, conn, items, commits)

        leader.transport._write_batch = recording  # type: ignore[method-assign]
        future = leader.driver.propose(0, b"x")
        index = leader.host.node(0).raft.log.last_index()
        fsyncs = leader.wal.stats.fsyncs
        leader.driver._pass()  # the pass the proposal scheduled, run now, outside the loop
        assert leader.wal.stats.fsyncs == fsyncs + 1
        sent = [n for n, indexes in written if index in indexes]
        assert sent == [fsyncs, fsyncs], written  # to both followers, before the fsync
        assert await future == 2
        await stop()

    run(main())


@BOTH_WRITERS
def test_single_node_commits_applies_and_recovers_its_history(tmp_path: Path, inline: bool) -> None:
    async def main() -> None:
        m = Member(tmp_path, 1, (1,), groups=4, inline=inline)
        await m.start(None, {})
        await until(lambda: all(m.leads(g) for g in range(4)), what="leaders")
        futures = [m.driver.propose(g, f"{g}:{i}".encode()) for i in range(50) for g in range(4)]
        results = await asyncio.gather(*futures)
        assert results == [i + 1 for i in range(50) for _ in range(4)]
        # One pass per loop iteration: 200 proposals made at once share few fsyncs.
        assert m.wal.stats.fsyncs < 20
        await m.stop()
        again = Member(tmp_path, 1, (1,), groups=4, inline=inline)
        await again.start(None, {})
        await until(
            lambda: all(len(again.sm.history[g]) == 50 for g in range(4)), what="replayed history"
        )
        assert again.sm.history[2] == [f"2:{i}".encode() for i in range(50)]
        await again.stop()

    run(main())


def test_read_contexts_differ_between_processes_of_one_node(tmp_path: Path) -> None:
    """Issue 27: the driver numbered its reads from 1 in every process, so an answer to a read
    of a node's earlier process (a ReadIndexResponse still on its way) carried the context of
    a read of the restarted one and answered it, at an index older than writes committed
    before it began (the simulation with per-process counters: seeds 19, 21, 1042...)."""

    async def first_read_context() -> bytes:
        m = Member(tmp_path, 1, (1,), groups=1)
        await m.start(None, {})
        try:
            await until(lambda: m.leads(0), what="leader")
            future = m.driver.read_index(0)
            [(ctx, _)] = m.driver.pipeline._read_batches.values()  # asked at the next pass
            assert await future >= 1
            return ctx
        finally:
            await m.stop()

    async def main() -> None:
        first = await first_read_context()
        assert await first_read_context() != first  # the same node, restarted

    run(main())


def test_propose_then_calls_back_once_per_entry_and_survives_a_failing_callback(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        m = Member(tmp_path, 1, (1,), groups=1)
        await m.start(None, {})
        await until(lambda: m.leads(0), what="a leader")
        calls: list[tuple[object, BaseException | None]] = []

        def record(result: object, exc: BaseException | None) -> None:
            calls.append((result, exc))

        def broken(result: object, exc: BaseException | None) -> None:
            raise RuntimeError("a caller's bug")

        m.driver.propose_then(0, b"a", record)
        m.driver.propose_then(0, b"b", broken)  # logged; the pass goes on
        m.driver.propose_then(0, b"c", record)
        assert calls == []  # never from inside propose_then: once applied
        await until(lambda: len(calls) == 2, what="two callbacks")
        assert calls == [(1, None), (3, None)]
        assert await m.driver.propose(0, b"d") == 4  # the driver still runs
        await m.stop()
        assert m.sm.history[0] == [b"a", b"b", b"c", b"d"]
        assert len(calls) == 2  # exactly once each

    run(main())


@BOTH_WRITERS
def test_snapshots_compact_the_wal_and_a_restart_restores_from_them(
    tmp_path: Path, inline: bool
) -> None:
    async def main() -> None:
        m = Member(tmp_path, 1, (1,), groups=2, snapshot_entries=100, inline=inline)
        await m.start(None, {})
        await until(lambda: all(m.leads(g) for g in range(2)), what="leaders")
        for i in range(250):
            await asyncio.gather(*(m.driver.propose(g, b"x%d" % i) for g in range(2)))
        assert m.driver.stats.snapshots_taken >= 4
        await until(lambda: m.wal.storage(0).first_index() > 200, what="compaction")
        await m.stop()
        again = Member(tmp_path, 1, (1,), groups=2, inline=inline)
        assert again.wal.storage(0).snapshot().meta.index >= 200
        await again.start(None, {})
        await until(lambda: len(again.sm.history[1]) == 250, what="restored history")
        assert again.sm.history[1] == [b"x%d" % i for i in range(250)]
        await again.stop()

    run(main())


def test_compaction_waits_for_the_compact_floor(tmp_path: Path) -> None:
    async def main() -> None:
        m = Member(tmp_path, 1, (1,), groups=1, snapshot_entries=50)
        floor = {0: 0}
        m.driver.compact_floor = lambda g: floor[g]
        await m.start(None, {})
        await until(lambda: m.leads(0), what="leader")
        for i in range(120):
            await m.driver.propose(0, b"y%d" % i)
        assert m.driver.stats.snapshots_taken >= 1
        await asyncio.sleep(5 * TICK_S)
        assert m.wal.storage(0).first_index() == 1, "compacted past the floor"
        floor[0] = 40  # below the held snapshot's index (~51, the first one taken): nothing
        await asyncio.sleep(5 * TICK_S)
        assert m.wal.storage(0).first_index() == 1
        floor[0] = 60  # the held snapshot is written; no newer one was taken meanwhile
        await until(lambda: m.wal.storage(0).first_index() > 1, what="the held snapshot")
        assert 50 < m.wal.storage(0).first_index() <= 61
        floor[0] = 10**9  # a newer snapshot follows at once (the log fell behind meanwhile)
        await until(lambda: m.wal.storage(0).first_index() > 100, what="compaction at the floor")
        await m.stop()

    run(main())


@BOTH_WRITERS
def test_three_nodes_replicate_every_group_and_only_the_leader_accepts(
    tmp_path: Path, inline: bool
) -> None:
    async def main() -> None:
        members, stop = await cluster(tmp_path, 3, groups=12, inline=inline)
        try:
            await until(
                lambda: all(leader_of(members, g) for g in range(12)), what="one leader each"
            )
            leads = [leader_of(members, g) for g in range(12)]
            # The preferred node of each group leads a fresh cluster: leadership is spread.
            assert sorted(m.id for m in leads if m) == sorted([1, 2, 3] * 4)
            futures = []
            for g, lead in enumerate(leads):
                assert lead is not None
                futures += [lead.driver.propose(g, b"%d-%d" % (g, i)) for i in range(20)]
            await asyncio.gather(*futures)
            follower = next(m for m in members if m is not leads[0])
            with pytest.raises(NotLeader):
                follower.driver.propose(0, b"nope")
            await until(
                lambda: all(len(m.sm.history[g]) == 20 for m in members for g in range(12)),
                what="every replica applied",
            )
            for g in range(12):
                assert members[0].sm.history[g] == members[1].sm.history[g]
                assert members[1].sm.history[g] == members[2].sm.history[g]
            # A linearizable read barrier from a follower.
            index = await follower.driver.read_index(0)
            assert index >= 21
            # Idle groups go quiescent everywhere.
            await until(lambda: all(m.host.awake_count() == 0 for m in members), what="quiet")
        finally:
            await stop()

    run(main())


@BOTH_WRITERS
def test_a_follower_behind_the_compaction_point_catches_up_by_snapshot(
    tmp_path: Path, inline: bool
) -> None:
    async def main() -> None:
        members, stop = await cluster(tmp_path, 3, groups=2, snapshot_entries=30, inline=inline)
        try:
            await until(lambda: all(leader_of(members, g) for g in range(2)), what="leaders")
            lead = leader_of(members, 0)
            assert lead is not None
            lagger = next(m for m in members if m is not lead)
            assert lagger.transport is not None
            await lagger.transport.close()  # it hears nothing while the others go on
            for i in range(200):
                await lead.driver.propose(0, b"e%d" % i)
            await until(lambda: lead.wal.storage(0).first_index() > 100, what="compaction")
            others = {j: m.transport.address for j, m in enumerate(members, 1) if m is not lagger}
            assert all(a is not None for a in others.values())
            on_batch, up, down, snap = lagger.driver.transport_callbacks()
            lagger.transport = Transport(
                lagger.id, "c", SECRET, listener(), others, on_batch, up, down, snap,
                backoff_min_s=0.01, backoff_max_s=0.1,
            )  # fmt: skip
            lagger.driver.attach(lagger.transport)
            await lagger.transport.start()
            installed: list[tuple[int, int]] = []
            lagger.driver.on_snapshot_installed = lambda g, i: installed.append((g, i))
            await until(lambda: len(lagger.sm.history[0]) == 200, what="caught up")
            assert lagger.driver.stats.snapshots_restored >= 1
            assert installed and installed[0][0] == 0 and installed[0][1] > 100
            assert lagger.sm.history[0] == lead.sm.history[0]
        finally:
            await stop()

    run(main())


@BOTH_WRITERS
def test_a_failed_wal_write_stops_the_node_and_fails_its_waiters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inline: bool
) -> None:
    async def main() -> None:
        m = Member(tmp_path, 1, (1,), groups=1, inline=inline)
        await m.start(None, {})
        await until(lambda: m.leads(0), what="leader")

        def broken(*a: Any, **k: Any) -> Any:
            raise OSError(5, "injected EIO")

        # The disk fails the next fdatasync (the WAL is compiled: its methods cannot be
        # replaced on an instance, the os module's functions can).
        monkeypatch.setattr(os, "fdatasync", broken)
        fut = m.driver.propose(0, b"doomed")
        # In the log, maybe sent to followers: another leader may still commit it.
        with pytest.raises(OutcomeUnknown, match=r"in flight .*the WAL failed"):
            await fut
        assert m.driver.failed is not None and m.driver.failed.done()
        with pytest.raises(NodeStopped):
            m.driver.propose(0, b"later")
        m.wal.close()

    run(main())


def test_an_internal_error_stops_the_node_and_is_not_blamed_on_the_wal(tmp_path: Path) -> None:
    """A bug (here: the state machine raising) stops the driver as a failed write does, but
    its waiters are told it was an internal error, not that the WAL failed (issue 25)."""

    async def main() -> None:
        m = Member(tmp_path, 1, (1,), groups=1)
        await m.start(None, {})
        await until(lambda: m.leads(0), what="leader")

        def broken(group: int, entries: list[Any]) -> list[object]:
            raise RuntimeError("a bug in apply")

        m.sm.apply = broken  # type: ignore[method-assign]
        fut = m.driver.propose(0, b"applied by a broken machine")
        with pytest.raises(OutcomeUnknown, match="internal error") as info:
            await fut
        assert "WAL" not in str(info.value)
        assert m.driver.failed is not None and m.driver.failed.done()
        assert isinstance(m.driver.failed.result(), RuntimeError)
        with pytest.raises(NodeStopped):
            m.driver.propose(0, b"later")
        m.wal.close()

    run(main())


def test_waiting_requests_are_bounded(tmp_path: Path) -> None:
    async def main() -> None:
        m = Member(tmp_path, 1, (1,), groups=1, pending_max=10)
        await m.start(None, {})
        await until(lambda: m.leads(0), what="leader")
        futures = [m.driver.propose(0, b"%d" % i) for i in range(10)]
        with pytest.raises(ProposalDropped):
            m.driver.propose(0, b"one too many")
        await asyncio.gather(*futures)
        await m.driver.propose(0, b"room again")
        await m.stop()

    run(main())


def test_a_proposal_its_group_never_applies_fails_after_proposal_timeout_s(
    tmp_path: Path,
) -> None:
    """The leader's appends of group 0 are lost for good (as a message the transport can never
    queue was): the proposal fails with OutcomeUnknown and frees its slot, instead of waiting
    for as long as the group stays stuck."""

    async def main() -> None:
        members, stop = await cluster(tmp_path, 3, groups=1, proposal_timeout_s=0.3)
        try:
            await until(lambda: leader_of(members, 0) is not None, what="a leader")
            lead = leader_of(members, 0)
            assert lead is not None and lead.transport is not None
            send = lead.transport.send

            def lose_appends(to: int, items: Any) -> None:
                send(to, [(g, m) for g, m in items if not isinstance(m, AppendEntries)])

            lead.transport.send = lose_appends  # type: ignore[method-assign]
            outcome: list[BaseException | None] = []
            lead.driver.propose_then(0, b"stuck", lambda result, exc: outcome.append(exc))
            await until(lambda: bool(outcome), timeout=5, what="the proposal's outcome")
            assert isinstance(outcome[0], OutcomeUnknown), outcome
            assert lead.driver.stats.proposals_expired == 1 and lead.leads(0)
        finally:
            await stop()

    run(main())


@BOTH_WRITERS
def test_a_group_moves_to_a_new_node_one_change_at_a_time(tmp_path: Path, inline: bool) -> None:
    """Issue 22's move over real sockets and WALs: node 4 joins (a transport peer added at run
    time, the group hosted empty), is added as a learner while proposals go on, catches up
    (by snapshot: the log was compacted), is promoted, and node 3 is removed and retired."""

    async def main() -> None:
        members, stop = await cluster(tmp_path, 3, groups=1, snapshot_entries=30, inline=inline)
        new = Member(tmp_path, 4, (), 1, inline=inline)  # hosts group 0 empty, no voters
        try:
            await until(lambda: leader_of(members, 0) is not None, what="a leader")
            lead = leader_of(members, 0)
            assert lead is not None
            for i in range(100):
                await lead.driver.propose(0, b"a%d" % i)
            sock = listener()
            addrs = {m.id: m.transport.address for m in members if m.transport is not None}
            await new.start(sock, addrs)
            for m in members:
                assert m.transport is not None
                m.transport.add_peer(4, sock.getsockname()[:2])
            assert not new.host.status(0).voters  # it waits to be told its membership
            added = lead.driver.propose_conf_change(0, ConfChange(ConfChangeType.ADD_LEARNER, 4))
            with pytest.raises(ProposalDropped):  # one membership change at a time
                lead.driver.propose_conf_change(0, ConfChange(ConfChangeType.ADD_NODE, 4))
            writes = [lead.driver.propose(0, b"b%d" % i) for i in range(50)]
            await added
            assert lead.host.status(0).learners == (4,)
            await asyncio.gather(*writes)

            def caught_up() -> bool:
                st = lead.host.status(0)
                return 4 in st.learners and st.progress[4][1] >= st.commit

            await until(caught_up, what="the learner caught up")
            await lead.driver.propose_conf_change(0, ConfChange(ConfChangeType.ADD_NODE, 4))
            assert lead.host.status(0).voters == (1, 2, 3, 4)
            out = next(m for m in members if m is not lead)
            await lead.driver.propose_conf_change(0, ConfChange(ConfChangeType.REMOVE_NODE, out.id))
            for m in [*members, new]:
                if m is not out and m.transport is not None:
                    m.transport.retire_peer(out.id)
            assert sorted(lead.host.status(0).voters) == sorted({1, 2, 3, 4} - {out.id})
            await lead.driver.propose(0, b"after")
            stay = [m for m in [*members, new] if m is not out]
            await until(
                lambda: all(len(m.sm.history[0]) == len(lead.sm.history[0]) for m in stay),
                what="every remaining replica applied",
            )
            assert new.sm.history[0] == lead.sm.history[0]
            assert new.driver.stats.snapshots_restored >= 1
            assert lead.sm.history[0][-1] == b"after"
        finally:
            await stop()
            await new.stop()

    run(main())


@BOTH_WRITERS
def test_followers_apply_what_their_leader_committed_without_waiting_for_a_heartbeat(
    tmp_path: Path, inline: bool
) -> None:
    """The product's settings (``commit_broadcast`` off, busy followers' heartbeats skipped)
    with heartbeats 0.5 s apart: a follower still applies each entry within a few
    milliseconds of its leader committing it, told by the commit notices of the leader's next
    batch to it (raft/multi.py), not by the next append or heartbeat."""
    raft = {"commit_broadcast": False, "skip_busy_heartbeats": True, "heartbeat_ticks": 50,
            "election_ticks": 200}  # fmt: skip

    async def main() -> None:
        members, stop = await cluster(tmp_path, 3, groups=2, inline=inline, raft=raft)
        try:
            await until(lambda: leader_of(members, 0) is not None, what="a leader")
            leader = leader_of(members, 0)
            assert leader is not None
            await leader.driver.propose(0, b"warm")
            followers = [m for m in members if m is not leader]
            await until(lambda: all(len(f.sm.history[0]) == 1 for f in followers), what="warm")
            lags: list[float] = []
            for i in range(2, 8):
                await asyncio.sleep(0.03)
                await leader.driver.propose(0, b"x%d" % i)  # applied by the leader
                committed = time.monotonic()
                await until(lambda n=i: all(len(f.sm.history[0]) == n for f in followers),
                            timeout=5.0, what=f"entry {i} at the followers")  # fmt: skip
                lags.append(time.monotonic() - committed)
            # a heartbeat would have come 0.5 s after the last one: every entry came sooner
            assert max(lags) < 0.25, lags
            received = sum(f.driver.stats.commit_notices_received for f in followers)
            assert received >= 2 * 6 and leader.driver.stats.commit_notices_sent >= 2 * 6
        finally:
            await stop()

    run(main())
