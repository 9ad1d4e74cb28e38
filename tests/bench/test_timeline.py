"""The second-by-second timeline of the window against a naive per-step computation."""

from __future__ import annotations

import array
import dataclasses
import math
import random

import pytest

from bench.histogram import LatencyHistogram
from bench.timeline import timeline, timeline_summary, window_histogram


@dataclasses.dataclass
class Acks:
    ack_start: array.array[float]
    ack_done: array.array[float]


def acks(pairs: list[tuple[float, float]]) -> Acks:
    return Acks(array.array("d", [s for s, _ in pairs]), array.array("d", [d for _, d in pairs]))


@pytest.mark.parametrize("seed", range(5))
def test_each_step_holds_the_acks_that_started_in_it(seed: int) -> None:
    rng = random.Random(seed)
    measure, end, step = 100.0, 100.0 + rng.choice((3.0, 5.5, 10.0)), rng.choice((0.5, 1.0, 2.0))
    parts = []
    for _ in range(rng.randint(1, 3)):
        pairs = []
        for _ in range(rng.randint(0, 400)):
            start = rng.uniform(measure - 2, end + 2)  # some outside the window
            pairs.append((start, start + rng.lognormvariate(-4, 1)))
        parts.append(acks(pairs))
    got = timeline(parts, measure, end, step)
    assert len(got) == math.ceil((end - measure) / step)
    for i, entry in enumerate(got):
        lo = measure + i * step
        hi = min(end, lo + step)
        expected = LatencyHistogram()
        for part in parts:
            for s, d in zip(part.ack_start, part.ack_done, strict=True):
                if lo <= s < hi:
                    expected.record_s(d - s)
        assert entry["t"] == pytest.approx(i * step)
        assert entry == {"t": entry["t"], **expected.summary_ms()}
    inside = sum(1 for p in parts for s in p.ack_start if measure <= s < end)
    assert sum(e["count"] for e in got) == inside


def test_the_summary_names_the_worst_step_and_the_steps_over_the_target() -> None:
    pairs = [(0.1, 0.11), (0.2, 0.21), (1.5, 1.9), (2.2, 2.26), (2.3, 2.31)]  # step 1: 400 ms
    steps = timeline([acks(pairs)], 0.0, 4.0)
    assert [s["count"] for s in steps] == [2, 1, 2, 0]
    summary = timeline_summary(steps, p99_target_ms=50)
    assert summary["steps"] == 4
    assert summary["worst"] == {"t": 1.0, "p99": steps[1]["p99"]}
    assert 399 < steps[1]["p99"] < 401
    assert summary["over_target"] == [1.0, 2.0]  # 400 ms and 60 ms; the empty step is not
    assert timeline_summary(timeline([acks([])], 0.0, 2.0), 50)["worst"] is None


def test_a_step_must_be_positive() -> None:
    with pytest.raises(ValueError):
        timeline([], 0.0, 1.0, 0.0)


def test_a_window_histogram_is_one_step_and_empty_for_an_empty_range() -> None:
    part = acks([(0.5, 0.6), (1.0, 1.5), (1.99, 2.0), (2.0, 9.0)])
    h = window_histogram([part], 1.0, 2.0)  # [1.0, 2.0): the 500 ms and the 10 ms ones
    assert h.count == 2 and 499 < h.summary_ms()["max"] < 501
    step = timeline([part], 1.0, 2.0, 1.0)[0]
    assert {"t": step.pop("t"), **h.summary_ms()} == {"t": 0.0, **step}
    assert window_histogram([part], 2.0, 2.0).count == 0
    assert window_histogram([part], 3.0, 1.0).count == 0
