"""Flow control shared by both ends of a connection (``wire.aio`` and ``wire.client``)."""

from __future__ import annotations

import asyncio


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
