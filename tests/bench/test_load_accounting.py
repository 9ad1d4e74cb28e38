"""A client process's accounting: what the window's histograms hold, without a cluster."""

from __future__ import annotations

import asyncio
from typing import Any

from bench import load
from bench.histogram import LatencyHistogram
from bench.load import Worker, WorkerSpec


def spec() -> WorkerSpec:
    return WorkerSpec(
        index=0, procs=1, run_id="r", sessions=4, groups=8, nodes={1: "127.0.0.1:1"},
        leaders=(1,) * 8, route="leader", token=None, payload_bytes=10, concurrency=1,
        rate=0.0, outstanding_max=1, read_ratio=0.0, read_last=50, readers=0,
        backlog_session=None, backlog_seq=0, page=100, retry_for_s=1.0, timeout_s=1.0, seed=1,
    )  # fmt: skip


def decoded(result: dict[str, Any], name: str) -> LatencyHistogram:
    return LatencyHistogram.decode(result["histograms"][name])


def expected(latencies_s: list[float]) -> LatencyHistogram:
    h = LatencyHistogram()
    for s in latencies_s:
        h.record_s(s)
    return h


def test_the_window_histogram_holds_the_logged_and_the_unlogged_acks(monkeypatch: Any) -> None:
    """Logged acks are recorded from the log after the run, acks beyond the log's bound as
    they come: either way, exactly the acks whose request started in the window."""
    monkeypatch.setattr(load, "ACK_LOG_MAX", 3)

    async def main() -> dict[str, Any]:
        w = Worker(spec(), [0] * 5)
        w.measure, w.end = 10.0, 20.0
        acks = [(9.0, 0.5), (10.0, 0.010), (12.0, 0.020), (19.0, 0.3), (25.0, 0.1), (15.0, 2.0)]
        for n, (start, latency) in enumerate(acks):
            w.ack(n % 4, n, n + 1, start, start + latency)
        assert len(w.ack_n) == 3 and w.acks_unlogged == 3
        return w.result(0)

    result = asyncio.run(main())
    got = decoded(result, "append")
    want = expected([0.010, 0.020, 0.3, 2.0])  # 9.0 and 25.0 started outside the window
    assert got.count == 4
    assert got.summary_ms() == want.summary_ms()


def test_logged_send_lags_join_those_recorded_as_they_came(monkeypatch: Any) -> None:
    monkeypatch.setattr(load, "SEND_LAG_LOG_MAX", 2)

    async def main() -> dict[str, Any]:
        w = Worker(spec(), [0] * 5)
        w.measure, w.end = 0.0, 100.0
        w.send_lags.extend([0.001, 0.002])
        w.hist["send_lag"].record_s(0.5)  # one over the bound, recorded as it came
        return w.result(0)

    got = decoded(asyncio.run(main()), "send_lag")
    assert got.summary_ms() == expected([0.001, 0.002, 0.5]).summary_ms()
