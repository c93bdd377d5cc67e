"""Small thread-safe measurement primitives: a time-bounded sample window and a bucket histogram.

`/stats` reports percentiles over recent samples (an operator wants "how is it now", not the
average since start-up); `/metrics` exports cumulative bucket counts, from which Prometheus
computes its own quantiles over any range. Both are kept by the services, never by Flask code.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Sequence

# Upper bounds (seconds) of the histogram buckets; +Inf is implied.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def percentile(ordered: Sequence[float], percent: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None when there are none."""
    if not ordered:
        return None
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


class SlidingWindow:
    """Samples of the last `seconds` (at most `max_samples`, oldest dropped first).

    Samples are usually numbers; any value may be kept when the caller only needs `values()`.
    """

    def __init__(self, seconds: float = 300.0, max_samples: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        self.seconds = seconds
        self._clock = clock
        self._samples: deque[tuple[float, Any]] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def add(self, value: Any) -> None:
        with self._lock:
            self._samples.append((self._clock(), value))

    def values(self) -> list[Any]:
        """The samples still inside the window, oldest first."""
        with self._lock:
            horizon = self._clock() - self.seconds
            while self._samples and self._samples[0][0] < horizon:
                self._samples.popleft()
            return [value for _, value in self._samples]

    def percentiles(self, percents: Iterable[int], scale: float = 1.0,
                    digits: int = 1) -> dict[str, float | int | None]:
        """{"p50": ..., "samples": n}, values multiplied by `scale` (1000 for ms) and rounded."""
        ordered = sorted(self.values())
        summary: dict[str, float | int | None] = {}
        for percent in percents:
            value = percentile(ordered, percent)
            summary[f"p{percent}"] = None if value is None else round(value * scale, digits)
        summary["samples"] = len(ordered)
        return summary


class BucketHistogram:
    """Cumulative bucket counts, sum and count, as Prometheus histograms expose them."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(sorted(bounds))
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.bounds, value)] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """([(upper bound, cumulative count)...] ending with "+Inf", sum of observations)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, count in zip([*map(_bound_label, self.bounds), "+Inf"], counts):
            running += count
            cumulative.append((bound, running))
        return cumulative, total


def _bound_label(bound: float) -> str:
    return repr(float(bound))
