"""/v1's fields through the official `openai` package on one live server: n and several
prompts, logprobs, echo, the extension fields (top_k, …), the ignored OpenAI fields, the bounds,
embeddings' token ids and dimensions, tool-call reply shapes, and errors in OpenAI's shape."""

from __future__ import annotations

import json
import math

import openai
import pytest
import requests

from conftest import MODEL_NAME, TEST_N_CTX
from services.dialects.openai_request import MAX_CHOICES, parse_chat

HELLO = [{"role": "user", "content": "Say hello."}]
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(module_server):
    """One live server for the module: the model loads once."""
    return module_server


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def sse_events(reply: requests.Response) -> list[dict]:
    """The JSON events of an OpenAI stream, after checking that it ends with [DONE]."""
    lines = [line for line in reply.iter_lines(decode_unicode=True) if line]
    assert lines[-1] == "data: [DONE]", lines[-1]
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def post(server, path: str, **body) -> requests.Response:
    return requests.post(f"{server.url}/v1/{path}", json={"model": MODEL_NAME, **body},
                         timeout=120)


# --- n and several prompts ----------------------------------------------------------------

def test_n_gives_that_many_choices_and_counts_the_prompt_once(client):
    one = client.chat.completions.create(model=MODEL_NAME, messages=CAPITAL, max_tokens=12,
                                         temperature=0, seed=4)
    two = client.chat.completions.create(model=MODEL_NAME, messages=CAPITAL, max_tokens=12,
                                         temperature=0, seed=4, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.message.content for c in two.choices] == [one.choices[0].message.content] * 2
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.usage.completion_tokens == 2 * one.usage.completion_tokens
    assert two.usage.total_tokens == two.usage.prompt_tokens + two.usage.completion_tokens


def test_streamed_n_carries_each_choices_index(client):
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=CAPITAL, max_tokens=12, temperature=0.9, seed=5, n=2,
        stream=True, stream_options={"include_usage": True}))
    texts, finished = {0: "", 1: ""}, {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert set(finished) == {0, 1} and all(text.strip() for text in texts.values())
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_a_list_of_prompts_gives_one_choice_each_in_order(client):
    prompts = ["The capital of France is", "One, two, three,"]
    alone = [client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=6, temperature=0,
                                       seed=2).choices[0].text for p in prompts]
    both = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=6,
                                     temperature=0, seed=2, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [alone[0], alone[0], alone[1], alone[1]]


def test_streamed_prompts_list_reaches_every_index(server):
    reply = requests.post(f"{server.url}/v1/completions", stream=True, timeout=120, json={
        "prompt": ["Hello", "Goodbye"], "max_tokens": 3, "stream": True, "temperature": 0})
    events = sse_events(reply)
    assert {c["index"] for e in events for c in e["choices"] if c["finish_reason"]} == {0, 1}


@pytest.mark.parametrize("path, body", [
    ("chat/completions", {"messages": HELLO, "n": MAX_CHOICES + 1}),
    ("completions", {"prompt": ["a", "b", "c"], "n": 3}),
])
def test_too_many_choices_is_a_400_naming_n(server, path, body):
    reply = post(server, path, max_tokens=2, **body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "n"


# --- logprobs and echo ----------------------------------------------------------------------

def test_chat_logprobs_parse_into_the_openai_types(client):
    reply = client.chat.completions.create(model=MODEL_NAME, messages=CAPITAL, max_tokens=8,
                                           temperature=0, seed=1, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content).strip() == choice.message.content.strip()
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token     # greedy: the likeliest
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    streamed = list(client.chat.completions.create(
        model=MODEL_NAME, messages=CAPITAL, max_tokens=8, temperature=0, seed=1, logprobs=True,
        top_logprobs=3, stream=True))
    pieces = [t for c in streamed if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 3)) for t in pieces] == \
        [(t.token, round(t.logprob, 3)) for t in content]


def test_completion_logprobs_parse_into_the_openai_types(client):
    reply = client.completions.create(model=MODEL_NAME, prompt="The capital of France is",
                                      max_tokens=6, temperature=0, seed=1, logprobs=2)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset[0] == 0 and len(logprobs.token_logprobs) == len(logprobs.tokens)
    assert all(len(top) <= 2 and max(top.values()) >= lp - 1e-4
               for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))


def test_echo_repeats_the_prompt_and_scores_it(client):
    prompt = "The capital of France is"
    plain = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4,
                                      temperature=0, seed=1)
    echoed = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4,
                                       temperature=0, seed=1, echo=True, logprobs=1)
    choice = echoed.choices[0]
    assert choice.text == prompt + plain.choices[0].text
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.token_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    scored = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True,
                                       logprobs=0)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert "".join(scored.choices[0].logprobs.tokens) == prompt


