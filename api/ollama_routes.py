"""Ollama-compatible API (/api): generate, chat, embed, tags, show, ps, delete, version.

Point the `ollama` package (or any Ollama client) at http://host:port. Generations stream as
NDJSON by default ("stream": false for one object) and report Ollama's counts and durations
(nanoseconds). Requests share LLMService, admission, pool and stats with every other API; errors
keep their statuses and take Ollama's shape, {"error": "message"}.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from flask import Blueprint, g, jsonify

from api import backend
from api.compat import start_generation
from api.docs import document
from api.errors import register_error_handlers
from api.http import log_fields
from api.json_body import json_body
from api.relay import Wire, log_result, relay
from services.dialects.chat import reply_events, reply_finished
from services.embeddings import check_inputs
from services.types import Finished, Token
from services.model_pool import VARIANT_MARK
from services.dialects.ollama_request import (CHAT_PARAMS, EMBED_PARAMS, GENERATE_PARAMS, MODEL_PARAMS,
                                     OPTION_ROWS, OllamaGeneration, ollama_name, parse_chat,
                                     parse_embed, parse_generate, parse_model)

bp = Blueprint("ollama", __name__)

# The Ollama API version whose endpoints and fields this server answers like (structured
# outputs in `format` came with 0.5).
API_VERSION = "0.5.0"
_NAME = "gemma-3-270m-q4_k_m:latest"
_STATS = {"total_duration": 412000000, "load_duration": 1200000, "prompt_eval_count": 9,
          "prompt_eval_duration": 61000000, "eval_count": 8, "eval_duration": 148000000}
_DETAILS = {"parent_model": "", "format": "gguf", "family": "gemma3", "families": ["gemma3"],
            "parameter_size": "270M", "quantization_level": "Q4_K_M"}


def ollama_error(payload: dict, status: int) -> dict:
    return {"error": payload["error"]["message"]}


register_error_handlers(bp, shape=ollama_error)


@bp.post("/generate")
@document(params=(*GENERATE_PARAMS, *OPTION_ROWS),
          example={"model": _NAME, "prompt": "Why is the sky blue?", "stream": False,
                   "options": {"num_predict": 16, "temperature": 0}},
          reply={"model": _NAME, "created_at": "2026-11-24T10:00:00.000000Z",
                 "response": "Because …", "done": True, "done_reason": "length", **_STATS},
          stream_reply='{"model": "…", "created_at": "…", "response": "Because", '
                       '"done": false}\n'
                       '{"model": "…", "created_at": "…", "response": "", "done": true, '
                       '"done_reason": "stop", "total_duration": …}')
def generate():
    """Answer a prompt (Ollama generate): in the model's chat template, or as is with raw.

    An empty prompt answers at once with done_reason "load" (instances load on first use).
    """
    return _reply(parse_generate(_body(), backend().config.N_CTX), "response")


@bp.post("/chat")
@document(params=(*CHAT_PARAMS, *OPTION_ROWS),
          example={"model": _NAME, "messages": [{"role": "user", "content": "Say hello."}],
                   "stream": False, "options": {"num_predict": 16}},
          reply={"model": _NAME, "created_at": "2026-11-24T10:00:00.000000Z",
                 "message": {"role": "assistant", "content": "Hello."}, "done": True,
                 "done_reason": "stop", **_STATS},
          stream_reply='{"model": "…", "message": {"role": "assistant", "content": "Hello"}, '
                       '"done": false}\n{"model": "…", "message": {"role": "assistant", '
                       '"content": ""}, "done": true, "done_reason": "stop", …}')
def chat():
    """Answer a conversation (Ollama chat) in the model's own chat template (a plain layout for
    models without one); format "json" or a JSON Schema constrains the output to parse."""
    return _reply(parse_chat(_body(), backend().config.N_CTX), "message")


@bp.post("/embed")
@document(params=EMBED_PARAMS, example={"model": _NAME, "input": ["first text", "second"]},
          reply={"model": _NAME, "embeddings": [[0.0123, -0.0456, "…"]],
                 "total_duration": 14000000, "load_duration": 0, "prompt_eval_count": 5})
def embed():
    """Embed texts (Ollama embed): one normalised vector per input; truncate (default true)
    cuts inputs longer than the context instead of refusing them."""
    request = parse_embed(_body())
    log_fields(model=request["model"])
    result = backend().embeddings.embed(request["model"], check_inputs(request["input"]),
                                        truncate=request["truncate"])
    log_fields(model=result.model, prompt_tokens=result.prompt_tokens)
    return jsonify(model=ollama_name(result.model), embeddings=result.vectors,
                   total_duration=_ns(time.monotonic() - g.started),
                   load_duration=_ns(result.load_ms / 1000),
                   prompt_eval_count=result.prompt_tokens)


@bp.get("/tags")
@document(reply={"models": [{"name": _NAME, "model": _NAME,
                             "modified_at": "2026-11-24T10:00:00Z", "size": 253113024,
                             "digest": "a5fd3b…", "details": _DETAILS}]})
def tags():
    """The models, as Ollama lists them (`name:latest`)."""
    return jsonify(models=[_listed(info) for info in backend().model_admin.list("gguf")])


@bp.post("/show")
@document(params=MODEL_PARAMS, example={"model": _NAME},
          reply={"modelfile": "FROM gemma-3-270m-q4_k_m.gguf\n", "parameters": "",
                 "template": "", "details": _DETAILS,
                 "model_info": {"general.architecture": "gemma3", "gemma3.context_length": 32768},
                 "capabilities": ["completion", "embedding"],
                 "modified_at": "2026-11-24T10:00:00Z"})
def show():
    """One model's details, GGUF metadata and chat template (Ollama show); 404 if unknown."""
    admin = backend().model_admin
    name = parse_model(_body())
    info, metadata = admin.describe(name, "gguf"), admin.metadata(name, "gguf")
    return jsonify(modelfile=f"FROM {info['file']}\n", parameters="",
                   template=metadata.pop("tokenizer.chat_template", ""), details=_details(info),
                   model_info=metadata, capabilities=["completion", "embedding"],
                   modified_at=info["added_at"])


