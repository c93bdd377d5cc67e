"""Small request/response helpers shared by the blueprints."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterable, Iterator

from flask import Request, Response, g
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream

from api.errors import error_payload, status_of
from services.errors import BackendError


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

    @cached_property
    def stream(self):
        """The body; a chunked one over `max_content_length` is 413, not cut off at the cap
        (Werkzeug stops reading there, and the truncated JSON or multipart then looked like
        a 400)."""
        if (self.content_length is not None or self.max_content_length is None
                or "wsgi.input_terminated" not in self.environ):
            return super().stream
        return _CappedStream(self.environ["wsgi.input"], self.max_content_length, is_max=True)

    def _get_file_stream(self, total_content_length, content_type, filename=None,
                         content_length=None):
        if self.upload_sink_factory is None:
            return super()._get_file_stream(total_content_length, content_type, filename,
                                            content_length)
        return self.upload_sink_factory()


class _CappedStream(LimitedStream):
    """A body of unknown length read up to its cap: one byte past the cap is a 413."""

    def on_exhausted(self) -> None:
        if self._stream.read(1):
            raise RequestEntityTooLarge()

    def readall(self) -> bytes:
        data = super().readall()
        if self.is_exhausted:
            self.on_exhausted()
        return data
