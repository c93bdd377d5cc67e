"""Chat messages as a prompt: the model's own chat template, or a plain layout for base models.

The template comes from the GGUF (`tokenizer.chat_template`) of the instance that runs the
request, so rendering happens on the worker (`ChatPrompt` is the builder `LLMService` calls,
with the app's `ChatTemplates`). It renders in Jinja's sandbox with bounds on time and size
(services/engine/chat_template.py): a template that reaches for Python internals, or runs past
a bound, is a `ChatTemplateError` (422, the model file's fault) and its worker is free again at
once. A model without a template (such as the default Gemma 3 270M, a base model) gets
"User: … / Assistant:" turns and stops where it starts a new turn.

Tools (services/dialects/tools.py) are rendered the model's way when its template mentions
`tools`: `tools=[{"type": "function", "function": {name, description, parameters}}]`, assistant
messages with `tool_calls=[{"id", "type": "function", "function": {"name", "arguments": {…}}}]`
and tool messages with `tool_call_id` and `name`, as Hugging Face templates expect. Otherwise
they take the generic layout:

    <system text>

    You can call these tools:
    - get_weather: Current weather in a city
      arguments (JSON schema): {"type": "object", "properties": {"city": {"type": "string"}}}

    To call a tool, answer with <tool_call>{"name": "<tool name>", "arguments": {<arguments
    as JSON>}}</tool_call> (one block per call) and nothing else. Each result comes back in a
    Tool turn.

    User: Weather in Paris?
    Assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>
    Tool: 18 °C, sunny
    Assistant:

With a template that does not mention tools, the tool section joins the system message, calls
are written into the assistant's text the same way, and results become a user turn
("Tool result (get_weather): 18 °C, sunny"). With tool_choice "none" the tool section is left
out (the history still shows calls and results).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

from services.dialects.tools import (CALL_CLOSE, CALL_OPEN, MAX_NESTING, ToolSpec, json_object,
                                     valid_name)
from services.engine.chat_template import ChatTemplates
from services.errors import InvalidRequest
from services.types import Finished, PromptTokens, Render, Token, ToolCall

MAX_MESSAGES = 1024
MAX_CALLS = 128
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "tool"}
_PLAIN_NAMES = {"user": "User", "assistant": "Assistant", "tool": "Tool"}
# Where a base model, left to itself, goes on to write the next turn.
PLAIN_STOPS = ("\nUser:", "\nAssistant:")
TOOL_STOPS = ("\nTool:",)


@dataclass(frozen=True)
class ChatMessage:
    """One turn. An assistant turn may hold `tool_calls`; a "tool" turn is a call's result,
    `tool_call_id` naming the call and `name` its function (when the client says)."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None


def parse_messages(raw: Any, param: str = "messages") -> tuple[ChatMessage, ...]:
    """Messages from an OpenAI or Ollama body: role and text content ("developer" is a system
    message; OpenAI's list of text parts is joined), assistant tool calls (OpenAI's arguments
    as JSON text, Ollama's as an object) and tool results (OpenAI's `tool_call_id`, Ollama's
    `tool_name`). A tool result without a name takes the name of the call it answers.

    :raise InvalidRequest: not a non-empty list of {role, content}, an unknown role, a
        malformed tool call (arguments that are not a JSON object), or content this server
        cannot take (images, audio).
    """
    if not isinstance(raw, list) or not raw or len(raw) > MAX_MESSAGES:
        raise InvalidRequest(f"{param} must be a list of 1 to {MAX_MESSAGES} messages", param=param)
    messages: list[ChatMessage] = []
    called: dict[str, str] = {}           # call id -> function name, for results without one
    for index, message in enumerate(raw):
        messages.append(_parse_message(message, f"{param}[{index}]", index, called))
        called.update((call.id, call.name) for call in messages[-1].tool_calls)
    return tuple(messages)


def _parse_message(message: Any, where: str, index: int, called: dict[str, str]) -> ChatMessage:
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object with role and content", param=where)
    role = message.get("role")
    role = _ROLES.get(role) if isinstance(role, str) else None
    if role is None:
        raise InvalidRequest(f"{where}.role must be one of {', '.join(_ROLES)}", param=where)
    for unsupported in ("images", "function_call", "audio"):
        if message.get(unsupported):
            raise InvalidRequest(f"{where}.{unsupported} is not supported by this server",
                                 param=where)
    content = _text_content(message.get("content"), where)
    if message.get("tool_calls"):
        if role != "assistant":
            raise InvalidRequest(f"{where}.tool_calls: only assistant messages hold tool calls",
                                 param=f"{where}.tool_calls")
        return ChatMessage(role, content, _parse_calls(message["tool_calls"], where, index))
    if role == "tool":
        call_id = _optional_text(message, "tool_call_id", where)
        name = _optional_text(message, "tool_name", where) or _optional_text(message, "name",
                                                                             where)
        return ChatMessage(role, content, (), call_id, name or called.get(call_id or ""))
    return ChatMessage(role, content)


