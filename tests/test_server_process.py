"""`python main.py` and the README's gunicorn command as a user runs them: serving, and a
graceful SIGTERM. (Slow clients: test_slow_clients.py; drains with stalled uploads and second
signals: test_lifecycle.py.)"""

from __future__ import annotations

import signal
import threading

import pytest
import requests

from conftest import LONG, wait_until
from server_process import ServerProcess


@pytest.mark.parametrize("kind", ["main", "gunicorn"])
def test_sigterm_lets_the_running_generation_finish_and_exits_0(kind, tmp_path, model_file,
                                                                 model_registry):
    server = ServerProcess(kind, tmp_path, model_file, model_registry, SHUTDOWN_TIMEOUT=60)
    try:
        running = []
        client = threading.Thread(target=lambda: running.append(requests.post(
            f"{server.url}/api/v1/generate", timeout=120, json={**LONG, "max_tokens": 150})))
        client.start()
        assert wait_until(lambda: requests.get(f"{server.url}/stats/concurrency",
                                             timeout=5).json()["active"] == 1, 30)
        server.signal(signal.SIGTERM)
        refused = None
        for _ in range(100):
            refused = requests.post(f"{server.url}/api/v1/generate", timeout=10,
                                    json={"prompt": "hi", "max_tokens": 2})
            if refused.status_code == 503:
                break
        client.join(timeout=120)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        assert running[0].status_code == 200
        assert running[0].json()["usage"]["completion_tokens"] == 150
        status = server.wait(60)
    finally:
        output = server.stop()
    assert status == 0, output[-3000:]
    assert "drained (all requests finished)" in output, output[-3000:]
