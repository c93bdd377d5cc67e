"""Will a model fit? Estimates from GGUF metadata, checked against available memory.

Refusing a load with a clear error beats the kernel's OOM killer ending the whole server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterable

import psutil

from services.errors import InsufficientMemory


@dataclass(frozen=True)
class LoadCost:
    """Bytes a model instance needs: the weights once per model, a KV cache per instance."""

    weights_bytes: int
    kv_cache_bytes: int

    @property
    def first_instance(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes


def estimate_load(size_bytes: int, kv_bytes_per_token: int | None, n_ctx: int) -> LoadCost:
    """File size for the weights (memory-mapped, shared by instances) + f16 KV for n_ctx."""
    return LoadCost(size_bytes, (kv_bytes_per_token or 0) * n_ctx)


def available_memory() -> int:
    return psutil.virtual_memory().available


class MemoryGuard:
    """Refuses loads that would leave less than MEMORY_RESERVE_BYTES available."""

    def __init__(self, reserve_bytes: int, available: Callable[[], int] = available_memory):
        self.reserve_bytes = reserve_bytes
        self._available = available

    def usable(self) -> int:
        return max(0, self._available() - self.reserve_bytes)

    def check(self, name: str, needed: int) -> None:
        """:raise InsufficientMemory: `needed` bytes exceed what may be used now."""
        usable = self.usable()
        if needed > usable:
            raise InsufficientMemory(
                f"loading {name} needs about {needed / 2**20:.0f} MiB but only "
                f"{usable / 2**20:.0f} MiB may be used (MEMORY_RESERVE_BYTES keeps "
                f"{self.reserve_bytes / 2**20:.0f} MiB free)",
                needed_bytes=needed, usable_bytes=usable, reserve_bytes=self.reserve_bytes)


def system_report(guard: MemoryGuard, directories: dict[str, str],
                  models: Iterable[tuple[str, str, LoadCost, bool]]) -> dict:
    """RAM, cores, disk per models directory, and whether each model would fit now.

    `models` yields (name, type, cost, loaded); a loaded model needs only a KV cache more.
    """
    memory = psutil.virtual_memory()
    usable = guard.usable()
    disks = {kind: psutil.disk_usage(path).free if os.path.isdir(path) else None
             for kind, path in directories.items()}
    return {
        "memory": {"total_bytes": memory.total, "available_bytes": memory.available,
                   "reserve_bytes": guard.reserve_bytes, "usable_bytes": usable},
        "cpu": {"cores": os.cpu_count(), "percent": psutil.cpu_percent(interval=None)},
        "disk_free_bytes": disks,
        "models": [{"name": name, "type": kind, "estimate_bytes": cost.first_instance,
                    "weights_bytes": cost.weights_bytes, "kv_cache_bytes": cost.kv_cache_bytes,
                    "loaded": loaded,
                    "fits": (cost.kv_cache_bytes if loaded else cost.first_instance) <= usable}
                   for name, kind, cost, loaded in models],
    }
