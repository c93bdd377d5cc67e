"""OpenAI reply shapes (/v1): choices, messages, tool calls, logprobs, chunks and usage.

Plain functions from the engine's events to OpenAI's JSON, so that the openai package's types
(and its stream helpers) parse them: a chat message with `tool_calls` (or, for a request that
used the legacy `functions`, `function_call`), finish_reason "tool_calls"; streamed calls as a
delta naming the call (id, type, name, empty arguments) and a delta with the arguments; chat
logprobs as {"content": [...], "refusal": null}; completions logprobs as parallel lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from services.types import (Finished, PromptTokens, Render, TokenLogprob, ToolCall, ToolCalled,
                            Usage)
from services.engine.sequence import check_token_ids


@dataclass(frozen=True)
class Totals:
    """The whole request's counts, after its last choice: the access log reads `usage` and
    `text` (as from a Finished), the stream's last chunk carries `usage`."""

    usage: Usage
    text: str


def total_usage(finished: Sequence[Finished], n: int) -> Usage:
    """Every choice's completion tokens; each prompt's tokens once (its n choices share it, and
    OpenAI counts it once), the prompts taken from choices 0, n, 2n, …"""
    prompt = sum(f.usage.prompt_tokens for f in finished[::n])
    return Usage(prompt, sum(f.usage.completion_tokens for f in finished))


def tool_call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def chat_message(finished: Finished, legacy: bool) -> dict:
    """The assistant message: content null when the reply is only calls."""
    message: dict[str, Any] = {"role": "assistant", "refusal": None,
                               "content": finished.text or (None if finished.tool_calls else "")}
    if finished.tool_calls and legacy:
        call = finished.tool_calls[0]
        message["function_call"] = {"name": call.name, "arguments": call.arguments}
    elif finished.tool_calls:
        message["tool_calls"] = [tool_call(call) for call in finished.tool_calls]
    return message


def finish_reason(finished: Finished, legacy: bool) -> str:
    if finished.finish_reason == "tool_calls" and legacy:
        return "function_call"
    return finished.finish_reason


def call_deltas(event: ToolCalled, legacy: bool) -> list[dict]:
    """A finished call as two deltas: its name (arguments empty), then its arguments; the
    openai package's stream helpers join them by `index`."""
    call = event.call
    if legacy:
        return [{"function_call": {"name": call.name, "arguments": ""}},
                {"function_call": {"arguments": call.arguments}}]
    return [{"tool_calls": [{"index": event.index, "id": call.id, "type": "function",
                             "function": {"name": call.name, "arguments": ""}}]},
            {"tool_calls": [{"index": event.index, "function": {"arguments": call.arguments}}]}]


def _top(entry: TokenLogprob) -> list[dict]:
    return [{"token": top.token, "logprob": top.logprob, "bytes": list(top.bytes)}
            for top in entry.top]


def chat_logprobs(entries: Iterable[TokenLogprob]) -> dict:
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
                         "top_logprobs": _top(e)} for e in entries],
            "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob | None], offset: int) -> dict:
    """Completions' parallel lists; `offset`: where the first token's text starts in the
    choice's text. An unscored token (the prompt's first, with echo) has null logprobs."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for entry in entries:
        scored = entry.logprob is not None
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        top_logprobs.append({top.token: top.logprob for top in entry.top} if scored else None)
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


class EchoedPrompt:
    """A completions prompt whose text and tokens the reply repeats (echo): built on the
    worker like any prompt, it keeps the text (token ids detokenized) and each token's text,
    for the prompt scores that come without one (the first token has no logprob)."""

    def __init__(self, prompt: str | list[int]):
        self.prompt = prompt
        self.text = prompt if isinstance(prompt, str) else ""
        self.pieces: list[str] = []

    def __call__(self, llm: Any, render: Render) -> PromptTokens:
        """:raise InvalidRequest: token ids outside the model's vocabulary."""
        if isinstance(self.prompt, str):
            tokens = llm.tokenize(self.prompt.encode("utf-8"), add_bos=True, special=True)
        else:
            tokens = check_token_ids(self.prompt, llm.n_vocab())
            self.text = llm.detokenize(tokens).decode("utf-8", errors="replace")
        bos = llm.token_bos()
        self.pieces = ["" if t == bos and i == 0 and isinstance(self.prompt, str)
                       else llm.detokenize([t]).decode("utf-8", errors="replace")
                       for i, t in enumerate(tokens)]
        return PromptTokens(tokens)

    def scored(self, prompt_logprobs: Sequence[TokenLogprob | None]) -> list[TokenLogprob]:
        """The prompt's tokens with their scores; the unscored ones (None) with null logprob."""
        return [entry if entry is not None else TokenLogprob(piece, None, tuple(
                    piece.encode("utf-8")))
                for piece, entry in zip(self.pieces, prompt_logprobs)]
