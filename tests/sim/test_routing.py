"""The simulation runs ctxstore's router (tests/sim/routing.py), and its product checks fail
when the router or the state machine break what clients are told."""

from __future__ import annotations

import pytest

from ctxstore.state import ConversationState, StateLimits
from raft.pipeline import ResultCallback

from . import app, cluster
from .checker import Violation
from .cluster import Faults, SimCluster
from .routing import SimDriver, SimLoop
from .runner import run_seed


def test_clients_go_through_the_routers() -> None:
    res = run_seed(2, 3, 2, 600)
    assert res.violation is None, res.violation
    st = res.stats
    assert st.forwarded > 0 and st.append_batches > 0 and st.client_reads > 0, st
    assert st.acks > 0 and st.dedupes > 0, st


def test_a_dedupe_that_forgets_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dedupe window of one id: a retried append is appended again."""

    def forgetful(groups: int) -> ConversationState:
        return ConversationState(StateLimits(dedupe_ids_max=1), groups=groups)

    monkeypatch.setattr(app, "ConversationState", forgetful)
    res = run_seed(1, 3, 2, 300)
    assert res.violation is not None and "dedupe failed" in res.violation, res.violation


def test_a_read_barrier_answered_at_once_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read served without asking the leader: a lagging replica misses acknowledged appends."""

    def at_once(
        self: SimDriver, group: int, done: ResultCallback, abandoned: object = None
    ) -> None:
        done(0, None)

    monkeypatch.setattr(SimDriver, "read_index_then", at_once)
    violations = [run_seed(seed, 3, 2, 300).violation for seed in range(1, 5)]
    assert any(v is not None and "acknowledged before it began" in v for v in violations), (
        violations
    )


def test_a_request_never_answered_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The routers' timers never run: a forward lost on the way is never failed."""
    monkeypatch.setattr(SimLoop, "run_due", lambda self: 0)
    res = run_seed(1, 3, 2, 300)
    assert res.violation is not None and "not answered" in res.violation, res.violation


QUIET = Faults(
    drop=0.0, duplicate=0.0, max_delay=0, max_persist_delay=0, crash=0.0, restart=0.0,
    partition=0.0, heal=0.0, pause=0.0,
)  # fmt: skip


def settled(c: SimCluster) -> int:
    """Rounds until group 0 has a leader and its sessions are created; the leader."""
    for _ in range(400):
        c.round()
        lead = c.leader(0)
        if lead is not None and len(c.clients.created) == len(c.clients.sessions[0]):
            return lead.node_id
        if lead is not None and c.now % 8 == 0:
            c.propose(0)  # (the clients create the sessions first)
    raise AssertionError("no leader, or the sessions were not created")


@pytest.mark.parametrize("reused", [False, True], ids=["unique", "reused"])
def test_an_answer_meant_for_a_restarted_nodes_previous_process(
    monkeypatch: pytest.MonkeyPatch, reused: bool
) -> None:
    """Node A forwards an append to the leader, which cannot commit it (the third node is cut
    off) before A crashes.  A restarts and forwards another append before its slow disk lets it
    acknowledge the first; the leader commits both and answers the first on the new
    connection.  With forward ids that restart at 1 in each process, A takes that answer for
    its own forward and tells its client the other append's seq."""
    if reused:
        monkeypatch.setattr(cluster, "fid_start", lambda incarnation: 1)
    with SimCluster(1, 3, 1, QUIET, wal=False, quiesce=False) as c:
        lead = settled(c)
        a, cut = [n for n in c.ids if n != lead]
        c.block(lead, cut)
        c.block(cut, lead)
        sid = c.clients.sessions[0][0]
        leader_router = c.nodes[lead].router
        assert leader_router is not None
        served = leader_router.served_forwards
        c.submit(a, 0, [c.clients.new_append(sid)])
        for _ in range(10):
            c.round()
            if leader_router.served_forwards > served:
                break
        assert leader_router.served_forwards == served + 1
        c.crash(a)
        c.restart(a)
        c.nodes[a].disk.delay = lambda: 20  # (a slow disk: A acknowledges after forwarding)
        ticket = c.submit(a, 0, [c.clients.new_append(sid)])
        if reused:
            with pytest.raises(Violation, match="not applied there"):
                for _ in range(400):
                    c.round()
            return
        for _ in range(400):
            c.round()
            if ticket.ok:
                break
        assert ticket.ok, "the second append was not acknowledged"
