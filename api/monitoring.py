"""Monitoring blueprint: liveness, statistics, Prometheus metrics and the live dashboard.

Every view here reads counters the services keep and never goes through the concurrency
manager, so each answers at once even when every worker is busy and the queue is full.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, render_template, request

from api import backend
from api.docs import document
from services.observability.metrics import render
from services.observability.reports import cache_report, concurrency_report, stats_report

bp = Blueprint("monitoring", __name__, template_folder="templates", static_folder="static",
               static_url_path="/dashboard/static")

_MODEL = "gemma-3-270m-q4_k_m.gguf"


@bp.get("/health")
@document(reply={"status": "ok"})
def health():
    """Liveness: answers at once, even when every worker is busy; 503 while shutting down."""
    draining = backend().concurrency.snapshot().draining
    return jsonify(status="shutting_down" if draining else "ok"), 503 if draining else 200


@bp.get("/stats")
@document(reply={
    "replica": "host-1:5000",
    "uptime_seconds": 812.4,
    "requests": {"total": 9, "succeeded": 6, "failed": 1, "rejected": 2, "timed_out": 0,
                 "cancelled": 0},
    "endpoints": {"POST /api/v1/generate": {"total": 9, "succeeded": 6, "failed": 1, "rejected": 2,
                                            "timed_out": 0, "cancelled": 0,
                                            "statuses": {"200": 6, "400": 1, "429": 2}}},
    "models": {_MODEL: {"requests": 8, "succeeded": 6, "failed": 0, "rejected": 2, "timed_out": 0,
                        "cancelled": 0, "generations": 6, "prompt_tokens": 42,
                        "completion_tokens": 96, "tokens_per_second": 61.3, "mean_queue_ms": 3.1}},
    "tokens": {"prompt": 42, "completion": 96},
    "tokens_per_second": {"recent": 60.8, "lifetime": 61.3},
    "latency_ms": {"p50": 270.4, "p95": 410.9, "p99": 410.9, "samples": 6},
    "ttft_ms": {"p50": 21.7, "p95": 35.2, "samples": 6}, "window_seconds": 300.0,
    "loaded_models": [{"name": _MODEL, "instances": 2, "in_use": 0}],
    "concurrency": {"in_flight": 0, "active": 0, "queued": 0, "...": "as in /stats/concurrency"}})
def stats():
    """Uptime; requests per outcome, endpoint and model; tokens; latency, TTFT and speed.

    Monitoring endpoints (/health, /stats..., /metrics, /dashboard) and the docs page are not
    counted. Percentiles cover the last window_seconds; counts and tokens are since start-up.
    """
    return jsonify(stats_report(backend()))


@bp.get("/stats/concurrency")
@document(reply={"limits": {"MAX_CONCURRENT_REQUESTS": 10, "MAX_WORKERS": 4, "MODEL_POOL_SIZE": 3,
                            "QUEUE_TIMEOUT": 30.0, "REQUEST_TIMEOUT": 300.0},
                 "in_flight": 5, "active": 3, "queued": 2,
                 "queued_by_priority": {"high": 1, "normal": 1, "low": 0}, "succeeded": 40,
                 "failed": 0, "rejected": 2, "timed_out": 0, "queue_timed_out": 0, "cancelled": 1,
                 "draining": False, "workers": {"max": 4, "busy": 4, "started": 4, "alive": 4},
                 "queue_wait_ms": {"p50": 0.3, "p95": 812.0, "samples": 43},
                 "window_seconds": 300.0})
def concurrency_stats():
    """Limits; requests in flight, active (holding a slot) and queued (also per priority); queue
    wait; refusals."""
    return jsonify(concurrency_report(backend()))


@bp.get("/cache/status")
@document(reply={"caches": [{"name": "gguf", "instances_per_model": 3, "hits": 41, "misses": 2,
                             "evictions": 0, "lru_order": [_MODEL],
                             "models": [{"name": _MODEL, "instances": 2, "idle": 2, "in_use": 0,
                                         "loading": 0, "last_used": "2026-01-01T12:00:00+00:00",
                                         "last_load_seconds": 0.41,
                                         "memory": {"bytes": 301989888,
                                                    "source": "measured_rss_at_load"}}]}],
                 "loaded_models": [{"cache": "gguf", "name": _MODEL, "instances": 2, "...": "..."}]})
def cache_status():
    """Loaded models per cache: instances idle / in use, LRU order, hits / misses / evictions.

    Memory is the process's measured RSS growth while the model's instances loaded
    (source "measured_rss_at_load"), or, when loads overlapped, the estimate from the GGUF
    metadata: weights plus a KV cache per instance (source "estimate").
    """
    return jsonify(cache_report(backend()))


@bp.get("/metrics")
@document(reply="text/plain; version=0.0.4 (Prometheus text format; OpenMetrics if Accept asks)")
def metrics():
    """Prometheus metrics: requests, latency / TTFT histograms, tokens, queue, pool, loads."""
    body, content_type = render(backend().metrics, request.headers.get("Accept", ""))
    return Response(body, content_type=content_type)


@bp.get("/dashboard")
@document(reply="text/html")
def dashboard():
    """Live charts of /stats and /stats/concurrency, polled every 2 s, and the model events
    (GET /api/v1/models/events) as they happen; no external assets."""
    return render_template("dashboard.html", auth=backend().access.required)
