"""Tool (function) calling: the tools a request offers, how the model is made to call them, and
how its output becomes calls.

A call is written as `<tool_call>{"name": "<tool>", "arguments": {…}}</tool_call>` (the Hermes
/ Qwen form, which templates of tool-trained models use too, and the form the generic layout
of services/dialects/chat.py teaches a model without a template). Small models write it
reliably because a grammar does the writing:

- tool_choice "required" or a named function: the whole reply is constrained to a call (or,
  with parallel_tool_calls, one or more calls back to back; a named function gets exactly one)
  of an allowed function, its arguments matching that function's JSON schema. Nothing may
  separate two calls: a small model offered a newline after a call takes it and repeats the
  call until max_tokens, while offered only `<tool_call>` or the end, it ends;
- "auto": the same grammar, lazy: the reply is free text until the model writes `<tool_call>`,
  and constrained from there, so a call it starts is a valid call;
- "none": no grammar; the tools are still part of the prompt (the history may hold calls).

Once the grammar is complete llama.cpp allows only end-of-generation, so the reply ends after
its call(s). `tool_events` then takes the calls out of the text, streamed and whole alike.

Tools are client input that becomes grammar work, so they are bounded like JSON schemas are
(services/dialects/json_mode.py): at most MAX_TOOLS, names of at most 64 safe characters,
descriptions of at most MAX_DESCRIPTION characters, every schema checked, and the grammar of
all of them together checked against llama.cpp's bounds.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator

from services.dialects.json_mode import check_grammar, check_schema, schema_grammar
from services.errors import InvalidRequest
from services.types import Finished, SamplingParams, Token, ToolCall, ToolCalled

MAX_TOOLS = 128
MAX_DESCRIPTION = 8192
MAX_NESTING = 64
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CHOICES = ("none", "auto", "required")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# GBNF pieces that are not rule names: literals, character classes, repetition counts.
_GBNF_WORD = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|\{[^}]*\}|([A-Za-z0-9_-]+)')
NO_ARGUMENTS = {"type": "object", "properties": {}}
_CHOICE_FORM = ('tool_choice must be none, auto, required or {"type": "function", "function": '
                '{"name": …}}')


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict          # JSON Schema of the arguments object


@dataclass(frozen=True)
class ToolSpec:
    """The tools of one request and what it lets the model do with them.

    `choice`: "auto" (text or calls), "required" (at least one call), or "function" (a call of
    `forced`). tool_choice "none" with tools is a ToolSpec with choice "none": the tools are
    shown to the model (the history may hold calls) but it may not call them.
    `grammar`: GBNF for the reply as calls (built by `parse_tools`, empty for "none").
    """

    tools: tuple[Tool, ...]
    choice: str = "auto"
    forced: str | None = None
    parallel: bool = True
    grammar: str = field(default="", repr=False, compare=False)

    def sampling(self, sampling: SamplingParams) -> SamplingParams:
        """`sampling` with the tool-call grammar: whole for required / a named function, lazy
        (triggered where a call starts) for auto, none for "none".

        :raise InvalidRequest: the request also asks for a JSON output grammar, which cannot
            hold a call.
        """
        if self.choice == "none":
            return sampling
        if sampling.grammar is not None:
            raise InvalidRequest("a JSON response format cannot be combined with tools the "
                                 "model may call (use tool_choice none, or no tools)",
                                 param="tools")
        triggers = (CALL_OPEN,) if self.choice == "auto" else ()
        return replace(sampling, grammar=self.grammar, grammar_triggers=triggers)

    def names(self) -> set[str]:
        return {tool.name for tool in self.tools}


def parse_tools(tools: Any, tool_choice: Any = None, parallel_tool_calls: bool | None = None,
                *, param: str = "tools") -> ToolSpec | None:
    """OpenAI chat's `tools` ([{"type": "function", "function": {name, description,
    parameters}}]) and `tool_choice` ("none" | "auto" | "required" | {"type": "function",
    "function": {"name": …}}); None when no tools are given. Ollama sends the same tools shape;
    the Responses API's flat shape ({"type": "function", "name": …, "parameters": …}, and
    {"type": "function", "name": …} as tool_choice) is taken too.

    :raise InvalidRequest: (with `param`) a malformed tool, a duplicate or invalid name, a
        schema the grammar cannot take, or a tool_choice naming no given tool.
    """
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise InvalidRequest("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest(f"{param} must be a list of tools", param=param)
    if len(tools or ()) > MAX_TOOLS:
        raise InvalidRequest(f"{param} holds {len(tools)} tools, more than {MAX_TOOLS}",
                             param=param)
    parsed = tuple(_parse_tool(tool, f"{param}[{index}]") for index, tool in enumerate(tools or ()))
    names = [tool.name for tool in parsed]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise InvalidRequest(f"{param}[{index}].function.name {name!r} is given twice",
                                 param=f"{param}[{index}].function.name")
    choice, forced = _parse_choice(tool_choice, set(names))
    if not parsed:
        return None
    check_schema([tool.parameters for tool in parsed], param)    # all of them together
    spec = ToolSpec(parsed, choice, forced, parallel_tool_calls is not False)
    if choice == "none":
        return spec
    return replace(spec, grammar=call_grammar(spec, param))


def _parse_tool(tool: Any, where: str) -> Tool:
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise InvalidRequest(f'{where} must be {{"type": "function", "function": {{"name": …, '
                             f'"description": …, "parameters": {{…}}}}}}', param=where)
    function = tool.get("function", tool if "name" in tool else None)
    where = f"{where}.function" if "function" in tool else where
    if not isinstance(function, dict):
        raise InvalidRequest(f"{where} must be an object with name, description and "
                             f"parameters", param=where)
    name = function.get("name")
    if not valid_name(name):
        raise InvalidRequest(f"{where}.name must be 1 to 64 letters, digits, _ or -",
                             param=f"{where}.name")
    description = function.get("description") or ""
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise InvalidRequest(f"{where}.description must be a string of at most "
                             f"{MAX_DESCRIPTION} characters", param=f"{where}.description")
    return Tool(name, description, _parameters(function.get("parameters"), f"{where}.parameters"))


def _parameters(schema: Any, where: str) -> dict:
    """The arguments' schema: always an object schema (missing = an object without properties)."""
    if schema is None:
        return dict(NO_ARGUMENTS)
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where} must be a JSON Schema object", param=where)
    if schema.get("type", "object") != "object":
        raise InvalidRequest(f'{where} must describe an object ("type": "object"): arguments '
                             f"are named", param=where)
    check_schema(schema, where)
    return {**schema, "type": "object"}


