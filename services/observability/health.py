"""Readiness checks and system figures for /api/v1/health (psutil, no Flask).

`down` means this server cannot serve a generation (no models, unreadable directory, shutting
down); `starting` that it is still loading PRELOAD_MODELS; `degraded` means it can, but an
operator should look (a worker died, memory or disk short, at the concurrency limit, a
preloaded model failed). Nothing here waits for a worker or a model instance.
"""

from __future__ import annotations

import os

import psutil

from models.model_file import READY

LOW_MEMORY_BYTES = 512 * 1024**2
LOW_DISK_BYTES = 1024**3


def health_report(backend) -> dict:
    """`status` ok / degraded / down with the reasons, plus models, workers, CPU, memory, disk."""
    models = backend.models.list()
    default_model = _default_model(backend.models.default_name(), models)
    fatal, reasons = _model_checks(backend, models, default_model)
    concurrency = backend.concurrency.snapshot()
    if concurrency.draining:
        fatal.append("shutting down")
    if concurrency.workers_alive < concurrency.workers_started:
        reasons.append(f"{concurrency.workers_started - concurrency.workers_alive} worker "
                       f"thread(s) died")
    if concurrency.in_flight >= concurrency.max_concurrent_requests:
        reasons.append("at MAX_CONCURRENT_REQUESTS: new requests get 429")
    starting = _preload_checks(backend, reasons)
    system = system_figures(backend.models.models_dir)
    if system["memory_available_bytes"] < LOW_MEMORY_BYTES:
        reasons.append("less than 512 MiB of memory available")
    if system["disk_free_bytes"] is not None and system["disk_free_bytes"] < LOW_DISK_BYTES:
        reasons.append("less than 1 GiB of disk free in MODELS_DIR")
    return {
        "status": ("down" if fatal else "starting" if starting else
                   "degraded" if reasons else "ok"),
        "reasons": fatal + starting + reasons,
        "models": len(models),
        "default_model": default_model,
        "loaded_models": [m.name for m in backend.pool.loaded_models() if m.instances],
        "preload": backend.preloader.status() if backend.preloader else None,
        "workers": {"max": concurrency.max_workers, "busy": concurrency.workers_busy,
                    "started": concurrency.workers_started, "alive": concurrency.workers_alive,
                    "active": concurrency.active, "queued": concurrency.queued},
        "system": system,
    }


def _preload_checks(backend, reasons: list[str]) -> list[str]:
    """The models PRELOAD_MODELS still loads (a "starting" reason); failed ones go to
    `reasons`."""
    if backend.preloader is None:
        return []
    status = backend.preloader.status()
    for name, error in status["failed"].items():
        reasons.append(f"PRELOAD_MODELS: {name} was not loaded: {error}")
    if not status["pending"]:
        return []
    return [f"starting: loading PRELOAD_MODELS ({', '.join(status['pending'])})"]


def _model_checks(backend, models: list, default_model: str | None) -> tuple[list[str], list[str]]:
    """(fatal, degraded) reasons about MODELS_DIR and the default model."""
    models_dir = backend.models.models_dir
    fatal, reasons = [], []
    if not os.access(models_dir, os.R_OK):
        fatal.append(f"models directory {models_dir} is not readable")
    if not models:
        fatal.append(f"no models in {models_dir}")
    elif default_model is None:
        reasons.append(f"the default model {backend.models.default_name() or '(none)'} is "
                       f"missing or not servable (see GET /api/v1/models)")
    return fatal, reasons


def _default_model(wanted: str | None, models: list) -> str | None:
    """The model a request naming none gets, or None when it is missing or not servable."""
    if not wanted:
        return None
    names = {m.name for m in models if m.status == READY}
    return next((name for name in (wanted, f"{wanted}.gguf") if name in names), None)


def system_figures(models_dir) -> dict:
    """CPU, memory and disk as psutil sees them; CPU % is since the previous call."""
    memory = psutil.virtual_memory()
    disk = psutil.disk_usage(str(models_dir)) if os.path.isdir(models_dir) else None
    return {"cpu_percent": psutil.cpu_percent(interval=None), "cpu_count": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "memory_total_bytes": memory.total, "memory_available_bytes": memory.available,
            "memory_percent": memory.percent,
            "process_rss_bytes": psutil.Process().memory_info().rss,
            "disk_total_bytes": disk.total if disk else None,
            "disk_free_bytes": disk.free if disk else None,
            "disk_percent": disk.percent if disk else None}
