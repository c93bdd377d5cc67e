"""What the OpenAI and Ollama blueprints share: starting a generation with its access-log
fields, and relaying a running one as that API's stream.

Each blueprint only says how an event looks in its format; the relay owns the rest, as
/api/v1/generate's SSE stream does: a client that goes away cancels the generation, an error
after the first event becomes the stream's last event, and the access-log line gets the tokens.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator

from flask import g

from api import backend
from api.http import guarded_stream, log_fields
from services.types import SamplingParams
from services.llm_service import GenerationStream
from services.types import Finished, Prompt, Token

Event = Token | Finished


def start_generation(model: str | None, prompt: Prompt,
                     sampling: SamplingParams) -> GenerationStream:
    """Start a generation through the shared service (admission, pool, timeouts, stats); its
    early errors (404, 429, 503, a prompt over the context) raise here, before any reply.

    :raise ModelNotFound, ContextOverflow, TooBusy, QueueTimeout, ShuttingDown, ChatTemplateError:
    """
    log_fields(model=model)
    stream = backend().llm.stream_prompt(model, prompt, sampling)
    log_fields(model=stream.started.model, prompt_tokens=stream.started.prompt_tokens,
               queue_ms=round(stream.started.queue_ms, 1))
    return stream


def log_finished(finished: Finished) -> Finished:
    """Put a whole reply's token count on the access-log line."""
    log_fields(completion_tokens=finished.usage.completion_tokens)
    return finished


def relay(stream: GenerationStream, events: Iterable[Event],
          shape: Callable[[Event], Iterable[Any]],
          shape_error: Callable[[dict, int], Any]) -> Iterator[Any]:
    """`shape(event)` for every event; an error mid-stream becomes `shape_error(payload, status)`.

    Reads what it needs from the request now: the generator runs after the view has returned.
    """
    return _relay(stream, events, shape, shape_error, g.log_fields, g.request_id,
                  backend().loggers.errors)


def _relay(stream: GenerationStream, events: Iterable[Event], shape: Callable,
           shape_error: Callable, fields: dict, request_id: str,
           errors_log: logging.Logger) -> Iterator[Any]:
    def shaped() -> Iterator[Any]:
        for event in events:
            if isinstance(event, Finished):
                fields["completion_tokens"] = event.usage.completion_tokens
            yield from shape(event)

    return guarded_stream(shaped(), stream.close, fields, request_id, errors_log, shape_error)
