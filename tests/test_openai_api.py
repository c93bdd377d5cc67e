"""/v1 through the official `openai` package and LangChain's ChatOpenAI, on a live server."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from conftest import MODEL_NAME

# Short answers end on their own at temperature 0 ("Hello." for this prompt).
HELLO = [{"role": "user", "content": "Say hello."}]


def client_for(server, api_key: str = "unused") -> openai.OpenAI:
    # The openai client retries 429 and 5xx by default; a test wants the first answer.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def test_models_lists_the_gguf_models(live):
    models = client_for(live()).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].object == "model" and models.data[0].created > 0


def test_completion_continues_the_prompt_as_is(live):
    server = live()
    reply = client_for(server).completions.create(
        model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0, seed=1)
    native = server.generate(prompt="The capital of France is", max_tokens=8, temperature=0,
                             seed=1, repeat_penalty=1.0, top_p=1.0).json()
    assert reply.object == "text_completion" and reply.model == MODEL_NAME
    assert reply.choices[0].text == native["text"]
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == native["usage"]["prompt_tokens"]
    assert reply.usage.completion_tokens == native["usage"]["completion_tokens"] <= 8


def test_chat_answers_and_counts_tokens(live):
    server = live()
    reply = client_for(server).chat.completions.create(
        model=MODEL_NAME, messages=HELLO, max_tokens=16, temperature=0, seed=3)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    content = choice.message.content
    assert content.strip() and content == content.lstrip()
    assert "User:" not in content      # stopped where the next turn begins
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    usage = server.backend.stats.by_model()[MODEL_NAME]
    assert usage["succeeded"] == 1 and usage["completion_tokens"] == reply.usage.completion_tokens


def test_streamed_chat_reassembles_to_the_whole_reply(live):
    client = client_for(live())
    request = dict(model=MODEL_NAME, temperature=0, seed=11, max_tokens=24,
                   messages=[{"role": "system", "content": "You are a geography teacher."},
                             {"role": "user", "content": "What is the capital of France?"}])
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text.strip()
    finishing = [c.choices[0].finish_reason for c in chunks
                 if c.choices and c.choices[0].finish_reason]
    assert finishing == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_stream_ends_with_done(live):
    server = live()
    reply = requests.post(f"{server.url}/v1/completions", stream=True, timeout=60,
                          json={"prompt": "Hello", "max_tokens": 3, "stream": True})
    lines = [line for line in reply.iter_lines(decode_unicode=True) if line]
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "text_completion" for e in events)


def test_embeddings_have_the_models_dimension(live):
    server = live()
    client = client_for(server)
    reply = client.embeddings.create(model=MODEL_NAME, input=["The cat sat.", "Stocks fell."])
    n_embd = server.backend.model_admin.metadata(MODEL_NAME)["gemma3.embedding_length"]
    assert [len(item.embedding) for item in reply.data] == [n_embd, n_embd] == [640, 640]
    assert [item.index for item in reply.data] == [0, 1]
    assert abs(sum(x * x for x in reply.data[0].embedding) - 1.0) < 1e-3   # normalised
    assert reply.usage.prompt_tokens == reply.usage.total_tokens > 4
    floats = client.embeddings.create(model=MODEL_NAME, input="The cat sat.",
                                      encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(reply.data[0].embedding, abs=1e-6)
    loaded = {m.name for m in server.backend.pool.loaded_models()}
    assert f"{MODEL_NAME}#embedding" in loaded


def test_an_embedding_input_over_the_context_is_a_400(live):
    server = live(N_CTX=64)
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).embeddings.create(model=MODEL_NAME, input="word " * 200)
    assert caught.value.code == "context_length_exceeded"


def test_json_mode_output_parses(live):
    client = client_for(live())
    reply = client.chat.completions.create(
        model=MODEL_NAME, temperature=0, seed=1, max_tokens=48,
        messages=[{"role": "user", "content": 'Reply with the JSON object {"answer": "yes"}.'}],
        response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_json_schema_output_parses_and_matches(live):
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = client_for(live()).chat.completions.create(
        model=MODEL_NAME, temperature=0, seed=1, max_tokens=48,
        messages=[{"role": "user", "content": "Describe Ada, aged 36, as JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema}})
    person = json.loads(reply.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int)


@pytest.mark.parametrize("bad, param", [
    ({"n": 9}, "n"),                      # more choices than the bound (8)
    ({"temperature": 5}, "temperature"),
    ({"extra_body": {"max_token": 3}}, "max_token"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]"),
])
def test_a_bad_request_raises_bad_request_error(live, bad, param):
    request = {"model": MODEL_NAME, "messages": HELLO, "max_tokens": 4, **bad}
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(live()).chat.completions.create(**request)
    error = caught.value
    assert error.status_code == 400 and error.param == param
    assert error.body["type"] == "invalid_request_error" and error.body["message"]


def test_unknown_model_is_a_404_in_openai_shape(live):
    server = live()
    reply = requests.post(f"{server.url}/v1/chat/completions", timeout=30,
                          json={"model": "no-such-model", "messages": HELLO})
    assert reply.status_code == 404
    assert reply.json() == {"error": {"message": reply.json()["error"]["message"],
                                      "type": "invalid_request_error", "param": None,
                                      "code": "model_not_found"}}
    with pytest.raises(openai.NotFoundError):
        client_for(server).models.retrieve("no-such-model")


def test_a_full_server_raises_rate_limit_error(live):
    server = live(MAX_CONCURRENT_REQUESTS=1)
    busy = server.stream(prompt="Count from one to one thousand: 1, 2, 3,", max_tokens=800,
                         temperature=0)
    lines = busy.iter_lines()    # kept: dropping the iterator closes the connection (a disconnect)
    next(line for line in lines if line)                    # it holds the only admission slot
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            client_for(server).chat.completions.create(model=MODEL_NAME, messages=HELLO)
        assert int(caught.value.response.headers["Retry-After"]) >= 1
        assert caught.value.code == "too_many_requests"
    finally:
        busy.close()


def test_api_keys_apply_and_a_wrong_key_raises_authentication_error(live):
    server = live(API_KEYS="sk-local-1")
    with pytest.raises(openai.AuthenticationError):
        client_for(server, api_key="sk-wrong").models.list()
    reply = client_for(server, api_key="sk-local-1").chat.completions.create(
        model=MODEL_NAME, messages=HELLO, max_tokens=4, temperature=0)
    assert reply.choices[0].message.content


def test_langchain_chat_openai_answers(live):
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    server = live()
    chat = ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused", model=MODEL_NAME,
                      temperature=0, max_tokens=16, max_retries=0, timeout=60)
    answer = chat.invoke([SystemMessage("You are brief."), HumanMessage("Say hello.")])
    assert isinstance(answer, AIMessage) and answer.content.strip()
    assert answer.usage_metadata["output_tokens"] > 0
    streamed = "".join(chunk.content for chunk in chat.stream([HumanMessage("Say hello.")]))
    assert streamed.strip()
