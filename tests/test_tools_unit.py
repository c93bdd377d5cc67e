"""Tool calling below the HTTP layer: parsing tools and messages, the call grammar (checked by
llama.cpp with the real vocabulary), the prompt layouts, and taking calls out of a reply.
"""

from __future__ import annotations

import ctypes
import json
import math

import llama_cpp
import pytest

from gguf_edit import with_chat_template
from test_chat_template import GEMMA_TEMPLATE
from services.dialects.chat import (ChatMessage, ChatPrompt, parse_messages, plain_layout,
                                    plain_stops, render_template)
from services.dialects.tools import parse_tools, tool_events
from services.engine.chat_template import ChatTemplates
from services.engine.sampler import check_grammar, grammar_sampler
from services.errors import ChatTemplateError, InvalidRequest
from services.types import (Finished, SamplingParams, Timings, Token, TokenLogprob, ToolCalled,
                            Usage)

# A Hermes / Qwen 2.5 style template: tools in the system turn, calls as <tool_call> blocks,
# results as <tool_response> in a user turn.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n"
    "{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' %}"
    "{% elif message.role == 'assistant' %}<|im_start|>assistant\n"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% for call in message.tool_calls or [] %}\n<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ message.content }}\n</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
USAGE, TIMINGS = Usage(3, 5), Timings(0.0, 1.0, 5.0)


def tool(name: str, **function) -> dict:
    return {"type": "function", "function": {"name": name, **function}}


@pytest.mark.parametrize("tools, choice, parallel, param, message", [
    ("get_weather", None, None, "tools", "must be a list"),
    ([7], None, None, "tools[0]", '"type": "function"'),
    ([{"type": "retrieval"}], None, None, "tools[0]", '"type": "function"'),
    ([{"type": "function", "function": "get_weather"}], None, None, "tools[0].function",
     "must be an object"),
    ([tool("get weather")], None, None, "tools[0].function.name", "1 to 64 letters"),
    ([tool("x" * 65)], None, None, "tools[0].function.name", "1 to 64 letters"),
    ([tool("a</tool_call>")], None, None, "tools[0].function.name", "1 to 64 letters"),
    ([tool(None)], None, None, "tools[0].function.name", "1 to 64 letters"),
    ([WEATHER, WEATHER], None, None, "tools[1].function.name", "given twice"),
    ([tool("f", description="d" * 8193)], None, None, "tools[0].function.description",
     "at most 8192"),
    ([tool("f", parameters="city")], None, None, "tools[0].function.parameters",
     "JSON Schema object"),
    ([tool("f", parameters={"type": "array"})], None, None, "tools[0].function.parameters",
     "describe an object"),
    ([tool("f", parameters={"type": "object", "properties": {
        "s": {"type": "string", "minLength": 10 ** 9}}})], None, None,
     "tools[0].function.parameters", "more than 1000 repeats"),
    ([tool(f"f{i}") for i in range(129)], None, None, "tools", "more than 128"),
    ([WEATHER], "sometimes", None, "tool_choice", "none, auto, required"),
    ([WEATHER], {"type": "function"}, None, "tool_choice", "none, auto, required"),
    ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, None, "tool_choice",
     "not one of the tools"),
    (None, "required", None, "tool_choice", "needs tools"),
    ([WEATHER], "auto", "yes", "parallel_tool_calls", "boolean"),
])
def test_malformed_tools_are_refused_with_the_field_at_fault(tools, choice, parallel, param,
                                                             message):
    with pytest.raises(InvalidRequest, match=message) as caught:
        parse_tools(tools, choice, parallel)
    assert caught.value.details["param"] == param


def test_too_much_schema_altogether_is_refused():
    """Each tool within bounds, all of them together over the bound of grammar work."""
    properties = {f"property_number_{i}": {"type": "string"} for i in range(40)}
    tools = [tool(f"f{i}", parameters={"type": "object", "properties": properties})
             for i in range(128)]
    with pytest.raises(InvalidRequest) as caught:
        parse_tools(tools, "required")
    assert caught.value.details["param"] == "tools"


def test_tools_and_choices_parse():
    assert parse_tools(None) is None and parse_tools([], "auto") is None
    spec = parse_tools([WEATHER, CLOCK])
    assert (spec.choice, spec.forced, spec.parallel) == ("auto", None, True)
    assert spec.tools[1].parameters == {"type": "object", "properties": {}}
    named = parse_tools([WEATHER, CLOCK], {"type": "function", "function": {"name": "get_time"}},
                        False)
    assert (named.choice, named.forced, named.parallel) == ("function", "get_time", False)
    flat = parse_tools([{"type": "function", "name": "get_time"}],
                       {"type": "function", "name": "get_time"})
    assert (flat.tools[0].name, flat.choice) == ("get_time", "function")
    assert parse_tools([WEATHER], "none").grammar == ""


