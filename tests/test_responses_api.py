"""/v1/responses through the openai package (`client.responses.create`) and LangChain's
`ChatOpenAI(use_responses_api=True)`, on one live server for the module (the mid-stream failure
needs a server of its own)."""

from __future__ import annotations

import json

import openai
import pytest
import requests
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from conftest import LONG, MODEL_NAME, LiveServer, instances_in_use, wait_until

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"], "additionalProperties": False}}
# LangChain's bind_tools takes chat's shape and sends the flat one above.
WEATHER_CHAT = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
PARIS = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(module_server):
    return module_server


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def create(server, **request):
    """A greedy, seeded response (two unseeded requests may differ under batching)."""
    request.setdefault("temperature", 0)
    request.setdefault("extra_body", {"seed": 7})
    return client_for(server).responses.create(model=MODEL_NAME, **request)


def test_a_string_input_gets_a_response_with_text_and_usage(server):
    reply = create(server, input=PARIS, instructions="Answer in one short sentence.",
                   max_output_tokens=24)
    assert reply.object == "response" and reply.id.startswith("resp_")
    assert reply.model == MODEL_NAME and reply.created_at > 0
    [message] = reply.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    text = reply.output_text
    assert text.strip() and text == message.content[0].text and text == text.lstrip()
    assert "User:" not in text
    usage = reply.usage
    assert 0 < usage.output_tokens <= 24
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0
    if reply.status == "completed":
        assert reply.incomplete_details is None and message.status == "completed"
    else:
        assert (reply.status, reply.incomplete_details.reason) == ("incomplete",
                                                                   "max_output_tokens")
        assert usage.output_tokens == 24
    assert reply.instructions == "Answer in one short sentence."
    assert reply.max_output_tokens == 24 and reply.temperature == 0
    assert reply.tools == [] and reply.tool_choice == "auto" and reply.parallel_tool_calls
    bare = create(server, input=PARIS, max_output_tokens=1)
    assert usage.input_tokens > bare.usage.input_tokens      # the instructions were read


def test_the_reply_is_the_chat_completion_of_the_same_messages(server):
    items = [{"role": "system", "content": "You are a geography teacher."},
             {"role": "user", "content": [{"type": "input_text", "text": "Hello."}]},
             {"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": "Hello! Ask me anything.",
                           "annotations": []}]},
             {"role": "user", "content": PARIS}]
    reply = create(server, input=items, max_output_tokens=24)
    chat = client_for(server).chat.completions.create(
        model=MODEL_NAME, temperature=0, seed=7, max_tokens=24,
        messages=[{"role": "system", "content": "You are a geography teacher."},
                  {"role": "user", "content": "Hello."},
                  {"role": "assistant", "content": "Hello! Ask me anything."},
                  {"role": "user", "content": PARIS}])
    assert reply.output_text and reply.output_text == chat.choices[0].message.content
    assert reply.usage.input_tokens == chat.usage.prompt_tokens
    assert reply.usage.output_tokens == chat.usage.completion_tokens


def test_a_stream_sends_the_events_in_order_and_its_deltas_make_the_text(server):
    request = dict(input=PARIS, instructions="Answer in one short sentence.",
                   max_output_tokens=24)
    events = list(create(server, stream=True, **request))
    kinds = [event.type for event in events]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    end = "response.completed" if kinds[-1] == "response.completed" else "response.incomplete"
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", end]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    text = "".join(e.delta for e in deltas)
    assert text.strip() and len(deltas) > 1
    assert text == events[-4].text == final.output_text
    assert events[-2].item.content[0].text == text
    assert len({e.item_id for e in deltas} | {final.output[0].id}) == 1
    assert final.usage.output_tokens >= len(deltas)
    assert final.output_text == create(server, **request).output_text
    with client_for(server).responses.stream(model=MODEL_NAME, temperature=0,
                                             extra_body={"seed": 7}, **request) as helper:
        assert helper.get_final_response().output_text == text    # the SDK's accumulator
    raw = requests.post(f"{server.url}/v1/responses", stream=True, timeout=60,
                        json={"model": MODEL_NAME, "stream": True, **request})
    lines = [line for line in raw.iter_lines(decode_unicode=True)
             if line and not line.startswith(":")]            # not heartbeats
    assert len(lines) % 2 == 0 and lines[0] == "event: response.created"
    assert all(name == f"event: {json.loads(data[len('data: '):])['type']}"
               for name, data in zip(lines[::2], lines[1::2]))    # each data line named


