"""Hostile JSON bodies (issue 9, findings 3 and 6): every JSON endpoint answers 400 in its own
dialect's error shape, never 500, and the server still serves the next request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from conftest import MODEL_NAME
from test_browser_safety import JSON_ROUTES

DEEP = 100_000


def nest(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


# (name, raw body, words the 400's message must contain)
HOSTILE = [
    ("array nested 100,000 deep", b"[" * DEEP + b"]" * DEEP, "nested"),
    ("object nested 100,000 deep", b'{"a":' * DEEP + b"1" + b"}" * DEEP, "nested"),
    ("unclosed nesting 1 MiB deep", b"[" * (1 << 20), "nested"),
    ("one level over the bound", nest(65), "nested"),
    ("lone high surrogate", b'{"prompt": "\\ud800", "input": "x"}', "surrogate"),
    ("lone low surrogate", b'{"prompt": "\\udfff"}', "surrogate"),
    ("surrogate pair reversed", b'{"prompt": "\\ude00\\ud83d"}', "surrogate"),
    ("lone surrogate in a key", b'{"\\uD800": 1}', "surrogate"),
    ("lone surrogate deep in messages",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\udbffb"}]}]}',
     "surrogate"),
    ("duplicate key", b'{"prompt": "hello", "prompt": "bye"}', '"prompt" twice'),
    ("duplicate key by escape", b'{"model": "a", "\\u006dodel": "b"}', '"model" twice'),
    ("duplicate key nested",
     b'{"messages": [{"role": "user", "role": "system", "content": "x"}]}', '"role" twice'),
    ("NaN", b'{"temperature": NaN}', "NaN"),
    ("Infinity", b'{"max_tokens": Infinity}', "Infinity"),
    ("-Infinity", b'{"options": {"temperature": -Infinity}}', "Infinity"),
    ("1e400", b'{"temperature": 1e400}', "out of range"),
    ("-1e400", b'{"top_p": -1e400}', "out of range"),
    ("exponent 1e999999999", b'{"seed": 1e999999999}', "out of range"),
    ("integer of 5000 digits", b'{"seed": ' + b"9" * 5000 + b"}", "digits"),
    ("integer of 100,000 digits", b'{"max_tokens": ' + b"1" * 100_000 + b"}", "digits"),
    ("top-level array", b'[{"prompt": "hi"}]', "JSON object"),
    ("top-level string", b'"hi"', "JSON object"),
    ("top-level number", b"42", "JSON object"),
    ("top-level null", b"null", "JSON object"),
    ("top-level true", b"true", "JSON object"),
    ("invalid UTF-8", b'{"prompt": "\xff\xfe\xfd"}', "UTF-8"),
    ("UTF-8-encoded surrogate", b'{"prompt": "\xed\xa0\x80"}', "UTF-8"),
    ("overlong UTF-8", b'{"prompt": "\xc0\xaf"}', "UTF-8"),
    ("truncated UTF-8", b'{"prompt": "\xe2\x82"}', "UTF-8"),
    ("UTF-16 body", '{"prompt": "hi"}'.encode("utf-16"), "UTF-8"),
    ("empty body", b"", "empty"),
    ("whitespace body", b" \r\n\t ", "empty"),
    ("truncated JSON", b'{"prompt": "hi', "not valid JSON"),
    ("two documents", b'{"prompt": "a"} {"prompt": "b"}', "not valid JSON"),
    ("single quotes", b"{'prompt': 'hi'}", "not valid JSON"),
    ("comment", b'{"prompt": "hi" /* x */}', "not valid JSON"),
    ("trailing comma", b'{"prompt": "hi",}', "not valid JSON"),
    ("raw control character", b'{"prompt": "a\x00b"}', "not valid JSON"),
    ("bare word", b"undefined", "not valid JSON"),
]


def assert_400(reply, dialect: str, words: str, case: str) -> None:
    """A 400 in the dialect's shape whose message says what is wrong."""
    assert reply.status_code == 400, (case, reply.status_code, reply.get_data(as_text=True)[:300])
    body = reply.get_json()
    if dialect == "ollama":
        assert set(body) == {"error"} and isinstance(body["error"], str), case
        message = body["error"]
    else:
        error = body["error"]
        assert error["code"] == "invalid_request", (case, body)
        if dialect == "openai":
            assert set(error) == {"message", "type", "param", "code"}, case
            assert error["type"] == "invalid_request_error", case
        message = error["message"]
    assert words in message, (case, message)


