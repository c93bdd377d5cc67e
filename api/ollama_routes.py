"""Ollama-compatible API (/api): generate, chat (with tools), embed, embeddings, tags, show, ps,
pull, copy, delete, version.

Point the `ollama` package (or any Ollama client) at http://host:port. Generations stream as
NDJSON by default ("stream": false for one object) and report Ollama's counts and durations
(nanoseconds). Requests share LLMService, admission, pool and stats with every other API; errors
keep their statuses and take Ollama's shape, {"error": "message"} (api/errors.py picks it by
path, unknown routes included). `keep_alive` sets when the model is unloaded after the request
(the pool's deadline); without it a model stays loaded until evicted. Nothing is downloaded:
`pull` succeeds for a model that is here and says how to add one that is not.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Iterable

from flask import Blueprint, Response, g, jsonify

from api import backend
from api.access import admin_only
from api.compat import start_generation
from api.docs import document
from api.errors import ollama_error
from api.http import log_fields
from api.json_body import json_body
from api.relay import Wire, log_result, relay
from services.dialects.chat import reply_events
from services.dialects.tools import tool_events
from services.embeddings import check_inputs
from services.errors import ModelNotFound, ModelOnTrial, ModelUnusable
from services.types import Finished, Token, ToolCall, ToolCalled
from services.model_pool import ModelPool, model_of
from services.dialects.ollama_request import (
    CHAT_PARAMS, COPY_PARAMS, EMBED_PARAMS, EMBEDDINGS_PARAMS, FOREVER, GENERATE_PARAMS,
    MODEL_PARAMS, OPTION_ROWS, PULL_PARAMS, OllamaGeneration, ollama_name, parse_chat, parse_copy,
    parse_embed, parse_embeddings, parse_generate, parse_model, parse_pull)

bp = Blueprint("ollama", __name__)

# The Ollama API version whose endpoints and fields this server answers like (structured
# outputs in `format` came with 0.5).
API_VERSION = "0.5.0"
_NAME = "gemma-3-270m-q4_k_m:latest"
# What every model here can do: tool calls are grammar-constrained, so any model can make one.
CAPABILITIES = ["completion", "tools", "embedding"]
_STATS = {"total_duration": 412000000, "load_duration": 1200000, "prompt_eval_count": 9,
          "prompt_eval_duration": 61000000, "eval_count": 8, "eval_duration": 148000000}
_DETAILS = {"parent_model": "", "format": "gguf", "family": "gemma3", "families": ["gemma3"],
            "parameter_size": "270M", "quantization_level": "Q4_K_M"}


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

    An empty prompt answers at once with done_reason "load" (instances load on first use), or
    "unload" with keep_alive 0, which unloads the model once nothing of it is in use.
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
    models without one); format "json" or a JSON Schema constrains the output to parse. With
    tools the model may answer or call them (message.tool_calls; a call is constrained to a
    given function and its schema); the history may hold calls and role "tool" results."""
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
    _keep_alive(backend().pool, result.model, request["keep_alive"])
    return jsonify(model=ollama_name(result.model), embeddings=result.vectors,
                   total_duration=_ns(time.monotonic() - g.started),
                   load_duration=_ns(result.load_ms / 1000),
                   prompt_eval_count=result.prompt_tokens)


@bp.post("/embeddings")
@document(params=EMBEDDINGS_PARAMS, example={"model": _NAME, "prompt": "The sky is blue."},
          reply={"embedding": [0.0123, -0.0456, "…"]})
