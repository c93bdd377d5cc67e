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
import numpy as np
from flask import Blueprint, g, jsonify

from api import backend
from api.compat import start_generation
from api.docs import document
from api.errors import register_error_handlers
from api.http import log_fields
from api.json_body import json_body
from api.relay import SSEData, Wire, log_result, relay
from services.dialects.chat import reply_events, reply_finished
from services.embeddings import check_inputs
from services.types import Finished, Token
from services.dialects.openai_request import (CHAT_PARAMS, COMPLETION_PARAMS, EMBEDDING_PARAMS,
                                     OpenAIGeneration, parse_chat, parse_completion,
                                     parse_embedding)

bp = Blueprint("openai", __name__)

_MODEL = "gemma-3-270m-q4_k_m.gguf"
_USAGE = {"prompt_tokens": 9, "completion_tokens": 8, "total_tokens": 17}


def openai_error(payload: dict, status: int) -> dict:
    """An error in OpenAI's shape; the openai package picks its exception class by status."""
    error = payload["error"]
    kind = ("authentication_error" if status == 401 else "rate_limit_error" if status == 429
            else "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": error["message"], "type": kind, "param": error.get("param"),
                      "code": error["code"]}}


register_error_handlers(bp, shape=openai_error)


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
    """Continue a prompt (OpenAI completions): the text as is, no chat template."""
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
    data = [{"object": "embedding", "index": index,
             "embedding": _encode(vector, request.encoding_format)}
            for index, vector in enumerate(result.vectors)]
    return jsonify(object="list", data=data, model=result.model,
                   usage={"prompt_tokens": result.prompt_tokens,
                          "total_tokens": result.prompt_tokens})


def _reply(request: OpenAIGeneration, id_prefix: str, kind: str, chat: bool):
    """Run the request and answer with one JSON object, or SSE chunks ending in [DONE]."""
    stream = start_generation(request.model, request.prompt, request.sampling)
    head = {"id": f"{id_prefix}-{g.request_id}", "object": kind, "created": int(time.time()),
            "model": stream.started.model}
    if request.stream:
        return relay(reply_events(stream) if chat else stream, stream.close,
                     _wire(head, chat, request.include_usage))
    finished = log_result(reply_finished(stream.collect()) if chat else stream.collect())
    choice = ({"message": {"role": "assistant", "content": finished.text}} if chat
              else {"text": finished.text})
    return jsonify(**head, choices=[{"index": 0, **choice, "logprobs": None,
                                     "finish_reason": finished.finish_reason}],
                   usage=finished.usage.to_dict())


def _wire(head: dict, chat: bool, include_usage: bool) -> Wire:
    """OpenAI's chunks: a chat stream opens with the assistant's role and sends deltas; every
    stream that ends well ends with [DONE] (after an error event the stream just ends, and the
    client raises that error)."""
    if chat:
        head = {**head, "object": "chat.completion.chunk"}

    def choice(text: str | None, finish_reason: str | None) -> dict:
        if chat:
            return {"delta": {} if text is None else {"content": text},
                    "finish_reason": finish_reason}
        return {"text": text or "", "finish_reason": finish_reason}

    def shape(event: Token | Finished) -> list[dict]:
        if isinstance(event, Token):
            return [_chunk(head, choice(event.text, None), include_usage)]
        last = [_chunk(head, choice(None, event.finish_reason), include_usage)]
        if include_usage:
            last.append({**head, "choices": [], "usage": event.usage.to_dict()})
        return last

    role = {"delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    return Wire(shape, openai_error, opening=(_chunk(head, role, include_usage),) if chat else (),
                closing=(SSEData("[DONE]"),))


def _chunk(head: dict, choice: dict, include_usage: bool) -> dict:
    chunk = {**head, "choices": [{"index": 0, **choice, "logprobs": None}]}
    if include_usage:
        chunk["usage"] = None      # OpenAI: every chunk but the last carries "usage": null
    return chunk


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
