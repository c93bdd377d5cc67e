"""Ollama additions through the official `ollama` package on a live server: pull, the legacy
embeddings endpoint, copy, keep_alive, tools on chat, and Ollama-shaped errors everywhere under
/api (unknown routes included)."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from datetime import datetime, timezone

import ollama
import pytest
import requests

from conftest import MODEL_NAME, wait_until
from models.registry_file import LOCK_FILES, REGISTRY_FILE
from models.uploads import HashingFile, disk_full
from services.errors import InsufficientStorage

OLLAMA_NAME = "gemma-3-270m-q4_k_m:latest"
HELLO = [{"role": "user", "content": "Say hello."}]
FEW = {"num_predict": 4, "temperature": 0, "seed": 3}


@pytest.fixture(scope="module")
def shared(module_server):
    """One live server for the tests that leave it as they found it."""
    return module_server


def client_for(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=60)


def loaded(server) -> list[str]:
    """Pool entries (engines and embedding instances) that hold a loaded model."""
    return [m.name for m in server.backend.pool.loaded_models() if m.instances or m.loading]


def files_in(directory) -> list[str]:
    """A models directory's files, sorted, but for the lock files the processes sharing it keep."""
    return sorted(p.name for p in directory.iterdir() if p.name not in LOCK_FILES)


def ps_names(client) -> list[str]:
    return [m.model for m in client.ps().models]


# -- pull ---------------------------------------------------------------------------------------

def test_pull_of_a_model_here_reports_success(shared):
    client = client_for(shared)
    assert client.pull(OLLAMA_NAME).status == "success"
    lines = list(client.pull(OLLAMA_NAME, stream=True))
    assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
    layer = next(line for line in lines if line.digest)
    sha = shared.backend.models.resolve(MODEL_NAME).sha256
    assert layer.digest == f"sha256:{sha}" and layer.completed == layer.total > 0
    assert client.pull(MODEL_NAME).status == "success"              # the file name works too


def test_pull_of_a_model_not_here_says_how_to_add_one(shared):
    with pytest.raises(ollama.ResponseError) as caught:
        client_for(shared).pull("llama3.2:latest")
    error = caught.value
    assert error.status_code == 404 and isinstance(error.error, str)
    assert "does not download" in error.error and "POST /api/v1/models" in error.error
    assert "MODELS_DIR" in error.error and "models import" in error.error
    with pytest.raises(ollama.ResponseError) as caught:
        list(client_for(shared).pull("llama3.2", stream=True))
    assert caught.value.status_code == 404 and "POST /api/v1/models" in caught.value.error


# -- legacy embeddings --------------------------------------------------------------------------

def test_legacy_embeddings_gives_the_vector_embed_gives(shared):
    client = client_for(shared)
    old = client.embeddings(model=OLLAMA_NAME, prompt="The cat sat on the mat.")
    new = client.embed(model=OLLAMA_NAME, input="The cat sat on the mat.")
    assert len(old.embedding) == 640
    assert old.embedding == pytest.approx(new.embeddings[0], abs=1e-5)
    assert client.embeddings(model=OLLAMA_NAME, prompt="").embedding == []
    with pytest.raises(ollama.ResponseError) as caught:
        client.embeddings(model="no-such-model", prompt="hi")
    assert caught.value.status_code == 404 and isinstance(caught.value.error, str)


# -- copy ---------------------------------------------------------------------------------------

def _no_trial(server):
    """Make any trial in this server fail the test: a copy must not need one."""

    def refuse(path):
        raise AssertionError(f"a trial ran for {path}")

    server.backend.models._probe = refuse


def test_copy_is_served_at_once_without_a_new_trial(live):
    server = live()
    _no_trial(server)
    client = client_for(server)
    client.copy(OLLAMA_NAME, "my-gemma")
    models_dir = server.backend.models.models_dir
    original, copied = (models_dir / MODEL_NAME).stat(), (models_dir / "my-gemma.gguf").stat()
    assert copied.st_ino == original.st_ino                  # a hard link: no bytes copied
    assert sorted(m.model for m in client.list().models) == ["gemma-3-270m-q4_k_m:latest",
                                                              "my-gemma:latest"]
    entry = next(e for e in json.loads((models_dir / REGISTRY_FILE).read_text())["models"]
                 if e["name"] == "my-gemma.gguf")
    assert entry["status"] == "ready" and entry["source"] == "copy"
    assert entry["sha256"] == server.backend.models.resolve(MODEL_NAME).sha256
    reply = client.chat(model="my-gemma", messages=HELLO, options=FEW)
    assert reply.model == "my-gemma:latest" and reply.message.content.strip()
    shown = client.show("my-gemma:latest")
    assert shown.modelinfo["general.architecture"] == "gemma3" and "tools" in shown.capabilities


