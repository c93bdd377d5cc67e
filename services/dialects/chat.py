"""Chat messages as a prompt: the model's own chat template, or a plain layout for base models.

The template comes from the GGUF (`tokenizer.chat_template`) of the instance that runs the
request, so rendering happens on the worker (`ChatPrompt` is the builder `LLMService` calls,
with the app's `ChatTemplates`). It renders in Jinja's sandbox with bounds on time and size
(services/engine/chat_template.py): a template that reaches for Python internals, or runs past a bound,
is a `ChatTemplateError` (422, the model file's fault) and its worker is free again at once. A
model without a template (such as the default Gemma 3 270M, a base model) gets
"User: … / Assistant:" turns and stops where it starts a new turn.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator

from services.engine.chat_template import ChatTemplates
from services.errors import InvalidRequest
from services.types import Finished, PromptTokens, Render, Token

MAX_MESSAGES = 1024
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "tool"}
_PLAIN_NAMES = {"user": "User", "assistant": "Assistant", "tool": "Tool"}
# Where a base model, left to itself, goes on to write the next turn.
PLAIN_STOPS = ("\nUser:", "\nAssistant:")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def parse_messages(raw: Any, param: str = "messages") -> tuple[ChatMessage, ...]:
    """Messages from an OpenAI or Ollama body: role and text content ("developer" is a system
    message; OpenAI's list of text parts is joined).

    :raise InvalidRequest: not a non-empty list of {role, content}, an unknown role, or content
        this server cannot take (images, tool calls).
    """
    if not isinstance(raw, list) or not raw or len(raw) > MAX_MESSAGES:
        raise InvalidRequest(f"{param} must be a list of 1 to {MAX_MESSAGES} messages", param=param)
    return tuple(_parse_message(message, f"{param}[{index}]") for index, message in enumerate(raw))


def _parse_message(message: Any, where: str) -> ChatMessage:
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where} must be an object with role and content", param=where)
    role = message.get("role")
    role = _ROLES.get(role) if isinstance(role, str) else None
    if role is None:
        raise InvalidRequest(f"{where}.role must be one of {', '.join(_ROLES)}", param=where)
    for unsupported in ("images", "tool_calls", "function_call", "audio"):
        if message.get(unsupported):
            raise InvalidRequest(f"{where}.{unsupported} is not supported by this server",
                                 param=where)
    return ChatMessage(role, _text_content(message.get("content"), where))


def _text_content(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(
            isinstance(part, dict) and part.get("type") == "text"
            and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    raise InvalidRequest(f"{where}.content must be a string or a list of text parts", param=where)


class ChatPrompt:
    """A chat to be rendered on the worker with the instance's own chat template."""

    def __init__(self, messages: tuple[ChatMessage, ...]):
        self.messages = messages

    def __call__(self, llm: Any, render: Render) -> PromptTokens:
        """:raise ChatTemplateError, InvalidRequest: see `ChatTemplates.render`."""
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            text = plain_layout(self.messages)
            return PromptTokens(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False),
                                PLAIN_STOPS)
        text = render(template, [{"role": m.role, "content": m.content} for m in self.messages],
                      _token_text(llm, llm.token_bos()), _token_text(llm, llm.token_eos()))
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        bos = llm.tokenize(b"", add_bos=True, special=False)   # [BOS] when the model wants one
        if bos and tokens[:1] != bos:
            tokens = bos + tokens
        return PromptTokens(tokens)


def render_template(template: str, messages: tuple[ChatMessage, ...], bos_token: str,
                    eos_token: str, templates: ChatTemplates | None = None) -> str:
    """The chat rendered by a GGUF chat template, ready for the reply (see ChatTemplates).

    :raise ChatTemplateError: the template is broken, ran over a bound, or tried something the
        sandbox forbids.
    :raise InvalidRequest: the template refused the messages (its `raise_exception`), such as
        roles that do not alternate.
    """
    return (templates or ChatTemplates()).render(
        template, [{"role": m.role, "content": m.content} for m in messages], bos_token,
        eos_token)


def plain_layout(messages: tuple[ChatMessage, ...]) -> str:
    """System text first, then one "Name: text" line per turn, then the cue for the reply."""
    system = "\n\n".join(m.content for m in messages if m.role == "system" and m.content)
    turns = [f"{_PLAIN_NAMES[m.role]}: {m.content}" for m in messages if m.role != "system"]
    lines = "".join(f"{turn}\n" for turn in turns)
    return (f"{system}\n\n" if system else "") + lines + "Assistant:"


def _token_text(llm: Any, token: int) -> str:
    if token < 0:
        return ""
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


def reply_events(events: Iterable[Token | Finished]) -> Iterator[Token | Finished]:
    """A generation's events as a chat reply: without the whitespace that follows the cue
    ("Assistant: Paris", not "Assistant:" + " Paris"), streamed and whole alike."""
    leading = True
    for event in events:
        if isinstance(event, Finished):
            yield reply_finished(event)
            continue
        if leading:
            text = event.text.lstrip()
            if not text:
                continue
            leading, event = False, Token(text)
        yield event


def reply_finished(finished: Finished) -> Finished:
    """The whole reply without leading whitespace (see `reply_events`)."""
    return replace(finished, text=finished.text.lstrip())
