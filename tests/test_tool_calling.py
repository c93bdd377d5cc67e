"""Tool calling through a live server, as agents use it: instructor, LangChain's bind_tools, an
agent loop and streamed calls through the openai client, and a model whose own chat template
renders the tools.

The default model (Gemma 3 270M, a base model) gets the generic layout; a copy of it carries a
Hermes-style template. A forced call is grammar-constrained, so even this tiny model's calls
parse against their schemas; what it puts in them is not asserted unless it is reliable.
"""

from __future__ import annotations

import json

import instructor
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from conftest import MODEL_NAME, LiveServer, build_test_app
from templated_models import templated_dir, tried_copies
from test_tools_unit import HERMES_TEMPLATE

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server(model_file, tmp_path_factory):
    """One server for the module: the default model, and "hermes-tools" with its template."""
    directory = tmp_path_factory.mktemp("tool-models")
    registry = tried_copies(model_file, directory, {"hermes-tools": HERMES_TEMPLATE})
    base = tmp_path_factory.mktemp("tool-server")
    app = build_test_app(base, model_file, registry,
                         MODELS_DIR=templated_dir(directory, registry, base / "models"))
    live = LiveServer(app)
    yield live
    live.stop()
    app.extensions["llm"].close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def arguments(call) -> dict:
    """A call's arguments, which must be JSON text of an object."""
    parsed = json.loads(call.function.arguments)
    assert isinstance(parsed, dict)
    return parsed


class User(BaseModel):
    name: str = Field(max_length=24)
    age: int


def test_instructor_extracts_a_pydantic_object_in_tools_mode(client):
    extract = instructor.from_openai(client, mode=instructor.Mode.TOOLS)
    user = extract.chat.completions.create(
        model=MODEL_NAME, response_model=User, max_retries=0, max_tokens=48, temperature=0,
        seed=1, messages=[{"role": "user", "content": "Jason is 25 years old."}])
    assert isinstance(user, User)
    # Even the 270M model gets this one right (seeded: it runs alone, so always the same).
    assert (user.name, user.age) == ("Jason", 25)


class GetWeather(BaseModel):
    """Current weather in a city."""

    city: str = Field(max_length=24)


@pytest.mark.parametrize("tool_choice", ["GetWeather", "any"])
def test_langchain_bind_tools_returns_calls_that_parse(server, tool_choice):
    chat = ChatOpenAI(base_url=f"{server.url}/v1", api_key="x", model=MODEL_NAME, max_retries=0,
                      temperature=0, max_tokens=48)
    reply = chat.bind_tools([GetWeather], tool_choice=tool_choice).invoke(
        "What is the weather in Paris?")
    assert reply.tool_calls, reply
    for call in reply.tool_calls:
        assert call["name"] == "GetWeather" and call["id"].startswith("call_")
        GetWeather.model_validate(call["args"])


def test_an_agent_loop_through_the_openai_client(client):
    messages = list(ASK)
    first = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=48,
                                           tools=[WEATHER, CLOCK], tool_choice=FORCE_WEATHER,
                                           temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert set(arguments(call)) == {"city"}
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id,
                                  "content": "18 degrees and sunny"}]
    final = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24,
                                           tools=[WEATHER, CLOCK], tool_choice="none",
                                           temperature=0)
    answer = final.choices[0]
    assert answer.message.tool_calls is None and answer.finish_reason in ("stop", "length")
    assert answer.message.content.strip()


def test_with_auto_the_model_chooses_and_a_call_it_starts_is_valid(client):
    """The lazy grammar: a plain question gets text; a history of calls primes a call, which
    the grammar finishes and ends."""
    request = dict(model=MODEL_NAME, max_tokens=40, tools=[WEATHER], temperature=0, seed=1)
    text = client.chat.completions.create(messages=ASK, **request).choices[0]
    assert text.message.tool_calls is None and text.message.content.strip()
    primed = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
        {"role": "user", "content": "And the weather in Rome?"}]
    called = client.chat.completions.create(messages=primed, **request).choices[0]
    assert called.finish_reason == "tool_calls" and called.message.content is None
    assert [(c.function.name, set(arguments(c))) for c in called.message.tool_calls] == [
        ("get_weather", {"city"})]


def reassembled(chunks) -> tuple[list[dict], str | None, str]:
    """Streamed tool-call deltas put together by index, as the openai client's users do."""
    calls: dict[int, dict] = {}
    finish, text = None, ""
    for chunk in chunks:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            text += choice.delta.content or ""
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = delta.id or call["id"]
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    return [calls[index] for index in sorted(calls)], finish, text


def test_streamed_tool_calls_reassemble_to_the_whole_reply(client):
    request = dict(model=MODEL_NAME, messages=ASK, max_tokens=48, tools=[WEATHER, CLOCK],
                   tool_choice="required", temperature=0.7, seed=11)
    whole = client.chat.completions.create(**request).choices[0]
    streamed, finish, text = reassembled(client.chat.completions.create(**request, stream=True))
    assert whole.finish_reason == finish == "tool_calls" and text == ""
    assert [(c.function.name, arguments(c)) for c in whole.message.tool_calls] == [
        (c["name"], json.loads(c["arguments"])) for c in streamed]
    assert all(c["id"].startswith("call_") for c in streamed)
    assert {c["name"] for c in streamed} <= {"get_weather", "get_time"}


def test_a_templated_model_calls_tools_through_its_own_template(client):
    reply = client.chat.completions.create(model="hermes-tools", messages=ASK, max_tokens=48,
                                           tools=[WEATHER], tool_choice=FORCE_WEATHER,
                                           temperature=0)
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and set(arguments(call)) == {"city"}
    plain = client.chat.completions.create(model="hermes-tools", messages=ASK, max_tokens=1)
    # The template's tool section (the schema, the instructions) is in the prompt.
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 60


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                          "function": {"name": "get_weather", "arguments": "{oops"}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
])
def test_malformed_tool_requests_are_openai_400s(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**{"model": MODEL_NAME, "messages": ASK, "max_tokens": 4,
                                          **fields})
    assert caught.value.body["param"] == param
