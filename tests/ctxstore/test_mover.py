"""ctxstore.mover over real sockets and WALs: groups move to a joining node while appends go
on, and every acknowledged append ends up exactly once on each of the group's new replicas."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest

from ctxstore.membership import ClusterView, Join, NodeState, SetState, apply_meta, bootstrap_view
from ctxstore.mover import Mover
from ctxstore.reconciler import Action
from raft import RaftError, Role
from raft.driver import Driver
from tests.raft.test_driver import Member, leader_of, listener, run, until

GROUPS = 8


def test_groups_move_to_a_joining_node_under_appends(tmp_path: Path) -> None:
    async def main() -> None:
        old = [Member(tmp_path, i, (1, 2, 3), GROUPS, snapshot_entries=40) for i in (1, 2, 3)]
        new = Member(tmp_path, 4, (), GROUPS, snapshot_entries=40)  # every group, empty
        members = [*old, new]
        socks = {m.id: listener() for m in members}
        addrs = {i: s.getsockname()[:2] for i, s in socks.items()}
        for m in old:
            await m.start(socks[m.id], {j: a for j, a in addrs.items() if j not in (m.id, 4)})
        view = bootstrap_view(
            ((i, f"127.0.0.1:{addrs[i][1]}", "") for i in (1, 2, 3)), groups=GROUPS
        )
        views = [view]
        movers = [Mover(m.id, m.driver, lambda: views[-1], lambda: {1, 2, 3, 4}, 2, 0.05)
                  for m in members]  # fmt: skip
        acked: dict[int, list[bytes]] = {g: [] for g in range(GROUPS)}
        stop = asyncio.Event()
        counter = itertools.count()

        async def writer(g: int) -> None:
            while not stop.is_set():
                lead = leader_of(members, g)
                if lead is None:
                    await asyncio.sleep(0.01)
                    continue
                data = b"%d-%d" % (g, next(counter))  # never resent: unique payloads
                try:
                    await lead.driver.propose(g, data)
                except RaftError:
                    await asyncio.sleep(0.01)
                    continue
                acked[g].append(data)

        try:
            await until(lambda: all(leader_of(old, g) for g in range(GROUPS)), what="leaders")
            writers = [asyncio.create_task(writer(g)) for g in range(GROUPS)]
            for mv in movers:
                mv.start()
            await until(
                lambda: all(len(a) >= 60 for a in acked.values()),
                timeout=30,
                what="logs compacted past the start (snapshot_entries 40)",
            )
            assert not any(mv.stats.conf_changes for mv in movers)  # placement is settled
            # Node 4 joins: its transport knows the others, theirs learn of it; it is active.
            await new.start(socks[4], {j: a for j, a in addrs.items() if j != 4})
            for m in old:
                assert m.transport is not None
                m.transport.add_peer(4, addrs[4])
            v = views[-1]
            v, _ = apply_meta(v, Join(4, f"127.0.0.1:{addrs[4][1]}", ""))
            v, _ = apply_meta(v, SetState(4, NodeState.ACTIVE))
            views.append(v)
            targets = v.targets()
            moving = [g for g, t in targets.items() if 4 in t]
            assert moving and len(moving) < GROUPS

            def settled(view: ClusterView) -> bool:
                for g, t in view.targets().items():
                    lead = leader_of(members, g)
                    if lead is None:
                        return False
                    st = lead.host.status(g)
                    if set(st.voters) != set(t) or st.learners or st.conf_pending:
                        return False
                return True

            await until(lambda: settled(v), timeout=60, what="every group on its targets")
            await asyncio.sleep(0.2)  # appends keep going on the new placement
            stop.set()
            await asyncio.gather(*writers)
            for g, t in targets.items():
                lead = leader_of(members, g)
                assert lead is not None
                want = len(lead.sm.history[g])
                reps = [m for m in members if m.id in t]

                def applied(reps: list[Member] = reps, g: int = g, want: int = want) -> bool:
                    return all(len(m.sm.history[g]) >= want for m in reps)

                await until(applied, what=f"group {g} applied everywhere")
                for m in reps:
                    counts = Counter(m.sm.history[g])
                    assert all(counts[d] == 1 for d in acked[g]), (g, m.id)
                    assert max(counts.values()) == 1
                    assert m.sm.history[g][: len(lead.sm.history[g])] == lead.sm.history[g]
            assert sum(len(a) for a in acked.values()) > 100
            # Every moved group went learner -> voter on node 4, and lost one old replica.
            assert sum(mv.stats.conf_changes for mv in movers) >= 3 * len(moving)
            assert new.driver.stats.snapshots_restored >= 1  # logs were compacted meanwhile
        finally:
            stop.set()
            for mv in movers:
                await mv.stop()
            for m in members:
                await m.stop()

    run(main())


@pytest.mark.parametrize("leads", [True, False])
def test_a_round_observes_only_the_groups_this_node_leads(tmp_path: Path, leads: bool) -> None:
    async def main() -> None:
        m = Member(tmp_path, 1, (1,), 2)
        await m.start(None, {})
        try:
            await until(lambda: all(m.leads(g) for g in range(2)), what="leader")
            view = bootstrap_view([(1, "h:1", "")], groups=2)
            mv = Mover(1, m.driver, lambda: view, lambda: {1})
            if not leads:
                assert mv.observe().keys() == {0, 1}
                return
            assert mv.run_once() == []  # one node, one replica: nothing to do
            assert mv.stats.rounds == 1 and mv.stats.conf_changes == 0
        finally:
            await m.stop()

    run(main())


def test_the_meta_leader_activates_a_live_joiner_once_per_retry_period(tmp_path: Path) -> None:
    async def main() -> None:
        m = Member(tmp_path, 1, (1,), 3)  # groups 0, 1 and the meta group 2
        await m.start(None, {})
        try:
            await until(lambda: all(m.leads(g) for g in range(3)), what="leader")
            view, _ = apply_meta(bootstrap_view([(1, "h:1", "")], groups=2), Join(4, "h:4", ""))
            sent: list[object] = []
            mv = Mover(1, m.driver, lambda: view, lambda: {4}, meta_group=2,
                       propose_meta=sent.append)  # fmt: skip
            mv.run_once(now=10.0)
            assert sent == [SetState(4, NodeState.ACTIVE)]
            mv.run_once(now=11.0)  # not again while the first may still apply
            assert len(sent) == 1
            mv.run_once(now=12.5)
            assert len(sent) == 2 and mv.stats.meta_commands == 2
            # Without the meta group's leadership, the view's steps are not this node's.
            other = Mover(1, m.driver, lambda: view, lambda: {4}, meta_group=5,
                          propose_meta=sent.append)  # fmt: skip
            other.run_once(now=20.0)
            assert len(sent) == 2
        finally:
            await m.stop()

    run(main())


class _Raft:
    def __init__(self, lead: int, voters: tuple[int, ...], me: int = 1) -> None:
        self.lead, self.voters, self.lead_transferee = lead, voters, 0
        self.role = Role.LEADER if lead == me else Role.FOLLOWER


class _Host:
    """What ``Mover.balance`` reads of ``MultiRaft``: each hosted group's Raft (role, leader,
    voters) through ``node(g).raft``."""

    def __init__(self, rafts: dict[int, _Raft]) -> None:
        self.rafts = rafts

    def groups(self) -> list[int]:
        return sorted(self.rafts)

    def node(self, g: int) -> SimpleNamespace:
        return SimpleNamespace(raft=self.rafts[g])


class _Driver:
    def __init__(self, rafts: dict[int, _Raft]) -> None:
        self.host = _Host(rafts)
        self.transfers: list[tuple[int, int]] = []

    def transfer_leader(self, group: int, to: int) -> None:
        self.transfers.append((group, to))


def test_a_node_hosting_some_groups_sheds_its_excess_leadership_as_promised() -> None:
    """``Mover._shed`` in process (a node of 5 hosting 40 of 80 groups; fair share 16): it
    gives groups it leads only to their voters heard from (``peer_led``) and under the share by
    two or more, the least-leading first, each heir at most its shortfall divided among the
    other nodes, at most ``transfers_max`` a round, and keeps one less than its share; a node
    leading less than its share, or once every node is within one of it, moves nothing."""
    view = bootstrap_view([(n, f"h:{n}", "") for n in range(1, 6)], groups=80)

    def mover(led: int, peer_led: dict[int, int], transfers_max: int = 10) -> Mover:
        rafts = {}
        for g in range(40):  # the 40 groups hosted here; the first ``led`` led here
            voters = (1, 2, 5) if g % 2 == 0 else (1, 3, 4)
            rafts[g] = _Raft(1 if g < led else voters[1], voters)
        mv = Mover(1, cast(Driver, _Driver(rafts)), lambda: view, lambda: {2, 3, 4, 5},
                   transfers_max=transfers_max)  # fmt: skip
        mv.peer_led = dict(peer_led)
        return mv

    def shed(mv: Mover) -> list[tuple[int, int]]:
        steps = mv.balance(now=1.0)
        transfers = cast(_Driver, mv.driver).transfers
        assert [(s.action, s.group, s.node) for s in steps] == [
            (Action.TRANSFER, g, to) for g, to in transfers
        ]  # (each step planned was started, and nothing else)
        return transfers

    # Node 2 leads none: its quota is (16 - 1 - 0) // 4 = 3 (the even groups, it is their
    # voter); node 3 leads 12: quota 1; node 4 leads 15 (> 16 - 2: not an heir); node 5 was
    # not heard from: nothing, though it leads none it is known to.
    assert shed(mover(24, {2: 0, 3: 12, 4: 15})) == [(0, 2), (1, 3), (2, 2), (4, 2)]
    # The cap per round holds.
    assert shed(mover(24, {2: 0, 3: 12, 4: 15}, transfers_max=2)) == [(0, 2), (1, 3)]
    # It keeps one less than its share: leading 17, it gives 2 (and leading 15, none).
    assert shed(mover(17, {2: 0, 3: 0, 4: 0})) == [(0, 2), (1, 3)]
    assert shed(mover(15, {2: 0, 3: 0, 4: 0})) == []
    # Every node within one of its share (or unheard, or over it): nothing moves.
    assert shed(mover(24, {2: 15, 3: 16, 4: 15})) == []
    assert shed(mover(24, {})) == []
