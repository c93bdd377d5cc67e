"""What the OpenAI and Ollama blueprints share: starting a generation with its access-log
fields. Relaying it is api/relay.py's, as for every dialect."""

from __future__ import annotations

from api import backend
from api.client import client_gone_check
from api.http import log_fields
from api.relay import log_started
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
