"""api.log rotation at LOG_MAX_BYTES, and prompts / outputs logged only with LOG_PROMPTS."""

from __future__ import annotations

import json
import time
from pathlib import Path

import requests

from conftest import sse_events


def test_logs_rotate_at_the_configured_size(live):
    server = live(LOG_MAX_BYTES=1024, LOG_BACKUP_COUNT=2)
    log_dir = Path(server.backend.config.LOG_DIR)
    ids = [f"rotation-{i:03d}" for i in range(40)]
    for request_id in ids:
        requests.get(f"{server.url}/health", headers={"X-Request-ID": request_id}, timeout=10)
    deadline = time.monotonic() + 10
    while ids[-1] not in (log_dir / "api.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    files = sorted(path.name for path in log_dir.glob("api.log*"))
    assert files == ["api.log", "api.log.1", "api.log.2"]  # LOG_BACKUP_COUNT=2 kept, no more
    lines = []
    for name in ("api.log.2", "api.log.1", "api.log"):
        path = log_dir / name
        assert 0 < path.stat().st_size <= 1024
        lines += [json.loads(line) for line in path.read_text().splitlines()]
    logged = [line["request_id"] for line in lines]
    # Lines are written as replies close, so neighbours may swap; none is duplicated or torn.
    assert len(set(logged)) == len(logged) and set(logged) <= set(ids) and ids[-1] in logged


def test_prompts_and_outputs_are_logged_only_with_log_prompts(live):
    quiet, chatty = live(), live(LOG_PROMPTS="true")
    for server in (quiet, chatty):
        whole = server.generate(prompt="Tell me about zebras", max_tokens=4, temperature=0)
        streamed = server.stream(prompt="Tell me about giraffes", max_tokens=4, temperature=0)
        events = sse_events(streamed)
        lines = {name: server.logged_request(reply.headers["X-Request-ID"])
                 for name, reply in (("whole", whole), ("streamed", streamed))}
        if server is quiet:
            text = (Path(server.backend.config.LOG_DIR) / "api.log").read_text()
            assert "zebras" not in text and "giraffes" not in text
            assert all("prompt" not in line and "text" not in line for line in lines.values())
        else:
            assert lines["whole"]["prompt"] == "Tell me about zebras"
            assert lines["whole"]["text"] == whole.json()["text"]
            assert lines["streamed"]["prompt"] == "Tell me about giraffes"
            assert lines["streamed"]["text"] == "".join(e.get("token", "") for e in events)


def test_error_replies_name_their_code_in_the_access_log(live):
    server = live()
    reply = requests.post(f"{server.url}/api/v1/generate", json={"prompt": ""}, timeout=10)
    assert reply.status_code == 400
    line = server.logged_request(reply.headers["X-Request-ID"])
    assert (line["status"], line["error"], line["route"]) == (400, "invalid_request",
                                                              "/api/v1/generate")