def embeddings():
    """Embed one text (Ollama's older embeddings endpoint): the same normalised vector as
    /api/embed gives; an empty prompt gives an empty vector."""
    request = parse_embeddings(_body())
    log_fields(model=request["model"])
    services = backend()
    if not request["prompt"]:
        name = services.llm.models.resolve(request["model"]).name     # 404 for an unknown model
        _keep_alive(services.pool, name, request["keep_alive"])
        return jsonify(embedding=[])
    result = services.embeddings.embed(request["model"], [request["prompt"]], truncate=True)
    log_fields(model=result.model, prompt_tokens=result.prompt_tokens)
    _keep_alive(services.pool, result.model, request["keep_alive"])
    return jsonify(embedding=result.vectors[0])


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
                 "capabilities": CAPABILITIES,
                 "modified_at": "2026-11-24T10:00:00Z"})
def show():
    """One model's details, GGUF metadata and chat template (Ollama show); 404 if unknown."""
    admin = backend().model_admin
    name = parse_model(_body())
    info, metadata = admin.describe(name, "gguf"), admin.metadata(name, "gguf")
    return jsonify(modelfile=f"FROM {info['file']}\n", parameters="",
                   template=metadata.pop("tokenizer.chat_template", ""), details=_details(info),
                   model_info=metadata, capabilities=CAPABILITIES,
                   modified_at=info["added_at"])


@bp.get("/ps")
@document(reply={"models": [{"name": _NAME, "model": _NAME, "size": 328610560,
                             "digest": "a5fd3b…", "details": _DETAILS,
                             "expires_at": "2026-11-24T10:05:00.000000Z",
                             "size_vram": 0, "context_length": 4096}]})
def ps():
    """Models with instances loaded now (Ollama ps). expires_at is when a request's keep_alive
    unloads it; null: it stays until evicted (no keep_alive, or a negative one)."""
    services = backend()
    loaded = {model_of(m.name) for m in services.pool.loaded_models() if m.instances}
    return jsonify(models=[
        {**_listed(info), "size": info["memory_estimate_bytes"],
         "expires_at": _rfc3339(services.pool.expires_at(info["name"])),
         "size_vram": 0, "context_length": services.config.N_CTX}
        for info in services.model_admin.list("gguf") if info["name"] in loaded])


@bp.post("/pull")
@document(params=PULL_PARAMS, example={"model": _NAME, "stream": False},
          reply={"status": "success"},
          stream_reply='{"status": "pulling manifest"}\n{"status": "pulling a5fd3b…", '
                       '"digest": "sha256:a5fd3b…", "total": 253113024, "completed": 253113024}'
                       '\n{"status": "verifying sha256 digest"}\n{"status": "writing manifest"}'
                       '\n{"status": "success"}')
def pull():
    """Succeed for a model that is here (the status lines Ollama clients expect); this server
    downloads nothing, so a model that is not here is a 404 that says how to add it."""
    name, stream = parse_pull(_body())
    manager = backend().model_admin.manager("gguf")
    try:
        model = manager.check_servable(manager.find(name))
    except (ModelOnTrial, ModelUnusable):
        raise                              # here, but not servable (yet): say that
    except ModelNotFound:
        raise ModelNotFound(
            f"model {name!r:.80} is not on this server, and this server does not download "
            f"models. Add a GGUF file: upload it with POST /api/v1/models (multipart field 'file', "
            f"optional 'name'), or copy it into the server's MODELS_DIR, or run `flask --app "
            f"app_factory models import PATH`; GET /api/tags lists the models here") from None
    log_fields(model=model.name)
    if not stream:
        return jsonify(status="success")
    return Response("".join(json.dumps(line) + "\n" for line in _pull_status(model)),
                    mimetype="application/x-ndjson")


@bp.post("/copy")
@document(params=COPY_PARAMS, example={"source": _NAME, "destination": "my-gemma"})
@admin_only
def copy():
    """Copy a model under a new name, served at once (Ollama copy): 200; 404 for an unknown
    source; 409 if the destination exists (a copy never replaces a model)."""
    source, destination = parse_copy(_body())
    log_fields(model=source)
    backend().model_admin.copy(source, destination, "gguf")
    return "", 200


