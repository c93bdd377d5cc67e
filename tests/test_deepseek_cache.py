"""The DeepSeek model cache: LRU eviction that frees pooled instances, and hit/miss counts."""

from __future__ import annotations

import os

import pytest
import requests

A, B = "deepseek-a.gguf", "deepseek-b.gguf"


@pytest.fixture
def two_models(tmp_path, model_file):
    """A DeepSeek models directory holding the real model under two names."""
    directory = tmp_path / "deepseek-two"
    directory.mkdir()
    for name in (A, B):
        os.symlink(model_file, directory / name)
    return str(directory)


def ask(server, model: str) -> dict:
    reply = requests.post(f"{server.url}/api/deepseek/generate", timeout=120,
                          json={"prompt": "Hello", "model": model, "max_tokens": 2, "n_ctx": 512})
    assert reply.status_code == 200
    return reply.json()


def pooled(server) -> dict[str, int]:
    """Instances in the shared pool per DeepSeek model (those with their own n_ctx)."""
    return {m.name: m.instances for m in server.backend.pool.loaded_models()
            if m.n_ctx is not None and m.instances}


def listed(server) -> dict[str, bool]:
    models = requests.get(f"{server.url}/api/deepseek/models", timeout=10).json()["models"]
    return {m["name"]: m["loaded"] for m in models}


def test_loading_a_second_model_evicts_the_first_and_frees_its_instances(live, two_models):
    server = live(DEEPSEEK_MODELS_DIR=two_models, DEEPSEEK_CACHE_SIZE=1)
    cache = server.backend.deepseek.cache
    ask(server, A)
    assert pooled(server) == {A: 1} and listed(server) == {A: True, B: False}
    ask(server, B)
    status = cache.cache_status()
    assert (status["hits"], status["misses"], status["evictions"]) == (0, 2, 1)
    assert status["lru_order"] == [B] and pooled(server) == {B: 1}
    assert listed(server) == {A: False, B: True}
    ask(server, B)
    assert cache.cache_status()["hits"] == 1 and pooled(server) == {B: 1}
    ask(server, A)
    status = cache.cache_status()
    assert (status["hits"], status["misses"], status["evictions"]) == (1, 3, 2)
    assert status["lru_order"] == [A] and pooled(server) == {A: 1}
    [model] = status["models"]
    assert model["name"] == A and model["contexts"] == [512] and model["instances"] == 1
    assert model["memory"]["bytes"] > 0 and model["memory"]["source"] == "estimate"


def test_a_model_in_use_is_not_evicted_until_its_request_lets_go(live, two_models):
    server = live(DEEPSEEK_MODELS_DIR=two_models, DEEPSEEK_CACHE_SIZE=1)
    service = server.backend.deepseek
    with service.cache.use(service.resolve(A)):
        # B is loaded one over capacity while A is busy, and is the idle one once it is done.
        ask(server, B)
        status = service.cache.cache_status()
        assert status["lru_order"] == [A] and status["evictions"] == 1
        assert status["models"][0]["requests"] == 1
    assert service.cache.cache_status()["lru_order"] == [A]
    ask(server, B)
    assert service.cache.cache_status()["lru_order"] == [B]           # A idle now: evicted


def test_the_cache_reports_itself_beside_the_gguf_pool(live):
    server = live()
    assert "deepseek" in [cache.name for cache in server.backend.caches]


def test_evicting_a_removed_model_closes_its_instances(live, two_models):
    server = live(DEEPSEEK_MODELS_DIR=two_models)
    ask(server, A)
    assert pooled(server) == {A: 1}
    assert server.backend.deepseek.evict(A) is True
    assert pooled(server) == {} and server.backend.deepseek.evict(A) is False
