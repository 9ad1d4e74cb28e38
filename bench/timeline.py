"""The window second by second: when the slow appends happened.

A p99 over the whole window does not say whether the tail is spread evenly or comes from a few
bad seconds (an election, a GC pause, the first seconds of a new cluster).  ``timeline`` buckets
the acknowledged appends by their start (first send, or intended time in the open loop) into
steps of ``step_s`` from the window's start and gives each step's count and latencies; the
report prints the worst step and how many steps missed the p99 target.  It reads the ack log
(``load.ACK_LOG_MAX`` acks per client process): requests that never got an ack are not in it
(they are in ``failed`` and ``unfinished``), nor are acks beyond the log's bound (the JSON's
``client.acks_not_logged``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

from .histogram import LatencyHistogram


class Acks(Protocol):
    """What ``timeline`` reads of a ``load.WorkerResult``: the ack log's start and done times."""

    @property
    def ack_start(self) -> Sequence[float]: ...

    @property
    def ack_done(self) -> Sequence[float]: ...


def step_histograms(
    results: Sequence[Acks], t_from: float, t_to: float, step_s: float
) -> list[LatencyHistogram]:
    """One histogram per step of [t_from, t_to) (the last one may be shorter than ``step_s``):
    the latencies of the logged acks whose request started in it."""
    if step_s <= 0:
        raise ValueError("step_s must be > 0")
    steps = max(0, math.ceil((t_to - t_from) / step_s - 1e-9))
    hists = [LatencyHistogram() for _ in range(steps)]
    for r in results:
        for start, done in zip(r.ack_start, r.ack_done, strict=True):
            if t_from <= start < t_to:
                hists[min(steps - 1, int((start - t_from) / step_s))].record_s(done - start)
    return hists


def window_histogram(results: Sequence[Acks], t_from: float, t_to: float) -> LatencyHistogram:
    """The latencies of the logged acks whose request started in [t_from, t_to)."""
    if t_to <= t_from:
        return LatencyHistogram()
    return step_histograms(results, t_from, t_to, t_to - t_from)[0]


def timeline(
    results: Sequence[Acks], measure: float, end: float, step_s: float = 1.0
) -> list[dict[str, Any]]:
    """One entry per step of [measure, end): ``t`` (the step's start, seconds into the window),
    ``count`` and the latency summary in ms (``LatencyHistogram.summary_ms``) of the appends
    acked that started in it.  The last step may be shorter than ``step_s``."""
    hists = step_histograms(results, measure, end, step_s)
    return [{"t": round(i * step_s, 3), **h.summary_ms()} for i, h in enumerate(hists)]


def timeline_summary(steps: Sequence[dict[str, Any]], p99_target_ms: float) -> dict[str, Any]:
    """The worst step (by p99) and the steps whose p99 missed ``p99_target_ms``."""
    counted = [s for s in steps if s["count"]]
    worst = max(counted, key=lambda s: s["p99"], default=None)
    return {
        "steps": len(steps),
        "worst": None if worst is None else {"t": worst["t"], "p99": worst["p99"]},
        "over_target": [s["t"] for s in counted if s["p99"] > p99_target_ms],
    }


__all__ = ["step_histograms", "timeline", "timeline_summary", "window_histogram"]
