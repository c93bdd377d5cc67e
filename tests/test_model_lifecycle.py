"""Model lifecycle on a live server with the real model: PRELOAD_MODELS and readiness, the idle
timeout (MODEL_IDLE_SECONDS), the admin load / unload routes, and the model events stream."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest
import requests

from conftest import LONG, MODEL_NAME, multipart_upload, wait_until
from server_process import ServerProcess
from services.errors import TooBusy
from services.model_events import ModelEvents
from services.model_loading import InstanceSettings, llamacpp_loader

COPY = "lifecycle-copy"


def loaded(server) -> list[str]:
    """Pool entries (engines and embedding instances) that hold or are loading a model."""
    return [m.name for m in server.backend.pool.loaded_models() if m.instances or m.loading]


def pool_counts(server) -> dict:
    cache = requests.get(f"{server.url}/cache/status", timeout=10).json()["caches"][0]
    return {"hits": cache["hits"], "misses": cache["misses"]}


class EventReader:
    """A client following GET /api/v1/models/events on a thread: its events, in order."""

    def __init__(self, server, headers: dict | None = None):
        self.response = requests.get(f"{server.url}/api/v1/models/events", stream=True,
                                     timeout=60, headers=headers or {})
        self.events: list[dict] = []
        self.frames: list[dict] = []
        # Closing the response alone waits for the reading thread's next line (up to a
        # heartbeat): shutting the socket down ends the read at once, as a client that leaves.
        self._socket = self.response.raw._fp.fp.raw._sock
        if self.response.status_code == 200:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        frame: dict = {}
        try:
            for line in self.response.iter_lines(decode_unicode=True):
                if line:
                    field, _, value = line.partition(": ")
                    frame[field] = value
                    continue
                if "data" in frame:
                    self.frames.append(frame)
                    self.events.append(json.loads(frame["data"]))
                frame = {}
        except (requests.RequestException, OSError, AttributeError, ValueError):
            pass

    def kinds(self, model: str) -> list[str]:
        return [event["kind"] for event in self.events if event["model"] == model]

    def close(self) -> None:
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.response.close()


def gated_loader(gate: threading.Event):
    """The real loader, holding every load until `gate` is set (a slow disk, say)."""
    real = llamacpp_loader(InstanceSettings(n_ctx=1024, n_batch=512, n_threads=2,
                                            n_gpu_layers=0))

    def load(path: str):
        gate.wait(60)
        return real(path)

    return load


def test_preloaded_model_is_loaded_before_the_first_request(live):
    gate = threading.Event()
    server = live(loader=gated_loader(gate), PRELOAD_MODELS=f"{MODEL_NAME},no-such-model")
    readiness = requests.get(f"{server.url}/api/v1/health", timeout=10)
    assert readiness.status_code == 503 and readiness.json()["status"] == "starting"
    assert any(MODEL_NAME in reason for reason in readiness.json()["reasons"])
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200   # alive
    gate.set()
    assert wait_until(lambda: requests.get(f"{server.url}/api/v1/health",
                                           timeout=10).status_code == 200, 60)
    health = requests.get(f"{server.url}/api/v1/health", timeout=10).json()
    assert health["status"] != "starting" and health["loaded_models"] == [MODEL_NAME]
    assert health["preload"] == {"pending": [], "loaded": [MODEL_NAME],
                                 "failed": {"no-such-model": health["preload"]["failed"][
                                     "no-such-model"]}}
    assert any("no-such-model" in reason for reason in health["reasons"])
    ps = requests.get(f"{server.url}/api/ps", timeout=10).json()["models"]
    assert [model["model"] for model in ps] == ["gemma-3-270m-q4_k_m:latest"]
    assert pool_counts(server) == {"hits": 0, "misses": 1}
    reply = requests.post(f"{server.url}/api/generate", timeout=60, json={
        "model": MODEL_NAME, "prompt": "Hi", "stream": False, "options": {"num_predict": 4}})
    assert reply.status_code == 200 and reply.json()["done"]
    assert pool_counts(server) == {"hits": 1, "misses": 1}     # the first request loaded nothing
    failed = [e for e in server.backend.model_events.recent() if e.kind == "failed"]
    assert [e.model for e in failed] == ["no-such-model"]


def test_idle_model_is_unloaded_and_the_next_request_reloads(live):
    server = live(MODEL_IDLE_SECONDS=1)
    events = EventReader(server)
    try:
        assert server.generate(prompt="Hi", max_tokens=4).status_code == 200
        assert loaded(server) == [MODEL_NAME]
        assert wait_until(lambda: loaded(server) == [], 15)
        assert server.generate(prompt="Hello", max_tokens=4).status_code == 200
        assert loaded(server) == [MODEL_NAME] and pool_counts(server)["misses"] == 2
        assert wait_until(lambda: events.kinds(MODEL_NAME)[:5] == [
            "loading", "loaded", "unloaded", "loading", "loaded"], 10), events.events
        assert [e for e in events.events if e["kind"] == "unloaded"][0]["reason"] == "idle"
    finally:
        events.close()


def test_a_model_in_use_is_not_unloaded_until_it_has_been_idle(live):
    idle = 2
    server = live(MODEL_IDLE_SECONDS=idle)
    started = time.monotonic()
    with requests.post(f"{server.url}/api/v1/generate", stream=True, timeout=120,
                       json={**LONG, "max_tokens": 300, "stream": True}) as reply:
        assert reply.status_code == 200
        unloaded_while_busy = []
        for line in reply.iter_lines(decode_unicode=True):
            if line and MODEL_NAME not in loaded(server):
                unloaded_while_busy.append(line)
        took = time.monotonic() - started
    assert took > idle + 0.5, f"the generation took {took:.1f} s: too short to show anything"
    assert unloaded_while_busy == []
    assert loaded(server) == [MODEL_NAME]       # the idle clock starts when the use ends
    assert server.backend.pool.expires_at(MODEL_NAME) > time.time() + 0.5
    assert wait_until(lambda: loaded(server) == [], 15)


def test_keep_alive_overrides_the_idle_timeout_until_the_next_use(live):
    server = live(MODEL_IDLE_SECONDS=1)
    body = {"model": MODEL_NAME, "prompt": "Hi", "stream": False, "options": {"num_predict": 2}}
    assert requests.post(f"{server.url}/api/generate", json={**body, "keep_alive": -1},
                         timeout=60).status_code == 200
    time.sleep(2.5)
    assert loaded(server) == [MODEL_NAME]       # keep_alive -1: until evicted
    assert server.generate(prompt="Hi", max_tokens=2).status_code == 200   # idle again
    assert wait_until(lambda: loaded(server) == [], 15)


def test_events_stream_shows_an_upload_a_load_and_an_unload_in_order(live, model_file):
    server = live()
    events = EventReader(server)
    try:
        assert events.response.status_code == 200
        assert events.response.headers["Content-Type"].startswith("text/event-stream")
        upload = multipart_upload(f"{server.url}/api/v1/models", model_file,
                                  fields={"name": COPY})
        assert upload.status_code == 201, upload.text
        name = upload.json()["name"]
        load = requests.post(f"{server.url}/api/v1/models/{name}/load", timeout=60)
        assert load.status_code == 200 and load.json()["loaded"] is True
        assert load.json()["name"] == name and load.json()["instances"] == 1
        again = requests.post(f"{server.url}/api/v1/models/{name}/load", timeout=60)
        assert again.status_code == 200 and again.json()["load_seconds"] < 1
        unload = requests.post(f"{server.url}/api/v1/models/{name}/unload", timeout=60)
        assert unload.status_code == 200
        assert unload.json()["loaded"] is False and unload.json()["instances_closed"] == 1
        assert wait_until(lambda: events.kinds(name) == ["uploaded", "loading", "loaded",
                                                          "unloaded"], 10), events.events
    finally:
        events.close()
    mine = [e for e in events.events if e["model"] == name]
    assert mine[0]["source"] == "upload" and mine[-1]["reason"] == "admin"
    ids = [e["id"] for e in events.events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [f["event"] for f in events.frames] == [e["kind"] for e in events.events]
    assert [int(f["id"]) for f in events.frames] == ids
    # A client reconnecting with the last id it saw gets what it missed, from the backlog.
    resumed = EventReader(server, headers={"Last-Event-ID": str(mine[0]["id"])})
    try:
        assert wait_until(lambda: resumed.kinds(name) == ["loading", "loaded", "unloaded"], 10)
    finally:
        resumed.close()


def test_load_and_unload_of_an_unknown_model_are_404(live):
    server = live()
    for action in ("load", "unload"):
        reply = requests.post(f"{server.url}/api/v1/models/no-such-model/{action}", timeout=10)
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"
    unload = requests.post(f"{server.url}/api/v1/models/{MODEL_NAME}/unload", timeout=10)
    assert unload.status_code == 200 and unload.json()["instances_closed"] == 0
    assert server.backend.model_events.recent() == []      # nothing was loaded: no event


def test_an_inference_key_may_follow_events_but_not_load_or_unload(live):
    server = live(API_KEYS="inference-secret", ADMIN_KEYS="admin-secret")
    user = {"Authorization": "Bearer inference-secret"}
    admin = {"Authorization": "Bearer admin-secret"}
    for action in ("load", "unload"):
        url = f"{server.url}/api/v1/models/{MODEL_NAME}/{action}"
        assert requests.post(url, timeout=10).status_code == 401
        refused = requests.post(url, headers=user, timeout=10)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    assert loaded(server) == []
    assert requests.get(f"{server.url}/api/v1/models/events", timeout=10).status_code == 401
    events = EventReader(server, headers=user)
    try:
        assert events.response.status_code == 200
        load = requests.post(f"{server.url}/api/v1/models/{MODEL_NAME}/load", headers=admin,
                             timeout=60)
        assert load.status_code == 200 and load.json()["loaded"] is True
        assert wait_until(lambda: events.kinds(MODEL_NAME) == ["loading", "loaded"], 10)
    finally:
        events.close()


def test_subscribers_are_capped_and_a_client_that_leaves_frees_its_place(live):
    server = live()
    hub = server.backend.model_events
    hub.max_subscribers = 2
    first, second = EventReader(server), EventReader(server)
    try:
        assert first.response.status_code == second.response.status_code == 200
        assert wait_until(lambda: hub.subscribers() == 2, 5)
        refused = requests.get(f"{server.url}/api/v1/models/events", timeout=10)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_requests"
        assert "Retry-After" in refused.headers
        first.close()
        assert wait_until(lambda: hub.subscribers() == 1, 10)
        third = EventReader(server)
        assert third.response.status_code == 200
        third.close()
    finally:
        second.close()
    assert wait_until(lambda: hub.subscribers() == 0, 10)


def test_a_reader_that_falls_behind_is_dropped_and_reconnects_from_the_backlog():
    hub = ModelEvents(backlog=5, max_subscribers=2, queue_size=3)
    slow = hub.subscribe()
    for number in range(4):
        hub.publish("loaded", f"model-{number}")
    assert slow.next(0.1) is None and slow.dropped        # the stream ends
    assert hub.subscribers() == 0
    resumed = hub.subscribe(last_id=2)
    assert [resumed.next(0.1).model for _ in range(2)] == ["model-2", "model-3"]
    assert resumed.next(0.05) is False                    # nothing more yet
    restarted = hub.subscribe(last_id=999)                # ids from an earlier process
    assert [restarted.next(0.1).id for _ in range(4)] == [1, 2, 3, 4]
    with pytest.raises(TooBusy):
        hub.subscribe()
    hub.close()
    assert resumed.next(1) is None


def test_sigterm_ends_an_open_events_stream_and_the_drain_does_not_wait_for_it(
        tmp_path, model_file, model_registry):
    server = ServerProcess("main", tmp_path, model_file, model_registry, SHUTDOWN_TIMEOUT=30)
    try:
        stream = requests.get(f"{server.url}/api/v1/models/events", stream=True, timeout=60)
        assert stream.status_code == 200
        server.signal(signal.SIGTERM)
        assert list(stream.iter_lines()) is not None        # the stream ends (no timeout)
        status = server.wait(25)
    finally:
        output = server.stop()
    assert status == 0, output[-3000:]
    assert "all requests finished" in output, output[-3000:]