def test_sampling_gets_the_grammar_whole_lazy_or_not_at_all():
    base = SamplingParams(max_tokens=8)
    required = parse_tools([WEATHER], "required").sampling(base)
    assert required.grammar and required.grammar_triggers == ()
    auto = parse_tools([WEATHER]).sampling(base)
    assert auto.grammar == required.grammar and auto.grammar_triggers == ("<tool_call>",)
    assert parse_tools([WEATHER], "none").sampling(base) == base
    with pytest.raises(InvalidRequest, match="JSON response format") as caught:
        parse_tools([WEATHER], "required").sampling(SamplingParams(grammar="root ::= \"x\""))
    assert caught.value.details["param"] == "tools"


# The grammar, as llama.cpp runs it.

@pytest.fixture(scope="module")
def vocab_llm(model_file):
    llm = llama_cpp.Llama(model_path=str(model_file), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def grammar_takes(llm, gbnf: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets the model write `text` and then end: each token
    is offered alone and must keep its logit, then end-of-generation must."""
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    sampler = grammar_sampler(vocab, gbnf)
    try:
        for token in llm.tokenize(text.encode(), add_bos=False, special=False) + [llm.token_eos()]:
            data = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
            candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
            if math.isinf(data[0].logit):
                return False
            if token != llm.token_eos():
                llama_cpp.llama_sampler_accept(sampler, token)
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


def call(name: str, arguments: dict) -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {json.dumps(arguments)}}}</tool_call>'


def test_the_call_grammar_takes_valid_calls_and_only_those(vocab_llm):
    spec = parse_tools([WEATHER, CLOCK], "required")
    vocab = llama_cpp.llama_model_get_vocab(vocab_llm._model.model)
    check_grammar(vocab, spec.grammar)
    paris = call("get_weather", {"city": "Paris", "days": 2})
    assert grammar_takes(vocab_llm, spec.grammar, paris)
    assert grammar_takes(vocab_llm, spec.grammar, call("get_time", {}))
    assert grammar_takes(vocab_llm, spec.grammar, paris + call("get_time", {}))
    assert grammar_takes(vocab_llm, spec.grammar,
                         '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                         '\n</tool_call>')
    for wrong in (call("get_news", {}), call("get_weather", {}),          # no such tool; no city
                  call("get_weather", {"city": 3}), call("get_weather", {"town": "Paris"}),
                  call("get_weather", {"city": "Paris", "days": "two"}),
                  "Sure! " + paris, paris + " Done.", paris + "\n" + paris,
                  '{"name": "get_time", "arguments": {}}'):
        assert not grammar_takes(vocab_llm, spec.grammar, wrong), wrong


def test_a_named_function_or_no_parallel_calls_means_one_call(vocab_llm):
    named = parse_tools([WEATHER, CLOCK], {"type": "function", "function": {"name": "get_time"}})
    assert grammar_takes(vocab_llm, named.grammar, call("get_time", {}))
    assert not grammar_takes(vocab_llm, named.grammar, call("get_weather", {"city": "Rome"}))
    assert not grammar_takes(vocab_llm, named.grammar, call("get_time", {}) * 2)
    single = parse_tools([WEATHER, CLOCK], "required", False)
    assert not grammar_takes(vocab_llm, single.grammar, call("get_time", {}) * 2)


def test_schemas_with_refs_keep_them_per_tool(vocab_llm):
    """Pydantic writes nested models as $defs and $refs; each tool's refs are its own."""
    person = {"type": "object", "$defs": {"Pet": {"type": "object", "properties": {
        "kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]}},
        "properties": {"pet": {"$ref": "#/$defs/Pet"}}, "required": ["pet"]}
    other = {"type": "object", "$defs": {"Pet": {"type": "object", "properties": {
        "legs": {"type": "integer"}}, "required": ["legs"]}},
        "properties": {"pet": {"$ref": "#/$defs/Pet"}}, "required": ["pet"]}
    spec = parse_tools([tool("owner", parameters=person), tool("vet", parameters=other)],
                       "required")
    assert grammar_takes(vocab_llm, spec.grammar, call("owner", {"pet": {"kind": "cat"}}))
    assert grammar_takes(vocab_llm, spec.grammar, call("vet", {"pet": {"legs": 4}}))
    assert not grammar_takes(vocab_llm, spec.grammar, call("vet", {"pet": {"kind": "cat"}}))


# Taking calls out of a reply.

SPEC = parse_tools([WEATHER, CLOCK])
PARIS = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


def finished(text: str, reason: str = "stop") -> Finished:
    return Finished("m", text, reason, USAGE, TIMINGS)


def split(text: str, size: int, reason: str = "stop") -> list:
    """The reply as tokens of `size` characters, then its Finished."""
    return [Token(text[i:i + size]) for i in range(0, len(text), size)] + [finished(text, reason)]


def outcome(events) -> tuple[str, list[tuple[str, dict]], str, str]:
    """(streamed text, calls as (name, arguments), Finished.text, finish_reason); checks that
    the streamed calls are the Finished ones."""
    events = list(tool_events(events, SPEC))
    end = events[-1]
    called = [e.call for e in events if isinstance(e, ToolCalled)]
    assert called == list(end.tool_calls)
    assert [e.index for e in events if isinstance(e, ToolCalled)] == list(range(len(called)))
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in called)
    text = "".join(e.text for e in events if isinstance(e, Token))
    return (text, [(c.name, json.loads(c.arguments)) for c in called], end.text,
            end.finish_reason)


@pytest.mark.parametrize("reply, text, calls", [
    (PARIS, "", [("get_weather", {"city": "Paris"})]),
    ("Let me check. " + PARIS, "Let me check.", [("get_weather", {"city": "Paris"})]),
    (PARIS + "\n" + TIME + "\n", "", [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ("The answer is 3 < 4, and <b>bold</b>.", "The answer is 3 < 4, and <b>bold</b>.", []),
    ('<tool_call>{"name": "get_news", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "get_news", "arguments": {}}</tool_call>', []),
    ("<tool_call>not json</tool_call> then " + TIME, "<tool_call>not json</tool_call> then",
     [("get_time", {})]),
    (PARIS + " Checking now.\n", "Checking now.", [("get_weather", {"city": "Paris"})]),
    ("Line one\n\nline two\n", "Line one\n\nline two\n", []),
])
def test_calls_are_taken_out_however_the_tokens_cut_the_text(reply, text, calls):
    reason = "tool_calls" if calls else "stop"
    assert outcome([finished(reply)]) == (text, calls, text, reason)
    for size in range(1, 14):
        assert outcome(split(reply, size)) == (text, calls, text, reason), size


def test_a_call_cut_off_by_max_tokens_stays_text():
    reply = 'Sure. <tool_call>{"name": "get_weather", "arguments": {"ci'
    assert outcome(split(reply, 3, "length")) == (reply, [], reply, "length")
    partial = "Sure. <tool_c"
    assert outcome(split(partial, 2, "length")) == (partial, [], partial, "length")
    both = PARIS + "\n" + reply
    assert outcome(split(both, 4, "length")) == (
        reply, [("get_weather", {"city": "Paris"})], reply, "length")


@pytest.mark.timeout(30)
def test_a_long_call_streamed_in_small_tokens_is_found_in_linear_time():
    """Each token searches only the new text for the call's end (a context's worth of
    arguments would otherwise be scanned once per token)."""
    reply = call("get_weather", {"city": "x" * 400_000})
    assert outcome(split(reply, 4)) == ("", [("get_weather", {"city": "x" * 400_000})], "",
                                        "tool_calls")


def test_text_that_may_start_a_call_is_held_back_until_it_is_not():
    events = list(tool_events([Token("Hi <tool"), Token("box> there"),
                               finished("Hi <toolbox> there")], SPEC))
    assert [e.text for e in events[:-1]] == ["Hi", " <toolbox> there"]


def test_without_tools_or_with_none_the_events_pass_unchanged():
    events = [Token("a"), Token(PARIS), finished("a" + PARIS)]
    assert list(tool_events(iter(events), None)) == events
    assert list(tool_events(iter(events), parse_tools([WEATHER], "none"))) == events


def test_logprobs_stay_with_the_text_they_came_from():
    logprob = TokenLogprob("Hi", -0.5, (72, 105))
    events = list(tool_events([Token("Hi", (logprob,)), Token(PARIS), finished("Hi" + PARIS)],
                              SPEC))
    assert events[0] == Token("Hi", (logprob,))


# Messages with calls and results.

def test_openai_and_ollama_tool_turns_parse():
    openai_shape = parse_messages([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_a1", "content": "18 C"}])
    assert openai_shape[1].content == "" and openai_shape[1].tool_calls[0].id == "call_a1"
    assert json.loads(openai_shape[1].tool_calls[0].arguments) == {"city": "Paris"}
    assert (openai_shape[2].tool_call_id, openai_shape[2].name) == ("call_a1", "get_weather")
    ollama_shape = parse_messages([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "18 C"}])
    assert ollama_shape[1].tool_calls[0].id == "call_1_0"
    assert ollama_shape[1].tool_calls[0].arguments == openai_shape[1].tool_calls[0].arguments
    assert ollama_shape[2].name == "get_weather"


@pytest.mark.parametrize("message, param", [
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}, "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": "[1, 2]"}}]}, "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": 7}}]}, "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "f", "arguments": '{"a": ' + "[" * 64 + "]" * 64 + "}"}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "bad name", "arguments": "{}"}}]}, "messages[0].tool_calls[0]"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f"}, "id": 5}]},
     "messages[0].tool_calls[0].id"),
    ({"role": "assistant", "tool_calls": "f()"}, "messages[0].tool_calls"),
    ({"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]},
     "messages[0].tool_calls"),
    ({"role": "tool", "content": "x", "tool_call_id": 3}, "messages[0].tool_call_id"),
    ({"role": "user", "content": "x", "images": ["aGk="]}, "messages[0]"),
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, "messages[0]"),
])
def test_malformed_tool_turns_are_refused(message, param):
    with pytest.raises(InvalidRequest) as caught:
        parse_messages([message])
    assert caught.value.details["param"] == param


