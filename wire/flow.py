"""Flow control shared by both ends of a connection (``wire.aio`` and ``wire.client``), and the
rate-limited log line of the limits that refuse connections."""

from __future__ import annotations

import asyncio
import logging
import time


def set_reading(transport: asyncio.Transport | None, paused: bool, reading: bool) -> bool:
    """Resume (``reading``) or pause reading from ``transport`` unless it already is so;
    returns whether reading is paused now (``paused`` is whether it was)."""
    if transport is None or reading is not paused:
        return paused
    if reading:
        transport.resume_reading()
    else:
        transport.pause_reading()
    return not reading


class CountedLog:
    """One log line per ``interval_s`` for an event that may come in floods: the first event
    logs at once; the ones after it within the interval are only counted, and the next line
    says how many there were (``count``: all of them since start)."""

    def __init__(self, logger: logging.Logger, level: int, interval_s: float = 10.0) -> None:
        self.logger = logger
        self.level = level
        self.interval_s = interval_s
        self.count = 0
        self._since_line = 0
        self._next_line = 0.0

    def note(self, message: str) -> None:
        self.count += 1
        self._since_line += 1
        now = time.monotonic()
        if now < self._next_line:
            return
        self.logger.log(
            self.level, "%s (%d times in the last %g s)", message, self._since_line, self.interval_s
        )
        self._since_line = 0
        self._next_line = now + self.interval_s
