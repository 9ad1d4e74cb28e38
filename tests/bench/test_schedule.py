"""The open-loop schedule with a fake clock: intended times, lateness, skips at the bound."""

from __future__ import annotations

import heapq

import pytest

from bench.schedule import OpenLoopSchedule


def test_requests_are_due_at_their_intended_times() -> None:
    s = OpenLoopSchedule(first_s=10.0, interval_s=0.25, end_s=11.0, outstanding_max=100)
    assert s.poll(9.99, 0).send == []
    assert s.poll(10.0, 0).send == [10.0]
    assert s.poll(10.2, 0).send == []
    assert s.next_s == 10.25
    assert s.poll(10.5, 0).send == [10.25, 10.5]
    assert s.poll(20.0, 0).send == [10.75]  # nothing at or after end_s
    assert s.finished and s.sent == 4 and s.skipped == 0


def test_a_late_poll_sends_the_backlog_with_its_intended_times() -> None:
    """A stall (of the client or the service) is not skipped: every request is sent, and its
    latency will be measured from when it should have left."""
    s = OpenLoopSchedule(first_s=0.0, interval_s=0.001, end_s=1.0, outstanding_max=10_000)
    due = s.poll(0.5, 0)
    assert len(due.send) == 501
    assert due.send[0] == 0.0 and due.send[-1] == pytest.approx(0.5)
    assert [round(t * 1000) for t in due.send] == list(range(501))


def test_at_the_bound_requests_are_skipped_as_overload() -> None:
    s = OpenLoopSchedule(first_s=0.0, interval_s=0.125, end_s=10.0, outstanding_max=3)
    due = s.poll(0.5, outstanding=1)  # 5 due, room for 2
    assert due.send == [0.0, 0.125]
    assert due.skipped == [0.25, 0.375, 0.5]
    assert s.poll(0.625, outstanding=3).skipped == [0.625]
    assert s.poll(0.75, outstanding=0).send == [0.75]
    assert (s.sent, s.skipped) == (3, 4)


def test_invalid_schedules() -> None:
    with pytest.raises(ValueError):
        OpenLoopSchedule(0.0, 0.0, 1.0, 1)
    with pytest.raises(ValueError):
        OpenLoopSchedule(0.0, 0.1, 1.0, 0)


def simulate(
    rate: float, service_s: float, stall: tuple[float, float], bound: int
) -> dict[str, int]:
    """A fake clock polling every ms; a service answering in ``service_s``, nothing during
    ``stall``.  Returns what was sent, skipped, and the requests that waited past 100 ms."""
    s = OpenLoopSchedule(first_s=0.0, interval_s=1.0 / rate, end_s=2.0, outstanding_max=bound)
    in_flight: list[tuple[float, float]] = []  # (answer time, intended)
    slow = 0
    t = 0.0
    while not s.finished or in_flight:
        while in_flight and in_flight[0][0] <= t:
            done, intended = heapq.heappop(in_flight)
            slow += done - intended > 0.1
        for intended in s.poll(t, len(in_flight)).send:
            answer = max(t, stall[1]) + service_s if stall[0] <= t < stall[1] else t + service_s
            heapq.heappush(in_flight, (answer, intended))
        t = round(t + 0.001, 6)
    return {"sent": s.sent, "skipped": s.skipped, "slow": slow}


def test_a_service_stall_shows_in_latency_not_as_fewer_requests() -> None:
    steady = simulate(1000, 0.002, (0.0, 0.0), bound=10_000)
    assert steady == {"sent": 2000, "skipped": 0, "slow": 0}
    stalled = simulate(1000, 0.002, (0.5, 1.0), bound=10_000)
    assert stalled["sent"] == 2000 and stalled["skipped"] == 0
    assert 390 <= stalled["slow"] <= 410  # requests intended in (0.5, 0.9] waited > 100 ms


def test_a_stall_beyond_the_bound_is_counted_as_overload() -> None:
    r = simulate(1000, 0.002, (0.5, 1.0), bound=100)
    assert r["sent"] + r["skipped"] == 2000
    assert 390 <= r["skipped"] <= 410  # 500 intended during the stall, 100 of them in flight
