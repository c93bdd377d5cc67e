"""Times every model load and measures how much the process grew while it ran.

It wraps the pool's loader rather than living inside the pool, so it sees the same loads
whichever loader the app uses (the real llama.cpp one or a test's). A load's RSS change is a
measurement only when no other load overlapped it; otherwise /cache/status falls back to the
estimate from the GGUF metadata and says so. The pool unloads a model's instances together, so
the latest n loads of a file are its n loaded instances: the first carries the weights, the
others their own KV cache and buffers.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import psutil

from services.observability.window import LOAD_BUCKETS, BucketHistogram

Loader = Callable[..., Any]  # loader(path), or loader(path, n_ctx) for its own context size


def process_rss() -> int:
    return psutil.Process().memory_info().rss


_KEEP = 64  # RSS changes remembered per file (more than any pool holds instances)


@dataclass(frozen=True)
class LoadRecord:
    """The loads of one model file so far."""

    loads: int
    failures: int
    last_seconds: float | None
    rss_deltas: tuple[int | None, ...]  # per load, newest last; None where not measurable

    def measured_bytes(self, instances: int) -> int | None:
        """Growth caused by the latest `instances` loads, if every one of them was measured."""
        latest = self.rss_deltas[-instances:] if instances else ()
        if not latest or len(latest) < instances or None in latest:
            return None
        return sum(latest)


class LoadMeter:
    """Load durations per model (a histogram) and the latest RSS change per model file."""

    def __init__(self, rss: Callable[[], int] = process_rss):
        self._rss = rss
        self._lock = threading.Lock()
        self._running = 0
        self._started = 0
        self._records: dict[tuple[str, int | None], LoadRecord] = {}
        self._durations: dict[str, BucketHistogram] = {}

    def wrap(self, loader: Loader) -> Loader:
        """`loader`, measured."""

        def load(path: str, n_ctx: int | None = None) -> Any:
            with self._lock:
                alone, self._running = self._running == 0, self._running + 1
                self._started += 1
                ticket = self._started
            before, started = self._rss(), time.monotonic()
            try:
                # n_ctx: a DeepSeek instance's own context size; the pool passes none otherwise.
                instance = loader(path) if n_ctx is None else loader(path, n_ctx)
            except BaseException:
                self._finish((path, n_ctx), None, None)
                raise
            seconds, grown = time.monotonic() - started, self._rss() - before
            with self._lock:
                alone = alone and self._started == ticket  # no other load began meanwhile
            self._finish((path, n_ctx), seconds, grown if alone and grown > 0 else None)
            return instance

        return load

    def _finish(self, key: tuple[str, int | None], seconds: float | None,
                grown: int | None) -> None:
        name = os.path.basename(key[0])
        with self._lock:
            self._running -= 1
            old = self._records.get(key, LoadRecord(0, 0, None, ()))
            if seconds is None:
                self._records[key] = LoadRecord(old.loads, old.failures + 1, old.last_seconds,
                                                old.rss_deltas)
                return
            self._records[key] = LoadRecord(old.loads + 1, old.failures, seconds,
                                            (*old.rss_deltas, grown)[-_KEEP:])
            histogram = self._durations.setdefault(name, BucketHistogram(LOAD_BUCKETS))
        histogram.observe(seconds)

    def record(self, path: str, n_ctx: int | None = None) -> LoadRecord | None:
        """The loads of `path` at context size `n_ctx` (None: the pool's default size)."""
        with self._lock:
            return self._records.get((path, n_ctx))

    def durations(self) -> dict[str, tuple]:
        """{model file name: histogram snapshot} for /metrics."""
        with self._lock:
            histograms = dict(self._durations)
        return {name: histogram.snapshot() for name, histogram in sorted(histograms.items())}
