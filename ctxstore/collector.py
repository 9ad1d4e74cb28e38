"""The cyclic garbage collector, tuned for a server (a node; the bench's client processes too)."""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # the default of the config key gc_young_threshold (Python's: 700)


def tune_collector(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """The cyclic garbage collector, tuned for a server: what start-up built (the WAL's views,
    the restored state) moves to the permanent generation and is never scanned again, and the
    young generation is collected every ``young_threshold`` allocations instead of Python's 700,
    so the short-lived objects of requests in flight die by reference count before a
    collection sees them.  Cycles are still collected (later, and bounded by the threshold).
    What it saves, measured: docs/benchmarks.md (the table of changes)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)