def _parse_choice(tool_choice: Any, names: set[str]) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "function", the forced name)."""
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise InvalidRequest(_CHOICE_FORM, param="tool_choice")
        if tool_choice == "required" and not names:
            raise InvalidRequest("tool_choice required needs tools", param="tool_choice")
        return tool_choice, None
    function = tool_choice.get("function", tool_choice) if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or tool_choice.get("type") != "function":
        raise InvalidRequest(_CHOICE_FORM, param="tool_choice")
    if name not in names:
        raise InvalidRequest(f"tool_choice names {name[:64]!r}, which is not one of the tools",
                             param="tool_choice")
    return "function", name


def call_grammar(spec: ToolSpec, param: str = "tools") -> str:
    """GBNF for the reply as calls: `<tool_call>{"name": "<n>", "arguments": <args>}</tool_call>`
    with <args> matching tool <n>'s schema, for the tools `spec` allows; one call for a named
    function or without `parallel`, else one or more back to back.

    Each schema is converted on its own (its `$ref`s are relative to itself) and its rules get a
    prefix, so the grammars of several tools live side by side.

    :raise InvalidRequest: a schema the converter cannot take, or a grammar over the bounds.
    """
    allowed = [(index, tool) for index, tool in enumerate(spec.tools)
               if spec.choice != "function" or tool.name == spec.forced]
    rules, names = [], []
    for index, tool in allowed:
        where = f"{param}[{index}].function.parameters"
        rules.append(_prefixed(schema_grammar(tool.parameters, where), f"t{index}-"))
        names.append(f'"{tool.name}\\", \\"arguments\\": " t{index}-root')
    call = '"<tool_call>" "\\n"? "{\\"name\\": \\"" ( ' + " | ".join(names) + \
        ' ) "}" "\\n"? "</tool_call>"'
    several = spec.parallel and spec.choice != "function"
    root = "root ::= tool-call" + (" tool-call*" if several else "")
    grammar = "\n".join((root, f"tool-call ::= {call}", *rules))
    check_grammar(grammar, param)
    return grammar


def _prefixed(grammar: str, prefix: str) -> str:
    """The grammar with every rule name prefixed (literals and classes left as they are)."""
    return _GBNF_WORD.sub(lambda m: prefix + m.group(1) if m.group(1) else m.group(0), grammar)


def json_object(text: str) -> dict | None:
    """`text` as a JSON object nested at most MAX_NESTING deep (as request bodies are), or
    None: not JSON, not an object, or too deep (arguments are rendered into prompts and
    templates, which would recurse through them)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > MAX_NESTING:
            return None
        level = [child for item in level if isinstance(item, (dict, list))
                 for child in (item.values() if isinstance(item, dict) else item)]
    return value if isinstance(value, dict) else None


