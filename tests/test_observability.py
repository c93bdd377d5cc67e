"""/stats, /stats/concurrency, /cache/status and /metrics after known traffic, on the real model.

To hold requests at a known point, a gate keeps the real model's first load until the test
opens it: tokens, counts and timings all come from the real model.
"""

from __future__ import annotations

import os
import threading
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import LONG, MODEL_NAME, sse_events, wait_until
from services.model_loading import InstanceSettings, llamacpp_loader


def gated_loader(gate: threading.Event):
    """The real loader, held at the gate until the test opens it."""
    real = llamacpp_loader(InstanceSettings(n_ctx=1024, n_batch=512, n_threads=1, n_gpu_layers=0))

    def load(path):
        assert gate.wait(60), "the test never opened the gate"
        return real(path)

    return load


def get(server, path: str) -> dict:
    reply = requests.get(f"{server.url}{path}", timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def metric_samples(server) -> dict:
    """{(sample name, frozenset(labels)): value} from /metrics, via prometheus_client's parser;
    every sample's replica label is checked and left out of its key."""
    reply = requests.get(f"{server.url}/metrics", timeout=10)
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = [sample for family in text_string_to_metric_families(reply.text)
               for sample in family.samples]
    assert {sample.labels.get("replica") for sample in samples} == {
        server.backend.config.REPLICA_NAME}
    return {(sample.name, frozenset((k, v) for k, v in sample.labels.items() if k != "replica")):
            sample.value for sample in samples}


def metric(samples: dict, name: str, **labels) -> float:
    return samples[name, frozenset(labels.items())]


def run_known_traffic(server, gate: threading.Event) -> list[dict]:
    """4 successes (2 held at the gate, then 1 whole and 1 streamed), 3 rejections, 2 bad bodies."""
    held = []
    threads = [threading.Thread(target=lambda: held.append(
        server.generate(prompt="Hello there", max_tokens=3, temperature=0))) for _ in range(2)]
    for thread in threads:
        thread.start()
    assert wait_until(lambda: server.backend.concurrency.snapshot().in_flight == 2)
    for _ in range(3):
        refused = server.generate(prompt="one too many", max_tokens=3)
        assert refused.status_code == 429
    gate.set()
    for thread in threads:
        thread.join()
    replies = [reply.json() for reply in held]
    replies.append(server.generate(prompt="The sky is", max_tokens=3, temperature=0).json())
    events = sse_events(server.stream(prompt="Once upon", max_tokens=3, temperature=0))
    replies.append(events[-1])
    for body in ({"prompt": ""}, {"prompt": "hi", "max_token": 3}):
        assert requests.post(f"{server.url}/api/v1/generate", json=body, timeout=10).status_code == 400
    assert all(reply["finish_reason"] for reply in replies)
    return replies


def test_every_counter_matches_a_known_mix_of_traffic(live):
    gate = threading.Event()
    server = live(loader=gated_loader(gate), MAX_CONCURRENT_REQUESTS=2)
    replies = run_known_traffic(server, gate)
    prompt = sum(reply["usage"]["prompt_tokens"] for reply in replies)
    completion = sum(reply["usage"]["completion_tokens"] for reply in replies)
    assert completion > 0
    # The access-log line and the count are written as each reply closes: wait for the last.
    assert wait_until(lambda: get(server, "/stats")["requests"]["total"] == 9)

    stats = get(server, "/stats")
    outcomes = {"succeeded": 4, "failed": 2, "rejected": 3, "timed_out": 0, "queue_timed_out": 0,
                "cancelled": 0}
    assert stats["requests"] == {"total": 9, **outcomes}
    assert stats["endpoints"] == {"POST /api/v1/generate": {
        "total": 9, **outcomes, "statuses": {"200": 4, "400": 2, "429": 3}}}
    usage = stats["models"][MODEL_NAME]
    assert {key: usage[key] for key in ("requests", *outcomes, "generations")} == {
        "requests": 7, **outcomes, "failed": 0, "generations": 4}
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, completion)
    assert stats["tokens"] == {"prompt": prompt, "completion": completion}
    assert stats["latency_ms"]["samples"] == 4 and stats["ttft_ms"]["samples"] == 4
    assert 0 < stats["ttft_ms"]["p50"] <= stats["latency_ms"]["p50"] <= stats["latency_ms"]["p99"]
    assert stats["tokens_per_second"]["lifetime"] > 0
    assert stats["loaded_models"] == [{"name": MODEL_NAME, "n_ctx": None, "instances": 1,
                                       "in_use": 0}]

    concurrency = get(server, "/stats/concurrency")
    assert concurrency["limits"] == {"MAX_CONCURRENT_REQUESTS": 2, "MAX_WORKERS": 2,
                                     "MODEL_POOL_SIZE": 2, "N_PARALLEL": 8,
                                     "QUEUE_TIMEOUT": 30.0, "REQUEST_TIMEOUT": 300.0}
    assert {key: concurrency[key] for key in ("in_flight", "active", "queued", "succeeded",
                                              "failed", "rejected", "timed_out",
                                              "queue_timed_out", "cancelled")} == {
        "in_flight": 0, "active": 0, "queued": 0, "succeeded": 4, "failed": 0, "rejected": 3,
        "timed_out": 0, "queue_timed_out": 0, "cancelled": 0}
    assert concurrency["workers"] == {"max": 2, "busy": 0, "started": 2, "alive": 2}
    assert concurrency["slots"] == {"busy": 0, "total": 8}
    [engine] = concurrency["engines"]
    assert engine["model"] == MODEL_NAME and engine["steps"] > 0 and engine["widest_step"] >= 1
    assert concurrency["queue_wait_ms"]["samples"] == 4

    cache = get(server, "/cache/status")
    pool = cache["caches"][0]
    assert pool["name"] == "pool"
    # one load (the second request waited for it), then every request found the engine
    assert (pool["hits"], pool["misses"], pool["evictions"]) == (3, 1, 0)
    assert pool["lru_order"] == [MODEL_NAME]
    [model] = pool["models"]
    assert (model["instances"], model["idle"], model["in_use"]) == (1, 1, 0)
    assert model["memory"]["source"] in ("measured_rss_at_load", "estimate")
    assert model["memory"]["bytes"] > 0

    samples = metric_samples(server)
    for status, count in (("200", 4), ("400", 2), ("429", 3)):
        assert metric(samples, "llm_http_requests_total", method="POST",
                      route="/api/v1/generate", status=status) == count
    for outcome, count in outcomes.items():
        assert metric(samples, "llm_model_requests_total", model=MODEL_NAME,
                      outcome=outcome) == (0 if outcome == "failed" else count)
    assert metric(samples, "llm_prompt_tokens_total", model=MODEL_NAME) == prompt
    assert metric(samples, "llm_completion_tokens_total", model=MODEL_NAME) == completion
    assert metric(samples, "llm_request_latency_seconds_count", model=MODEL_NAME) == 4
    assert metric(samples, "llm_request_latency_seconds_bucket", model=MODEL_NAME, le="+Inf") == 4
    assert metric(samples, "llm_time_to_first_token_seconds_count", model=MODEL_NAME) == 4
    assert metric(samples, "llm_rejected_requests_total") == 3
    assert metric(samples, "llm_timeouts_total", stage="queue") == 0
    assert metric(samples, "llm_timeouts_total", stage="generation") == 0
    assert metric(samples, "llm_queue_depth") == 0 and metric(samples, "llm_requests_active") == 0
    for state, count in (("idle", 1), ("in_use", 0), ("loading", 0)):
        assert metric(samples, "llm_pool_instances", model=MODEL_NAME, state=state) == count
    assert metric(samples, "llm_slots_total", model=MODEL_NAME, n_ctx="1024") == 8
    assert metric(samples, "llm_slots_busy", model=MODEL_NAME, n_ctx="1024") == 0
    assert metric(samples, "llm_decode_steps_total", model=MODEL_NAME, n_ctx="1024") == engine["steps"]
    assert metric(samples, "llm_model_cache_hits_total", cache="pool") == 3
    assert metric(samples, "llm_model_cache_misses_total", cache="pool") == 1
    assert metric(samples, "llm_model_load_duration_seconds_count", model=MODEL_NAME) == 1
    # Monitoring calls are not API traffic: all the polling above left the counts alone.
    assert get(server, "/stats")["requests"]["total"] == 9


