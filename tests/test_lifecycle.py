"""SIGTERM under both servers, with a generation running and an upload stalled mid-file:
the drain answers 503 (new connections included), lets the generation finish, and the process
exits within its budget with no partial upload left behind."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
import requests

from conftest import LONG, wait_until
from server_process import ServerProcess, multipart_head, read_reply

SHUTDOWN = 10


def start_generation(server: ServerProcess) -> list:
    """A generation of 60 tokens, running when this returns; its response lands in the list."""
    result = []
    thread = threading.Thread(daemon=True, target=lambda: result.append(requests.post(
        f"{server.url}/api/v1/generate", json={**LONG, "max_tokens": 60}, timeout=120)))
    thread.start()
    assert wait_until(lambda: requests.get(f"{server.url}/stats/concurrency",
                                         timeout=5).json()["active"] == 1, 30)
    return result


def stall_an_upload(server: ServerProcess) -> socket.socket:
    """An upload that sent its head and a little of a 10 MB file, then stopped sending."""
    head, _tail = multipart_head(server.url, 10_000_000)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(head + b"GGUF" + b"\0" * 65_536)
    assert wait_until(server.partial_uploads, 30), "the upload's temp file never appeared"
    return sock


def assert_draining(server: ServerProcess) -> None:
    """New connections are answered, with 503 shutting_down, not refused."""
    assert wait_until(lambda: requests.get(f"{server.url}/health", timeout=5).status_code == 503)
    assert requests.get(f"{server.url}/health", timeout=5).json()["status"] == "shutting_down"
    readiness = requests.get(f"{server.url}/api/v1/health", timeout=5)
    assert readiness.status_code == 503 and "shutting down" in readiness.json()["reasons"]
    refused = requests.post(f"{server.url}/api/v1/generate", timeout=10,
                            json={"prompt": "hi", "max_tokens": 2})
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"


@pytest.mark.parametrize("kind", ["main", "gunicorn"])
def test_sigterm_drains_then_aborts_a_stalled_upload_and_leaves_no_temp_file(
        kind, tmp_path, model_file, model_registry):
    server = ServerProcess(kind, tmp_path, model_file, model_registry,
                           SHUTDOWN_TIMEOUT=SHUTDOWN, CLIENT_BODY_TIMEOUT=300)
    try:
        upload = stall_an_upload(server)
        generation = start_generation(server)
        server.signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert_draining(server)
        assert wait_until(lambda: generation, 60)
        assert generation[0].status_code == 200
        assert generation[0].json()["usage"]["completion_tokens"] == 60
        assert server.partial_uploads()  # the upload is still being waited for
        status = server.wait(SHUTDOWN + 10)
        exited_after = time.monotonic() - signalled
        reply, closed = read_reply(upload, 5)
        upload.close()
    finally:
        output = server.stop()
    assert status == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert exited_after >= SHUTDOWN / 2  # it waited for the upload, then gave up on it
    assert closed and b" 200 " not in reply[:20]
    assert server.partial_uploads() == []
    assert "timed out" in output, output[-3000:]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_exits_main_at_once(signum, tmp_path, model_file, model_registry):
    server = ServerProcess("main", tmp_path, model_file, model_registry, SHUTDOWN_TIMEOUT=120,
                           CLIENT_BODY_TIMEOUT=300)
    try:
        upload = stall_an_upload(server)  # would hold the drain for its whole 120 s
        server.signal(signum)
        assert wait_until(lambda: requests.get(f"{server.url}/health",
                                               timeout=5).status_code == 503)
        server.signal(signum)
        status = server.wait(10)
        upload.close()
    finally:
        output = server.stop()
    assert status == 128 + signum
    assert "again: exiting at once" in output, output[-3000:]
