"""Summary statistics of repeated timings: medians are quoted, tails show the jitter."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Distribution:
    """Median, 90th and 99th percentile, mean, min and count of a sample (same unit as the data)."""

    median: float
    p90: float
    p99: float
    mean: float
    min: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        """Summarise `values`; an empty sample gives zeros with count 0."""
        if len(values) == 0:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0)
        data = np.asarray(values, dtype=np.float64)
        median, p90, p99 = np.percentile(data, [50, 90, 99])  # monotone in the percentile
        return cls(
            float(median), float(p90), float(p99), float(data.mean()), float(data.min()), len(data)
        )

    def scaled(self, factor: float) -> Distribution:
        """The same distribution in another unit (e.g. seconds -> milliseconds)."""
        return Distribution(
            self.median * factor,
            self.p90 * factor,
            self.p99 * factor,
            self.mean * factor,
            self.min * factor,
            self.count,
        )

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)