@bp.delete("/delete")
@document(params=MODEL_PARAMS,
          curl="curl -X DELETE {base}/api/delete -H 'Content-Type: application/json' "
               "-d '{{\"model\": \"" + _NAME + "\"}}'")
@admin_only
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
    """Run a generate or chat request; answer NDJSON lines, or one object with stream false.
    Its keep_alive applies once it is done (streamed: when the reply closes)."""
    pool = backend().pool
    if request.prompt is None:
        model = backend().llm.models.resolve(request.model)      # 404 for an unknown model
        _keep_alive(pool, model.name, request.keep_alive)
        return jsonify(model=ollama_name(model.name), created_at=_now(), **_piece(field, ""),
                       done=True, done_reason="unload" if request.keep_alive == 0 else "load")
    stream = start_generation(request.model, request.prompt, request.sampling)
    name = stream.started.model
    head = {"model": ollama_name(name)}
    started = g.started
    events = reply_events(stream) if request.chat else stream
    if request.tools is not None:
        events = tool_events(events, request.tools)

    def close() -> None:
        try:
            stream.close()
        finally:
            _keep_alive(pool, name, request.keep_alive)

    if request.stream:
        return relay(events, close, Wire(_line(head, field, started), ollama_error, ndjson=True))
    try:
        finished = log_result(_last(events))
    finally:
        close()
    return jsonify(**head, created_at=_now(), **_piece(field, finished.text, finished.tool_calls),
                   done=True, **_done(finished, started))


def _last(events: Iterable) -> Finished:
    """The Finished event a whole reply ends with."""
    for event in events:
        if isinstance(event, Finished):
            return event
    raise AssertionError("a generation ended without a Finished event")


def _keep_alive(pool: ModelPool, name: str, seconds: float | None) -> None:
    """A request's keep_alive as the model's unload deadline (0: as soon as it is idle)."""
    if seconds is not None:
        pool.expire_at(name, None if seconds == FOREVER else time.time() + seconds)


def _line(head: dict, field: str, started: float):
    """One NDJSON line per token ("done": false), one per tool call (message.tool_calls), then
    the closing line with counts."""

    def line(event: Token | ToolCalled | Finished) -> list[dict]:
        if isinstance(event, Token):
            return [{**head, "created_at": _now(), **_piece(field, event.text), "done": False}]
        if isinstance(event, ToolCalled):
            return [{**head, "created_at": _now(), **_piece(field, "", (event.call,)),
                     "done": False}]
        return [{**head, "created_at": _now(), **_piece(field, ""), "done": True,
                 **_done(event, started)}]

    return line


def _piece(field: str, text: str, calls: tuple[ToolCall, ...] = ()) -> dict:
    if field == "message":
        message = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [_tool_call(call) for call in calls]
        return {"message": message}
    return {"response": text}


def _tool_call(call: ToolCall) -> dict:
    """Ollama's shape of a call: arguments as an object, not JSON text as OpenAI sends them."""
    return {"function": {"name": call.name, "arguments": json.loads(call.arguments)}}


def _done(finished: Finished, started: float) -> dict:
    """Ollama's closing fields: counts, and durations in nanoseconds."""
    timings = finished.timings
    # Ollama ends a reply that calls tools with "stop"; the calls are in the message.
    reason = "stop" if finished.finish_reason == "tool_calls" else finished.finish_reason
    return {"done_reason": reason,
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


def _pull_status(model) -> list[dict]:
    """The lines of an Ollama pull whose layers are all here already."""
    digest = model.sha256 or ""
    layer = ([{"status": f"pulling {digest[:12]}", "digest": f"sha256:{digest}",
               "total": model.size_bytes, "completed": model.size_bytes}] if digest else [])
    return [{"status": "pulling manifest"}, *layer, {"status": "verifying sha256 digest"},
            {"status": "writing manifest"}, {"status": "success"}]


def _rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return (datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="microseconds")
            .replace("+00:00", "Z"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)
