"""Per-model generation counters, kept by the service and read by /stats."""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import asdict, dataclass


@dataclass
class ModelUsage:
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0
    queue_seconds: float = 0.0

    def to_dict(self) -> dict:
        info = asdict(self)
        info["mean_latency_ms"] = round(
            1000 * (self.generation_seconds + self.queue_seconds) / self.requests, 1) if self.requests else None
        info["tokens_per_second"] = round(
            self.completion_tokens / self.generation_seconds, 1) if self.generation_seconds else None
        return info


class UsageStats:
    """Thread-safe per-model totals."""

    def __init__(self):
        self._lock = threading.Lock()
        self._models: dict[str, ModelUsage] = defaultdict(ModelUsage)

    def record(self, model: str, ok: bool, prompt_tokens: int, completion_tokens: int,
               queue_seconds: float, generation_seconds: float) -> None:
        with self._lock:
            usage = self._models[model]
            usage.requests += 1
            usage.succeeded += ok
            usage.failed += not ok
            usage.prompt_tokens += prompt_tokens
            usage.completion_tokens += completion_tokens
            usage.queue_seconds += queue_seconds
            usage.generation_seconds += generation_seconds

    def by_model(self) -> dict[str, dict]:
        with self._lock:
            return {name: usage.to_dict() for name, usage in sorted(self._models.items())}
