"""POST /api/v1/generate on the real model: whole, streamed, reproducible, and bad input."""

from __future__ import annotations

import json

import pytest
import requests

from conftest import MODEL_NAME, sse_events


def test_generate_returns_the_contract_json(live):
    server = live()
    reply = server.generate(prompt="The capital of France is", max_tokens=12)
    assert reply.status_code == 200
    body = reply.json()
    assert body["model"] == MODEL_NAME
    assert body["request_id"] == reply.headers["X-Request-ID"]
    assert isinstance(body["text"], str) and body["text"].strip()
    assert body["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert set(body["timings"]) == {"queue_ms", "generation_ms", "tokens_per_second"}
    assert body["timings"]["tokens_per_second"] > 0


def test_max_tokens_reached_is_reported_as_length(live):
    body = live().generate(prompt="Count from one to one hundred: one, two,", max_tokens=5,
                           temperature=0).json()
    assert body["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_same_seed_and_zero_temperature_give_the_same_text(live):
    server = live()
    first = server.generate(prompt="Once upon a time", max_tokens=20, temperature=0, seed=7).json()
    second = server.generate(prompt="Once upon a time", max_tokens=20, temperature=0, seed=7).json()
    assert first["text"] == second["text"] and first["text"].strip()


def test_same_seed_gives_the_same_sample_at_high_temperature(live):
    server = live()
    texts = {server.generate(prompt="My favourite animal is", max_tokens=16, temperature=1.5,
                             seed=1234).json()["text"] for _ in range(2)}
    assert len(texts) == 1


def test_stop_string_ends_generation_before_it(live):
    server = live()
    free = server.generate(prompt="Count: 1, 2, 3, 4,", max_tokens=16, temperature=0).json()
    assert " 6" in free["text"], free["text"]
    stopped = server.generate(prompt="Count: 1, 2, 3, 4,", max_tokens=16, temperature=0,
                              stop=[" 6"]).json()
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == free["text"][: free["text"].index(" 6")]


def test_system_instruction_goes_before_the_prompt(live):
    server = live()
    plain = server.generate(prompt="Say hi.", max_tokens=8, temperature=0).json()
    with_system = server.generate(prompt="Say hi.", system="You are a pirate. Speak like one.",
                                  max_tokens=8, temperature=0).json()
    assert with_system["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]


def test_stream_sends_token_events_then_done(live):
    server = live()
    reply = server.stream(prompt="The capital of France is", max_tokens=10, temperature=0, seed=3)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(reply)
    tokens, done = events[:-1], events[-1]
    assert tokens and all(set(event) == {"token"} for event in tokens)
    assert done["done"] is True and done["finish_reason"] in ("stop", "length")
    assert done["usage"]["completion_tokens"] >= len(tokens)
    whole = server.generate(prompt="The capital of France is", max_tokens=10, temperature=0,
                            seed=3).json()
    assert "".join(event["token"] for event in tokens) == whole["text"]


def test_stream_error_before_the_first_event_has_a_real_status(live):
    reply = live().stream(prompt="hello", model="no-such-model")
    assert reply.status_code == 404
    assert reply.json()["error"]["code"] == "model_not_found"


BAD_BODIES = [
    ("{not json", 400, "invalid_request"),
    ('"just a string"', 400, "invalid_request"),
    ("[1, 2]", 400, "invalid_request"),
    ("{}", 400, "invalid_request"),
    ('{"prompt": ""}', 400, "invalid_request"),
    ('{"prompt": "   "}', 400, "invalid_request"),
    ('{"prompt": 42}', 400, "invalid_request"),
    ('{"prompt": null}', 400, "invalid_request"),
    ('{"prompt": "hi", "max_tokens": "ten"}', 400, "invalid_request"),
    ('{"prompt": "hi", "max_tokens": 0}', 400, "invalid_request"),
    ('{"prompt": "hi", "max_tokens": 2.5}', 400, "invalid_request"),
    ('{"prompt": "hi", "max_tokens": true}', 400, "invalid_request"),
    ('{"prompt": "hi", "max_tokens": 100000}', 400, "invalid_request"),
    ('{"prompt": "hi", "temperature": -0.1}', 400, "invalid_request"),
    ('{"prompt": "hi", "temperature": 2.5}', 400, "invalid_request"),
    ('{"prompt": "hi", "temperature": NaN}', 400, "invalid_request"),
    ('{"prompt": "hi", "top_p": 1.5}', 400, "invalid_request"),
    ('{"prompt": "hi", "top_k": -1}', 400, "invalid_request"),
    ('{"prompt": "hi", "repeat_penalty": "high"}', 400, "invalid_request"),
    ('{"prompt": "hi", "stop": ["a","b","c","d","e","f","g","h","i"]}', 400, "invalid_request"),
    ('{"prompt": "hi", "stop": [1]}', 400, "invalid_request"),
    ('{"prompt": "hi", "stop": [""]}', 400, "invalid_request"),
    ('{"prompt": "hi", "seed": -5}', 400, "invalid_request"),
    ('{"prompt": "hi", "stream": "yes"}', 400, "invalid_request"),
    ('{"prompt": "hi", "promt": "typo"}', 400, "invalid_request"),
    ('{"prompt": "hi", "model": "no-such-model"}', 404, "model_not_found"),
    ('{"prompt": "hi", "model": "../../etc/passwd"}', 404, "model_not_found"),
]


@pytest.mark.parametrize("body,status,code", BAD_BODIES)
def test_bad_input_gets_a_json_error_and_a_log_line(live, body, status, code):
    server = live()
    reply = requests.post(f"{server.url}/api/v1/generate", data=body,
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["code"] == code and error["message"]
    assert "Traceback" not in reply.text
    assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    logged = server.logged_request(reply.headers["X-Request-ID"])
    assert logged["status"] == status and logged["path"] == "/api/v1/generate"


def test_prompt_over_the_context_gets_400_with_both_counts(live):
    server = live(N_CTX=256)
    reply = server.generate(prompt="word " * 300, max_tokens=16)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["prompt_tokens"] > 256 and error["max_tokens"] == 16
    assert str(error["prompt_tokens"]) in error["message"] and "256" in error["message"]
    fits = server.generate(prompt="word " * 230, max_tokens=40)
    assert fits.status_code == 400 and fits.json()["error"]["max_tokens"] == 40
    assert server.generate(prompt="word " * 100, max_tokens=8).status_code == 200


def test_wrong_content_type_gets_415(live):
    server = live()
    reply = requests.post(f"{server.url}/api/v1/generate", data=json.dumps({"prompt": "hi"}),
                          headers={"Content-Type": "text/plain"}, timeout=30)
    assert reply.status_code == 415
    assert reply.json()["error"]["code"] == "unsupported_media_type"


def test_huge_body_gets_413_before_it_is_read(live):
    server = live(MAX_REQUEST_BYTES=64 * 1024)
    reply = requests.post(f"{server.url}/api/v1/generate",
                          data=json.dumps({"prompt": "x" * 200_000}),
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "payload_too_large"
    assert server.generate(prompt="still fine", max_tokens=2).status_code == 200


@pytest.mark.parametrize("method,path,status,code", [
    ("GET", "/no/such/route", 404, "not_found"),
    ("DELETE", "/api/v1/generate", 405, "method_not_allowed"),
    ("GET", "/api/v1/generate", 405, "method_not_allowed"),
])
def test_flask_routing_errors_are_json(client, method, path, status, code):
    reply = client.open(path, method=method)
    assert reply.status_code == status
    assert reply.get_json()["error"]["code"] == code
    assert reply.headers["X-Request-ID"]
