"""One stream relay for every dialect: a client that goes away stops its generation, and a
generation that fails after the 200 ends its stream with an error in the dialect's own shape;
either way the access-log line (and so /stats) names what happened."""

from __future__ import annotations

import json

import requests

from conftest import LONG, instances_in_use, wait_until

COUNT = LONG["prompt"]
OPTIONS = {"num_predict": 1500, "temperature": 0}
STREAMS = [
    ("/api/v1/generate", {**LONG, "max_tokens": 1500, "stream": True}),
    ("/v1/completions", {"prompt": COUNT, "temperature": 0, "max_tokens": 1500, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": COUNT}], "temperature": 0,
                              "max_tokens": 1500, "stream": True}),
    ("/api/generate", {"prompt": COUNT, "raw": True, "options": OPTIONS}),
    ("/api/chat", {"messages": [{"role": "user", "content": COUNT}], "options": OPTIONS}),
    ("/api/deepseek/generate", {**LONG, "max_tokens": 1500, "n_ctx": 2048, "stream": True}),
]


def messages(reply: requests.Response, count: int | None = None) -> list:
    """The stream's messages: decoded JSON, or the raw text of a non-JSON SSE event ([DONE])."""
    ndjson = reply.headers["Content-Type"].startswith("application/x-ndjson")
    found = []
    for line in reply.iter_lines(decode_unicode=True):
        if ndjson and line:
            found.append(json.loads(line))
        elif line.startswith("data: "):
            data = line[len("data: "):]
            found.append(data if data == "[DONE]" else json.loads(data))
        if count is not None and len(found) == count:
            break
    return found


def assert_error_in_shape(path: str, last) -> None:
    if path.startswith("/v1/"):
        assert last["error"]["type"] == "server_error", last
        assert last["error"]["code"] == "generation_timeout", last
    elif path in ("/api/generate", "/api/chat"):
        assert set(last) == {"error"} and "REQUEST_TIMEOUT" in last["error"], last
    else:
        assert last["error"]["code"] == "generation_timeout", last


def test_a_failure_after_the_200_ends_the_stream_with_the_dialects_error(live):
    server = live(REQUEST_TIMEOUT=1, N_CTX=2048)
    for path, body in STREAMS:
        reply = requests.post(f"{server.url}{path}", json=body, stream=True, timeout=120)
        assert reply.status_code == 200, (path, reply.text[:300])
        sent = messages(reply)                     # the status went out before the failure
        assert_error_in_shape(path, sent[-1])
        assert "[DONE]" not in sent, path            # OpenAI: only a stream that ended well
        logged = server.logged_request(reply.headers["X-Request-ID"])
        assert (logged["status"], logged["error"]) == (200, "generation_timeout"), path
        assert wait_until(lambda: instances_in_use(server) == 0, seconds=5), path


def test_a_client_that_goes_away_stops_the_generation_in_every_dialect(live):
    server = live(N_CTX=2048)
    for path, body in STREAMS:
        reply = requests.post(f"{server.url}{path}", json=body, stream=True, timeout=120)
        assert len(messages(reply, count=4)) == 4, path
        reply.close()
        logged = server.logged_request(reply.headers["X-Request-ID"])
        assert (logged["status"], logged["error"]) == (200, "client_disconnected"), path
        assert wait_until(lambda: instances_in_use(server) == 0, seconds=5), path