@pytest.mark.parametrize("dialect,method,path,valid", JSON_ROUTES,
                         ids=[f"{method} {path}" for _, method, path, _ in JSON_ROUTES])
def test_hostile_bodies_get_400_in_the_dialects_shape(make_app, dialect, method, path, valid):
    app = make_app()
    client = app.test_client()
    for case, body, words in HOSTILE:
        reply = client.open(path, method=method, data=body,
                            headers={"Content-Type": "application/json"})
        assert_400(reply, dialect, words, case)
    errors_log = Path(app.extensions["llm"].config.LOG_DIR) / "errors.log"
    assert not errors_log.exists() or "Traceback" not in errors_log.read_text()
    # The server is not wedged: a normal request right after succeeds.
    after = client.open(path, method=method, json=valid)
    expected = 404 if path == "/api/delete" else 200       # its valid body names no model
    assert after.status_code == expected, after.get_data(as_text=True)[:300]


def test_the_duplicate_key_is_the_openai_param(client):
    body = b'{"prompt": "a", "max_tokens": 1, "max_tokens": 2}'
    reply = client.post("/v1/completions", data=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.get_json()["error"]["param"] == "max_tokens"


def test_a_hostile_key_stays_printable_in_the_message(client):
    key = "\\ud800" + "k" * 10_000
    body = f'{{"{key}": 1, "{key}": 2}}'.encode()
    reply = client.post("/api/v1/generate", data=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400
    message = reply.get_json()["error"]["message"]
    assert len(message) < 300 and message.isascii()


@pytest.mark.parametrize("case,body", [
    ("escaped surrogate pair (an emoji, as json.dumps writes it)",
     b'{"prompt": "Say \\ud83d\\ude00", "max_tokens": 1}'),
    ("a literal backslash-u text, not an escape", b'{"prompt": "\\\\ud800 is a code unit", '
                                                  b'"max_tokens": 1}'),
    ("UTF-8 byte order mark", b'\xef\xbb\xbf{"prompt": "Hi", "max_tokens": 1}'),
    ("an escaped NUL in the prompt", b'{"prompt": "a\\u0000b", "max_tokens": 1}'),
    ("a number that underflows to zero",
     b'{"prompt": "Hi", "max_tokens": 1, "temperature": 1e-400}'),
])
def test_valid_bodies_near_the_limits_are_served(client, case, body):
    reply = client.post("/api/v1/generate", data=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 200, (case, reply.get_data(as_text=True)[:300])
    assert reply.get_json()["usage"]["completion_tokens"] <= 1


def test_the_depth_bound_is_64_levels(client):
    """64 levels pass the JSON gate (and meet the endpoint's own checks); 65 do not."""
    for depth, words in [(64, "unknown field"), (65, "nested more than 64 levels")]:
        body = b'{"prompt": "Hi", "x": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
        reply = client.post("/api/v1/generate", data=body,
                            headers={"Content-Type": "application/json"})
        assert reply.status_code == 400 and words in reply.get_json()["error"]["message"], depth


def test_hostile_bodies_are_400_over_real_http_and_streams_start_clean(live):
    """Through the real server, with stream: true: the 400 comes before any stream begins."""
    server = live()
    for path in ["/api/v1/generate", "/v1/chat/completions", "/api/chat"]:
        reply = requests.post(f"{server.url}{path}", timeout=30,
                              data=b'{"stream": true, "prompt": "\\ud800", '
                                   b'"messages": [{"role": "user", "content": "\\ud800"}]}',
                              headers={"Content-Type": "application/json"})
        assert reply.status_code == 400 and "surrogate" in json.dumps(reply.json()), path
        assert reply.headers["Content-Type"].startswith("application/json")
    assert server.generate(prompt="Hi", max_tokens=1, model=MODEL_NAME).status_code == 200
