"""What /cache/status shows of each model cache: instances, LRU order, hits / misses / evictions.

Any cache of loaded models (the GGUF pool today, DeepSeek's later) reports through the same
`ModelCache` shape, so adding one to `Backend.caches` is all it takes to show it.
"""

from __future__ import annotations

import datetime
from typing import Callable, Iterable, Protocol

from services.errors import ModelNotFound
from services.observability.load_meter import LoadMeter
from services.engine.memory import estimate_load
from services.model_pool import LoadedModel, ModelPool, model_of

# (model name, KV cache cells of its loaded contexts) -> estimated bytes, None if unknown.
Estimate = Callable[[str, int], "int | None"]


class ModelCache(Protocol):
    """A cache of loaded models. `cache_status()` returns at least: name, hits, misses,
    evictions, lru_order (least recently used first) and models in that order (each with
    name, instances, idle, in_use and memory {bytes, source})."""

    name: str

    def cache_status(self) -> dict: ...


class PoolCache:
    """The ModelPool seen as a model cache: every loaded llama.cpp instance, of any model, with
    its memory. Instances DeepSeek loads at its own context size are listed apart (`n_ctx`)."""

    def __init__(self, name: str, pool: ModelPool, meter: LoadMeter, estimate: Estimate):
        self.name = name
        self._pool, self._meter, self._estimate = pool, meter, estimate

    def cache_status(self) -> dict:
        models = sorted((m for m in self._pool.loaded_models() if m.instances or m.loading),
                        key=lambda m: m.last_used)
        return {
            "name": self.name,
            "instances_per_model": self._pool.size,
            **self._pool.cache_counts(),
            "lru_order": [_label(m) for m in models],
            "models": [self._describe(model) for model in models],
        }

    def _describe(self, model: LoadedModel) -> dict:
        record = self._meter.record(model.path, model.n_ctx)
        return {
            "name": model.name, "n_ctx": model.n_ctx, "instances": model.instances, "idle": model.instances - model.in_use,
            "in_use": model.in_use, "loading": model.loading,
            "last_used": _iso(model.last_used),
            "last_load_seconds": round(record.last_seconds, 3) if record and record.last_seconds else None,
            "memory": self._memory(model, record),
        }

    def _memory(self, model: LoadedModel, record) -> dict:
        """Measured RSS growth of its instances' loads when known, else the metadata estimate."""
        measured = record.measured_bytes(model.instances) if record else None
        if measured is not None:
            return {"bytes": measured, "source": "measured_rss_at_load"}
        return {"bytes": self._estimate(model.name, model.kv_tokens),
                "source": "estimate"}


def _label(model: LoadedModel) -> str:
    """The model's name, with its context size when it is not the default one."""
    return model.name if model.n_ctx is None else f"{model.name} (n_ctx={model.n_ctx})"


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(
        timespec="seconds")


def registry_estimate(managers: Iterable) -> Estimate:
    """Estimate from the ModelManagers' GGUF metadata: the weights once, and the KV cache of
    every cell its contexts hold (an engine's slots share one cache)."""
    managers = list(managers)

    def estimate(name: str, kv_tokens: int) -> int | None:
        for manager in managers:
            try:
                model = manager.resolve(model_of(name))
            except ModelNotFound:
                continue
            return estimate_load(model.size_bytes, model.kv_bytes_per_token,
                                 kv_tokens).first_instance
        return None

    return estimate
