"""The HDR histogram wrapper against a naive sorted-list computation (nearest rank)."""

from __future__ import annotations

import math
import random

import pytest

from bench.histogram import QUANTILES, LatencyHistogram

QS = [q for _, q in QUANTILES] + [0.001, 0.25, 0.75, 0.9999, 1.0]


def naive(values: list[int], q: float) -> int:
    s = sorted(values)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def samples(rng: random.Random, n: int, kind: str) -> list[int]:
    if kind == "uniform":
        return [rng.randrange(1, 50_000) for _ in range(n)]
    if kind == "lognormal":  # a latency-like tail: ms with rare seconds
        return [max(1, int(rng.lognormvariate(8, 1.2))) for _ in range(n)]
    return [rng.choice((5, 5, 5, 900, 2_000_000)) for _ in range(n)]  # few distinct values


@pytest.mark.parametrize("kind", ["uniform", "lognormal", "discrete"])
@pytest.mark.parametrize("seed", range(4))
def test_quantiles_match_a_sorted_list(kind: str, seed: int) -> None:
    rng = random.Random(seed)
    values = samples(rng, rng.choice((1, 2, 7, 100, 5000)), kind)
    h = LatencyHistogram()
    for v in values:
        h.record_us(v)
    assert h.count == len(values)
    got = h.quantiles_us(QS)
    for q, value in zip(QS, got, strict=True):
        expected = naive(values, q)
        assert value == h.equivalent_us(expected), (q, value, expected)
        assert expected <= value <= expected * 1.001 + 1  # 3 significant digits


def test_summary_is_in_milliseconds() -> None:
    h = LatencyHistogram()
    for ms in range(1, 101):
        h.record_s(ms / 1000)
    s = h.summary_ms()
    assert s["count"] == 100
    assert s["p50"] == pytest.approx(50, rel=1e-3)
    assert s["p99"] == pytest.approx(99, rel=1e-3)
    assert s["max"] == pytest.approx(100, rel=1e-3)
    assert s["mean"] == pytest.approx(50.5, rel=1e-3)


def test_empty_and_out_of_range() -> None:
    h = LatencyHistogram()
    assert h.summary_ms()["p99"] == 0.0 and h.count == 0
    h.record_s(-1.0)  # a clock that went backwards counts as 0
    h.record_s(10_000.0)  # over an hour: clamped, not dropped
    assert h.count == 2
    assert h.summary_ms()["max"] >= 3_600_000 * 0.999


def test_merged_process_histograms_equal_one_histogram() -> None:
    rng = random.Random(7)
    values = samples(rng, 20_000, "lognormal")
    whole = LatencyHistogram()
    parts = [LatencyHistogram() for _ in range(3)]
    for i, v in enumerate(values):
        whole.record_us(v)
        parts[i % 3].record_us(v)
    shipped = [LatencyHistogram.decode(p.encode()) for p in parts]  # as the processes send them
    merged = LatencyHistogram.merged([*shipped, LatencyHistogram()])
    assert merged.count == whole.count == len(values)
    assert merged.quantiles_us(QS) == whole.quantiles_us(QS)
    for q, value in zip(QS, merged.quantiles_us(QS), strict=True):
        assert value == merged.equivalent_us(naive(values, q))
    assert merged.summary_ms() == whole.summary_ms()
