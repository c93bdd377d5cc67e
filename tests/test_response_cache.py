"""The response cache on the real model (RESPONSE_CACHE_SIZE): a repeated deterministic request
is answered without generating, says so with `X-Cache: HIT` in every API, whole or streamed,
and is counted in /cache/status and /metrics; what must not be cached is not."""

from __future__ import annotations

import json
import os
import re

import pytest
import requests

from conftest import (LONG, MODEL_NAME, LiveServer, build_test_app, instances_in_use,
                      multipart_upload, sse_events, wait_until)
from gguf_edit import with_chat_template
from models.registry_file import REGISTRY_FILE

GREEDY = {"max_tokens": 12, "temperature": 0}


def cache_status(server) -> dict:
    return requests.get(f"{server.url}/cache/status", timeout=10).json()["response_cache"]


def metric(server, name: str) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    # Every series carries the replica label (and only that one here).
    return float(re.search(rf'^{name}{{replica="[^"]*"}} (\S+)$', text, re.M).group(1))


def test_a_repeated_greedy_or_seeded_request_is_answered_from_the_cache(live):
    server = live(RESPONSE_CACHE_SIZE=4)
    for n, body in enumerate(({"temperature": 0}, {"temperature": 0.9, "seed": 11}), 1):
        first = server.generate(prompt="The three primary colours are", max_tokens=16, **body)
        again = server.generate(prompt="The three primary colours are", max_tokens=16, **body)
        assert (first.status_code, again.status_code) == (200, 200)
        assert "X-Cache" not in first.headers
        assert again.headers["X-Cache"] == "HIT"
        assert again.json()["text"] == first.json()["text"] and first.json()["text"]
        assert again.json()["usage"] == first.json()["usage"]
        assert again.json()["finish_reason"] == first.json()["finish_reason"]
        assert again.json()["timings"]["tokens_per_second"] == 0     # nothing generated
        assert server.logged_request(again.headers["X-Request-ID"])["cache"] == "hit"
        assert "cache" not in server.logged_request(first.headers["X-Request-ID"])
        assert cache_status(server) == {"size": 4, "entries": n, "hits": n, "misses": n}
    assert metric(server, "llm_response_cache_hits_total") == 2
    assert metric(server, "llm_response_cache_misses_total") == 2
    assert metric(server, "llm_response_cache_entries") == 2
    # A hit is a request of the model that succeeded, but not a generation.
    model = requests.get(f"{server.url}/stats", timeout=10).json()["models"][MODEL_NAME]
    assert (model["succeeded"], model["generations"]) == (4, 2)


@pytest.fixture(scope="module")
def cached_server(tmp_path_factory, model_file, model_registry):
    app = build_test_app(tmp_path_factory.mktemp("cached"), model_file, model_registry,
                         RESPONSE_CACHE_SIZE=64)
    server = LiveServer(app)
    yield server
    server.stop()
    app.extensions["llm"].close()


def _chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _lines(reply) -> list[dict]:
    return [json.loads(line) for line in reply.iter_lines(decode_unicode=True) if line]


def _events(reply) -> list[dict]:
    """The JSON `data:` events of an SSE reply (OpenAI's closing [DONE] left out)."""
    return [json.loads(line[len("data: "):]) for line in reply.iter_lines(decode_unicode=True)
            if line.startswith("data: ") and line != "data: [DONE]"]


