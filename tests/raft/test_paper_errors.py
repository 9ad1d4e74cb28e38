"""Paper tests for the errors the core raises (docs/raft.md §9)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raft import (
    ConfState,
    HardState,
    InvariantViolation,
    MemoryStorage,
    NotLeader,
    ProposalDropped,
    RaftError,
    RawNode,
)
from raft.errors import check
from raft.messages import AppendEntries, Heartbeat, InstallSnapshot, Message, Snapshot

from .helpers import Cluster, config, entries_of

ROOT = Path(__file__).resolve().parents[2]


def test_propose_on_a_follower_raises_not_leader_with_a_hint() -> None:
    """Raft paper §8: clients talk to the leader; a follower refuses a request and names the
    leader it knows (leader_hint), or 0 when it knows none."""
    c = Cluster()
    c.elect(1)
    with pytest.raises(NotLeader) as e:
        c.nodes[2].propose(b"x")
    assert e.value.leader_hint == 1 and e.value.code == "not_leader"
    lone = Cluster()
    with pytest.raises(NotLeader) as e:
        lone.nodes[2].propose(b"x")
    assert e.value.leader_hint == 0


def test_read_index_without_a_known_leader_is_dropped() -> None:
    """Thesis §6.4: a follower that knows no leader cannot forward a read."""
    c = Cluster()
    with pytest.raises(ProposalDropped):
        c.nodes[1].read_index(b"r")


@pytest.mark.parametrize(
    "make",
    [
        lambda t: AppendEntries(2, 1, t, 0, 0, [], 0),
        lambda t: Heartbeat(2, 1, t, 0),
        lambda t: InstallSnapshot(2, 1, t, Snapshot()),
    ],
    ids=["AppendEntries", "Heartbeat", "InstallSnapshot"],
)
def test_two_leaders_in_one_term_is_an_invariant_violation(make: object) -> None:
    """Raft paper §5.2 (Election Safety): at most one leader per term; a leader that receives a
    leader's message of its own term from another node raises InvariantViolation."""
    c = Cluster()
    c.elect(1)
    m: Message = make(c.raft(1).term)  # type: ignore[operator]
    with pytest.raises(InvariantViolation):
        c.nodes[1].step(m)


def test_commit_beyond_the_log_at_restart_is_an_invariant_violation() -> None:
    """Raft paper §5.3: the commit index never exceeds the last log index; a disk whose hard
    state says otherwise was truncated or lost, and the core refuses to start on it."""
    storage = MemoryStorage(ConfState((1, 2, 3)))
    storage.append(entries_of((1, 1)))
    storage.set_hard_state(HardState(1, 0, 5))
    with pytest.raises(InvariantViolation):
        RawNode(config(1), storage)


def test_invariant_violation_is_not_an_assert() -> None:
    """docs/raft.md §9: InvariantViolation is raised explicitly by errors.check (not `assert`,
    which `python -O` strips) and is not a RaftError a caller might catch and retry."""
    assert not issubclass(InvariantViolation, AssertionError | RaftError)
    with pytest.raises(InvariantViolation, match="boom"):
        check(False, "boom")
    script = textwrap.dedent(
        """
        from raft import InvariantViolation
        from raft.errors import check
        from raft.messages import AppendEntries
        from tests.raft.helpers import Cluster

        assert False, "asserts are stripped under -O"
        try:
            check(False, "kept")
        except InvariantViolation:
            pass
        else:
            raise SystemExit("check() was stripped")
        c = Cluster()
        c.elect(1)
        try:
            c.nodes[1].step(AppendEntries(2, 1, c.raft(1).term, 0, 0, [], 0))
        except InvariantViolation:
            print("raised")
        """
    )
    out = subprocess.run(
        [sys.executable, "-O", "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "raised"