def test_streamed_echo_and_logprobs_match_the_whole_reply(client):
    request = dict(model=MODEL_NAME, prompt="One, two, three,", max_tokens=5, temperature=0,
                   seed=3, logprobs=1)
    for echo in (False, True):
        whole = client.completions.create(**request, echo=echo).choices[0]
        chunks = list(client.completions.create(**request, echo=echo, stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        offsets = [o for c in chunks if c.choices[0].logprobs
                   for o in c.choices[0].logprobs.text_offset]
        assert (text, tokens, offsets) == (whole.text, whole.logprobs.tokens,
                                           whole.logprobs.text_offset)
        assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_echo_of_token_ids_is_their_text(client, model_file):
    import llama_cpp

    prompt = "The capital of France is"
    vocab = llama_cpp.Llama(model_path=str(model_file), vocab_only=True, verbose=False)
    ids = vocab.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
    echoed = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=0, echo=True,
                                       logprobs=0).choices[0]
    as_text = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0,
                                        echo=True, logprobs=0).choices[0]
    assert echoed.text == as_text.text == prompt == "".join(echoed.logprobs.tokens)
    assert echoed.logprobs.token_logprobs == pytest.approx(as_text.logprobs.token_logprobs,
                                                           abs=1e-3)
    assert len(echoed.logprobs.tokens) == len(ids) and echoed.logprobs.token_logprobs[0] is None


def test_max_tokens_zero_without_echo_is_a_400(server):
    reply = post(server, "completions", prompt="Hi", max_tokens=0)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"


# --- extension fields, ignored fields, bounds ----------------------------------------------

def test_top_k_from_extra_body_is_applied(client):
    request = dict(model=MODEL_NAME, messages=CAPITAL, max_tokens=24, seed=9)
    greedy = client.chat.completions.create(**request, temperature=0)
    top1 = client.chat.completions.create(**request, temperature=2, extra_body={"top_k": 1})
    wild = client.chat.completions.create(**request, temperature=2)
    assert top1.choices[0].message.content == greedy.choices[0].message.content
    assert wild.choices[0].message.content != greedy.choices[0].message.content


def test_extension_fields_reach_the_sampling():
    sampling = parse_chat({"messages": HELLO, "top_k": 3, "min_p": 0.1, "typical_p": 0.9,
                           "repetition_penalty": 1.2}, TEST_N_CTX).sampling
    assert (sampling.top_k, sampling.min_p, sampling.typical_p, sampling.repeat_penalty) == \
        (3, 0.1, 0.9, 1.2)
    defaults = parse_chat({"messages": HELLO}, TEST_N_CTX).sampling
    assert (defaults.min_p, defaults.repeat_penalty, defaults.typical_p) == (0.0, 1.0, 1.0)


def test_ignored_openai_fields_are_accepted_and_change_nothing(client):
    request = dict(model=MODEL_NAME, messages=HELLO, max_tokens=10, temperature=0, seed=6)
    plain = client.chat.completions.create(**request)
    busy = client.chat.completions.create(
        **request, reasoning_effort="low", service_tier="auto", store=False, verbosity="low",
        metadata={"team": "x"}, user="u1", prompt_cache_key="k", safety_identifier="s",
        logit_bias={"50256": -100}, modalities=["text"], web_search_options={},
        prediction={"type": "content", "content": "Hello"}, parallel_tool_calls=True,
        extra_body={"cache_prompt": True, "chat_template_kwargs": {}})
    assert busy.choices[0].message.content == plain.choices[0].message.content
    completion = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3,
                                           best_of=2, suffix="!", user="u1",
                                           logit_bias={"1": 5})
    assert completion.choices[0].text is not None


@pytest.mark.parametrize("field, value", [
    ("typical_p", 1.5), ("min_p", -0.1), ("repeat_penalty", 11), ("repetition_penalty", 20),
    ("top_k", -1), ("top_logprobs", 21), ("n", 0), ("reasoning_effort", 3),
])
def test_out_of_range_or_mistyped_fields_are_400_with_param(client, field, value):
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=2,
                                       extra_body={field: value, **extra})
    assert caught.value.param == field and isinstance(caught.value.body["message"], str)


def test_completion_logprobs_over_five_is_a_400(server):
    reply = post(server, "completions", prompt="Hi", max_tokens=2, logprobs=6)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "logprobs"


def test_an_unknown_field_is_refused_as_openai_refuses_it(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL_NAME, messages=HELLO, max_tokens=2,
                                       extra_body={"max_token": 3})
    assert caught.value.param == "max_token"


# --- embeddings -------------------------------------------------------------------------------

@pytest.mark.parametrize("ids", [[9906, 1917], [[9906, 1917], [15339]]])
def test_embedding_token_ids_are_a_400_that_says_what_to_change(client, ids):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL_NAME, input=ids)
    assert caught.value.param == "input"
    assert "tokenizer" in caught.value.message
    assert "check_embedding_ctx_length=False" in caught.value.message


