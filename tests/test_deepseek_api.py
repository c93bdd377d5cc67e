"""/api/deepseek on the real model: listing with the fallback, one-step and map-reduce
generation (whole and streamed), admission, timeouts, disconnects, reasoning, bad input."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import requests

from conftest import MODEL_NAME, instances_in_use, sse_events, wait_until
from DeepSeekLLM.model_cache import ModelTokenizer
from DeepSeekLLM.services import ChatLayout

N_CTX = 1024
COLOURS = ["red", "green", "blue", "yellow", "white", "black", "orange"]


@pytest.fixture(scope="module")
def tokenizer(model_file):
    tokenizer = ModelTokenizer(str(model_file))
    yield tokenizer
    tokenizer.close()


def document(tokenizer, tokens: int) -> str:
    """A text of about `tokens` tokens of distinct facts, so no chunk repeats another."""
    lines, size, i = [], 0, 0
    while size < tokens:
        line = (f"Record {i}: the parcel for house {i} went to the {COLOURS[i % 7]} door "
                f"on day {i % 28 + 1}.\n")
        lines.append(line)
        size += len(tokenizer.tokenize(line))
        i += 1
    return "".join(lines)


def post(server, **body) -> requests.Response:
    return requests.post(f"{server.url}/api/deepseek/generate", json=body,
                         stream=bool(body.get("stream")), timeout=300)


def test_a_fresh_setup_lists_the_default_model_as_fallback_and_answers(live):
    server = live()
    [model] = requests.get(f"{server.url}/api/deepseek/models", timeout=10).json()["models"]
    assert model["name"] == MODEL_NAME and model["fallback"] is True
    assert model["loaded"] is False and model["contexts"] == []
    reply = post(server, prompt="The capital of France is", max_tokens=8, n_ctx=512)
    assert reply.status_code == 200
    body = reply.json()
    assert body["model"] == MODEL_NAME and body["text"].strip()
    assert body["reasoning"] == "" and body["finish_reason"] in ("stop", "length")
    assert body["chunking"] == {"strategy": "none", "chunks": 0, "chunk_tokens": [], "overlap": 0}
    assert body["usage"]["total_tokens"] == (body["usage"]["prompt_tokens"]
                                             + body["usage"]["completion_tokens"])
    [model] = requests.get(f"{server.url}/api/deepseek/models", timeout=10).json()["models"]
    assert model["loaded"] is True and model["contexts"] == [512]


def test_with_no_model_at_all_the_listing_is_empty_and_generate_404(live, tmp_path):
    empty = tmp_path / "no-models"
    empty.mkdir()
    server = live(MODELS_DIR=str(empty))
    assert requests.get(f"{server.url}/api/deepseek/models", timeout=10).json() == {"models": []}
    reply = post(server, prompt="Hi")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"


def test_an_added_deepseek_model_replaces_the_fallback(live, tmp_path, model_file):
    deepseek_dir = tmp_path / "deepseek-models"
    deepseek_dir.mkdir()
    os.symlink(model_file, deepseek_dir / "deepseek-r1-test.gguf")
    server = live(DEEPSEEK_MODELS_DIR=str(deepseek_dir))
    models = requests.get(f"{server.url}/api/deepseek/models", timeout=10).json()["models"]
    assert [(m["name"], m["type"], m["fallback"]) for m in models] == [
        ("deepseek-r1-test.gguf", "deepseek", False)]
    assert post(server, prompt="Hi", max_tokens=2, n_ctx=512).json()["model"] == "deepseek-r1-test.gguf"
    gone = post(server, prompt="Hi", max_tokens=2, model=MODEL_NAME)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_a_context_that_fits_is_one_generation(live, tokenizer):
    server = live()
    context = document(tokenizer, 300)
    body = post(server, prompt="Which door did parcel 3 go to?", context=context, max_tokens=8,
                n_ctx=N_CTX, temperature=0).json()
    chunking = body["chunking"]
    assert chunking["strategy"] == "none" and chunking["chunks"] == 1
    assert chunking["chunk_tokens"] == [len(tokenizer.tokenize(context))]
    assert body["usage"]["prompt_tokens"] > chunking["chunk_tokens"][0]
    assert server.backend.stats.by_model()[MODEL_NAME]["generations"] == 1


def test_four_times_n_ctx_is_map_reduced_and_usage_adds_up(live, tokenizer):
    server = live()
    context = document(tokenizer, 4 * N_CTX)
    peak = {"in_flight": 0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak["in_flight"] = max(peak["in_flight"], server.backend.concurrency.snapshot().in_flight)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    reply = post(server, prompt="Which door did the parcel for house 42 go to?", context=context,
                 n_ctx=N_CTX, max_tokens=24, temperature=0, seed=1)
    elapsed = time.monotonic() - started
    done.set()
    watcher.join()
    assert reply.status_code == 200
    body = reply.json()
    chunking, usage = body["chunking"], body["usage"]
    assert chunking["strategy"] == "map_reduce" and chunking["chunks"] >= 4
    assert len(chunking["chunk_tokens"]) == chunking["chunks"]
    assert max(chunking["chunk_tokens"]) < N_CTX and chunking["overlap"] > 0
    # Every context token was read: the chunks, less the shared tokens, are the whole context.
    assert sum(chunking["chunk_tokens"]) - chunking["overlap"] * (chunking["chunks"] - 1) == len(
        tokenizer.tokenize(context))
    assert body["text"].strip()
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > sum(chunking["chunk_tokens"])
    stats = server.backend.stats.by_model()[MODEL_NAME]
    assert stats["generations"] >= chunking["chunks"] + 1      # map steps, reduce (, collapses)
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (usage["prompt_tokens"],
                                                                    usage["completion_tokens"])
    assert stats["succeeded"] == 1                             # one request, many steps
    assert peak["in_flight"] <= 2                              # MODEL_POOL_SIZE = MAX_WORKERS = 2
    assert instances_in_use(server) == 0
    logged = server.logged_request(reply.headers["X-Request-ID"])
    assert logged["chunks"] == chunking["chunks"]
    print(f"\n4 x n_ctx request: {elapsed:.1f} s, {usage['prompt_tokens']} prompt + "
          f"{usage['completion_tokens']} completion tokens in {stats['generations']} steps")


def test_streamed_map_reduce_sends_progress_in_order_then_the_answer(live, tokenizer):
    server = live()
    reply = post(server, prompt="Which door did the parcel for house 7 go to?",
                 context=document(tokenizer, 4 * N_CTX), n_ctx=N_CTX, max_tokens=24,
                 temperature=0, seed=1, stream=True)
    assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(reply)
    done = events[-1]
    progress = [e for e in events if e.get("event") == "chunk"]
    tokens = [e for e in events if "token" in e]
    chunks = done["chunking"]["chunks"]
    assert done["done"] is True and done["chunking"]["strategy"] == "map_reduce" and chunks >= 4
    assert [(e["index"], e["of"]) for e in progress] == [(i, chunks) for i in range(1, chunks + 1)]
    assert events.index(progress[-1]) < events.index(tokens[0])
    assert "".join(e["token"] for e in tokens).strip()
    assert done["usage"]["total_tokens"] == (done["usage"]["prompt_tokens"]
                                             + done["usage"]["completion_tokens"])
    assert done["usage"]["completion_tokens"] >= len(tokens)


def test_a_client_leaving_a_streamed_map_reduce_cancels_its_steps(live, tokenizer):
    server = live()
    reply = post(server, prompt="Which door did the parcel for house 7 go to?",
                 context=document(tokenizer, 6 * N_CTX), n_ctx=N_CTX, max_tokens=24, stream=True)
    lines = (line for line in reply.iter_lines(decode_unicode=True) if line.startswith("data: "))
    first = json.loads(next(lines)[len("data: "):])
    assert first["event"] == "chunk" and first["of"] >= 6
    reply.close()
    assert wait_until(lambda: server.backend.concurrency.snapshot().in_flight == 0, seconds=15)
    assert wait_until(lambda: instances_in_use(server) == 0, seconds=5)
    generations = server.backend.stats.by_model()[MODEL_NAME]["generations"]
    assert generations <= first["of"]              # map steps (run together), no reduce step
    assert server.backend.deepseek.cache.cache_status()["models"][0]["requests"] == 0
    assert server.backend.stats.by_model()[MODEL_NAME]["cancelled"] == 1
    assert post(server, prompt="Hello", max_tokens=2, n_ctx=512).status_code == 200


def test_map_steps_wait_for_a_single_admission_slot_instead_of_failing(live, tokenizer):
    server = live(MAX_CONCURRENT_REQUESTS=1)
    reply = post(server, prompt="Which door did parcel 2 go to?", n_ctx=512, max_tokens=16,
                 context=document(tokenizer, 900), temperature=0)
    assert reply.status_code == 200
    assert reply.json()["chunking"]["strategy"] == "map_reduce"
    assert reply.json()["chunking"]["chunks"] >= 2
    snapshot = server.backend.concurrency.snapshot()
    assert snapshot.outcomes["rejected"] == 0 and snapshot.outcomes["succeeded"] == 1  # counted once


def test_a_full_server_refuses_the_first_step_with_429(live):
    server = live(MAX_CONCURRENT_REQUESTS=1)
    runner = threading.Thread(target=lambda: server.generate(
        prompt="Count from one to one thousand: 1, 2, 3,", max_tokens=150, temperature=0))
    runner.start()
    assert wait_until(lambda: server.backend.concurrency.snapshot().in_flight == 1)
    reply = post(server, prompt="Hello", max_tokens=4, n_ctx=512)
    runner.join()
    assert reply.status_code == 429
    assert reply.json()["error"]["code"] == "too_many_requests" and reply.headers["Retry-After"]


def test_request_timeout_applies_to_each_step(live):
    server = live(REQUEST_TIMEOUT=1)
    reply = post(server, prompt="Count from one to one thousand: 1, 2, 3,", max_tokens=1500,
                 n_ctx=2048, temperature=0)
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "generation_timeout"
    assert wait_until(lambda: instances_in_use(server) == 0, seconds=2)


def test_reasoning_opened_by_the_template_streams_as_reasoning(live, monkeypatch):
    # The 270M model writes no <think> tags; a layout that opens the block (as DeepSeek-R1's
    # template does) makes everything it writes reasoning, through the real HTTP path.
    plain = ModelTokenizer._chat_layout
    monkeypatch.setattr(ModelTokenizer, "_chat_layout", lambda self, templates: ChatLayout(
        plain(self, templates).before, plain(self, templates).after, True))
    server = live()
    # a seed makes the two requests give the same text (README, "Seeds and batching")
    events = sse_events(post(server, prompt="Why is the sky blue?", max_tokens=8, n_ctx=512,
                             temperature=0, seed=1, stream=True))
    assert events[-1]["done"] is True
    assert [e for e in events[:-1] if "reasoning" in e] and not [e for e in events if "token" in e]
    body = post(server, prompt="Why is the sky blue?", max_tokens=8, n_ctx=512, temperature=0,
                seed=1).json()
    assert body["text"] == "" and body["reasoning"] == "".join(
        e["reasoning"] for e in events if "reasoning" in e)


BAD_BODIES = [
    ({}, 400, "invalid_request"),
    ({"prompt": ""}, 400, "invalid_request"),
    ({"prompt": "   ", "context": "text"}, 400, "invalid_request"),
    ({"prompt": "hi", "contxt": "typo"}, 400, "invalid_request"),
    ({"prompt": "hi", "n_ctx": 40000}, 400, "invalid_request"),          # over DEEPSEEK_MAX_CTX
    ({"prompt": "hi", "n_ctx": 100}, 400, "invalid_request"),
    ({"prompt": "hi", "n_ctx": 512, "max_tokens": 512}, 400, "invalid_request"),
    ({"prompt": "hi", "chunk_size": 100, "chunk_overlap": 100}, 400, "invalid_request"),
    ({"prompt": "hi", "chunk_overlap": -1}, 400, "invalid_request"),
    ({"prompt": "hi", "context": 42}, 400, "invalid_request"),
    ({"prompt": "hi", "model": "no-such-model"}, 404, "model_not_found"),
    ({"prompt": "word " * 600, "n_ctx": 512}, 400, "context_length_exceeded"),
    ({"prompt": "hi", "context": "word " * 2000, "n_ctx": 512, "chunk_size": 600},
     400, "invalid_request"),                                            # chunk does not fit
    ({"prompt": "hi", "context": "word " * 2000, "n_ctx": 512, "chunk_overlap": 500},
     400, "invalid_request"),                                            # overlap >= chunk
    ({"prompt": "hi", "context": "word " * 2000, "n_ctx": 512, "max_tokens": 450},
     400, "context_length_exceeded"),                                    # no room to chunk
]


@pytest.mark.parametrize("body,status,code", BAD_BODIES)
def test_bad_requests_get_json_errors(live, body, status, code):
    server = live(DEEPSEEK_MAX_CTX=32768)
    reply = post(server, **body)
    assert reply.status_code == status
    assert reply.json()["error"]["code"] == code and reply.json()["error"]["message"]
    assert instances_in_use(server) == 0


def test_n_ctx_beyond_what_the_model_was_trained_on_is_refused(live):
    reply = post(live(DEEPSEEK_MAX_CTX=65536), prompt="hi", n_ctx=40000)
    assert reply.status_code == 400 and reply.json()["error"]["context_length"] == 32768


def test_notes_too_long_for_one_prompt_are_collapsed_before_the_answer(live, tokenizer):
    server = live()
    reply = post(server, prompt="Which door did the parcel for house 5 go to?",
                 context=document(tokenizer, 1200), n_ctx=256, max_tokens=32, temperature=0,
                 seed=1, stream=True)
    events = sse_events(reply)
    phases = [e["event"] for e in events if "event" in e]
    done = events[-1]
    chunks = done["chunking"]["chunks"]
    assert done["done"] is True and phases[:chunks] == ["chunk"] * chunks
    assert phases[chunks:] and set(phases[chunks:]) == {"collapse"}
    assert done["usage"]["prompt_tokens"] > sum(done["chunking"]["chunk_tokens"])