def test_health_and_stats_answer_while_every_slot_is_busy_and_the_queue_is_full(live):
    server = live(N_PARALLEL=1, MAX_CONCURRENT_REQUESTS=2)
    finished = []

    def long_generation():
        reply = server.generate(**LONG, max_tokens=80)
        finished.append((time.monotonic(), reply))

    runners = [threading.Thread(target=long_generation) for _ in range(2)]
    for runner in runners:
        runner.start()
    assert wait_until(lambda: (server.backend.concurrency.snapshot().active,
                               server.backend.concurrency.snapshot().queued) == (1, 1))
    answers = {path: requests.get(f"{server.url}{path}", timeout=30)
               for path in ("/health", "/stats", "/stats/concurrency", "/cache/status",
                            "/metrics", "/api/v1/health")}
    refused = server.generate(prompt="Hello", max_tokens=4)
    answered_at = time.monotonic()
    still_running = server.backend.concurrency.snapshot().in_flight
    for runner in runners:
        runner.join()

    assert still_running == 2  # both generations were still running after every answer
    assert all(reply.status_code == 200 for reply in answers.values()), answers
    assert answers["/health"].json() == {"status": "ok"}
    concurrency = answers["/stats/concurrency"].json()
    assert (concurrency["in_flight"], concurrency["active"], concurrency["queued"]) == (2, 1, 1)
    assert concurrency["slots"] == {"busy": 1, "total": 1}
    assert answers["/stats"].json()["concurrency"]["in_flight"] == 2
    readiness = answers["/api/v1/health"].json()
    assert readiness["status"] == "degraded"
    assert "at MAX_CONCURRENT_REQUESTS: new requests get 429" in readiness["reasons"]
    assert refused.status_code == 429
    assert [reply.status_code for _, reply in finished] == [200, 200]
    assert all(t > answered_at for t, _ in finished)