def test_max_output_tokens_cuts_the_reply_and_the_response_is_incomplete(server):
    request = dict(input="Count from one to one hundred: 1, 2, 3,", max_output_tokens=3)
    reply = create(server, **request)
    assert reply.status == "incomplete"
    assert reply.incomplete_details.reason == "max_output_tokens"
    assert reply.output[0].status == "incomplete" and reply.usage.output_tokens == 3
    events = list(create(server, stream=True, **request))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == reply.output_text


def test_a_required_function_tool_is_called_and_its_result_answered(server):
    first = create(server, input="What is the weather in Paris?", tools=[WEATHER],
                   tool_choice="required", parallel_tool_calls=False, max_output_tokens=48)
    assert first.status == "completed"
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.status == "completed" and call.id.startswith("fc_")
    assert call.call_id.startswith("call_")
    arguments = json.loads(call.arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)
    assert first.output_text == "" and first.tools[0].name == "get_weather"
    history = [{"role": "user", "content": "What is the weather in Paris?"},
               call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id,
                "output": "18 degrees Celsius and sunny"}]
    second = create(server, input=history, tools=[WEATHER], tool_choice="none",
                    max_output_tokens=32)
    assert second.output[0].type == "message" and second.output_text.strip()
    alone = create(server, input=history[:1], tools=[WEATHER], tool_choice="none",
                   max_output_tokens=1)
    assert second.usage.input_tokens > alone.usage.input_tokens   # the call and its result


def test_a_named_function_call_streams_as_function_call_events(server):
    request = dict(input="Weather in Rome, please.", tools=[WEATHER], max_output_tokens=48,
                   tool_choice={"type": "function", "name": "get_weather"})
    events = list(create(server, stream=True, **request))
    kinds = [event.type for event in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta",
                     "response.function_call_arguments.done", "response.output_item.done",
                     "response.completed"]
    added, delta, done, item_done, completed = events[2:]
    assert added.item.type == "function_call" and added.item.name == "get_weather"
    assert delta.delta == done.arguments == item_done.item.arguments
    assert json.loads(done.arguments)["city"]
    whole = create(server, **request)
    assert completed.response.output[0].arguments == whole.output[0].arguments
    assert completed.response.output[0].call_id == item_done.item.call_id
    with client_for(server).responses.stream(model=MODEL_NAME, temperature=0,
                                             extra_body={"seed": 7}, **request) as helper:
        [call] = helper.get_final_response().output
    assert (call.name, call.arguments) == ("get_weather", whole.output[0].arguments)


def test_json_schema_text_format_output_parses(server):
    schema = {"type": "object", "properties": {"capital": {"type": "string"}},
              "required": ["capital"], "additionalProperties": False}
    reply = create(server, input=PARIS, max_output_tokens=32,
                   text={"format": {"type": "json_schema", "name": "answer", "schema": schema,
                                    "strict": True}})
    assert reply.status == "completed"
    assert set(json.loads(reply.output_text)) == {"capital"}
    assert reply.text.format.type == "json_schema"


def test_bookkeeping_fields_are_accepted_and_metadata_echoed(server):
    reply = create(server, input="Hi", max_output_tokens=4, store=True, metadata={"run": "7"},
                   user="u1", service_tier="auto", truncation="auto", include=[],
                   reasoning={"effort": "low"}, prompt_cache_key="k", safety_identifier="s",
                   parallel_tool_calls=False, top_p=0.5)
    assert reply.metadata == {"run": "7"} and reply.parallel_tool_calls is False
    assert reply.top_p == 0.5 and reply.output_text.strip()