def test_copy_onto_an_existing_model_is_refused_and_changes_nothing(live):
    server = live()
    client = client_for(server)
    client.copy(OLLAMA_NAME, "second")
    before = (server.backend.models.models_dir / REGISTRY_FILE).read_text()
    for destination in ("second", "second:latest", "second.gguf", OLLAMA_NAME):
        with pytest.raises(ollama.ResponseError) as caught:
            client.copy(OLLAMA_NAME, destination)
        assert caught.value.status_code == 409 and "exists" in caught.value.error
    assert (server.backend.models.models_dir / REGISTRY_FILE).read_text() == before


def test_copy_of_an_unknown_model_or_to_a_bad_name_is_refused(live):
    server = live()
    client = client_for(server)
    with pytest.raises(ollama.ResponseError) as caught:
        client.copy("no-such-model", "other")
    assert caught.value.status_code == 404 and isinstance(caught.value.error, str)
    for bad in ("../escape", "a/b", "tag:v2", ".hidden", "x" * 200, "y" * 100_000):
        with pytest.raises(ollama.ResponseError) as caught:
            client.copy(OLLAMA_NAME, bad)
        assert caught.value.status_code == 400 and "invalid model name" in caught.value.error
    reply = requests.post(f"{server.url}/api/copy", json={"source": OLLAMA_NAME}, timeout=10)
    assert reply.status_code == 400 and "destination" in reply.json()["error"]
    assert [m.model for m in client.list().models] == [OLLAMA_NAME]
    assert files_in(server.backend.models.models_dir) == [
        MODEL_NAME, REGISTRY_FILE]


def test_copy_without_hard_links_copies_the_bytes_and_keeps_the_trial(live, monkeypatch):
    server = live()
    _no_trial(server)
    source = server.backend.models.resolve(MODEL_NAME)
    real_link = os.link

    def link(src, dst, **kwargs):
        if str(src) == source.path:              # the source lives on another filesystem
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", link)
    client = client_for(server)
    client.copy(OLLAMA_NAME, "bytes-copy")
    models_dir = server.backend.models.models_dir
    copied = models_dir / "bytes-copy.gguf"
    assert copied.stat().st_ino != (models_dir / MODEL_NAME).stat().st_ino
    assert copied.stat().st_size == source.size_bytes
    assert client.show("bytes-copy").details.family == "gemma3"
    assert files_in(models_dir) == [
        "bytes-copy.gguf", MODEL_NAME, REGISTRY_FILE]           # no temp file left
    listed = {m["name"]: m for m in server.backend.model_admin.list("gguf")}
    assert listed["bytes-copy.gguf"]["sha256"] == source.sha256
    assert listed["bytes-copy.gguf"]["status"] == "ready"


@pytest.mark.parametrize("hard_link", [True, False])
def test_a_copy_that_fails_leaves_neither_file_nor_entry(live, monkeypatch, hard_link):
    server = live()
    manager = server.backend.models
    if hard_link:      # the file is linked, then models_list.json cannot be written
        def no_registry():
            raise InsufficientStorage("the disk is full: models_list.json could not be written")

        monkeypatch.setattr(manager, "_save_registry", no_registry)
    else:              # no hard links, and the disk fills while the bytes are copied
        monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(
            OSError(errno.EXDEV, "Invalid cross-device link")))

        def full(self, data):
            raise disk_full(OSError(errno.ENOSPC, "No space left on device"), "the copy")

        monkeypatch.setattr(HashingFile, "write", full)
    before = (manager.models_dir / REGISTRY_FILE).read_text()
    with pytest.raises(ollama.ResponseError) as caught:
        client_for(server).copy(OLLAMA_NAME, "doomed")
    assert caught.value.status_code == 507 and "disk is full" in caught.value.error
    assert files_in(manager.models_dir) == [MODEL_NAME, REGISTRY_FILE]
    assert (manager.models_dir / REGISTRY_FILE).read_text() == before
    monkeypatch.undo()
    assert [m.name for m in manager.list()] == [MODEL_NAME]


# -- keep_alive ---------------------------------------------------------------------------------