def test_timeouts_and_disconnects_are_counted(live):
    server = live(REQUEST_TIMEOUT=1, N_CTX=2048)
    assert server.generate(**LONG, max_tokens=1500).status_code == 504
    stream = server.stream(**LONG, max_tokens=1000)
    next(line for line in stream.iter_lines() if line)
    stream.close()
    assert wait_until(lambda: get(server, "/stats")["requests"]["total"] == 2
                      and get(server, "/stats")["models"][MODEL_NAME]["cancelled"] == 1)
    stats = get(server, "/stats")
    assert (stats["requests"]["timed_out"], stats["requests"]["cancelled"]) == (1, 1)
    usage = stats["models"][MODEL_NAME]
    assert (usage["timed_out"], usage["cancelled"], usage["succeeded"]) == (1, 1, 0)
    assert metric(metric_samples(server), "llm_timeouts_total", stage="generation") == 1
    assert stats["latency_ms"]["samples"] == 0  # only completed generations have a latency


def test_cache_status_reports_lru_order_and_evictions(live):
    server = live()
    models_dir = server.backend.models.models_dir
    os.symlink(models_dir / MODEL_NAME, models_dir / "second-copy.gguf")
    for name in (MODEL_NAME, "second-copy.gguf", MODEL_NAME):
        assert server.generate(prompt="Hi", max_tokens=2, model=name).status_code == 200
    pool = get(server, "/cache/status")["caches"][0]
    assert pool["lru_order"] == ["second-copy.gguf", MODEL_NAME]
    assert (pool["hits"], pool["misses"], pool["evictions"]) == (1, 2, 0)
    server.backend.pool.evict("second-copy.gguf")
    cache = get(server, "/cache/status")
    assert cache["caches"][0]["evictions"] == 1
    assert [model["name"] for model in cache["loaded_models"]] == [MODEL_NAME]
