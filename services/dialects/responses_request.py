"""OpenAI Responses request bodies (POST /v1/responses) as a chat this server can run.

The Responses API is OpenAI's newer shape for the same work as chat completions: `input` (a
string, or a list of items: messages, the model's earlier `function_call`s and the client's
`function_call_output`s) plus `instructions` become the chat's messages; `max_output_tokens`,
`temperature`, `top_p`, `text.format` and the function `tools` become sampling and a tool spec,
the same as on /v1/chat/completions. Every field of OpenAI's request schema is accepted:
applied, ignored (bookkeeping, and options of OpenAI's own models and hosted services), or,
where honouring it needs state this server does not keep (`previous_response_id`,
`conversation`, `background`, stored `prompt`s), refused with a 400 that says what to send
instead: answering as if the earlier turns were there would be silently wrong.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from services.dialects import sampling_fields as f
from services.dialects.chat import MAX_MESSAGES, ChatMessage, ChatPrompt
from services.dialects.json_mode import any_json_object, schema_grammar
from services.dialects.openai_request import MODEL, PARALLEL_TOOL_CALLS, SERVICE_FIELDS, USER
from services.dialects.params import Param, ignored_param, parse_params
from services.dialects.tools import MAX_NESTING, ToolSpec, json_object, parse_tools, valid_name
from services.errors import InvalidRequest
from services.types import SamplingParams, ToolCall

_STATELESS = ("this server does not store responses: send the whole conversation in input "
              "(earlier messages, function_call and function_call_output items)")
_MESSAGE_ROLES = {"user": "user", "system": "system", "developer": "system",
                  "assistant": "assistant"}
_TEXT_PARTS = ("input_text", "output_text", "text")
_TOOL_CHOICE_HELP = ('auto, none, required, or {"type": "function", "name": …}')

RESPONSES_PARAMS: tuple[Param, ...] = (
    MODEL,
    Param("input", "string or array", None, "a text (one user message), or a list of items: "
          "messages {role, content} (content a string or input_text / output_text parts), "
          "function_call {call_id, name, arguments} and function_call_output {call_id, "
          "output} (required)", required=True),
    Param("instructions", "string", None, "a system message placed before the input"),
    f.MAX_TOKENS.param("max_output_tokens", default=None,
                       note="default: until the reply ends or the context is full"),
    f.TEMPERATURE.param(default=1.0), f.TOP_P.param(default=1.0),
    Param("stream", "boolean", False, "stream server-sent events: response.created, "
          "response.output_text.delta …, response.completed"),
    Param("text", "object", None, '{"format": {"type": "json_object"}} or {"format": {"type": '
          '"json_schema", "name": …, "schema": {...}}}: output constrained to parse as JSON '
          "(verbosity is ignored)"),
    Param("tools", "array", None, 'functions the model may call: [{"type": "function", "name", '
          '"description", "parameters": JSON Schema}]; hosted tools (web search, file search, '
          "…) are refused"),
    Param("tool_choice", "string or object", None, f"{_TOOL_CHOICE_HELP}; a forced call is "
          "grammar-constrained to the function's schema"),
    PARALLEL_TOOL_CALLS,
    Param("previous_response_id", "string", None, f"refused: {_STATELESS}"),
    Param("conversation", "string or object", None, f"refused: {_STATELESS}"),
    Param("background", "boolean", None, "only false: responses run while the request waits",
          lambda v: None if v is False else "is not supported by this server (only false)"),
    Param("prompt", "object", None, "refused: there are no stored prompt templates here"),
    ignored_param("store", "boolean", "nothing is stored; the reply says store false"),
    ignored_param("metadata", "object", "echoed in the reply, not stored"),
    USER,
    *SERVICE_FIELDS,
    ignored_param("reasoning", "object", "for OpenAI's reasoning models"),
    ignored_param("truncation", "string", "the input is never truncated: one over the context "
                  "is a 400"),
    ignored_param("include", "array", "there is nothing extra to include"),
    ignored_param("top_logprobs", "integer", "log probabilities are not returned here"),
    ignored_param("max_tool_calls", "integer", "limits OpenAI's hosted tools"),
    ignored_param("stream_options", "object", "include_obfuscation: events are not padded"),
    ignored_param("context_management", "array", "OpenAI's conversation compaction"),
    ignored_param("moderation", "object", "OpenAI's moderation models"),
    ignored_param("image", "object", "inputs are text"),
    ignored_param("access_programs", "object", "OpenAI's access programs"),
    # What llama-server, vLLM and Ollama users send through extra_body.
    f.SEED.param(), f.STOP.param(), f.TOP_K.param(), f.MIN_P.param(default=0.0),
    f.TYPICAL_P.param(), f.REPEAT_PENALTY.param(default=1.0, note="default 1.0 (off) on /v1"),
    f.PRESENCE_PENALTY.param(), f.FREQUENCY_PENALTY.param(),
)


@dataclass(frozen=True)
class ResponsesRequest:
    """A Responses request ready to run, and the settings its Response object reports."""

    model: str | None
    prompt: ChatPrompt
    sampling: SamplingParams
    stream: bool
    tools: ToolSpec | None
    settings: dict


def parse_responses(body: Any, n_ctx: int) -> ResponsesRequest:
    """:raise InvalidRequest: the body is not a Responses request this server can run."""
    values = parse_params(body, RESPONSES_PARAMS)
    for name in ("previous_response_id", "conversation"):
        if values[name]:
            raise InvalidRequest(f"{name} is not supported: {_STATELESS}", param=name)
    if values["prompt"]:
        raise InvalidRequest("prompt (a stored prompt template) is not supported: send the "
                             "text in instructions and input", param="prompt")
    messages = input_messages(values["input"], values["instructions"])
    tools = flat_tools(values["tools"])
    spec = parse_tools(tools, _chat_tool_choice(values["tool_choice"]),
                       values["parallel_tool_calls"])
    text_format = _text_format(values["text"])
    named = {**f.named_fields(values), "max_tokens": values["max_output_tokens"],
             "grammar": _format_grammar(text_format)}
    sampling = f.sampling_params(n_ctx, {"max_tokens": "max_output_tokens"}, **named)
    if spec is not None:
        sampling = spec.sampling(sampling)
    return ResponsesRequest(values["model"], ChatPrompt(messages, tools=spec), sampling,
                            values["stream"], spec, _settings(values, tools, text_format))


def input_messages(raw: Any, instructions: str | None) -> tuple[ChatMessage, ...]:
    """The chat: `instructions` as a system message, then the input's messages; a model's
    function_call items join the assistant turn before them, and each function_call_output
    becomes a tool message naming its function.

    :raise InvalidRequest: (param `input` or `input[i]…`) an empty or oversized list, an item
        of a type this server cannot take (images, files, hosted tool calls, references to
        stored items), or a malformed item.
    """
    messages = [ChatMessage("system", instructions)] if instructions else []
    if isinstance(raw, str):
        return (*messages, ChatMessage("user", raw))
    if not raw or len(raw) > MAX_MESSAGES:
        raise InvalidRequest(f"input must be a string or a list of 1 to {MAX_MESSAGES} items",
                             param="input")
    names: dict[str, str] = {}
    for index, item in enumerate(raw):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object (a message, function_call or "
                                 f"function_call_output)", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(item, where))
        elif kind == "function_call":
            call = _function_call(item, where)
            names[call.id] = call.name
            _add_call(messages, call)
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where)
            messages.append(ChatMessage("tool", _content(item.get("output"), f"{where}.output"),
                                        tool_call_id=call_id, name=names.get(call_id)))
        elif kind == "reasoning":
            continue        # another model's hidden reasoning: nothing this model can use
        elif kind == "item_reference":
            raise InvalidRequest(f"{where}: item_reference is not supported: {_STATELESS}",
                                 param=where)
        else:
            raise InvalidRequest(f"{where}.type {str(kind)[:64]!r} is not supported: input "
                                 f"items are message, function_call and function_call_output",
                                 param=f"{where}.type")
    if not any(m.role != "system" for m in messages):
        raise InvalidRequest("input holds no message", param="input")
    return tuple(messages)


def _message(item: dict, where: str) -> ChatMessage:
    role = item.get("role")
    if role not in _MESSAGE_ROLES:
        raise InvalidRequest(f"{where}.role must be one of {', '.join(_MESSAGE_ROLES)}",
                             param=f"{where}.role")
    return ChatMessage(_MESSAGE_ROLES[role], _content(item.get("content"), f"{where}.content"))


def _content(content: Any, where: str) -> str:
    """A string, or a list of text parts joined (input_text, output_text; a refusal's text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or a list of input_text parts",
                             param=where)
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("refusal" if kind == "refusal" else "text") if kind else None
        if kind in (*_TEXT_PARTS, "refusal") and isinstance(text, str):
            texts.append(text)
            continue
        problem = (f"{str(kind)[:32]} parts are not supported: this server reads text"
                   if isinstance(kind, str) and kind not in (*_TEXT_PARTS, "refusal")
                   else "must be a text part {\"type\": \"input_text\", \"text\": …}")
        raise InvalidRequest(f"{where}[{index}] {problem}", param=f"{where}[{index}]")
    return "".join(texts)


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"{where}.{key} must be a non-empty string", param=f"{where}.{key}")
    return value


