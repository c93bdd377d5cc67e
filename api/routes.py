"""GGUF blueprint (/api/v1): generation and detailed health."""

from __future__ import annotations

from flask import Blueprint, g, jsonify

from api import backend
from api.client import client_gone_check
from api.docs import document
from api.http import log_fields
from api.json_body import json_body
from api.relay import Wire, log_result, log_started, relay
from services.dialects.generate_request import GENERATE_PARAMS, GenerateRequest
from services.observability.health import health_report
from services.types import Finished, Token

bp = Blueprint("gguf", __name__)

_EXAMPLE_REPLY = {
    "request_id": "3f2c…", "model": "gemma-3-270m-q4_k_m.gguf", "text": " Paris.",
    "finish_reason": "stop", "usage": {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9},
    "timings": {"queue_ms": 0.4, "generation_ms": 52.1, "tokens_per_second": 57.6},
}


@bp.post("/generate")
@document(params=GENERATE_PARAMS,
          example={"prompt": "The capital of France is", "max_tokens": 16},
          reply=_EXAMPLE_REPLY,
          stream_reply='data: {"token": " Paris"}\n\ndata: {"done": true, "finish_reason": "stop", '
                       '"usage": {...}, "timings": {...}}')
def generate():
    """Generate text from a prompt with a GGUF model.

    With "stream": true the reply is text/event-stream: one {"token"} event per token, then a
    {"done": true} event with finish_reason, usage and timings. Errors before the first event
    have their own status; an error after it arrives as a final {"error"} event.
    """
    service, log_text = backend().llm, backend().config.LOG_PROMPTS
    request = GenerateRequest.from_json(json_body(), service.n_ctx)
    log_fields(model=request.model)
    if log_text:  # prompts and outputs stay out of the logs unless the operator asks
        log_fields(system=request.system, prompt=request.prompt)
    stream = service.stream(request, client_gone_check())
    log_started(stream.started)
    if request.stream:
        return relay(stream, stream.close, Wire(_sse_event(g.request_id), log_text=log_text))
    result = log_result(stream.collect(), text=log_text)
    return jsonify(request_id=g.request_id, **finished_fields(result))


def finished_fields(result: Finished) -> dict:
    return {"model": result.model, "text": result.text, "finish_reason": result.finish_reason,
            "usage": result.usage.to_dict(), "timings": result.timings.to_dict()}


def _sse_event(request_id: str):
    """A {"token"} event per token, then {"done": true} with usage and timings (not the text)."""

    def shape(event: Token | Finished) -> list[dict]:
        if isinstance(event, Token):
            return [{"token": event.text}]
        done = finished_fields(event)
        del done["text"]
        return [{"done": True, "request_id": request_id, **done}]

    return shape


@bp.get("/health")
@document(reply={"status": "ok", "reasons": [], "models": 1, "workers": {"max": 4, "busy": 0}})
def detailed_health():
    """Readiness: models present, PRELOAD_MODELS loaded, workers alive, memory and disk.

    Status ok or degraded (200); starting (503 while PRELOAD_MODELS load) or down (503).
    """
    report = health_report(backend())
    return jsonify(report), 503 if report["status"] in ("down", "starting") else 200