def _parse_calls(calls: Any, where: str, index: int) -> tuple[ToolCall, ...]:
    where = f"{where}.tool_calls"
    if not isinstance(calls, list) or len(calls) > MAX_CALLS:
        raise InvalidRequest(f"{where} must be a list of at most {MAX_CALLS} calls", param=where)
    return tuple(_parse_call(call, f"{where}[{n}]", f"call_{index}_{n}")
                 for n, call in enumerate(calls))


def _parse_call(call: Any, where: str, default_id: str) -> ToolCall:
    """One call: {"id", "type": "function", "function": {"name", "arguments"}}; a missing id
    (Ollama sends none) is made from the call's place, so the prompt stays the same."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not valid_name(function.get("name")):
        raise InvalidRequest(f'{where} must be {{"type": "function", "function": {{"name": …, '
                             f'"arguments": …}}}} with a name of 1 to 64 letters, digits, _ '
                             f"or -", param=where)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        arguments = json_object(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"{where}.function.arguments must be a JSON object (or its JSON "
                             f"text), nested at most {MAX_NESTING} deep",
                             param=f"{where}.function.arguments")
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise InvalidRequest(f"{where}.id must be a string", param=f"{where}.id")
    return ToolCall(call_id or default_id, function["name"], json.dumps(arguments))


def _optional_text(message: dict, key: str, where: str) -> str | None:
    value = message.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{where}.{key} must be a string", param=f"{where}.{key}")
    return value or None


def _text_content(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(
            isinstance(part, dict) and part.get("type") == "text"
            and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise InvalidRequest(f"{where}.content must be a string or a list of text parts", param=where)


class ChatPrompt:
    """A chat (and the tools it offers) to be rendered on the worker with the instance's own
    chat template."""

    def __init__(self, messages: tuple[ChatMessage, ...], tools: ToolSpec | None = None):
        self.messages = messages
        self.tools = tools

    def __call__(self, llm: Any, render: Render) -> PromptTokens:
        """:raise ChatTemplateError, InvalidRequest: see `ChatTemplates.render`."""
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            text = plain_layout(self.messages, self.tools)
            return PromptTokens(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False),
                                plain_stops(self.messages, self.tools))
        messages, variables = template_input(template, self.messages, self.tools)
        text = render(template, messages, _token_text(llm, llm.token_bos()),
                      _token_text(llm, llm.token_eos()), **variables)
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        bos = llm.tokenize(b"", add_bos=True, special=False)   # [BOS] when the model wants one
        if bos and tokens[:1] != bos:
            tokens = bos + tokens
        return PromptTokens(tokens)


def render_template(template: str, messages: tuple[ChatMessage, ...], bos_token: str,
                    eos_token: str, templates: ChatTemplates | None = None,
                    tools: ToolSpec | None = None) -> str:
    """The chat rendered by a GGUF chat template, ready for the reply (see ChatTemplates).

    :raise ChatTemplateError: the template is broken, ran over a bound, or tried something the
        sandbox forbids.
    :raise InvalidRequest: the template refused the messages (its `raise_exception`), such as
        roles that do not alternate.
    """
    dicts, variables = template_input(template, messages, tools)
    return (templates or ChatTemplates()).render(template, dicts, bos_token, eos_token,
                                                 **variables)


def template_input(template: str, messages: tuple[ChatMessage, ...],
                   tools: ToolSpec | None) -> tuple[list[dict], dict]:
    """The messages and variables a template renders. A template that mentions `tools` gets
    them as Hugging Face templates expect them (and calls and results in its messages); one
    that does not gets the generic tool instructions in the system message, calls written as
    `<tool_call>` blocks in the assistant's text and results as user turns."""
    if "tools" in template:
        variables = {"tools": [tool_dict(tool) for tool in tools.tools]} if tools else {}
        return [_message_dict(m) for m in messages], variables
    dicts = _without_tool_turns(messages)
    instructions = tool_instructions(tools)
    if instructions and dicts[0]["role"] == "system":
        dicts[0] = {**dicts[0], "content": f"{dicts[0]['content']}\n\n{instructions}"}
    elif instructions:
        dicts.insert(0, {"role": "system", "content": instructions})
    return dicts, {}


