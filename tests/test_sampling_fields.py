"""One definition of the sampling fields: the same bound, the same refusal, in every dialect.

Each dialect names the fields its own way (max_tokens, max_completion_tokens, options.num_predict)
but the bounds and the max_tokens-vs-context rule are one, so a value is refused, or let
through, alike by the native, OpenAI, Ollama and DeepSeek endpoints.
"""

from __future__ import annotations

import pytest

from conftest import TEST_N_CTX

HI = [{"role": "user", "content": "Hi"}]


def sampling_requests(**fields) -> list[tuple[str, dict]]:
    """The same sampling fields in every dialect's request (Ollama's under options)."""
    return [
        ("/api/v1/generate", {"prompt": "Hi", **fields}),
        ("/v1/completions", {"prompt": "Hi", **fields}),
        ("/v1/chat/completions", {"messages": HI, **fields}),
        ("/api/generate", {"prompt": "Hi", "stream": False, "options": fields}),
        ("/api/chat", {"messages": HI, "stream": False, "options": fields}),
        ("/api/deepseek/generate", {"prompt": "Hi", **fields}),
    ]


def refusal(reply) -> tuple[str, str | None]:
    """The message and the param of a 400, whatever the dialect's error shape."""
    assert reply.status_code == 400, reply.get_data(as_text=True)[:300]
    error = reply.get_json()["error"]
    if isinstance(error, str):                              # Ollama: {"error": "message"}
        return error, None
    assert error["code"] == "invalid_request", error
    return error["message"], error["param"]


@pytest.mark.parametrize("field,value,message", [
    ("top_p", 1.5, "top_p must be between 0 and 1"),
    ("temperature", -0.5, "temperature must be between 0 and 2"),
    ("seed", 2**32, "seed must be between 0 and 4294967295"),
])
def test_an_out_of_range_field_is_the_same_400_in_every_dialect(client, field, value, message):
    for path, body in sampling_requests(**{field: value}):
        said, param = refusal(client.post(path, json=body))
        assert said == message, path
        assert param in (field, None), path


@pytest.mark.parametrize("value", [-0.01, 1.01])
def test_min_p_has_the_same_bounds_in_every_dialect(client, value):
    for path, body in sampling_requests(min_p=value):
        said, param = refusal(client.post(path, json=body))
        assert said == "min_p must be between 0 and 1" and param in ("min_p", None), path


BY_WIRE_NAME = [
    ("/api/v1/generate", {"prompt": "Hi"}, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": HI}, "max_tokens"),
    ("/v1/chat/completions", {"messages": HI}, "max_completion_tokens"),
    ("/api/generate", {"prompt": "Hi", "stream": False}, "num_predict"),
    ("/api/chat", {"messages": HI, "stream": False}, "num_predict"),
    ("/api/deepseek/generate", {"prompt": "Hi", "n_ctx": TEST_N_CTX}, "max_tokens"),
]


def _with_limit(body: dict, name: str, value: int) -> dict:
    if name == "num_predict":
        return {**body, "options": {name: value}}
    return {**body, name: value}


@pytest.mark.parametrize("path,body,name", BY_WIRE_NAME, ids=[f"{p} {n}" for p, _, n in BY_WIRE_NAME])
def test_max_tokens_that_fills_the_context_alone_is_refused_alike(client, path, body, name):
    """max_tokens = n_ctx leaves no room for a prompt: a 400 naming the request's own field."""
    said, param = refusal(client.post(path, json=_with_limit(body, name, TEST_N_CTX)))
    assert said == (f"{name} must be smaller than the context size ({TEST_N_CTX} tokens), "
                    f"so that the prompt fits")
    assert param in (name, None)


@pytest.mark.parametrize("path,body,name", BY_WIRE_NAME, ids=[f"{p} {n}" for p, _, n in BY_WIRE_NAME])
def test_one_token_less_is_judged_with_the_prompt(client, path, body, name):
    """n_ctx - 1 passes the field's bound; the prompt ("Hi" and its BOS, at least) then does not
    fit beside it, which is the prompt-and-completion error with both counts."""
    reply = client.post(path, json=_with_limit(body, name, TEST_N_CTX - 1))
    assert reply.status_code == 400, reply.get_data(as_text=True)[:300]
    error = reply.get_json()["error"]
    if isinstance(error, dict):
        assert error["code"] == "context_length_exceeded", error
        error = error["message"]
    assert str(TEST_N_CTX - 1) in error and str(TEST_N_CTX) in error


def test_the_docs_page_shows_each_fields_bounds_from_the_one_table(client):
    page = client.get("/").get_data(as_text=True)
    assert page.count("drop tokens less likely than min_p times the likeliest one, 0 = off "
                      "(0 .. 1)") == 7   # native, Ollama x2, DeepSeek, /v1 x2, /v1/responses
    assert "options.num_predict" in page and "options.min_p" in page
