"""Small request/response helpers shared by the blueprints."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterable, Iterator

from flask import Request, Response, g, request
from werkzeug.exceptions import BadRequest, UnsupportedMediaType

from api.errors import error_payload, status_of
from services.errors import BackendError, InvalidRequest


def json_body(any_content_type: bool = False) -> Any:
    """The decoded JSON body; `any_content_type` reads it whatever the Content-Type says, as
    Ollama does (its documented `curl -d '{…}'` examples send form-encoded headers).

    :raise 415: the Content-Type is not application/json.
    :raise 413: the body is larger than MAX_REQUEST_BYTES (raised by Werkzeug while reading).
    :raise InvalidRequest: the body is not valid JSON.
    """
    if not request.is_json and not any_content_type:
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
    try:
        return request.get_json(force=True)
    except BadRequest as exc:
        raise InvalidRequest("the request body is not valid JSON") from exc


def guarded_stream(events: Iterable, close: Callable[[], None], fields: dict, request_id: str,
                   errors_log: logging.Logger,
                   shape_error: Callable[[dict, int], Any] = lambda payload, status: payload
                   ) -> Iterator:
    """Relay a generation's events once its reply has begun.

    A client that goes away is noted on the access-log line and `close` stops the generation at
    once; an error after the first event can no longer change the status, so it becomes the
    stream's last event, `shape_error(payload, status)` in the API's own error shape.
    """
    try:
        yield from events
    except GeneratorExit:
        fields["error"] = "client_disconnected"
        raise
    except Exception as exc:
        payload = error_payload(exc)
        fields["error"] = payload["error"]["code"]
        if not isinstance(exc, BackendError):
            errors_log.error("stream failed", exc_info=exc,
                             extra={"fields": {"request_id": request_id, "error": repr(exc)}})
        yield shape_error(payload, status_of(exc))
    finally:
        close()


def log_fields(**fields: Any) -> dict:
    """Add fields (model, tokens...) to this request's access-log line; returns the live dict."""
    g.log_fields.update(fields)
    return g.log_fields


class SSEData(str):
    """Text sent as it is in one `data:` event (OpenAI's closing `data: [DONE]`)."""


def _streamed(events: Iterable, encode: Callable[[Any], str], mimetype: str) -> Response:
    """A response that writes each event as it comes, unbuffered by proxies."""

    def body() -> Iterator[str]:
        try:
            for event in events:
                yield encode(event)
        finally:
            # The server closes this iterator when the client goes away; pass that on at once.
            close = getattr(events, "close", None)
            if close is not None:
                close()

    response = Response(body(), mimetype=mimetype)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def _sse_event(event: dict | str) -> str:
    if isinstance(event, SSEData):
        return f"data: {event}\n\n"
    if isinstance(event, str):
        return f": {event}\n\n"
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


def sse_response(events: Iterable[dict | str]) -> Response:
    """A text/event-stream response: one `data: <json>` event per dict; a str is sent as an SSE
    comment (`: keep-alive`), which clients ignore, to keep a quiet stream alive."""
    return _streamed(events, _sse_event, "text/event-stream")


def ndjson_response(events: Iterable[dict]) -> Response:
    """An application/x-ndjson response (Ollama's streams): one JSON object per line."""
    return _streamed(events, lambda event: json.dumps(event, ensure_ascii=False) + "\n",
                     "application/x-ndjson")


class UploadRequest(Request):
    """A request whose multipart file parts can stream into a sink the view chooses.

    Werkzeug spools uploads to a temp file of its own; a model upload instead goes straight to
    a temp file in its models directory, hashed as it arrives, so a 60 GB file is written once
    and never held in memory. Views opt in by setting `upload_sink_factory`.
    """

    upload_sink_factory = None

    def _get_file_stream(self, total_content_length, content_type, filename=None,
                         content_length=None):
        if self.upload_sink_factory is None:
            return super()._get_file_stream(total_content_length, content_type, filename,
                                            content_length)
        return self.upload_sink_factory()