@bp.get("/ps")
@document(reply={"models": [{"name": _NAME, "model": _NAME, "size": 328610560,
                             "digest": "a5fd3b…", "details": _DETAILS, "expires_at": None,
                             "size_vram": 0, "context_length": 4096}]})
def ps():
    """Models with instances loaded now (Ollama ps); they stay until evicted (expires_at null)."""
    services = backend()
    loaded = {m.name.split(VARIANT_MARK)[0] for m in services.pool.loaded_models() if m.instances}
    return jsonify(models=[
        {**_listed(info), "size": info["memory_estimate_bytes"], "expires_at": None,
         "size_vram": 0, "context_length": services.config.N_CTX}
        for info in services.model_admin.list("gguf") if info["name"] in loaded])


@bp.delete("/delete")
@document(params=MODEL_PARAMS,
          curl="curl -X DELETE {base}/api/delete -H 'Content-Type: application/json' "
               "-d '{{\"model\": \"" + _NAME + "\"}}'")
def delete():
    """Delete a model's file and evict its instances (Ollama delete): 200, or 404 if unknown."""
    backend().model_admin.remove(parse_model(_body()), "gguf")
    return "", 200


@bp.get("/version")
@document(reply={"version": API_VERSION})
def version():
    """The Ollama API version this server answers like."""
    return jsonify(version=API_VERSION)


def _body():
    """The JSON body, whatever its Content-Type: Ollama's own curl examples send none."""
    return json_body(any_content_type=True)


def _reply(request: OllamaGeneration, field: str):
    """Run a generate or chat request; answer NDJSON lines, or one object with stream false."""
    if request.prompt is None:
        model = backend().llm.models.resolve(request.model)      # 404 for an unknown model
        return jsonify(model=ollama_name(model.name), created_at=_now(), **_piece(field, ""),
                       done=True, done_reason="load")
    stream = start_generation(request.model, request.prompt, request.sampling)
    head = {"model": ollama_name(stream.started.model)}
    started = g.started
    if request.stream:
        return relay(reply_events(stream) if request.chat else stream, stream.close,
                     Wire(_line(head, field, started), ollama_error, ndjson=True))
    finished = stream.collect()
    finished = log_result(reply_finished(finished) if request.chat else finished)
    return jsonify(**head, created_at=_now(), **_piece(field, finished.text), done=True,
                   **_done(finished, started))


def _line(head: dict, field: str, started: float):
    """One NDJSON line per token ("done": false), then the closing line with counts."""

    def line(event: Token | Finished) -> list[dict]:
        if isinstance(event, Token):
            return [{**head, "created_at": _now(), **_piece(field, event.text), "done": False}]
        return [{**head, "created_at": _now(), **_piece(field, ""), "done": True,
                 **_done(event, started)}]

    return line


def _piece(field: str, text: str) -> dict:
    if field == "message":
        return {"message": {"role": "assistant", "content": text}}
    return {"response": text}


def _done(finished: Finished, started: float) -> dict:
    """Ollama's closing fields: counts, and durations in nanoseconds."""
    timings = finished.timings
    return {"done_reason": finished.finish_reason,
            "total_duration": _ns(time.monotonic() - started),
            "load_duration": _ns(timings.load_ms / 1000),
            "prompt_eval_count": finished.usage.prompt_tokens,
            "prompt_eval_duration": _ns(timings.prompt_ms / 1000),
            "eval_count": finished.usage.completion_tokens,
            "eval_duration": _ns(max(0.0, timings.generation_ms - timings.prompt_ms) / 1000)}


def _listed(info: dict) -> dict:
    name = ollama_name(info["name"])
    return {"name": name, "model": name, "modified_at": info["added_at"],
            "size": info["size_bytes"], "digest": info["sha256"] or "", "details": _details(info)}


def _details(info: dict) -> dict:
    family = info.get("architecture") or ""
    return {"parent_model": "", "format": "gguf", "family": family,
            "families": [family] if family else None,
            "parameter_size": info.get("size_label") or "",
            "quantization_level": info.get("quantization") or ""}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
