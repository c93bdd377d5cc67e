"""The one stream relay: a started generation's events to the client, as SSE or NDJSON.

Every dialect (native, DeepSeek, OpenAI, Ollama) only says how its events look on the wire
(`Wire`). The relay owns the rest, the same for all: framing; closing the generation as soon as
the client goes away (a failed write, or the server closing the reply); turning an error after
the 200 went out into a last event in the dialect's error shape; and the access-log line's
fields (the token counts, and the error code by which /stats counts the request).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from flask import Response, g

from api import backend
from api.errors import Shape, error_payload, status_of
from services.errors import BackendError
from services.observability.request_stats import CLIENT_DISCONNECTED


class SSEData(str):
    """Text sent as it is in one `data:` event (OpenAI's closing `data: [DONE]`)."""


@dataclass(frozen=True)
class Wire:
    """How one dialect's stream looks.

    `event(e)`: the messages (dicts) for one event: a Token, the Finished (or DeepSeek's
    result), a DeepSeek progress event. `error(payload, status)`: the last message after a
    failure. `opening` goes first; `closing` last, only when the stream ended well. A heartbeat
    (a str event) is an SSE comment, which clients ignore. `log_text` puts the reply's text on
    the access-log line (LOG_PROMPTS). `named_events`: each SSE message gets an `event:` line
    with its "type" (OpenAI Responses' streams name their events).
    """

    event: Callable[[Any], Iterable[Any]]
    error: Shape = lambda payload, status: payload
    ndjson: bool = False
    opening: tuple = ()
    closing: tuple = ()
    log_text: bool = False
    named_events: bool = False


def relay(events: Iterable, close: Callable[[], None], wire: Wire) -> Response:
    """A streamed reply of a started generation's `events`; `close` stops the generation.

    Reads what it needs from the request now: the body runs after the view has returned.
    """
    body = _Relay(events, close, wire, g.log_fields, g.request_id, backend().loggers.errors)
    response = Response(body.lines(),
                        mimetype="application/x-ndjson" if wire.ndjson else "text/event-stream")
    response.call_on_close(body.gone_before_start)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"       # no buffering in nginx and the like
    return response


def log_started(started: Any) -> None:
    """Put a started generation's model, prompt size and queue wait on the access-log line, and
    "cache": "hit" when the response cache answers it (the reply then says `X-Cache: HIT`)."""
    g.log_fields.update(model=started.model, prompt_tokens=started.prompt_tokens,
                        queue_ms=round(started.queue_ms, 1))
    log_cache(started)


def log_cache(*started: Any) -> None:
    """Mark the access-log line "cache": "hit" (and the reply `X-Cache: HIT`, added by
    api/middleware.py) when the response cache answered every generation of the reply."""
    if started and all(s.cached for s in started):
        g.log_fields["cache"] = "hit"


def log_result(result: Any, fields: dict | None = None, text: bool = False) -> Any:
    """Put a whole reply's token counts (and its text, with LOG_PROMPTS) on the access-log line;
    `result` is a Finished or a DeepSeekResult (anything with `usage` and `text`)."""
    fields = g.log_fields if fields is None else fields
    fields.update(prompt_tokens=result.usage.prompt_tokens,
                  completion_tokens=result.usage.completion_tokens)
    if text:
        fields["text"] = result.text
    return result


class _Relay:
    def __init__(self, events: Iterable, close: Callable[[], None], wire: Wire, fields: dict,
                 request_id: str, errors_log: logging.Logger):
        self._events, self._close, self._wire, self._fields = events, close, wire, fields
        self._request_id, self._errors_log = request_id, errors_log
        self._ran = False
        self._encode = (_ndjson_line if wire.ndjson else
                        _named_sse_event if wire.named_events else _sse_event)

    def lines(self) -> Iterator[str]:
        """The reply's text. The server closes this generator when the client goes away, which
        lands here as GeneratorExit at the pending `yield`."""
        self._ran = True
        try:
            yield from map(self._encode, self._wire.opening)
            for event in self._events:
                yield from map(self._encode, self._messages(event))
            yield from map(self._encode, self._wire.closing)
        except GeneratorExit:
            self._fields["error"] = CLIENT_DISCONNECTED
            raise
        except Exception as exc:
            yield self._encode(self._failed(exc))
        finally:
            self._close()

    def gone_before_start(self) -> None:
        """The reply was closed before its body ran (closing a generator that never started
        runs none of it): the generation must stop all the same."""
        if not self._ran:
            self._fields["error"] = CLIENT_DISCONNECTED
            self._close()

    def _messages(self, event: Any) -> Iterable[Any]:
        if isinstance(event, str):
            return (event,) if not self._wire.ndjson else ()
        if hasattr(event, "usage"):
            log_result(event, self._fields, self._wire.log_text)
        return self._wire.event(event)

    def _failed(self, exc: Exception) -> Any:
        """The last message: the error in the dialect's shape (the status is already sent)."""
        payload = error_payload(exc)
        self._fields["error"] = payload["error"]["code"]
        if not isinstance(exc, BackendError):
            self._errors_log.error("stream failed", exc_info=exc, extra={
                "fields": {"request_id": self._request_id, "error": repr(exc)}})
        return self._wire.error(payload, status_of(exc))


def _sse_event(message: dict | str) -> str:
    if isinstance(message, SSEData):
        return f"data: {message}\n\n"
    if isinstance(message, str):
        return f": {message}\n\n"
    return f"data: {json.dumps(message, ensure_ascii=False)}\n\n"


def _named_sse_event(message: dict | str) -> str:
    if isinstance(message, dict) and isinstance(message.get("type"), str):
        return f"event: {message['type']}\n" + _sse_event(message)
    return _sse_event(message)


def _ndjson_line(message: dict) -> str:
    return json.dumps(message, ensure_ascii=False) + "\n"
