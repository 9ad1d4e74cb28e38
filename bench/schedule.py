"""The open-loop send schedule, pure (no clock, no asyncio): the caller passes ``now``.

Request ``i`` of a schedule is *intended* at ``first_s + i * interval_s``; requests intended at
or after ``end_s`` are not part of it.  At each ``poll(now, outstanding)`` every request whose
intended time has come is due:

- it is sent now if fewer than ``outstanding_max`` requests are in flight (counting the ones
  this poll sends), however late that is: its latency is measured from the intended time, so a
  stall of the service (or of the client) shows up in the figures instead of being skipped
  (no coordinated omission);
- otherwise it is *skipped*: never sent, counted as an ``overload`` error.  Memory stays
  bounded by ``outstanding_max`` instead of growing with the backlog.

``lag`` of a sent request (now - intended) is the client's own delay; the bench reports it so a
saturated client process does not pass unnoticed.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Due:
    send: list[float]  # intended times of the requests to send now
    skipped: list[float]  # intended times of the requests skipped (outstanding_max reached)


class OpenLoopSchedule:
    """Intended send times at a fixed rate, with a bound on the requests in flight."""

    def __init__(self, first_s: float, interval_s: float, end_s: float, outstanding_max: int):
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        if outstanding_max < 1:
            raise ValueError("outstanding_max must be at least 1")
        self.first_s = first_s
        self.interval_s = interval_s
        self.end_s = end_s
        self.outstanding_max = outstanding_max
        self.index = 0  # the next request not yet due
        self.sent = 0
        self.skipped = 0

    def intended(self, index: int) -> float:
        return self.first_s + index * self.interval_s

    @property
    def next_s(self) -> float:
        """The intended time of the next request (>= ``end_s`` once the schedule is over)."""
        return self.intended(self.index)

    @property
    def finished(self) -> bool:
        return self.next_s >= self.end_s

    def poll(self, now_s: float, outstanding: int) -> Due:
        """The requests due at ``now_s``, given ``outstanding`` requests in flight."""
        due = Due([], [])
        room = self.outstanding_max - outstanding
        while not self.finished and self.next_s <= now_s:
            t = self.next_s
            self.index += 1
            if room > 0:
                due.send.append(t)
                room -= 1
            else:
                due.skipped.append(t)
        self.sent += len(due.send)
        self.skipped += len(due.skipped)
        return due


__all__ = ["Due", "OpenLoopSchedule"]