def test_keep_alive_zero_unloads_when_the_request_is_done(live):
    server = live()
    client = client_for(server)
    reply = client.generate(model=OLLAMA_NAME, prompt="Hi", options=FEW, keep_alive=0)
    assert reply.done_reason in ("stop", "length") and reply.response
    assert wait_until(lambda: ps_names(client) == [] and loaded(server) == [], 10)
    client.chat(model=OLLAMA_NAME, messages=HELLO, options=FEW)      # loads it again
    assert ps_names(client) == [OLLAMA_NAME] and client.ps().models[0].expires_at is None
    unload = client.chat(model=OLLAMA_NAME, messages=[], keep_alive="0s")
    assert unload.done and unload.done_reason == "unload" and unload.message.content == ""
    assert wait_until(lambda: ps_names(client) == [] and loaded(server) == [], 10)
    assert client.generate(model=OLLAMA_NAME, keep_alive="0").done_reason == "unload"
    parts = list(client.chat(model=OLLAMA_NAME, messages=HELLO, options=FEW, stream=True,
                             keep_alive=0))
    assert parts[-1].done and "".join(p.message.content for p in parts)
    assert wait_until(lambda: ps_names(client) == [] and loaded(server) == [], 10)


def test_keep_alive_zero_waits_for_a_busy_model(live):
    server = live()
    client = client_for(server)
    parts = client.generate(model=OLLAMA_NAME, prompt="Count from one to one hundred: 1, 2,",
                            stream=True, options={"num_predict": 48, "temperature": 0})
    first = next(parts)                                   # the model is decoding now
    assert client.generate(model=OLLAMA_NAME, keep_alive=0).done_reason == "unload"
    assert loaded(server) == [MODEL_NAME]                 # not pulled from under the stream
    rest = list(parts)
    assert rest[-1].done and rest[-1].done_reason == "length" and rest[-1].eval_count == 48
    assert (first.response + "".join(p.response for p in rest)).strip()
    assert wait_until(lambda: ps_names(client) == [] and loaded(server) == [], 10)


def test_a_leased_engine_stays_until_its_lease_ends(live):
    # What a request holds between getting the engine and submitting its sequence.
    server = live()
    pool, model = server.backend.pool, server.backend.models.resolve(MODEL_NAME)
    with pool.lease(model.name, model.path) as (engine, _):
        pool.expire_at(model.name, time.time())
        time.sleep(0.5)
        assert loaded(server) == [MODEL_NAME] and not engine.busy
    assert wait_until(lambda: loaded(server) == [], 5)