def _function_call(item: dict, where: str) -> ToolCall:
    """A call the model made earlier: its arguments must be a JSON object (as JSON text)."""
    name = item.get("name")
    if not valid_name(name):
        raise InvalidRequest(f"{where}.name must be 1 to 64 letters, digits, _ or -",
                             param=f"{where}.name")
    arguments = item.get("arguments")
    parsed = (json_object(arguments) if arguments.strip() else {}) \
        if isinstance(arguments, str) else None
    if parsed is None:
        raise InvalidRequest(f"{where}.arguments must be a JSON object as text, nested at most "
                             f"{MAX_NESTING} deep", param=f"{where}.arguments")
    return ToolCall(_string(item, "call_id", where), name, json.dumps(parsed))


def _add_call(messages: list[ChatMessage], call: ToolCall) -> None:
    """A call joins the assistant turn just before it (its text, or earlier calls of the same
    turn); otherwise it opens an assistant turn of its own."""
    last = messages[-1] if messages else None
    if last is not None and last.role == "assistant":
        messages[-1] = ChatMessage("assistant", last.content, tool_calls=(*last.tool_calls, call))
    else:
        messages.append(ChatMessage("assistant", "", tool_calls=(call,)))


def flat_tools(tools: list | None) -> list[dict] | None:
    """The function tools as the Response object lists them ({"type": "function", "name",
    "description", "parameters", "strict"}); parse_tools reads this flat shape too.

    :raise InvalidRequest: a tool that is not a function: hosted tools (web search, file
        search, code interpreter, MCP, …) run on OpenAI's servers, not here.
    """
    if tools is None:
        return None
    flat = []
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise InvalidRequest(f"tools[{index}].type {str(kind)[:64]!r} is not supported: only "
                                 f"function tools run on this server", param=f"tools[{index}]")
        if isinstance(tool.get("function"), dict):      # chat's nested shape, sent by mistake
            tool = {"type": "function", **tool["function"]}
        flat.append({"type": "function", "name": tool.get("name"),
                     "description": tool.get("description"),
                     "parameters": tool.get("parameters"), "strict": tool.get("strict")})
    return flat