def tool_dict(tool: Any) -> dict:
    """A tool as OpenAI (and Hugging Face templates) write it."""
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": tool.parameters}}


def _message_dict(message: ChatMessage) -> dict:
    """A message as Hugging Face templates take it: calls with their arguments as objects."""
    result: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        result["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.name, "arguments": json.loads(call.arguments)}}
            for call in message.tool_calls]
    if message.tool_call_id is not None:
        result["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        result["name"] = message.name
    return result


def _without_tool_turns(messages: tuple[ChatMessage, ...]) -> list[dict]:
    """Role/content dicts for a template that knows nothing of tools: calls as text, and the
    results that follow a turn as one user turn."""
    dicts: list[dict] = []
    for message in messages:
        if message.role != "tool":
            dicts.append({"role": message.role, "content": _with_calls(message)})
        elif dicts and dicts[-1].get("results"):
            dicts[-1]["content"] += "\n" + _result_line(message)
        else:
            dicts.append({"role": "user", "content": _result_line(message), "results": True})
    return [{"role": d["role"], "content": d["content"]} for d in dicts]


def _result_line(message: ChatMessage) -> str:
    return f"Tool result ({message.name}): {message.content}" if message.name \
        else f"Tool result: {message.content}"


def _with_calls(message: ChatMessage) -> str:
    """The message's text followed by its calls in the `<tool_call>` form."""
    blocks = [call_block(call.name, call.arguments) for call in message.tool_calls]
    return "\n".join(([message.content] if message.content else []) + blocks)


def call_block(name: str, arguments: str) -> str:
    """A call as the model writes it (and as the grammar makes it write it)."""
    return f'{CALL_OPEN}{{"name": "{name}", "arguments": {arguments}}}{CALL_CLOSE}'


def tool_instructions(tools: ToolSpec | None) -> str:
    """The generic tool section: each tool's name, description and argument schema, and how to
    call. Empty without tools or with tool_choice "none" (a model shown a call format it may
    not use tends to use it anyway)."""
    if tools is None or tools.choice == "none":
        return ""
    lines = [f"- {tool.name}: {tool.description or '(no description)'}\n"
             f"  arguments (JSON schema): {json.dumps(tool.parameters)}" for tool in tools.tools]
    return ("You can call these tools:\n" + "\n".join(lines) + "\n\nTo call a tool, answer "
            f'with {CALL_OPEN}{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}'
            f"{CALL_CLOSE} (one block per call) and nothing else. Each result comes back in a "
            "Tool turn.")


def plain_layout(messages: tuple[ChatMessage, ...], tools: ToolSpec | None = None) -> str:
    """System text (and the tool instructions) first, then one "Name: text" line per turn
    (calls written as `<tool_call>` blocks, results as "Tool:" turns), then the cue for the
    reply."""
    system = [m.content for m in messages if m.role == "system" and m.content]
    system = "\n\n".join(system + ([tool_instructions(tools)] if tool_instructions(tools)
                                    else []))
    turns = [f"{_PLAIN_NAMES[m.role]}: {_with_calls(m)}" for m in messages if m.role != "system"]
    lines = "".join(f"{turn}\n" for turn in turns)
    return (f"{system}\n\n" if system else "") + lines + "Assistant:"


def plain_stops(messages: tuple[ChatMessage, ...], tools: ToolSpec | None) -> tuple[str, ...]:
    """Where the plain layout's reply ends: a new turn ("Tool:" too once tools are about)."""
    if tools is not None or any(m.role == "tool" or m.tool_calls for m in messages):
        return PLAIN_STOPS + TOOL_STOPS
    return PLAIN_STOPS


def _token_text(llm: Any, token: int) -> str:
    if token < 0:
        return ""
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


def reply_events(events: Iterable[Token | Finished]) -> Iterator[Token | Finished]:
    """A generation's events as a chat reply: without the whitespace that follows the cue
    ("Assistant: Paris", not "Assistant:" + " Paris"), streamed and whole alike."""
    leading, skipped = True, ()
    for event in events:
        if isinstance(event, Finished):
            yield reply_finished(event)
            continue
        if leading:
            text = event.text.lstrip()
            if not text:        # its tokens' logprobs go with the first text sent
                skipped += event.logprobs
                continue
            leading, event = False, replace(event, text=text,
                                            logprobs=skipped + event.logprobs)
        yield event


def reply_finished(finished: Finished) -> Finished:
    """The whole reply without leading whitespace (see `reply_events`)."""
    return replace(finished, text=finished.text.lstrip())
