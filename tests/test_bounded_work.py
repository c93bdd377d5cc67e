"""Bounded work per request: DeepSeek plans over DEEPSEEK_MAX_STEPS are refused before any
step runs, and work a request started stops when the request ends (504 included)."""

from __future__ import annotations

import time

import pytest
import requests

from conftest import MODEL_NAME, wait_until
from DeepSeekLLM.services import count_chunks, split_tokens
from templated_models import templated_dir
from test_hostile_prompts import hostile_models  # noqa: F401  (session fixture)

TEXT = "The parcel for house 7 went to the blue door. " * 60      # ~700 tokens


def post(server, **body) -> requests.Response:
    return requests.post(f"{server.url}/api/deepseek/generate", json=body, timeout=120)


@pytest.mark.parametrize("stream", [False, True])
def test_a_plan_over_deepseek_max_steps_is_a_400_that_says_how_many(live, stream):
    server = live(DEEPSEEK_MAX_STEPS=8)
    reply = post(server, prompt="Which door?", context=TEXT, n_ctx=512, max_tokens=16,
                 chunk_size=40, chunk_overlap=39, stream=stream)
    assert reply.status_code == 400
    assert reply.headers["Content-Type"].startswith("application/json")
    error = reply.json()["error"]
    assert error["code"] == "invalid_request" and error["max_steps"] == 8
    assert error["steps"] > 600 and f"{error['steps']} map steps" in error["message"]
    assert "DEEPSEEK_MAX_STEPS (8)" in error["message"]
    snapshot = server.backend.concurrency.snapshot()
    # no step ran; the request itself is counted once, as failed
    assert (snapshot.outcomes["succeeded"], snapshot.outcomes["failed"], snapshot.in_flight) == (0, 1, 0)
    assert server.backend.pool.engines() == []


def test_a_plan_within_deepseek_max_steps_runs(live):
    server = live(DEEPSEEK_MAX_STEPS=8)
    reply = post(server, prompt="Which door?", context=TEXT, n_ctx=512, max_tokens=16,
                 chunk_size=200, chunk_overlap=10, temperature=0)
    assert reply.status_code == 200, reply.text
    chunks = reply.json()["chunking"]["chunks"]
    assert 2 <= chunks <= 8
    # map steps, collapse steps (fewer than the notes they merge) and one reduce step ran as
    # generations of one request, counted once
    assert server.backend.stats.by_model()[MODEL_NAME]["generations"] <= 2 * chunks
    assert server.backend.concurrency.snapshot().outcomes["succeeded"] == 1


@pytest.mark.parametrize("n_ids,size,overlap", [(0, 16, 0), (16, 16, 15), (17, 16, 15),
                                                (1000, 40, 39), (4097, 4096, 256),
                                                (12345, 100, 7)])
def test_the_step_count_is_counted_without_splitting(n_ids, size, overlap):
    assert count_chunks(n_ids, size, overlap) == len(split_tokens(range(n_ids), size, overlap))


def test_a_504_while_a_template_renders_frees_the_worker(live, hostile_models, tmp_path):
    """REQUEST_TIMEOUT ends the request before CHAT_TEMPLATE_TIMEOUT would: the render stops
    at its next step (the job is cancelled), not at the template bound a minute later."""
    server = live(MODELS_DIR=templated_dir(*hostile_models, tmp_path / "m"),
                  REQUEST_TIMEOUT=1, CHAT_TEMPLATE_TIMEOUT=60)
    started = time.monotonic()
    reply = requests.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "hostile", "max_tokens": 2,
        "messages": [{"role": "user", "content": "nested-loops"}]})
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "generation_timeout"
    assert wait_until(lambda: server.backend.concurrency.snapshot().workers_busy == 0,
                      seconds=5)
    assert time.monotonic() - started < 30
    assert server.backend.concurrency.snapshot().outcomes["timed_out"] == 1   # as its 504 said
    ok = requests.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "hostile", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    assert ok.status_code == 200
