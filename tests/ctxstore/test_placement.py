"""ctxstore.placement: a stable, uniform session -> group hash."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ctxstore.placement import GROUPS, group_of, placement, replicas, weight
from wire import placement as wire_placement


@pytest.mark.parametrize(
    ("session_id", "group", "group_of_7"),
    [
        ("", 180, 0),
        ("a", 47, 2),
        ("session-1", 172, 1),
        ("sess_01HZY3", 190, 1),
        ("user@example.com:42", 237, 1),
    ],
)
def test_golden_values(session_id: str, group: int, group_of_7: int) -> None:
    # Changing these moves every session of every cluster: never do it.
    assert group_of(session_id) == group
    assert group_of(session_id, 7) == group_of_7
    assert wire_placement.group_of(session_id, 256) == group  # what clients compute (protocol.md)


def test_same_in_another_process_with_another_hash_seed() -> None:
    code = "from ctxstore.placement import group_of; print(group_of('session-1'))"
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert out.stdout.strip() == "172"


def test_spread_over_256_groups_is_uniform() -> None:
    n = 100_000
    counts = Counter(group_of(f"session-{i}") for i in range(n))
    assert GROUPS == 256
    assert set(counts) == set(range(GROUPS))
    expected = n / GROUPS  # ~390.6
    assert min(counts.values()) > 0.8 * expected
    assert max(counts.values()) < 1.2 * expected
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 350  # 255 degrees of freedom: mean 255, sd ~22.6


def test_one_group_and_invalid_counts() -> None:
    assert {group_of(f"s{i}", 1) for i in range(100)} == {0}
    with pytest.raises(ValueError):
        group_of("s", 0)


# -- replicas by rendezvous hashing ------------------------------------------------------------


def test_replica_golden_values() -> None:
    # Changing these moves groups of every running cluster on upgrade: never do it.
    assert replicas(0, [1, 2, 3, 4, 5]) == (1, 3, 5)
    assert replicas(255, [1, 2, 3, 4, 5]) == (2, 3, 4)


def test_fewer_nodes_than_replicas() -> None:
    assert replicas(7, [4]) == (4,)
    assert replicas(7, [9, 4]) == (4, 9)
    assert replicas(7, [1, 2, 3]) == (1, 2, 3)
    with pytest.raises(ValueError):
        replicas(7, [1, 2, 3], 0)


def test_naive_top_weights() -> None:
    # The definition, spelled out: the three nodes of highest weight.
    nodes = list(range(1, 12))
    for g in range(GROUPS):
        by_weight = sorted(nodes, key=lambda n: weight(g, n), reverse=True)
        assert replicas(g, nodes) == tuple(sorted(by_weight[:3]))


@pytest.mark.parametrize("n", [3, 4, 5, 7, 10])
def test_a_join_moves_only_what_must_move(n: int) -> None:
    before = placement(range(1, n + 1))
    after = placement(range(1, n + 2))
    new = n + 1
    moved = 0
    for g in range(GROUPS):
        gone = set(before[g]) - set(after[g])
        came = set(after[g]) - set(before[g])
        assert came <= {new}  # only the new node gains replicas
        assert len(gone) == len(came) <= 1  # it takes one replica's place, at most
        moved += len(came)
    expected = GROUPS * 3 / (n + 1)
    assert 0.75 * expected < moved < 1.25 * expected


@pytest.mark.parametrize("n", [4, 5, 7, 10])
def test_a_leave_moves_only_the_leavers_groups(n: int) -> None:
    nodes = list(range(1, n + 1))
    before = placement(nodes)
    after = placement([m for m in nodes if m != 2])
    for g in range(GROUPS):
        if 2 in before[g]:
            assert len(set(after[g]) - set(before[g])) == 1
            assert set(before[g]) - {2} <= set(after[g])
        else:
            assert after[g] == before[g]


@pytest.mark.parametrize("n", [3, 5, 8])
def test_replicas_spread_evenly(n: int) -> None:
    per_node = Counter(m for reps in placement(range(1, n + 1)).values() for m in reps)
    expected = GROUPS * 3 / n
    assert min(per_node.values()) > 0.7 * expected
    assert max(per_node.values()) < 1.3 * expected