def test_langchain_embeddings_sending_texts_work(server):
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(base_url=f"{server.url}/v1", api_key="unused",
                                  model=MODEL_NAME, check_embedding_ctx_length=False,
                                  max_retries=0)
    vectors = embeddings.embed_documents(["first text", "second text"])
    assert [len(v) for v in vectors] == [640, 640] and vectors[0] != vectors[1]


def test_embedding_dimensions_shorten_and_renormalise(client):
    full = client.embeddings.create(model=MODEL_NAME, input="The cat sat.").data[0].embedding
    short = client.embeddings.create(model=MODEL_NAME, input="The cat sat.",
                                     dimensions=8).data[0].embedding
    assert len(short) == 8 and math.isclose(sum(x * x for x in short), 1.0, rel_tol=1e-3)
    norm = math.sqrt(sum(x * x for x in full[:8]))
    assert short == pytest.approx([x / norm for x in full[:8]], abs=1e-5)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL_NAME, input="x", dimensions=len(full) + 1)
    assert caught.value.param == "dimensions"


# --- tool calls: the raw shapes -------------------------------------------------------------

def test_a_forced_tool_call_comes_in_openais_message_shape(server):
    reply = post(server, "chat/completions", max_tokens=48, temperature=0, seed=1, tools=[WEATHER],
                 tool_choice="required", parallel_tool_calls=False,
                 messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] is None
    [call] = message["tool_calls"]
    assert set(call) == {"id", "type", "function"} and call["id"].startswith("call_")
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)


def test_a_streamed_tool_call_comes_in_openais_chunk_shape(server, client):
    body = {"model": MODEL_NAME, "max_tokens": 48, "temperature": 0, "seed": 1,
            "tools": [WEATHER], "messages": [{"role": "user", "content": "Weather in Rome?"}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    events = sse_events(requests.post(f"{server.url}/v1/chat/completions", timeout=120,
                                      stream=True, json={**body, "stream": True}))
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    calls = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    assert calls[0] == [{"index": 0, "id": calls[0][0]["id"], "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]
    assert calls[1][0]["index"] == 0 and set(calls[1][0]) == {"index", "function"}
    json.loads(calls[1][0]["function"]["arguments"])
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    with client.chat.completions.stream(**body) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)
    assert final.choices[0].finish_reason == "tool_calls"


def test_legacy_functions_get_a_function_call_reply(server):
    reply = post(server, "chat/completions", max_tokens=48, temperature=0, seed=1,
                 functions=[WEATHER["function"]], function_call={"name": "get_weather"},
                 messages=[{"role": "user", "content": "Weather in Oslo?"}])
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"]["name"] == "get_weather"
    assert "tool_calls" not in choice["message"]
    events = sse_events(requests.post(
        f"{server.url}/v1/chat/completions", timeout=120, stream=True, json={
            "max_tokens": 48, "temperature": 0, "seed": 1, "stream": True,
            "functions": [WEATHER["function"]], "function_call": {"name": "get_weather"},
            "messages": [{"role": "user", "content": "Weather in Oslo?"}]}))
    calls = [e["choices"][0]["delta"]["function_call"] for e in events
             if e["choices"][0]["delta"].get("function_call")]
    assert calls[0] == {"name": "get_weather", "arguments": ""}
    assert json.loads(calls[1]["arguments"]) == \
        json.loads(choice["message"]["function_call"]["arguments"])
    assert events[-1]["choices"][0]["finish_reason"] == "function_call"


def test_tools_with_no_call_needed_still_answer_in_text(server):
    reply = post(server, "chat/completions", max_tokens=12, temperature=0, seed=1,
                 tools=[WEATHER], tool_choice="none", messages=HELLO)
    choice = reply.json()["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and choice["message"]["content"]
    assert "tool_calls" not in choice["message"]


def test_the_docs_page_marks_the_ignored_fields(server):
    page = requests.get(f"{server.url}/", timeout=30).text
    assert "ignored: for OpenAI&#39;s reasoning models" in page or \
        "ignored: for OpenAI's reasoning models" in page
    assert "vLLM&#39;s name for repeat_penalty" in page or "vLLM's name for repeat_penalty" in page


# --- errors in OpenAI's shape ---------------------------------------------------------------

def test_an_unknown_v1_route_and_a_wrong_method_raise_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.post("/no-such-route", cast_to=object, body={})
    assert isinstance(caught.value.message, str) and caught.value.body["type"]
    assert isinstance(caught.value.body["message"], str)
    with pytest.raises(openai.APIStatusError) as caught:
        client.get("/chat/completions", cast_to=object)
    assert caught.value.status_code == 405 and isinstance(caught.value.body["message"], str)
