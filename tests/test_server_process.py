"""`python main.py` as a user runs it: serving, and a graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import requests

from conftest import MODEL_NAME, ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(tmp_path, model_file, **settings):
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    os.symlink(model_file, models_dir / MODEL_NAME)
    port = free_port()
    env = {**os.environ, "PORT": str(port), "MODELS_DIR": str(models_dir),
           "LOG_DIR": str(tmp_path / "logs"), "N_CTX": "1024", **settings}
    process = subprocess.Popen([sys.executable, "main.py"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError(process.communicate()[0])


def test_sigterm_lets_the_running_generation_finish_and_exits_0(tmp_path, model_file):
    process, url = start_server(tmp_path, model_file, SHUTDOWN_TIMEOUT="60")
    try:
        running = []
        client = threading.Thread(target=lambda: running.append(requests.post(
            f"{url}/api/v1/generate", timeout=120,
            json={"prompt": "Count from one to one thousand: 1, 2, 3,", "max_tokens": 150,
                  "temperature": 0})))
        client.start()
        for _ in range(200):
            if requests.get(f"{url}/stats/concurrency", timeout=5).json()["active"] == 1:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        refused = None
        for _ in range(100):
            refused = requests.post(f"{url}/api/v1/generate", json={"prompt": "hi", "max_tokens": 2},
                                    timeout=10)
            if refused.status_code == 503:
                break
            time.sleep(0.02)
        client.join(timeout=120)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        assert running[0].status_code == 200
        assert running[0].json()["usage"]["completion_tokens"] == 150
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "received SIGTERM" in output, output[-3000:]
