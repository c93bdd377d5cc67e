"""What the OpenAI and Ollama blueprints share: starting a generation (or several choices) with
its access-log fields. Relaying it is api/relay.py's, as for every dialect."""

from __future__ import annotations

from typing import Callable, Iterable

from flask import g

from api import backend
from api.client import client_gone_check
from api.http import log_fields
from api.relay import log_cache, log_started
from services.choices import Choices, start_choices
from services.llm_service import GenerationStream
from services.types import Prompt, SamplingParams


def start_generation(model: str | None, prompt: Prompt,
                     sampling: SamplingParams) -> GenerationStream:
    """Start a generation through the shared service (admission, pool, timeouts, stats); its
    early errors (404, 429, 503, a prompt over the context) raise here, before any reply.

    :raise ModelNotFound, ContextOverflow, TooBusy, QueueTimeout, ShuttingDown, ChatTemplateError:
    """
    log_fields(model=model)
    stream = backend().llm.stream_prompt(model, prompt, sampling, client_gone_check())
    log_started(stream.started)
    return stream


def start_choice_generations(model: str | None, requests: list[tuple[Prompt, SamplingParams]],
                             transform: Callable[[Iterable], Iterable] = lambda events: events
                             ) -> Choices:
    """Start one generation per choice (OpenAI's n, several prompts), each admitted like a
    request; the first that cannot start cancels the others and raises here, before any reply.
    The access-log line gets the model, every choice's prompt tokens and the longest wait.

    :raise ModelNotFound, ContextOverflow, TooBusy, QueueTimeout, ShuttingDown, ChatTemplateError:
    """
    log_fields(model=model)
    choices = start_choices(backend().llm, model, requests, client_gone_check(), transform)
    started = choices.started
    g.log_fields.update(model=started[0].model,
                        prompt_tokens=sum(s.prompt_tokens for s in started),
                        queue_ms=round(max(s.queue_ms for s in started), 1))
    log_cache(*started)
    return choices
