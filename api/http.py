"""Small request/response helpers shared by the blueprints."""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Callable, Iterable, Iterator

from flask import Request, Response, g, request
from werkzeug.exceptions import UnsupportedMediaType
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream

from api.errors import error_payload, status_of
from services.errors import BackendError, InvalidRequest


# Deeper JSON is refused: no request needs it, and code that walks a body (a JSON schema
# turned into a grammar, a chat template over messages) recurses.
MAX_JSON_DEPTH = 64
# What Ollama's clients send besides JSON: its docs' `curl -d '{…}'` is form-encoded, and some
# clients send no Content-Type at all.
_OLLAMA_TYPES = ("", "application/x-www-form-urlencoded")
# A \uD800-\uDFFF escape: the only way a lone surrogate gets into a strictly UTF-8 body.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def json_body(any_content_type: bool = False) -> dict:
    """The request's JSON object, read by the one strict rule every JSON endpoint shares.

    `any_content_type` also accepts what Ollama's own clients send (form-encoded or no
    Content-Type); any other type is 415 (text/plain is what a web page can POST cross-site
    without a preflight).

    :raise 415: the Content-Type is not JSON (nor one Ollama's clients send).
    :raise 413: the body is larger than MAX_REQUEST_BYTES (raised by Werkzeug while reading).
    :raise InvalidRequest: see `parse_json_object`.
    """
    if not request.is_json and not (any_content_type and request.mimetype in _OLLAMA_TYPES):
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
    return parse_json_object(request.get_data(cache=True))


def parse_json_object(data: bytes) -> dict:
    """`data` as a JSON object, or a 400 that says what is wrong with it, never another error.

    Stricter than `json.loads`: the body must be UTF-8 (a BOM is allowed), an object, nested at
    most MAX_JSON_DEPTH deep, without duplicate keys, NaN/Infinity, numbers out of range or
    lone surrogates (which would fail later, when the text is encoded for the model).

    :raise InvalidRequest:
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid UTF-8 (byte {exc.start})") from exc
    if not text.strip():
        raise InvalidRequest("the request body is empty: send a JSON object")
    try:
        value = json.loads(text, object_pairs_hook=_object, parse_constant=_constant,
                           parse_float=_float)
    except RecursionError as exc:       # the C parser's own bound, far below any stack limit
        raise _too_deep() from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    except ValueError as exc:           # an integer over Python's 4300-digit limit
        raise InvalidRequest("the JSON body holds an integer with too many digits") from exc
    if not isinstance(value, dict):
        raise InvalidRequest("the request body must be a JSON object, not "
                             + _JSON_TYPES[type(value)])
    _check_tree(value, text)
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict:
    value = dict(pairs)
    if len(value) < len(pairs):
        seen = set()
        key = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise InvalidRequest(f"the JSON body has the key {_quoted(key)} twice in one object",
                             param=key if len(key) <= 64 and key.isprintable() else None)
    return value


def _constant(name: str) -> Any:
    raise InvalidRequest(f"{name} is not a JSON number; send a finite number")


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise InvalidRequest(f"the number {text[:40]} is out of range")
    return value


def _check_tree(root: dict, text: str) -> None:
    """Bound the nesting depth and refuse lone surrogates in keys and strings, walking the
    parsed body level by level (so no stack to exhaust) and only when the text could hold them.
    """
    deep = text.count("[") + text.count("{") > MAX_JSON_DEPTH
    strings = _SURROGATE_ESCAPE.search(text) is not None
    level, depth = [root], 1
    while level and (deep or strings):
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        children = []
        for node in level:
            values = node.values() if isinstance(node, dict) else node
            if strings:
                _check_strings(node if isinstance(node, dict) else (), values)
            children += [value for value in values if isinstance(value, (dict, list))]
        level, depth = children, depth + 1


def _check_strings(keys: Iterable, values: Iterable) -> None:
    for text in (*keys, *values):
        if isinstance(text, str) and _SURROGATE.search(text):
            char = _SURROGATE.search(text).group()
            raise InvalidRequest(f"a string in the JSON body holds the lone surrogate "
                                 f"\\u{ord(char):04x}; strings must be valid Unicode "
                                 "(a surrogate escape needs its pair)")


def _too_deep() -> InvalidRequest:
    return InvalidRequest(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep")


def _quoted(key: str) -> str:
    """A key for a message: quoted, cut, and ASCII-escaped, so a hostile key stays printable."""
    return json.dumps(key[:80])


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
