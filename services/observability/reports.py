"""The JSON documents of /stats, /stats/concurrency and /cache/status, built from the counters
the services keep. Each read takes only short locks that no generation holds while it runs, so
these answer at once however busy the workers are.
"""

from __future__ import annotations

import time
from dataclasses import asdict


def stats_report(backend) -> dict:
    """Uptime, request outcomes per endpoint and per model, tokens, latency / TTFT, speed."""
    requests = backend.requests.summary()
    endpoints = requests.pop("endpoints")
    usage = backend.stats.summary()
    return {
        "replica": backend.config.REPLICA_NAME,
        "uptime_seconds": round(time.monotonic() - backend.started_at, 1),
        "requests": requests,
        "endpoints": endpoints,
        "models": backend.stats.by_model(),
        "keys": backend.requests.by_key(),
        **usage,
        "loaded_models": [{"name": m.name, "n_ctx": m.n_ctx, "instances": m.instances,
                           "in_use": m.in_use}
                          for m in backend.pool.loaded_models() if m.instances],
        "concurrency": _flat(asdict(backend.concurrency.snapshot())),
    }


def concurrency_report(backend) -> dict:
    """Limits, in-flight / active / queued, outcomes, workers, the engines' slots, queue wait."""
    concurrency = backend.concurrency
    snapshot = asdict(concurrency.snapshot())
    limits = {"MAX_CONCURRENT_REQUESTS": snapshot.pop("max_concurrent_requests"),
              "MAX_WORKERS": snapshot.pop("max_workers"),
              "MODEL_POOL_SIZE": backend.pool.size,
              "N_PARALLEL": backend.config.N_PARALLEL,
              "QUEUE_TIMEOUT": snapshot.pop("queue_timeout"),
              "REQUEST_TIMEOUT": snapshot.pop("request_timeout")}
    workers = {"max": limits["MAX_WORKERS"], "busy": snapshot.pop("workers_busy"),
               "started": snapshot.pop("workers_started"), "alive": snapshot.pop("workers_alive")}
    engines = engine_states(backend)
    slots = {"busy": sum(e["slots_busy"] for e in engines),
             "total": sum(e["slots_total"] for e in engines)}
    outcomes = snapshot.pop("outcomes")
    return {"limits": limits, **snapshot, **outcomes, "workers": workers,
            "slots": slots, "engines": engines,
            "queue_wait_ms": concurrency.queue_wait.percentiles((50, 95), scale=1000),
            "window_seconds": concurrency.queue_wait.seconds}


def engine_states(backend) -> list[dict]:
    """Every loaded model's batched engine: its slots, queue, KV cache and decode steps."""
    return [{"model": name, "n_ctx": n_ctx or backend.config.N_CTX,
             **asdict(engine.snapshot())}
            for name, n_ctx, engine in backend.pool.engines()]


def _flat(snapshot: dict) -> dict:
    """The concurrency snapshot with its outcome counts as fields of their own."""
    outcomes = snapshot.pop("outcomes")
    return {**snapshot, **outcomes}


def cache_report(backend) -> dict:
    """Every model cache, and the pool's loaded instances per model (least recently used first).

    The pool is the first cache: it holds every llama.cpp instance, so its list is the memory
    truth; other caches (DeepSeek's) are views over the same instances.
    """
    caches = cache_statuses(backend)
    return {"caches": caches, "loaded_models": caches[0]["models"],
            "response_cache": backend.response_cache.status()}


def cache_statuses(backend) -> list[dict]:
    return [cache.cache_status() for cache in backend.caches]

