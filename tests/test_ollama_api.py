"""/api (Ollama's format) through the official `ollama` package, on a live server."""

from __future__ import annotations

import json

import ollama
import pytest
import requests

from conftest import MODEL_NAME

OLLAMA_NAME = "gemma-3-270m-q4_k_m:latest"
HELLO = [{"role": "user", "content": "Say hello."}]


def client_for(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=60)


def test_generate_answers_with_counts_and_durations(live):
    reply = client_for(live()).generate(model=OLLAMA_NAME, prompt="Why is the sky blue?",
                                        options={"num_predict": 12, "temperature": 0})
    assert reply.model == OLLAMA_NAME and reply.done and reply.response.strip()
    assert reply.done_reason in ("stop", "length") and 0 < reply.eval_count <= 12
    assert reply.prompt_eval_count > 0
    assert reply.total_duration >= reply.prompt_eval_duration + reply.eval_duration > 0
    assert reply.load_duration >= 0 and reply.created_at.endswith("Z")


def test_generate_raw_skips_the_template_and_streams_by_default(live):
    server = live()
    native = server.generate(prompt="The capital of France is", max_tokens=6, temperature=0,
                             seed=2, top_p=0.9).json()
    parts = list(client_for(server).generate(
        model=MODEL_NAME, prompt="The capital of France is", raw=True, stream=True,
        options={"num_predict": 6, "temperature": 0, "seed": 2}))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.response for p in parts) == native["text"]
    assert parts[-1].eval_count == native["usage"]["completion_tokens"]
    assert parts[-1].prompt_eval_count == native["usage"]["prompt_tokens"]


def test_chat_answers_in_the_assistant_role(live):
    server = live()
    reply = client_for(server).chat(model=OLLAMA_NAME, messages=HELLO,
                                    options={"num_predict": 16, "temperature": 0, "seed": 4})
    assert reply.message.role == "assistant" and reply.message.content.strip()
    assert "User:" not in reply.message.content and reply.done
    assert server.backend.stats.by_model()[MODEL_NAME]["succeeded"] == 1


def test_streamed_chat_reassembles_to_the_whole_reply(live):
    client = client_for(live())
    request = dict(model=OLLAMA_NAME, options={"num_predict": 24, "temperature": 0, "seed": 9},
                   messages=[{"role": "system", "content": "You are a geography teacher."},
                             {"role": "user", "content": "What is the capital of France?"}])
    whole = client.chat(**request)
    parts = list(client.chat(**request, stream=True))
    assert len(parts) > 2 and parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count and parts[-1].done_reason == whole.done_reason


def test_stream_is_ndjson_and_the_body_needs_no_content_type(live):
    server = live()
    # As in Ollama's own examples: curl -d '{…}' (sent as form-encoded, read as JSON all the same).
    reply = requests.post(f"{server.url}/api/chat", stream=True, timeout=60, data=json.dumps(
        {"messages": HELLO, "options": {"num_predict": 3}}),
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in reply.iter_lines() if line]
    assert lines[-1]["done"] is True and "eval_count" in lines[-1]


def test_format_json_output_parses(live):
    reply = client_for(live()).chat(
        model=OLLAMA_NAME, format="json",
        options={"num_predict": 48, "temperature": 0, "seed": 1},
        messages=[{"role": "user", "content": 'Reply with the JSON object {"answer": "yes"}.'}])
    assert reply.done_reason == "stop"
    assert isinstance(json.loads(reply.message.content), dict)


def test_embed_returns_one_vector_per_input(live):
    reply = client_for(live()).embed(model=OLLAMA_NAME, input=["The cat sat.", "Stocks fell."])
    assert [len(vector) for vector in reply.embeddings] == [640, 640]
    assert reply.embeddings[0] != reply.embeddings[1]
    assert reply.prompt_eval_count > 4 and reply.model == OLLAMA_NAME


def test_embed_truncates_long_input_by_default_and_refuses_it_when_asked(live):
    server = live(N_CTX=64)
    client = client_for(server)
    assert len(client.embed(model=OLLAMA_NAME, input="word " * 200).embeddings[0]) == 640
    with pytest.raises(ollama.ResponseError) as caught:
        client.embed(model=OLLAMA_NAME, input="word " * 200, truncate=False)
    assert caught.value.status_code == 400 and "64" in caught.value.error


def test_list_show_and_version(live):
    server = live()
    client = client_for(server)
    listed = client.list().models
    assert [m.model for m in listed] == [OLLAMA_NAME]
    assert listed[0].size == (server.backend.models.resolve(MODEL_NAME).size_bytes)
    assert listed[0].details.family == "gemma3" and listed[0].details.quantization_level == "Q4_K_M"
    shown = client.show(OLLAMA_NAME)
    assert shown.modelinfo["general.architecture"] == "gemma3"
    assert shown.modelinfo["gemma3.embedding_length"] == 640
    assert shown.details.parameter_size == "270M" and "completion" in shown.capabilities
    assert client.show(MODEL_NAME).modelinfo == shown.modelinfo       # either name works
    assert requests.get(f"{server.url}/api/version", timeout=10).json()["version"]


def test_ps_lists_models_with_loaded_instances(live):
    client = client_for(live())
    assert client.ps().models == []
    client.generate(model=OLLAMA_NAME, prompt="Hi", options={"num_predict": 1})
    running = client.ps().models
    assert [m.model for m in running] == [OLLAMA_NAME]
    assert running[0].size > 0 and running[0].context_length == 1024


def test_delete_removes_the_model_and_its_instances(live):
    server = live()
    client = client_for(server)
    client.generate(model=OLLAMA_NAME, prompt="Hi", options={"num_predict": 1})
    assert client.delete(OLLAMA_NAME).status == "success"
    assert client.list().models == [] and client.ps().models == []
    with pytest.raises(ollama.ResponseError) as caught:
        client.delete(OLLAMA_NAME)
    assert caught.value.status_code == 404 and "not found" in caught.value.error


def test_errors_keep_their_status_in_ollama_shape(live):
    server = live()
    client = client_for(server)
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="no-such-model:latest", messages=HELLO)
    assert caught.value.status_code == 404
    reply = requests.post(f"{server.url}/api/generate", timeout=30,
                          json={"prompt": "hi", "options": {"mirostat": 2}})
    assert reply.status_code == 400 and set(reply.json()) == {"error"}
    assert "mirostat" in reply.json()["error"]


def test_an_empty_prompt_reports_the_model_loaded(live):
    reply = client_for(live()).generate(model=OLLAMA_NAME)
    assert reply.done and reply.done_reason == "load" and reply.response == ""
