"""Per-model generation statistics, kept by the services and read by /stats and /metrics.

Two kinds of record, both made exactly once per event:
- `record_outcome(model, outcome)`: one request for a model ended, in the vocabulary of
  `services.types.OUTCOMES`; made by the job runner when it ends the request's job.
- `record(model, ...)`: one generation ran; tokens, time to first token and latency.
Percentiles come from a sliding window (how the server is doing now); histograms and totals are
cumulative since start-up, as Prometheus expects.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from services.observability.window import LATENCY_BUCKETS, TTFT_BUCKETS, BucketHistogram, SlidingWindow
from services.types import OUTCOMES


@dataclass
class ModelUsage:
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    generations: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0
    queue_seconds: float = 0.0
    latency: BucketHistogram = field(default_factory=lambda: BucketHistogram(LATENCY_BUCKETS))
    ttft: BucketHistogram = field(default_factory=lambda: BucketHistogram(TTFT_BUCKETS))

    def to_dict(self) -> dict:
        return {
            "requests": sum(self.outcomes.values()), **self.outcomes,
            "generations": self.generations,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "tokens_per_second": _rate(self.completion_tokens, self.generation_seconds),
            "mean_queue_ms": round(1000 * self.queue_seconds / self.generations, 1)
            if self.generations else None,
        }


@dataclass(frozen=True)
class _Generation:
    completion_tokens: int
    generation_seconds: float


class UsageStats:
    """Thread-safe per-model totals plus recent-window percentiles of latency and TTFT."""

    def __init__(self, window_seconds: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.window_seconds = window_seconds
        self._lock = threading.Lock()
        self._models: dict[str, ModelUsage] = {}
        self._latency = SlidingWindow(window_seconds, clock=clock)
        self._ttft = SlidingWindow(window_seconds, clock=clock)
        self._recent = SlidingWindow(window_seconds, clock=clock)

    def _usage(self, model: str) -> ModelUsage:
        """The model's record (lock held)."""
        usage = self._models.get(model)
        if usage is None:
            usage = self._models[model] = ModelUsage()
        return usage

    def record_outcome(self, model: str, outcome: str) -> None:
        """One request for `model` ended with `outcome` (one of OUTCOMES)."""
        with self._lock:
            self._usage(model).outcomes[outcome] += 1

    def record(self, model: str, ok: bool, prompt_tokens: int, completion_tokens: int,
               queue_seconds: float, generation_seconds: float, *,
               ttft_seconds: float | None = None, latency_seconds: float | None = None) -> None:
        """One generation ran on a worker; latency counts only when it completed (`ok`)."""
        with self._lock:
            usage = self._usage(model)
            usage.generations += 1
            usage.prompt_tokens += prompt_tokens
            usage.completion_tokens += completion_tokens
            usage.queue_seconds += queue_seconds
            usage.generation_seconds += generation_seconds
            if ttft_seconds is not None:
                usage.ttft.observe(ttft_seconds)
            if ok and latency_seconds is not None:
                usage.latency.observe(latency_seconds)
        if ttft_seconds is not None:
            self._ttft.add(ttft_seconds)
        if ok and latency_seconds is not None:
            self._latency.add(latency_seconds)
        if generation_seconds > 0:
            self._recent.add(_Generation(completion_tokens, generation_seconds))

    def by_model(self) -> dict[str, dict]:
        with self._lock:
            return {name: usage.to_dict() for name, usage in sorted(self._models.items())}

    def summary(self) -> dict:
        """Token totals over every model, and the recent window's latency, TTFT and speed."""
        with self._lock:
            usages = list(self._models.values())
            prompt = sum(u.prompt_tokens for u in usages)
            completion = sum(u.completion_tokens for u in usages)
            seconds = sum(u.generation_seconds for u in usages)
        recent = self._recent.values()
        return {
            "tokens": {"prompt": prompt, "completion": completion},
            "tokens_per_second": {
                "recent": _rate(sum(g.completion_tokens for g in recent),
                                sum(g.generation_seconds for g in recent)),
                "lifetime": _rate(completion, seconds)},
            "latency_ms": self._latency.percentiles((50, 95, 99), scale=1000),
            "ttft_ms": self._ttft.percentiles((50, 95), scale=1000),
            "window_seconds": self.window_seconds,
        }

    def histograms(self) -> dict[str, dict[str, tuple]]:
        """Per model: {"latency": snapshot, "ttft": snapshot} for /metrics."""
        with self._lock:
            usages = dict(self._models)
        return {name: {"latency": usage.latency.snapshot(), "ttft": usage.ttft.snapshot()}
                for name, usage in sorted(usages.items())}


def _rate(tokens: int, seconds: float) -> float | None:
    """Completion tokens per second of generation, or None before any generation."""
    return round(tokens / seconds, 1) if seconds > 0 else None
