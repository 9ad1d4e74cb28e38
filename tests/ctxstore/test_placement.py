"""ctxstore.placement: a stable, uniform session -> group hash."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from ctxstore.placement import GROUPS, group_of
from wire import placement


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
    assert placement.group_of(session_id, 256) == group  # what clients compute (protocol.md)


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
