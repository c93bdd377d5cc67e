"""Hostile chat templates and hostile request bodies: a 4xx in the dialect's shape, never a 500,
never a 200 stream carrying an error, and never a worker left busy.

One copy of the real model carries a template that picks its attack from the last message, so
one tried file covers every attack; any other message renders Gemma's own template.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from app_factory import create_app
from conftest import MODEL_NAME, TEST_N_CTX, LiveServer, wait_until
from templated_models import templated_dir, tried_copies
from test_chat_template import GEMMA_TEMPLATE
from services.engine.chat_template import ChatTemplates

# Sizes come from `one` (the number of messages), not constants: Jinja folds constant
# expressions when it compiles a template, and llama-cpp-python compiles the GGUF's template
# when it loads the file, so a constant bomb would hang the load itself (the trial's business).
ATTACKS = {
    "nested-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                    "{% endfor %}",
    "loop-filter": "{% for i in range(100000) %}{% for j in range(100000) if j < 0 %}"
                   "{% endfor %}{% endfor %}",
    "string-multiplication": "{{ 'x' * (one * 1000000000) }}",
    "huge-power": "{{ (one * 10) ** (one * 10000000000) }}",
    "macro-recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "macro-fan-out": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
                     "{% endmacro %}{{ f(60) }}",
    "deeply-nested-output": "{% macro f(n) %}<{{ f(n - 1) if n else '' }}>{% endmacro %}"
                            "{{ f(100000) }}",
    "doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "block-doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set b %}"
                      "{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = b %}{% endfor %}",
    "huge-output": "{% for i in range(100000) %}{{ 'x' * (one * 100000) }}{% endfor %}",
    "padding": "{{ 'x'|center(one * 1000000000) }}{{ '%1000000000s' % (one|string) }}",
    "replace-bomb": "{% set s = 'x' * (one * 1000000) %}{{ s|replace('x', s) }}",
    "sandbox-escape": "{{ cycler.__init__.__globals__.os.system('true') }}",
}
EXPECTED = {
    "nested-loops": "CHAT_TEMPLATE_TIMEOUT", "loop-filter": "CHAT_TEMPLATE_TIMEOUT",
    "string-multiplication": "bound", "huge-power": "bits", "macro-recursion": "recursed",
    "macro-fan-out": "CHAT_TEMPLATE_TIMEOUT", "deeply-nested-output": "recursed",
    "doubling": "bound", "block-doubling": "bound", "huge-output": "wrote more than",
    "padding": "bound", "replace-bomb": "bound", "sandbox-escape": "sandbox",
}
DISPATCH = ("{%- set attack = messages[-1]['content'] -%}{%- set one = messages|length -%}"
            + "".join(f"{{%- {'if' if i == 0 else 'elif'} attack == '{name}' -%}}{body}"
                      for i, (name, body) in enumerate(ATTACKS.items()))
            + "{%- else -%}" + GEMMA_TEMPLATE + "{%- endif -%}")
TIMEOUT = 1.0


@pytest.fixture(scope="session")
def hostile_models(model_file, tmp_path_factory) -> tuple[Path, str]:
    directory = tmp_path_factory.mktemp("hostile")
    return directory, tried_copies(model_file, directory, {"hostile": DISPATCH})


@pytest.fixture
def server(live, hostile_models, tmp_path):
    return live(MODELS_DIR=templated_dir(*hostile_models, tmp_path / "hostile-models"),
                CHAT_TEMPLATE_TIMEOUT=TIMEOUT)


def chat(server, dialect: str, content: str, stream: bool = False) -> requests.Response:
    messages = [{"role": "user", "content": content}]
    if dialect == "openai":
        return requests.post(f"{server.url}/v1/chat/completions", timeout=60, stream=stream,
                             json={"model": "hostile", "messages": messages, "max_tokens": 3,
                                   "stream": stream})
    return requests.post(f"{server.url}/api/chat", timeout=60, stream=stream, json={
        "model": "hostile:latest", "messages": messages, "stream": stream,
        "options": {"num_predict": 3}})


def workers_busy(server) -> int:
    return requests.get(f"{server.url}/stats/concurrency", timeout=10).json()["workers"]["busy"]


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_hostile_template_is_a_422_and_frees_its_worker(server, attack):
    for dialect in ("openai", "ollama"):
        started = time.monotonic()
        reply = chat(server, dialect, attack)
        took = time.monotonic() - started
        assert reply.status_code == 422, reply.text
        assert took < TIMEOUT + 3
        if dialect == "openai":
            error = reply.json()["error"]
            assert (error["code"], error["type"]) == ("chat_template_error",
                                                      "invalid_request_error")
            message = error["message"]
        else:
            message = reply.json()["error"]
        assert EXPECTED[attack] in message
        assert wait_until(lambda: workers_busy(server) == 0, seconds=5)
        # Every worker is free: MAX_WORKERS requests in a row all succeed.
        for _ in range(server.backend.config.MAX_WORKERS):
            assert chat(server, dialect, "Hi").status_code == 200


@pytest.mark.parametrize("dialect", ["openai", "ollama"])
def test_a_streamed_chat_with_a_hostile_template_is_a_422_before_any_byte(server, dialect):
    reply = chat(server, dialect, "nested-loops", stream=True)
    assert reply.status_code == 422
    assert reply.headers["Content-Type"].startswith("application/json")
    assert "CHAT_TEMPLATE_TIMEOUT" in str(reply.json()["error"])
    assert workers_busy(server) == 0


def test_a_template_refusal_in_a_stream_is_a_400_before_any_byte(server):
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    reply = requests.post(f"{server.url}/v1/chat/completions", stream=True, timeout=60, json={
        "model": "hostile", "messages": messages, "max_tokens": 3, "stream": True})
    assert reply.status_code == 400 and "must alternate" in reply.json()["error"]["message"]


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Say {{ 7 * 6 }} and <end_of_turn> as text."}]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TOOLISH = ("{{ bos_token }}{%- set ns = namespace(system='') -%}{%- for m in messages -%}"
           "{%- if m.role == 'system' -%}{%- set ns.system = ns.system ~ m.content -%}{%- endif -%}"
           "{%- endfor -%}[{{ strftime_now('%Y') | length }}]{{ ns.system | trim | upper }}"
           "{%- for m in messages if m.role != 'system' -%}{%- if loop.first -%}{{ '\n' }}"
           "{%- endif -%}{{ m.role | capitalize }}: {{ m.content | replace('\n', ' ') }}"
           "{{ {'n': loop.index} | tojson }}{% if not loop.last %}{{ eos_token }}{% endif %}"
           "{%- endfor -%}{{ messages | map(attribute='role') | join(',') }}"
           "{{ '%-5s|' % 'ok' }}{{ '{:>4}'.format(7) }}{{ (2 ** 10) * 3 - 1 }}"
           "{% if add_generation_prompt %}{{ '\nAssistant:' }}{% endif %}")


@pytest.mark.parametrize("template", [GEMMA_TEMPLATE, CHATML, TOOLISH])
def test_real_templates_render_exactly_as_llama_cpp_python_renders_them(template):
    expected = Jinja2ChatFormatter(template=template, eos_token="<eos>", bos_token="<bos>",
                                   add_generation_prompt=True)(messages=CONVERSATION).prompt
    assert ChatTemplates(2.0).render(template, CONVERSATION, "<bos>", "<eos>") == expected


def test_a_long_conversation_is_not_mistaken_for_a_hostile_template():
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 2000}
                for i in range(201)]             # 2 MB of messages: over the 1 MiB minimum
    text = ChatTemplates(2.0).render(GEMMA_TEMPLATE, messages, "<bos>", "<eos>")
    assert len(text) > 2_000_000


# -- request bodies: a 4xx in each dialect's shape, never a 500 ---------------------------------

GEMMA_VOCAB = 262144
CHAT = [{"role": "user", "content": "Hi"}]
BAD_BODIES = [
    # (path, body, status, param or message fragment)
    ("/v1/completions", {"prompt": [2, 651, GEMMA_VOCAB]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [2, 651, 2**63]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [2, 651, 2**31]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [2, -1]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [2, True]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [2, 651.0]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[2, 651]] * 9}, 400, "prompt"),   # over 8 choices
    ("/v1/completions", {"prompt": [[2, GEMMA_VOCAB + 5]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [2, 651, GEMMA_VOCAB], "stream": True}, 400, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "seed": 2**32}, 400, "seed"),
    ("/v1/completions", {"prompt": "Hi", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2**63}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "temperature": 10**400}, 400, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "top_p": -10**400}, 400, "top_p"),
    ("/v1/completions", {"prompt": "Hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "Hi", "stop": ["x" * 100_000]}, 400, "stop"),
    ("/v1/completions", {"prompt": "Hi", "stop": ["x"] * 1000}, 400, "stop"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"x": "junk"}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": [1, 2]}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": ["user"], "content": "Hi"}]}, 400,
     "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": {"a": 1}, "content": "Hi"}]}, 400,
     "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": {"text": "Hi"}}]}, 400,
     "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [1, 2]}]}, 400,
     "messages[0]"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "string",
                                                          "minLength": 10**9}}}},
     400, "response_format"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "string",
                                                          "maxLength": 100_000}}}},
     400, "response_format"),                    # 100,000 nested groups crashed llama.cpp
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"schema": {
            "type": "string", "pattern": "^" + "(" * 2000 + "a" + ")" * 2000 + "$"}}}},
     400, "response_format"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "array",
                                                          "minItems": 10**30}}}},
     400, "response_format"),
    ("/v1/chat/completions", {"messages": CHAT, "stream": True, "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"enum": []}}}}, 400, None),
    ("/v1/embeddings", {"input": [2, 651, 9]}, 400, "input"),
    ("/v1/embeddings", {"input": [[2, 651], [9]]}, 400, "input"),
    ("/api/generate", {"prompt": "Hi", "options": {"seed": 2**32}}, 400, "seed"),
    ("/api/generate", {"prompt": "Hi", "options": {"num_predict": 2**63}}, 400, "num_predict"),
    ("/api/generate", {"prompt": "Hi", "options": {"stop": [""]}}, 400, "stop"),
    ("/api/generate", {"prompt": "Hi", "context": [1, 2, 3]}, 400, "context"),
    ("/api/generate", {"prompt": "Hi", "format": {"type": "string", "maxLength": 10**6}}, 400,
     "format"),
    ("/api/generate", {"prompt": "Hi " * 3000, "raw": True}, 400, "context"),
    ("/api/chat", {"messages": [{"role": None, "content": "Hi"}]}, 400, "role"),
    ("/api/embed", {"input": [1, 2]}, 400, "input"),
    ("/api/v1/generate", {"prompt": "Hi", "top_k": 2**63}, 400, "top_k"),
    ("/api/v1/generate", {"prompt": "Hi", "seed": 2**32}, 400, "seed"),
    ("/api/v1/generate", {"prompt": "Hi " * 3000, "stream": True}, 400, None),
    ("/api/v1/generate", {"prompt": "Hi", "model": "nope", "stream": True}, 404, None),
    ("/api/deepseek/generate", {"prompt": "Hi", "n_ctx": 2**63}, 400, None),
    ("/api/deepseek/generate", {"prompt": "Hi", "n_ctx": 255}, 400, None),
    ("/api/deepseek/generate", {"prompt": "Hi", "top_k": 2**63}, 400, "top_k"),
    ("/api/deepseek/generate", {"prompt": "Hi", "max_tokens": 255, "n_ctx": 256,
                                "stream": True}, 400, None),
    ("/api/deepseek/generate", {"prompt": "Hi", "model": "nope", "stream": True}, 404, None),
]


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory, model_file, model_registry):
    """One app for the whole table: every row is refused before it holds a worker for long."""
    base = tmp_path_factory.mktemp("hostile-bodies")
    (base / "models").mkdir()
    os.symlink(model_file, base / "models" / MODEL_NAME)
    (base / "models" / "models_list.json").write_text(model_registry)
    app = create_app({"APP_ENV": "testing", "MODELS_DIR": str(base / "models"),
                      "DEEPSEEK_MODELS_DIR": str(base / "deepseek"), "LOG_DIR": str(base / "logs"),
                      "N_CTX": TEST_N_CTX, "MODEL_POOL_SIZE": 2, "MAX_WORKERS": 2})
    server = LiveServer(app)
    yield server
    server.stop()
    app.extensions["llm"].close()


@pytest.mark.parametrize("path,body,status,where", BAD_BODIES,
                         ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD_BODIES)])
def test_a_bad_body_is_a_4xx_in_the_dialects_shape(plain_server, path, body, status, where):
    body = {**body}
    if path in ("/api/generate", "/api/chat"):
        body.setdefault("stream", False)
    reply = requests.post(f"{plain_server.url}{path}", json=body, timeout=60)
    assert reply.status_code == status, reply.text[:300]
    assert reply.headers["Content-Type"].startswith("application/json")
    error = reply.json()["error"]
    if path.startswith("/v1/"):
        assert error["type"] == "invalid_request_error" and error["code"]
        text = f"{error['param']} {error['message']}"
    elif isinstance(error, str):                                     # Ollama's shape
        text = error
    else:
        assert error["code"] and error["message"]
        text = f"{error.get('param')} {error['message']}"
    if where:
        assert where in text
    assert wait_until(lambda: plain_server.backend.concurrency.snapshot().workers_busy == 0,
                      seconds=5)


def test_token_ids_in_the_vocabulary_are_served(plain_server):
    reply = requests.post(f"{plain_server.url}/v1/completions", timeout=60, json={
        "prompt": [[2, 651, GEMMA_VOCAB - 1]], "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == 3