def _chat_tool_choice(choice: Any) -> Any:
    """The Responses tool_choice as parse_tools takes it; hosted-tool choices refused."""
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest(f"tool_choice must be {_TOOL_CHOICE_HELP} (allowed_tools and hosted "
                         f"tools are not supported)", param="tool_choice")


def _text_format(text: dict | None) -> dict:
    """text.format, checked: {"type": "text"} when not given."""
    text_format = (text or {}).get("format") or {"type": "text"}
    if not isinstance(text_format, dict):
        raise InvalidRequest("text.format must be an object", param="text.format")
    if text_format.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidRequest("text.format.type must be text, json_object or json_schema",
                             param="text.format.type")
    return text_format


def _format_grammar(text_format: dict) -> str | None:
    if text_format["type"] == "json_object":
        return any_json_object()
    if text_format["type"] == "json_schema":
        schema = text_format.get("schema")
        return schema_grammar({"type": "object"} if schema is None else schema,
                              "text.format.schema")
    return None


def _settings(values: dict, tools: list | None, text_format: dict) -> dict:
    """What a Response object reports of its request (the openai package's type needs them)."""
    reasoning = values["reasoning"] if isinstance(values["reasoning"], dict) else {}
    return {
        "instructions": values["instructions"], "max_output_tokens": values["max_output_tokens"],
        "metadata": values["metadata"] or {},
        "parallel_tool_calls": values["parallel_tool_calls"] is not False,
        "previous_response_id": None,
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "service_tier": "default", "store": False, "temperature": values["temperature"],
        "text": {"format": text_format}, "tool_choice": values["tool_choice"] or "auto",
        "tools": tools or [], "top_p": values["top_p"], "truncation": "disabled",
        "user": values["user"],
    }