# Rendering.

HISTORY = parse_messages([
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_a1", "content": "18 C"}])
WEATHER_SCHEMA = json.dumps(WEATHER["function"]["parameters"])


def test_the_generic_layout_lists_tools_and_writes_calls_and_results():
    spec = parse_tools([WEATHER])
    assert plain_layout(HISTORY, spec) == (
        "Be brief.\n\nYou can call these tools:\n"
        f"- get_weather: Current weather in a city\n  arguments (JSON schema): {WEATHER_SCHEMA}\n\n"
        'To call a tool, answer with <tool_call>{"name": "<tool name>", "arguments": '
        "{<arguments as JSON>}}</tool_call> (one block per call) and nothing else. Each result "
        "comes back in a Tool turn.\n\n"
        "User: Weather in Paris?\n"
        'Assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "</tool_call>\nTool: 18 C\nAssistant:")
    assert "You can call" not in plain_layout(HISTORY, parse_tools([WEATHER], "none"))
    assert plain_stops(HISTORY, None) == ("\nUser:", "\nAssistant:", "\nTool:")
    assert plain_stops(HISTORY[:2], None) == ("\nUser:", "\nAssistant:")


def test_a_template_that_knows_tools_gets_them_as_hugging_face_passes_them():
    text = render_template(HERMES_TEMPLATE, HISTORY, "", "", tools=parse_tools([WEATHER]))
    assert text == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou are provided with function signatures "
        "within <tools></tools> XML tags:\n<tools>\n" + json.dumps(WEATHER) + "\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n")


def test_a_template_that_knows_no_tools_gets_the_generic_instructions():
    text = render_template(GEMMA_TEMPLATE, HISTORY, "<bos>", "<eos>", tools=parse_tools([WEATHER]))
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\nYou can call these tools:\n"
                           f"- get_weather: Current weather in a city\n  arguments (JSON "
                           f"schema): {WEATHER_SCHEMA}\n")
    assert text.endswith(
        "Tool turn.\n\nWeather in Paris?<end_of_turn>\n<start_of_turn>model\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
        "<end_of_turn>\n<start_of_turn>user\nTool result (get_weather): 18 C<end_of_turn>\n"
        "<start_of_turn>model\n")


def test_tool_text_counts_toward_the_render_bound():
    """128 tools of 8 KiB descriptions render past the 1 MiB floor: the bound grows with them."""
    spec = parse_tools([tool(f"f{i}", description="d" * 8192) for i in range(128)], "none")
    text = render_template("{{ tools | tojson }}", (ChatMessage("user", "hi"),), "", "",
                           tools=spec)
    assert len(text) > 1 << 20
    with pytest.raises(ChatTemplateError, match="wrote more than"):   # by twice, not more
        ChatTemplates().render("{% for i in range(5) %}{{ tools | tojson }}{% endfor %}",
                               [{"role": "user", "content": "hi"}], "", "",
                               tools=[{"d": "x" * 400_000}])


@pytest.fixture(scope="module")
def hermes_llm(model_file, tmp_path_factory):
    path = tmp_path_factory.mktemp("hermes-unit") / "hermes-tools.gguf"
    with_chat_template(model_file, path, HERMES_TEMPLATE)
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def test_a_real_model_renders_tools_from_its_own_template(hermes_llm):
    built = ChatPrompt(HISTORY, parse_tools([WEATHER]))(hermes_llm, ChatTemplates().render)
    prompt = hermes_llm.detokenize(list(built.tokens), special=True).decode()
    assert '"name": "get_weather"' in prompt and WEATHER_SCHEMA in prompt
    assert prompt.endswith("<tool_response>\n18 C\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert built.stop == ()
