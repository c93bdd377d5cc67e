"""OpenAI-compatible API (/v1): models, completions, chat completions, embeddings.

Point the `openai` package (or LangChain's ChatOpenAI, an editor, a chat UI) at
http://host:port/v1. Requests run through the same LLMService, admission, pool and stats as
/api/v1/generate; this module only translates shapes. Errors keep their statuses and take
OpenAI's shape, {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import base64
import time
from datetime import datetime
from typing import Iterator

import numpy as np
from flask import Blueprint, g, jsonify

from api import backend
from api.compat import start_choice_generations
from api.docs import document
from api.errors import openai_error
from api.http import log_fields
from api.json_body import json_body
from api.relay import SSEData, Wire, log_result, relay
from services.dialects.chat import reply_events
from services.dialects.openai_reply import (Totals, call_deltas, chat_logprobs, chat_message,
                                            completion_logprobs, finish_reason, total_usage)
from services.dialects.openai_request import (CHAT_PARAMS, COMPLETION_PARAMS, EMBEDDING_PARAMS,
                                              OpenAIGeneration, parse_chat, parse_completion,
                                              parse_embedding)
from services.dialects.tools import tool_events
from services.embeddings import check_inputs, shorten
from services.types import Finished, Token, ToolCalled

bp = Blueprint("openai", __name__)

_MODEL = "gemma-3-270m-q4_k_m.gguf"
_USAGE = {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17}


@bp.get("/models")
@document(reply={"object": "list", "data": [{"id": _MODEL, "object": "model",
                                             "created": 1763977200, "owned_by": "local"}]})
def list_models():
    """The models, as OpenAI lists them (GGUF models; ids are the names /api/v1/models shows)."""
    return jsonify(object="list", data=[_model(m) for m in backend().model_admin.list("gguf")])


@bp.get("/models/<name>")
@document(reply={"id": _MODEL, "object": "model", "created": 1763977200, "owned_by": "local"})
def get_model(name: str):
    """One model, as OpenAI describes it; 404 if there is no such model."""
    return jsonify(_model(backend().model_admin.describe(name, "gguf")))


@bp.post("/completions")
@document(params=COMPLETION_PARAMS,
          example={"model": _MODEL, "prompt": "The capital of France is", "max_tokens": 8,
                   "temperature": 0},
          reply={"id": "cmpl-3f2c…", "object": "text_completion", "created": 1763977200,
                 "model": _MODEL, "choices": [{"index": 0, "text": " Paris.", "logprobs": None,
                                               "finish_reason": "stop"}], "usage": _USAGE},
          stream_reply='data: {"object": "text_completion", "choices": [{"text": " Paris", …}]}'
                       '\n\ndata: [DONE]')
def completions():
    """Continue a prompt (OpenAI completions): the text as is, no chat template.

    A list of prompts gives one choice each (times n; choice index = prompt index × n + i).
    logprobs k adds each token's log probability and its k likeliest alternatives; echo puts
    the prompt first (with logprobs, its tokens scored too; max_tokens 0 only scores it).
    """
    request = parse_completion(json_body(), backend().config.N_CTX)
    return _reply(request, "cmpl", "text_completion", chat=False)


@bp.post("/chat/completions")
@document(params=CHAT_PARAMS,
          example={"model": _MODEL, "messages": [{"role": "user", "content": "Say hello."}],
                   "max_tokens": 16, "temperature": 0},
          reply={"id": "chatcmpl-3f2c…", "object": "chat.completion", "created": 1763977200,
                 "model": _MODEL, "choices": [{"index": 0, "message": {
                     "role": "assistant", "content": "Hello."}, "logprobs": None,
                     "finish_reason": "stop"}], "usage": _USAGE},
          stream_reply='data: {"object": "chat.completion.chunk", "choices": [{"delta": '
                       '{"content": "Hello"}, …}]}\n\ndata: [DONE]')
def chat_completions():
    """Answer a conversation (OpenAI chat completions) in the model's own chat template.

    The template is the GGUF's tokenizer.chat_template, rendered in Jinja's sandbox; a model
    without one (a base model) gets plain "User: / Assistant:" turns. response_format json_object
    or json_schema constrains the output with a grammar, so a reply that ends on its own parses.
    With tools, calls come back as message.tool_calls and finish_reason "tool_calls" (streamed as
    OpenAI's tool_calls deltas); tool_choice required or a named function constrains the reply
    to a call whose arguments match the function's schema. n gives n choices; logprobs and
    top_logprobs add each token's log probability.
    """
    request = parse_chat(json_body(), backend().config.N_CTX)
    return _reply(request, "chatcmpl", "chat.completion", chat=True)


@bp.post("/embeddings")
@document(params=EMBEDDING_PARAMS, example={"model": _MODEL, "input": ["first text", "second"]},
          reply={"object": "list", "data": [{"object": "embedding", "index": 0,
                                             "embedding": [0.0123, -0.0456, "…"]}],
                 "model": _MODEL, "usage": {"prompt_tokens": 5, "total_tokens": 5}})
def embeddings():
    """Embed texts: one normalised vector per input, of the model's embedding size.

    Runs on a separate embedding instance of the model (loaded on first use) and is admitted
    like a generation. An input longer than the context is refused (400).
    """
    request = parse_embedding(json_body())
    log_fields(model=request.model)
    result = backend().embeddings.embed(request.model, check_inputs(request.inputs))
    log_fields(model=result.model, prompt_tokens=result.prompt_tokens)
    vectors = shorten(result.vectors, request.dimensions)
    data = [{"object": "embedding", "index": index,
             "embedding": _encode(vector, request.encoding_format)}
            for index, vector in enumerate(vectors)]
    return jsonify(object="list", data=data, model=result.model,
                   usage={"prompt_tokens": result.prompt_tokens,
                          "total_tokens": result.prompt_tokens})


def _reply(request: OpenAIGeneration, id_prefix: str, kind: str, chat: bool):
    """Run the request's choices and answer with one JSON object, or SSE chunks ending in
    [DONE]; chat replies go through the tool-call parser when the request offers tools."""
    transform = ((lambda events: tool_events(reply_events(events), request.tools)) if chat
                 else (lambda events: events))
    choices = start_choice_generations(request.model, request.requests, transform)
    head = {"id": f"{id_prefix}-{g.request_id}", "object": kind, "created": int(time.time()),
            "model": choices.started[0].model}
    shape = _ChatChoices(request) if chat else _CompletionChoices(request)
    if request.stream:
        return relay(_with_totals(choices, request), choices.close,
                     _wire(head, shape, request.include_usage, len(request.requests)))
    finished = choices.collect()
    totals = log_result(_totals(finished, request))
    return jsonify(**head, choices=[{"index": index, **shape.whole(index, one)}
                                    for index, one in enumerate(finished)],
                   usage=totals.usage.to_dict())


def _totals(finished: list[Finished], request: OpenAIGeneration) -> Totals:
    return Totals(total_usage(finished, request.n), "".join(one.text for one in finished))


def _with_totals(choices, request: OpenAIGeneration) -> Iterator:
    """The choices' (index, event) pairs, then the request's `Totals`."""
    finished: dict[int, Finished] = {}
    for index, event in choices:
        if isinstance(event, Finished):
            finished[index] = event
        yield (index, event) if not isinstance(event, str) else event
    yield _totals([finished[index] for index in sorted(finished)], request)


class _ChatChoices:
    """A chat choice whole (`whole`) or as chunk choices (`streamed`), in OpenAI's shapes."""

    def __init__(self, request: OpenAIGeneration):
        self.legacy, self.logprobs = request.legacy_functions, request.logprobs

    def whole(self, index: int, finished: Finished) -> dict:
        return {"message": chat_message(finished, self.legacy),
                "logprobs": chat_logprobs(finished.logprobs) if self.logprobs else None,
                "finish_reason": finish_reason(finished, self.legacy)}

    def opening(self, index: int) -> dict:
        return {"delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def streamed(self, index: int, event: Token | ToolCalled | Finished) -> list[dict]:
        if isinstance(event, Token):
            logprobs = chat_logprobs(event.logprobs) if self.logprobs else None
            return [{"delta": {"content": event.text}, "logprobs": logprobs,
                     "finish_reason": None}]
        if isinstance(event, ToolCalled):
            return [{"delta": delta, "logprobs": None, "finish_reason": None}
                    for delta in call_deltas(event, self.legacy)]
        return [{"delta": {}, "logprobs": None,
                 "finish_reason": finish_reason(event, self.legacy)}]


class _CompletionChoices:
    """A completion choice whole or streamed. With echo the prompt comes first (and, with
    logprobs, its scored tokens), so a streamed echoed choice is sent in one chunk when it ends:
    the prompt's scores exist only then."""

    def __init__(self, request: OpenAIGeneration):
        self.request = request
        self.offsets: dict[int, int] = {}

    def whole(self, index: int, finished: Finished) -> dict:
        request = self.request
        text, entries = finished.text, list(finished.logprobs)
        if request.echo:
            prompt = request.prompts[index // request.n]
            text = prompt.text + text
            entries = prompt.scored(finished.prompt_logprobs) + entries
        return {"text": text,
                "logprobs": completion_logprobs(entries, 0) if request.logprobs else None,
                "finish_reason": finished.finish_reason}

    def opening(self, index: int) -> None:
        return None

    def streamed(self, index: int, event: Token | Finished) -> list[dict]:
        if isinstance(event, Finished):
            whole = self.whole(index, event)
            end = {"text": "", "logprobs": None, "finish_reason": whole["finish_reason"]}
            return [{**whole, "finish_reason": None}, end] if self.request.echo else [end]
        if self.request.echo:
            return []
        offset = self.offsets.get(index, 0)
        self.offsets[index] = offset + len(event.text)
        logprobs = (completion_logprobs(event.logprobs, offset) if self.request.logprobs
                    else None)
        return [{"text": event.text, "logprobs": logprobs, "finish_reason": None}]


def _wire(head: dict, shape, include_usage: bool, count: int) -> Wire:
    """OpenAI's chunks, each carrying its choice's index: a chat stream opens with each
    choice's role; the request's usage (every choice) comes last when asked for; a stream that
    ends well ends with [DONE] (after an error event the stream just ends, and the client raises
    that error)."""
    if isinstance(shape, _ChatChoices):
        head = {**head, "object": "chat.completion.chunk"}

    def chunk(index: int, choice: dict) -> dict:
        message = {**head, "choices": [{"index": index, **choice}]}
        if include_usage:
            message["usage"] = None  # OpenAI: every chunk but the last carries "usage": null
        return message

    def event(item) -> list[dict]:
        if isinstance(item, Totals):
            return [{**head, "choices": [], "usage": item.usage.to_dict()}] if include_usage else []
        index, one = item
        return [chunk(index, choice) for choice in shape.streamed(index, one)]

    opening = tuple(chunk(index, shape.opening(index)) for index in range(count)
                    if shape.opening(index) is not None)
    return Wire(event, openai_error, opening=opening, closing=(SSEData("[DONE]"),))


def _model(info: dict) -> dict:
    return {"id": info["name"], "object": "model", "created": _epoch(info.get("added_at")),
            "owned_by": "local"}


def _epoch(iso: str | None) -> int:
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except (AttributeError, ValueError):
        return 0


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    """Floats, or base64 of little-endian float32 (the openai package's default request)."""
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
