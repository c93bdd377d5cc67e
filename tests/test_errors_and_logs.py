"""Failures the client cannot cause: JSON 500s, tracebacks in errors.log, and the access log."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests


def broken_loader(path: str):
    raise RuntimeError("llama.cpp refused the file")


class NotALlama:
    """An instance without the llama.cpp client the service expects: a server-side bug."""


@pytest.mark.parametrize("loader,status,code", [
    (broken_loader, 500, "model_load_failed"),
    (lambda path: NotALlama(), 500, "internal_error"),
])
def test_server_failures_are_json_and_logged_with_a_traceback(live, loader, status, code):
    server = live(loader=loader)
    reply = server.generate(prompt="hello", max_tokens=4)
    assert reply.status_code == status
    assert reply.json()["error"]["code"] == code
    assert "Traceback" not in reply.text
    request_id = reply.headers["X-Request-ID"]
    errors = [line for line in server.log_lines("errors.log") if line.get("request_id") == request_id]
    assert errors and "Traceback" in errors[0]["traceback"]
    assert server.backend.pool.loaded_models() == [] or all(
        m.in_use == 0 for m in server.backend.pool.loaded_models())


def test_access_log_has_one_json_line_per_request(live):
    server = live()
    reply = requests.post(f"{server.url}/api/v1/generate",
                          json={"prompt": "Tell me about zebras", "max_tokens": 5},
                          headers={"X-Request-ID": "my-trace-42"}, timeout=60)
    assert reply.headers["X-Request-ID"] == "my-trace-42"
    line = server.logged_request("my-trace-42")
    assert line["method"] == "POST" and line["path"] == "/api/v1/generate" and line["status"] == 200
    assert line["model"] == "gemma-3-270m-q4_k_m.gguf"
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] == 5
    assert line["latency_ms"] > 0 and "time" in line
    assert "zebras" not in Path(server.backend.config.LOG_DIR, "api.log").read_text()


def test_a_hostile_request_id_is_replaced(client):
    reply = client.get("/health", headers={"X-Request-ID": "bad id\twith spaces" + "x" * 300})
    assert reply.headers["X-Request-ID"] != "bad id\twith spaces" + "x" * 300
    assert len(reply.headers["X-Request-ID"]) == 32
