"""Latency histograms: HdrHistogram (``hdrh``) in microseconds, reported in milliseconds.

Each client process records into its own ``LatencyHistogram`` and ships it to the parent
encoded (``encode``: the standard compressed, base64 HdrHistogram V2 blob, readable by every
HdrHistogram implementation); the parent ``merge``s them.  Percentiles are nearest-rank: the
value at rank ``ceil(q * n)`` of the sorted recordings, reported as the highest value
equivalent to it at the histogram's precision (3 significant digits: within 0.1 %).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour: anything longer is clamped to it
SIGNIFICANT_DIGITS = 3
QUANTILES: tuple[tuple[str, float], ...] = (
    ("p50", 0.50),
    ("p90", 0.90),
    ("p99", 0.99),
    ("p99.9", 0.999),
)


class LatencyHistogram:
    """Counts of latencies from 1 µs to 1 h at 3 significant digits; a few hundred KiB."""

    def __init__(self, hdr: HdrHistogram | None = None) -> None:
        self._hdr = hdr or HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)

    @property
    def count(self) -> int:
        return int(self._hdr.get_total_count())

    def record_s(self, seconds: float) -> None:
        """Record one latency given in seconds (negative values count as 0)."""
        self.record_us(round(seconds * 1_000_000))

    def record_us(self, us: int, count: int = 1) -> None:
        self._hdr.record_value(min(max(us, 0), HIGHEST_US), count)

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s counts to this histogram."""
        if other.count:
            self._hdr.add(other._hdr)

    @classmethod
    def merged(cls, parts: Iterable[LatencyHistogram]) -> LatencyHistogram:
        out = cls()
        for part in parts:
            out.merge(part)
        return out

    def encode(self) -> str:
        return str(self._hdr.encode().decode("ascii"))

    @classmethod
    def decode(cls, blob: str) -> LatencyHistogram:
        return cls(HdrHistogram.decode(blob.encode("ascii")))

    def quantiles_us(self, quantiles: Sequence[float]) -> list[int]:
        """Nearest-rank values (µs) at ``quantiles`` (each in (0, 1]); one pass over the counts."""
        total = self.count
        if total == 0:
            return [0 for _ in quantiles]
        order = sorted(range(len(quantiles)), key=lambda i: quantiles[i])
        ranks = [max(1, math.ceil(quantiles[i] * total - 1e-9)) for i in order]
        out = [0] * len(quantiles)
        hdr = self._hdr
        seen = k = 0
        for index in range(hdr.counts_len):
            c = hdr.counts[index]
            if not c:
                continue
            seen += c
            while k < len(ranks) and seen >= ranks[k]:
                value = hdr.get_value_from_index(index)
                out[order[k]] = int(hdr.get_highest_equivalent_value(value))
                k += 1
            if k == len(ranks):
                break
        return out

    def equivalent_us(self, us: int) -> int:
        """The value the histogram reports for a recording of ``us``."""
        return int(self._hdr.get_highest_equivalent_value(min(max(us, 0), HIGHEST_US)))

    def summary_ms(self) -> dict[str, float]:
        """count, mean, p50, p90, p99, p99.9 and max in milliseconds (0 when empty)."""
        values = self.quantiles_us([q for _, q in QUANTILES] + [1.0])
        out: dict[str, float] = {"count": self.count}
        out["mean"] = float(self._hdr.get_mean_value()) / 1000.0 if self.count else 0.0
        for (name, _), value in zip(QUANTILES, values, strict=False):
            out[name] = value / 1000.0
        out["max"] = values[-1] / 1000.0
        return out


__all__ = ["QUANTILES", "LatencyHistogram"]