def test_unloading_never_fails_the_requests_around_it(live):
    server = live()
    client = client_for(server)
    failures, replies = [], []

    def run(keep_alive):
        for round_ in range(3):
            try:
                reply = client.generate(model=OLLAMA_NAME, prompt=f"Say {round_}.",
                                        options={"num_predict": 3}, keep_alive=keep_alive)
                replies.append(reply.done_reason)
            except Exception as exc:          # noqa: BLE001 - any failure is the finding
                failures.append(repr(exc))

    threads = [threading.Thread(target=run, args=(keep_alive,)) for keep_alive in (0, None, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert failures == [] and len(replies) == 9
    assert wait_until(lambda: loaded(server) == [], 15)


def test_keep_alive_duration_sets_expires_at_and_unloads_when_it_passes(live):
    server = live()
    client = client_for(server)
    client.chat(model=OLLAMA_NAME, messages=HELLO, options=FEW, keep_alive="5m")
    expires = client.ps().models[0].expires_at
    assert abs((expires - datetime.now(timezone.utc)).total_seconds() - 300) < 30
    client.generate(model=OLLAMA_NAME, prompt="Hi", options=FEW, keep_alive=-1)
    assert client.ps().models[0].expires_at is None        # negative: until evicted
    client.generate(model=OLLAMA_NAME, prompt="Hi", options=FEW, keep_alive="1s")
    expires = client.ps().models[0].expires_at
    assert 0 < (expires - datetime.now(timezone.utc)).total_seconds() <= 1.5
    assert wait_until(lambda: ps_names(client) == [] and loaded(server) == [], 15)
    client.generate(model=OLLAMA_NAME, prompt="Hi", options=FEW)     # loads it again
    assert ps_names(client) == [OLLAMA_NAME] and client.ps().models[0].expires_at is None


def test_a_new_request_clears_the_deadline(live):
    server = live()
    client = client_for(server)
    client.generate(model=OLLAMA_NAME, prompt="Hi", options=FEW, keep_alive=2)
    client.generate(model=OLLAMA_NAME, prompt="Hello", options=FEW)    # no keep_alive
    assert client.ps().models[0].expires_at is None
    time.sleep(3)
    assert ps_names(client) == [OLLAMA_NAME]


def test_keep_alive_applies_to_embeddings(live):
    server = live()
    client = client_for(server)
    client.embed(model=OLLAMA_NAME, input="first", keep_alive="10m")
    assert ps_names(client) == [OLLAMA_NAME] and client.ps().models[0].expires_at is not None
    client.embeddings(model=OLLAMA_NAME, prompt="second", keep_alive=0)
    assert wait_until(lambda: ps_names(client) == [] and loaded(server) == [], 10)


def test_bad_keep_alive_is_a_400_naming_it(live):
    server = live()
    for endpoint, body in (("generate", {"prompt": "hi"}), ("chat", {"messages": HELLO}),
                           ("embed", {"input": "hi"}), ("embeddings", {"prompt": "hi"})):
        for bad in ("soon", "5 minutes", "1d", True, [5], "nan", 10**400, "99999999h"):
            reply = requests.post(f"{server.url}/api/{endpoint}", timeout=10,
                                  json={**body, "keep_alive": bad})
            assert reply.status_code == 400, (endpoint, bad)
            assert "keep_alive" in reply.json()["error"]
    assert loaded(server) == []


# -- tools --------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
# A history in Ollama's shapes (a call's arguments as an object, the result with tool_name)
# that shows the base model what a call looks like, then a question it answers with one.
WEATHER_CHAT = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "18 C, sunny", "tool_name": "get_weather"},
    {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
    {"role": "user", "content": "What is the weather in London?"}]
TOOL_OPTIONS = {"num_predict": 32, "temperature": 0, "seed": 5}


def get_weather(city: str) -> str:
    """
    Get the current weather for a city.

    Args:
      city: The city

    Returns:
      str: The weather there
    """
    return "sunny"


def test_chat_with_tools_returns_calls_whole_and_streamed(shared):
    client = client_for(shared)
    reply = client.chat(model=OLLAMA_NAME, messages=WEATHER_CHAT, tools=[WEATHER],
                        options=TOOL_OPTIONS)
    calls = reply.message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert isinstance(calls[0].function.arguments, dict)
    assert isinstance(calls[0].function.arguments["city"], str)
    assert "<tool_call>" not in reply.message.content and reply.done_reason in ("stop", "length")
    parts = list(client.chat(model=OLLAMA_NAME, messages=WEATHER_CHAT, tools=[WEATHER],
                             options=TOOL_OPTIONS, stream=True))
    streamed = [call for part in parts for call in part.message.tool_calls or ()]
    assert [part.done for part in parts] == [False] * (len(parts) - 1) + [True]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in calls]
    assert "".join(part.message.content for part in parts) == reply.message.content


def test_chat_with_a_python_function_as_tool(shared):
    reply = client_for(shared).chat(model=OLLAMA_NAME, messages=WEATHER_CHAT,
                                    tools=[get_weather], options=TOOL_OPTIONS)
    call = reply.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert get_weather(**call.function.arguments) == "sunny"     # the arguments fit the function


def test_bad_tools_are_a_400_in_ollama_shape(shared):
    client = client_for(shared)
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=OLLAMA_NAME, messages=HELLO, tools=[
            {"type": "function", "function": {"name": "bad name!", "parameters": {}}}])
    assert caught.value.status_code == 400 and isinstance(caught.value.error, str)
    reply = requests.post(f"{shared.url}/api/chat", timeout=10, json={
        "messages": HELLO, "tools": [WEATHER], "format": "json"})
    assert reply.status_code == 400 and isinstance(reply.json()["error"], str)


# -- errors -------------------------------------------------------------------------------------

def test_every_error_under_api_is_in_ollama_shape(shared):
    client = client_for(shared)
    with pytest.raises(ollama.ResponseError) as caught:
        client._request_raw("POST", "/api/no-such-endpoint", json={})
    assert caught.value.status_code == 404 and isinstance(caught.value.error, str)
    with pytest.raises(ollama.ResponseError) as caught:
        client._request_raw("GET", "/api/chat")
    assert caught.value.status_code == 405 and isinstance(caught.value.error, str)
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=OLLAMA_NAME, messages=[{"role": "wizard", "content": "hi"}])
    assert caught.value.status_code == 400 and isinstance(caught.value.error, str)
    for path in ("/api/nope", "/api/tags/extra", "/api"):
        body = requests.get(f"{shared.url}{path}", timeout=10).json()
        assert isinstance(body["error"], str), path
    native = requests.get(f"{shared.url}/api/v1/nope", timeout=10).json()
    assert isinstance(native["error"], dict) and native["error"]["code"]
