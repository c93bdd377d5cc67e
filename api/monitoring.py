"""Monitoring blueprint: liveness and the counters the services keep. Never queued."""

from __future__ import annotations

import time
from dataclasses import asdict

from flask import Blueprint, jsonify

from api import backend
from api.docs import document

bp = Blueprint("monitoring", __name__)


@bp.get("/health")
@document(reply={"status": "ok"})
def health():
    """Liveness: answers at once, even when every worker is busy; 503 while shutting down."""
    draining = backend().concurrency.snapshot().draining
    return jsonify(status="shutting_down" if draining else "ok"), 503 if draining else 200


@bp.get("/stats")
@document(reply={"uptime_seconds": 12.5, "models": {"gemma-3-270m-q4_k_m.gguf": {"requests": 3}},
                 "concurrency": {"active": 0, "completed": 3}})
def stats():
    """Uptime, per-model request and token counts, and the concurrency counters."""
    services = backend()
    return jsonify(uptime_seconds=round(time.monotonic() - services.started_at, 1),
                   models=services.stats.by_model(),
                   concurrency=asdict(services.concurrency.snapshot()))


@bp.get("/stats/concurrency")
@document(reply={"max_concurrent_requests": 10, "max_workers": 4, "active": 1, "queued": 0,
                 "rejected": 0, "timed_out": 0})
def concurrency_stats():
    """Limits, requests active and queued, and completed / failed / rejected / timed-out counts."""
    return jsonify(asdict(backend().concurrency.snapshot()))


@bp.get("/cache/status")
@document(reply={"pool_size": 3, "loaded_models": [{"name": "gemma-3-270m-q4_k_m.gguf",
                                                    "instances": 1, "in_use": 0}]})
def cache_status():
    """Loaded models and their pooled instances (idle and in use)."""
    pool = backend().pool
    return jsonify(pool_size=pool.size,
                   loaded_models=[asdict(model) for model in pool.loaded_models()])
