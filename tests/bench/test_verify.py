"""The read-back checker on hand-made sessions."""

from __future__ import annotations

from bench.verify import Verdict, check_session


def check(
    stored: list[tuple[int, str | None]], acked: list[tuple[str, int]], first: int = 1
) -> Verdict:
    v = Verdict()
    check_session(v, "s", stored, acked, first, ours="r-")
    return v


def test_a_clean_session_passes() -> None:
    v = check([(1, "r-0"), (2, "r-1"), (3, None), (4, "r-2")], [("r-0", 1), ("r-2", 4)])
    assert v.ok and (v.acked, v.messages, v.landed_unacked) == (2, 4, 1)


def test_missing_duplicated_misplaced_and_gaps_fail() -> None:
    assert check([(1, "r-0")], [("r-0", 1), ("r-1", 2)]).missing == 1
    assert check([(1, "r-0"), (2, "r-0")], [("r-0", 1)]).duplicated == 1
    assert check([(1, "x"), (2, "r-0")], [("r-0", 1)]).misplaced == 1
    assert check([(1, "r-0"), (3, "r-1")], [("r-0", 1)]).bad_seqs == 1
    assert check([(2, "r-0"), (1, "r-1")], []).bad_seqs == 1
    for v in (check([(1, "r-0")], [("r-1", 1)]), check([(2, "r-0")], [])):
        assert not v.ok and v.problems


def test_evicted_acks_are_counted_not_failed() -> None:
    v = check([(5, "r-5"), (6, "r-6")], [("r-1", 1), ("r-5", 5)], first=5)
    assert v.ok and v.evicted == 1