def test_langchain_chat_openai_with_the_responses_api(server):
    model = ChatOpenAI(model=MODEL_NAME, base_url=f"{server.url}/v1", api_key="unused",
                       use_responses_api=True, temperature=0, max_tokens=16, max_retries=0,
                       extra_body={"seed": 3})
    reply = model.invoke(PARIS)
    assert reply.text.strip() and reply.response_metadata["id"].startswith("resp_")
    assert reply.usage_metadata["output_tokens"] <= 16
    streamed = "".join(chunk.text for chunk in model.stream(PARIS))
    assert streamed == reply.text
    caller = model.model_copy(update={"max_tokens": 48})     # room for a whole call
    calls = caller.bind_tools([WEATHER_CHAT], tool_choice="get_weather").invoke("Weather in Oslo?")
    [call] = calls.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"]["city"], str)
    chunks = list(caller.bind_tools([WEATHER_CHAT], tool_choice="get_weather").stream(
        "Weather in Oslo?"))
    streamed_call = sum(chunks[1:], chunks[0]).tool_calls
    assert [(c["name"], c["args"]) for c in streamed_call] == [(call["name"], call["args"])]


def test_langchain_structured_output_through_the_responses_api(server):
    class Capital(BaseModel):
        city: str

    model = ChatOpenAI(model=MODEL_NAME, base_url=f"{server.url}/v1", api_key="unused",
                       use_responses_api=True, temperature=0, max_tokens=32, max_retries=0,
                       extra_body={"seed": 3})
    answer = model.with_structured_output(Capital, method="json_schema").invoke(PARIS)
    assert isinstance(answer, Capital) and answer.city.strip()


BAD = [
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0]", "only function tools"),
    ({"input": 42}, "input", "string or array"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0]", "not supported"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "does not store"),
    ({"input": "Hi", "previous_response_id": "resp_1"}, "previous_response_id",
     "does not store"),
    ({"input": "Hi", "temperature": "hot"}, "temperature", "number"),
    ({"input": "Hi", "max_output_tokens": 0}, "max_output_tokens", ">= 1"),
    ({"input": "Hi", "text": {"format": {"type": "xml"}}}, "text.format.type", "json_schema"),
    ({"input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice", "not one of the tools"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "[1]"}]},
     "input[0].arguments", "JSON object"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f",      # not a 500
                 "arguments": '{"a": ' * 50_000 + "1" + "}" * 50_000}]},
     "input[0].arguments", "nested at most 64 deep"),
    ({"input": "Hi", "max_output_tokens": 5, "reasoning_effort": "low"}, "reasoning_effort",
     "unknown field"),
]


@pytest.mark.parametrize("body,param,words", BAD, ids=[p for _, p, _ in BAD])
def test_a_bad_request_raises_bad_request_error_naming_the_field(server, body, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(server).responses.create(model=MODEL_NAME, extra_body=body)
    error = caught.value.body
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_a_client_that_leaves_mid_stream_stops_the_generation(server):
    reply = requests.post(f"{server.url}/v1/responses", stream=True, timeout=60, json={
        "input": LONG["prompt"], "max_output_tokens": 500, "temperature": 0, "stream": True})
    lines = reply.iter_lines(decode_unicode=True)
    deltas = 0
    while deltas < 3:
        deltas += '"response.output_text.delta"' in next(lines)
    reply.close()
    logged = server.logged_request(reply.headers["X-Request-ID"])
    assert (logged["status"], logged["error"]) == (200, "client_disconnected")
    assert wait_until(lambda: instances_in_use(server) == 0, seconds=5)


def test_a_failure_mid_stream_raises_in_the_client(make_app):
    live = LiveServer(make_app(REQUEST_TIMEOUT=1, N_CTX=2048))
    try:
        stream = client_for(live).responses.create(
            model=MODEL_NAME, input=LONG["prompt"], max_output_tokens=1500, temperature=0,
            stream=True)
        seen = []
        with pytest.raises(openai.APIError) as caught:
            for event in stream:
                seen.append(event.type)
        assert seen[:2] == ["response.created", "response.in_progress"]
        assert "response.completed" not in seen
        assert caught.value.body["code"] == "generation_timeout"
        raw = requests.post(f"{live.url}/v1/responses", stream=True, timeout=60, json={
            "input": LONG["prompt"], "max_output_tokens": 1500, "temperature": 0,
            "stream": True})
        last = json.loads([line for line in raw.iter_lines(decode_unicode=True)
                           if line.startswith("data: ")][-1][len("data: "):])
        assert last["type"] == "error" and last["code"] == "generation_timeout"
        assert last["message"] and last["sequence_number"] > 1
    finally:
        live.stop()