def valid_name(name: Any) -> bool:
    """A function name as OpenAI allows it: 1 to 64 letters, digits, _ or -."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def tool_events(events: Iterable[Token | Finished],
                spec: ToolSpec | None) -> Iterator[Token | ToolCalled | Finished]:
    """A chat reply's events with the calls taken out: text outside calls as `Token`s (text
    that may be the start of a call is held back until it is known not to be), one
    `ToolCalled` per complete call, then `Finished` with `tool_calls`, its `text` the text
    outside calls, and finish_reason "tool_calls" when there are calls. With `spec` None (or
    choice "none") the events pass through unchanged.

    A whole reply (only a `Finished`) gives the same calls and text as its stream. A block that
    is not a call of a given tool (a cut-off one, bad JSON, or one whose arguments hold the
    text `</tool_call>`, where it is taken to end) stays text. Whitespace between
    calls is not text: a reply of calls only has text "".
    """
    if spec is None or spec.choice == "none":
        yield from events
        return
    splitter = CallSplitter(spec.names())
    for event in events:
        if isinstance(event, Finished):
            fed = "".join(splitter.fed)
            yield from splitter.feed(event.text[len(fed):] if event.text.startswith(fed) else "")
            yield from splitter.finish(event)
            return
        yield from splitter.feed(event.text, event.logprobs)


class CallSplitter:
    """The state of `tool_events`: text not yet sent, and the calls found so far.

    Whitespace next to a call is not text (a reply of calls only has text ""), so trailing
    whitespace is held until text follows it; the same rules apply however the text is cut
    into tokens, so a stream and its whole reply agree.
    """

    def __init__(self, names: set[str]):
        self.names = names
        self.fed: list[str] = []  # all text fed so far
        self.pending = ""         # text not yet sent: a possible call start, a call, whitespace
        # While a call is under way its text gathers here, and only the new text (and the end
        # of the old) is searched for the call's end: linear in the reply's length.
        self.call_parts: list[str] = []
        self.call_tail = ""
        self.logprobs: list = []  # of the tokens whose text is pending
        self.after_call = False   # the last thing found was a call: drop the space after it
        self.sent: list[str] = []
        self.calls: list[ToolCall] = []

    def feed(self, text: str, logprobs: tuple = ()) -> Iterator[Token | ToolCalled]:
        self.fed.append(text)
        self.logprobs.extend(logprobs)
        if self.call_parts:
            window = self.call_tail + text
            self.call_parts.append(text)
            self.call_tail = window[-len(CALL_CLOSE):]
            if CALL_CLOSE not in window:
                return
            self.pending, self.call_parts = "".join(self.call_parts), []
        else:
            self.pending += text
        while True:
            start = self.pending.find(CALL_OPEN)
            if start < 0:
                yield from self._send(self._safe_length())
                return
            end = self.pending.find(CALL_CLOSE, start)
            if end < 0:           # a call under way: held until its end
                yield from self._send(len(self.pending[:start].rstrip()))
                self.call_parts, self.call_tail = [self.pending], self.pending[-len(CALL_CLOSE):]
                self.pending = ""
                return
            call = self._call(self.pending[start + len(CALL_OPEN):end])
            if call is None:      # not a call: the block is text
                yield from self._send(end + len(CALL_CLOSE))
                continue
            yield from self._send(len(self.pending[:start].rstrip()))
            self.pending = self.pending[self.pending.find(CALL_CLOSE) + len(CALL_CLOSE):]
            self.logprobs, self.after_call = [], True
            self.calls.append(call)
            yield ToolCalled(len(self.calls) - 1, call)

    def finish(self, finished: Finished) -> Iterator[Token | Finished]:
        """The held text (a cut-off call, a partial tag, trailing space) is text after all,
        except trailing space in a reply with calls."""
        self.pending, self.call_parts = self.pending + "".join(self.call_parts), []
        yield from self._send(len(self.pending.rstrip() if self.calls else self.pending))
        reason = finished.finish_reason
        if self.calls and reason == "stop":
            reason = "tool_calls"
        yield replace(finished, text="".join(self.sent), finish_reason=reason,
                      tool_calls=tuple(self.calls))

    def _safe_length(self) -> int:
        """How much of `pending` (which holds no call start) can be sent: all but a tail that
        may begin a call tag, and the whitespace before that tail."""
        tail = 0
        for keep in range(min(len(CALL_OPEN) - 1, len(self.pending)), 0, -1):
            if CALL_OPEN.startswith(self.pending[-keep:]):
                tail = keep
                break
        return len(self.pending[:len(self.pending) - tail].rstrip())

    def _send(self, length: int) -> Iterator[Token]:
        """Send `pending[:length]` as text (without the space right after a call)."""
        if self.after_call:
            stripped = self.pending[:length].lstrip()
            self.pending = self.pending[length - len(stripped):]
            length = len(stripped)
        if length <= 0:
            return
        text, self.pending = self.pending[:length], self.pending[length:]
        logprobs, self.logprobs = tuple(self.logprobs), []
        self.after_call = False
        self.sent.append(text)
        yield Token(text, logprobs)

    def _call(self, body: str) -> ToolCall | None:
        value = json_object(body)
        arguments = value.get("arguments", {}) if value is not None else None
        if not isinstance(arguments, dict) or value.get("name") not in self.names:
            return None
        return ToolCall(new_call_id(), value["name"], json.dumps(arguments))
