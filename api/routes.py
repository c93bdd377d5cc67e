"""GGUF blueprint (/api/v1): generation and detailed health."""

from __future__ import annotations

import logging
from typing import Iterator

from flask import Blueprint, g, jsonify

from api import backend
from api.docs import document
from api.http import guarded_stream, log_fields, sse_response
from api.json_body import json_body
from services.dialects.generate_request import GENERATE_PARAMS
from services.observability.health import health_report
from services.llm_service import GenerationStream
from services.types import Finished

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
    request = service.parse_request(json_body())
    log_fields(model=request.model)
    if log_text:  # prompts and outputs stay out of the logs unless the operator asks
        log_fields(system=request.system, prompt=request.prompt)
    if request.stream:
        stream = service.stream(request)
        log_fields(model=stream.started.model, prompt_tokens=stream.started.prompt_tokens,
                   queue_ms=round(stream.started.queue_ms, 1))
        return sse_response(_sse_events(stream, g.request_id, g.log_fields,
                                        backend().loggers.errors, log_text))
    result = service.generate(request)
    log_fields(model=result.model, prompt_tokens=result.usage.prompt_tokens,
               completion_tokens=result.usage.completion_tokens,
               queue_ms=round(result.timings.queue_ms, 1))
    if log_text:
        log_fields(text=result.text)
    return jsonify(request_id=g.request_id, **finished_fields(result))


def finished_fields(result: Finished) -> dict:
    return {"model": result.model, "text": result.text, "finish_reason": result.finish_reason,
            "usage": result.usage.to_dict(), "timings": result.timings.to_dict()}


def _sse_events(stream: GenerationStream, request_id: str, fields: dict,
                errors_log: logging.Logger, log_text: bool = False) -> Iterator[dict]:
    """Token events, then `done`; an error mid-stream becomes a last `error` event."""

    def events() -> Iterator[dict]:
        for event in stream:
            if isinstance(event, Finished):
                fields["completion_tokens"] = event.usage.completion_tokens
                if log_text:
                    fields["text"] = event.text
                done = finished_fields(event)
                del done["text"]
                yield {"done": True, "request_id": request_id, **done}
            else:
                yield {"token": event.text}

    return guarded_stream(events(), stream.close, fields, request_id, errors_log)


@bp.get("/health")
@document(reply={"status": "ok", "reasons": [], "models": 1, "workers": {"max": 4, "busy": 0}})
def detailed_health():
    """Readiness: models present, workers alive, memory and disk; status ok, degraded or down."""
    report = health_report(backend())
    return jsonify(report), 200 if report["status"] != "down" else 503
