"""Readiness checks and system figures for /api/v1/health (psutil, no Flask)."""

from __future__ import annotations

import os

import psutil


def health_report(backend) -> dict:
    """`status` ok / degraded / down with the reasons, plus models, workers, memory and disk."""
    models_dir = backend.models.models_dir
    reasons, fatal = [], []
    if not os.access(models_dir, os.R_OK):
        fatal.append(f"models directory {models_dir} is not readable")
    models = backend.models.list()
    if not models:
        fatal.append(f"no models in {models_dir}")
    elif backend.config.DEFAULT_MODEL and backend.config.DEFAULT_MODEL not in {
            m.name for m in models} | {m.name.removesuffix(".gguf") for m in models}:
        reasons.append(f"DEFAULT_MODEL {backend.config.DEFAULT_MODEL} is missing")
    concurrency = backend.concurrency.snapshot()
    if concurrency.draining:
        fatal.append("shutting down")
    if concurrency.in_flight >= concurrency.max_concurrent_requests:
        reasons.append("at MAX_CONCURRENT_REQUESTS: new requests get 429")
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(models_dir)) if models_dir.is_dir() else None
    if memory.available < 512 * 1024**2:
        reasons.append("less than 512 MiB of memory available")
    return {
        "status": "down" if fatal else "degraded" if reasons else "ok",
        "reasons": fatal + reasons,
        "models": len(models),
        "loaded_models": [m.name for m in backend.pool.loaded_models()],
        "workers": {"max": concurrency.max_workers, "busy": concurrency.active,
                    "queued": concurrency.queued},
        "system": {"cpu_percent": psutil.cpu_percent(interval=None), "cpu_count": os.cpu_count(),
                   "memory_total_bytes": memory.total, "memory_available_bytes": memory.available,
                   "process_rss_bytes": psutil.Process().memory_info().rss,
                   "disk_free_bytes": disk.free if disk else None},
    }
