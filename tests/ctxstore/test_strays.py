"""A removed follower of an idle group asks its leader and retires the group (ctxstore/strays.py),
over real sockets and WALs: never while the leader still counts it (the view alone says
nothing), nor while a membership change is pending at the leader; at once once its removal
applied there.  Leader side, the answer comes only from the leader."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import msgspec

from ctxstore.strays import MemberAnswer, MemberQuery, Strays
from raft import ConfChangeType, Role
from raft.core import Config
from tests.raft.test_driver import run, until

from .test_retire_moves import GROUP, Replica, caught_up, change, leader

_decode = msgspec.msgpack.Decoder(MemberQuery | MemberAnswer).decode


class StrayReplica(Replica):
    """A ``Replica`` whose transport carries the strays' questions and answers."""

    def __init__(self, path: Path, node_id: int, voters: tuple[int, ...]) -> None:
        super().__init__(path, node_id, voters)
        self.placed = True  # the view places group 0 here
        self.still_checked = 0
        self.deaf = False  # drops every Raft message it receives (not the application lane)

    async def start(self, sock: socket.socket, peers: dict[int, tuple[str, int]]) -> None:
        await super().start(sock, peers)
        self.transport.on_app = self._on_app
        hear = self.transport.on_batch
        self.transport.on_batch = lambda peer, items: None if self.deaf else hear(peer, items)
        self.strays = Strays(
            self.id, self.driver, lambda g: self.placed, self.transport.send_app, self._retire,
            meta_group=99, retiring=lambda g: g in self.retirer.retiring,
        )  # fmt: skip

    def raft_config(self) -> Config:
        # As ``ctxstore serve`` runs groups: no commit-only broadcast, so a follower removed
        # while the group is idle never hears that its removal committed.
        return Config(self.id, election_ticks=10, seed=3, commit_broadcast=False,
                      skip_busy_heartbeats=True)  # fmt: skip

    def _on_app(self, peer: int, payloads: list[bytes]) -> None:
        for data in payloads:
            self.strays.on_envelope(peer, _decode(data))

    def _retire(self, group: int, still: Callable[[], bool]) -> None:
        def counted() -> bool:
            self.still_checked += 1
            return still()

        loop = asyncio.get_running_loop()
        self.tasks.append(loop.create_task(self.retirer.retire(group, counted)))


async def ask_for(reps: list[StrayReplica], seconds: float) -> None:
    """Every replica runs its strays' rounds (as the node's housekeeping does) for a while."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        for r in reps:
            r.strays.run_once(loop.time())
        await asyncio.sleep(0.05)


def test_an_idle_removed_follower_retires_only_once_the_leader_dropped_it(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        socks = {i: socket.create_server(("127.0.0.1", 0)) for i in (1, 2, 3, 4)}
        addrs = {i: s.getsockname()[:2] for i, s in socks.items()}
        reps = [StrayReplica(tmp_path, i, (1, 2, 3) if i != 4 else ()) for i in (1, 2, 3, 4)]
        for r in reps:
            await r.start(socks[r.id], {j: a for j, a in addrs.items() if j != r.id})
        asking: asyncio.Task[None] | None = None
        try:
            await until(lambda: leader(reps) is not None, what="a leader")
            lead = leader(reps)
            assert lead is not None
            out = next(r for r in reps[:3] if r is not lead)
            # The view no longer places the group on ``out`` (a move starts): it asks, but the
            # leader still counts it (a voter the group needs), so it keeps the group.
            out.placed = False
            await ask_for(reps, 1.5)
            assert out.strays.stats.asked >= 1 and lead.strays.stats.answered >= 1
            assert out.hosts() and out.retirer.retired == 0
            # Node 4 takes its place; ``out`` is removed while the group is idle.
            await change(reps, ConfChangeType.ADD_LEARNER, 4)
            await caught_up(reps, 4)
            await change(reps, ConfChangeType.ADD_NODE, 4)
            # What the idle group gives ``out`` once removed: nothing more.  Left to the race, a
            # heartbeat the leader sends between committing the removal and applying it may
            # carry the commit, and ``out`` applies its own removal (a CI run saw it): correct,
            # but not the case under test.  The quorum is the three others.
            out.deaf = True
            await change(reps, ConfChangeType.REMOVE_NODE, out.id)
            lead = leader(reps)
            assert lead is not None and out.id not in lead.host.status(GROUP).voters
            asking = asyncio.create_task(ask_for(reps, 10))
            await until(lambda: out.retirer.retired == 1, timeout=8, what="the stray retired")
            assert out.still_checked >= 1 and out.strays.stats.retired == 1
            assert not out.hosts() and out.wal.removed(GROUP)
            # The others keep it: each is placed and counted.
            assert all(r.hosts() for r in reps if r is not out)
            assert all(r.strays.stats.retired == 0 for r in reps if r is not out)
            # Only a leader answers.
            answered = {r.id: r.strays.stats.answered for r in reps}
            assert all(n == 0 for i, n in answered.items() if i in (out.id,)), answered
            roles = {r.id: r.host.node(GROUP).raft.role for r in reps if r.hosts()}
            assert sum(role is Role.LEADER for role in roles.values()) == 1
        finally:
            if asking is not None:
                asking.cancel()
            for r in reps:
                await r.stop()

    run(main())
