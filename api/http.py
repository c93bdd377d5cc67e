"""Small request/response helpers shared by the blueprints."""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from flask import Response, g, request
from werkzeug.exceptions import BadRequest, UnsupportedMediaType

from services.errors import InvalidRequest


def json_body() -> Any:
    """The decoded JSON body.

    :raise 415: the Content-Type is not application/json.
    :raise 413: the body is larger than MAX_REQUEST_BYTES (raised by Werkzeug while reading).
    :raise InvalidRequest: the body is not valid JSON.
    """
    if not request.is_json:
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
    try:
        return request.get_json()
    except BadRequest as exc:
        raise InvalidRequest("the request body is not valid JSON") from exc


def log_fields(**fields: Any) -> dict:
    """Add fields (model, tokens...) to this request's access-log line; returns the live dict."""
    g.log_fields.update(fields)
    return g.log_fields


def sse_response(events: Iterable[dict]) -> Response:
    """A text/event-stream response: one `data: <json>` event per dict."""

    def encode() -> Iterator[str]:
        try:
            for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        finally:
            # The server closes this iterator when the client goes away; pass that on at once.
            close = getattr(events, "close", None)
            if close is not None:
                close()

    response = Response(encode(), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response