# Per API: (path, body for a prompt, the whole reply's text, the streamed reply's text).
DIALECTS = {
    "native": ("/api/v1/generate", lambda p: {"prompt": p, **GREEDY},
               lambda r: r.json()["text"],
               lambda r: "".join(e.get("token", "") for e in _events(r))),
    "chat": ("/v1/chat/completions", lambda p: {"messages": _chat(p), **GREEDY},
             lambda r: r.json()["choices"][0]["message"]["content"],
             lambda r: "".join(e["choices"][0]["delta"].get("content") or ""
                               for e in _events(r) if e.get("choices"))),
    "completions": ("/v1/completions", lambda p: {"prompt": p, **GREEDY},
                    lambda r: r.json()["choices"][0]["text"],
                    lambda r: "".join(e["choices"][0]["text"]
                                      for e in _events(r) if e.get("choices"))),
    "ollama-generate": ("/api/generate",
                        lambda p: {"prompt": p, "options": {"num_predict": 12, "temperature": 0}},
                        lambda r: r.json()["response"],
                        lambda r: "".join(line["response"] for line in _lines(r))),
    "ollama-chat": ("/api/chat",
                    lambda p: {"messages": _chat(p),
                               "options": {"num_predict": 12, "temperature": 0}},
                    lambda r: r.json()["message"]["content"],
                    lambda r: "".join(line["message"]["content"] for line in _lines(r))),
    "responses": ("/v1/responses", lambda p: {"input": p, "max_output_tokens": 12,
                                              "temperature": 0},
                  lambda r: r.json()["output"][0]["content"][0]["text"],
                  lambda r: "".join(e["delta"] for e in _events(r)
                                    if e.get("type") == "response.output_text.delta")),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("dialect", list(DIALECTS))
def test_every_api_says_x_cache_hit_on_a_cached_reply(cached_server, dialect, stream):
    path, body, whole_text, streamed_text = DIALECTS[dialect]
    request = {**body(f"Say something about {dialect} number {int(stream)}."), "stream": stream}
    replies, texts = [], []
    for _ in range(2):          # the second once the first was read to its end
        replies.append(requests.post(f"{cached_server.url}{path}", json=request, stream=stream,
                                     timeout=120))
        assert replies[-1].status_code == 200, replies[-1].text
        texts.append((streamed_text if stream else whole_text)(replies[-1]))
    assert "X-Cache" not in replies[0].headers
    assert replies[1].headers["X-Cache"] == "HIT"
    assert texts[1] == texts[0] and texts[0]


def test_a_streamed_cached_reply_arrives_as_the_same_tokens(cached_server):
    body = {"prompt": "List three rivers:", "max_tokens": 16, "temperature": 0, "seed": 3}
    replies, tokens = [], []
    for _ in range(2):
        replies.append(cached_server.stream(**body))
        tokens.append([e["token"] for e in sse_events(replies[-1]) if "token" in e])
    first, again = replies
    assert "X-Cache" not in first.headers and again.headers["X-Cache"] == "HIT"
    assert tokens[1] == tokens[0] and len(tokens[0]) > 1
    whole = cached_server.generate(**body)           # the same request, whole: the same entry
    assert whole.headers["X-Cache"] == "HIT" and whole.json()["text"] == "".join(tokens[0])


def test_a_different_parameter_is_a_different_entry(cached_server):
    first = cached_server.generate(prompt="Colours of the sea:", **GREEDY)
    for change in ({"max_tokens": 11}, {"stop": ["\n"]}, {"repeat_penalty": 1.0},
                   {"seed": 5}):
        reply = cached_server.generate(prompt="Colours of the sea:", **{**GREEDY, **change})
        assert reply.status_code == 200 and "X-Cache" not in reply.headers, change
    assert cached_server.generate(prompt="Colours of the sea:",
                                  **GREEDY).headers["X-Cache"] == "HIT"
    assert first.status_code == 200


def test_sampling_without_a_seed_is_never_cached(live):
    server = live(RESPONSE_CACHE_SIZE=4)
    replies = [server.generate(prompt="A poem about rain:", max_tokens=8, temperature=0.8)
               for _ in range(2)]
    assert [reply.status_code for reply in replies] == [200, 200]
    assert not any("X-Cache" in reply.headers for reply in replies)
    assert cache_status(server) == {"size": 4, "entries": 0, "hits": 0, "misses": 0}


def test_with_size_zero_nothing_is_cached(live):
    server = live()
    replies = [server.generate(prompt="A poem about rain:", **GREEDY) for _ in range(2)]
    assert not any("X-Cache" in reply.headers for reply in replies)
    assert cache_status(server) == {"size": 0, "entries": 0, "hits": 0, "misses": 0}
    assert metric(server, "llm_response_cache_hits_total") == 0


def test_the_least_recently_used_reply_is_dropped_at_size_one(live):
    server = live(RESPONSE_CACHE_SIZE=1)

    def cached(prompt: str) -> bool:
        reply = server.generate(prompt=prompt, **GREEDY)
        assert reply.status_code == 200
        return reply.headers.get("X-Cache") == "HIT"

    assert [cached("Apples"), cached("Apples"), cached("Pears"), cached("Apples"),
            cached("Apples")] == [False, True, False, False, True]
    assert cache_status(server) == {"size": 1, "entries": 1, "hits": 2, "misses": 3}


def test_a_cancelled_or_timed_out_generation_is_not_cached(live):
    server = live(RESPONSE_CACHE_SIZE=4, REQUEST_TIMEOUT=1)
    reply = server.stream(**LONG, max_tokens=800)
    lines = (line for line in reply.iter_lines(decode_unicode=True) if line)
    assert [next(lines) for _ in range(3)]
    reply.close()
    lines.close()
    assert wait_until(lambda: instances_in_use(server) == 0)
    timed_out = server.generate(**LONG, max_tokens=800)
    assert timed_out.status_code == 504
    assert wait_until(lambda: instances_in_use(server) == 0)
    assert cache_status(server) == {"size": 4, "entries": 0, "hits": 0, "misses": 2}


def test_a_changed_model_file_with_the_same_name_is_a_miss(make_app, model_file, model_registry,
                                                           tmp_path):
    """`swap.gguf` is the default model's bytes (known, so served at once), then an upload with
    overwrite replaces it by a copy with another chat template: another sha256."""
    models = tmp_path / "swap-models"
    models.mkdir()
    os.symlink(model_file, models / MODEL_NAME)
    os.symlink(model_file, models / "swap.gguf")
    (models / REGISTRY_FILE).write_text(model_registry)
    server = LiveServer(make_app(MODELS_DIR=str(models), RESPONSE_CACHE_SIZE=8))
    try:
        body = {"model": "swap.gguf", "prompt": "Name a planet.", **GREEDY}

        def ask() -> requests.Response:
            reply = requests.post(f"{server.url}/api/v1/generate", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            return reply

        assert wait_until(lambda: requests.post(f"{server.url}/api/v1/generate", json={
            **body, "max_tokens": 1, "temperature": 0.5}, timeout=120).status_code == 200)
        before = ask()
        assert "X-Cache" not in before.headers and ask().headers["X-Cache"] == "HIT"
        variant = with_chat_template(model_file, tmp_path / "variant.gguf",
                                     "{{ messages[0]['content'] }}")
        upload = multipart_upload(f"{server.url}/api/v1/models", variant, "swap.gguf",
                                  fields={"name": "swap", "overwrite": "true"})
        assert upload.status_code == 201, upload.text
        after = ask()
        assert "X-Cache" not in after.headers
        assert ask().headers["X-Cache"] == "HIT"
        assert cache_status(server)["entries"] == 2
    finally:
        server.stop()
