"""Text generation as the API sees it: resolve the model, build the prompt, run it on a worker.

Every generation, whole or streamed, runs the same way: the concurrency manager admits it and
runs `_work` on a worker thread, which checks out a pooled instance and puts events on a queue;
the caller's thread reads that queue, enforcing the queue and generation timeouts. A caller that
stops reading (client gone, timeout) cancels the job, and the worker stops at the next token.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from dataclasses import replace
from typing import Any, Iterator, Sequence

from langchain_core.prompts import PromptTemplate

from models.model_file import ModelFile
from models.model_manager import ModelManager
from services.engine.chat_template import ChatTemplates
from services.concurrency_manager import ConcurrencyManager, Job
from services.errors import ContextOverflow, GenerationTimeout, InvalidRequest, QueueTimeout
from services.dialects.generate_request import GenerateRequest
from services.engine.generation import TokenLoopResult, build_grammar, stream_tokens, tokenize
from services.types import (Finished, Prompt, Render, SamplingParams, Started, Timings,
                           Token, Usage)
from services.engine.memory import estimate_load
from services.model_pool import ModelPool
from services.observability.stats import UsageStats, outcome_of

# How long the caller waits past a deadline the worker enforces itself before giving up on it.
_GRACE_SECONDS = 1.0

_PLAIN = PromptTemplate.from_template("{prompt}")
_WITH_SYSTEM = PromptTemplate.from_template("{system}\n\n{prompt}")


class GenerationStream:
    """A running generation: iterate for `Token`s then one `Finished`; closing it cancels."""

    def __init__(self, service: "LLMService", job: Job, events: queue.Queue, model: str,
                 counted: bool = True):
        self._service, self._job, self._events = service, job, events
        self.model = model
        self.started: Started | None = None
        # A step of a larger request (a DeepSeek map step) leaves its outcome to that request.
        self._settled = not counted
        self._settle_lock = threading.Lock()

    def __iter__(self) -> Iterator[Token | Finished]:
        try:
            while True:
                try:
                    event = next_event(self._job, self._events)
                except BaseException as exc:
                    self._settle(outcome_of(exc))
                    raise
                if isinstance(event, Started):
                    self.started = event
                    continue
                if isinstance(event, Finished):
                    self._settle("succeeded")
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self.close()

    def close(self) -> None:
        """Stop the generation if it still runs (the client went away); its instance returns."""
        self._settle("cancelled")
        self._job.cancel()

    def wait_started(self) -> Started:
        """Block until the generation holds an instance, so its early errors raise here.

        :raise QueueTimeout, ContextOverflow, ModelLoadError, InsufficientMemory, ShuttingDown:
        """
        try:
            self.started = next_event(self._job, self._events)
        except BaseException as exc:
            self._settle(outcome_of(exc))
            self._job.cancel()
            raise
        return self.started

    def collect(self) -> Finished:
        """Run to the end and return the `Finished` event, whose text holds every token."""
        for event in self:
            if isinstance(event, Finished):
                return event
        raise AssertionError("a generation stream ended without a Finished event")

    def _settle(self, outcome: str) -> None:
        """Count this request's outcome once: the first of finished, failed or closed wins."""
        with self._settle_lock:
            if self._settled:
                return
            self._settled = True
        self._service.stats.record_outcome(self.model, outcome)


class LLMService:
    """Generation over the model registry, the pool and the concurrency manager."""

    def __init__(self, models: ModelManager, pool: ModelPool, concurrency: ConcurrencyManager,
                 stats: UsageStats, n_ctx: int, templates: ChatTemplates | None = None):
        self.models = models
        self.pool = pool
        self.concurrency = concurrency
        self.stats = stats
        self.n_ctx = n_ctx
        self.templates = templates or ChatTemplates()

    def parse_request(self, body: object) -> GenerateRequest:
        """:raise InvalidRequest: the body does not describe a valid generation."""
        return GenerateRequest.from_json(body, self.n_ctx)

    def generate(self, request: GenerateRequest) -> Finished:
        """Run a generation to the end.

        :raise ModelNotFound, ContextOverflow, TooBusy, QueueTimeout, GenerationTimeout:
        """
        return self.stream(request).collect()

    def stream(self, request: GenerateRequest) -> GenerationStream:
        """Start a generation and wait until it holds an instance, so early errors raise here.

        :raise ModelNotFound, ContextOverflow, TooBusy, QueueTimeout, ShuttingDown:
        """
        return self.stream_prompt(request.model, build_prompt(request.prompt, request.system),
                                  request.sampling)

    def stream_prompt(self, model_name: str | None, prompt: Prompt,
                      sampling: SamplingParams) -> GenerationStream:
        """Start a generation of a prompt built by a caller (the OpenAI and Ollama APIs) on the
        named model, or the default one, and wait until it holds an instance.

        :raise ModelNotFound, ContextOverflow, TooBusy, QueueTimeout, ShuttingDown:
        """
        return self.start(self.models.resolve(model_name), prompt, sampling)

    def start(self, model: ModelFile, prompt: Prompt, sampling: SamplingParams,
              n_ctx: int | None = None, *, wait: bool = True,
              counted: bool = True) -> GenerationStream:
        """Submit one generation of `prompt` (text, token ids, or a builder) on `model`.

        `n_ctx` runs it on instances with that context size rather than N_CTX. With `wait` it
        returns once the generation holds an instance. `counted=False` marks a step of a larger
        request, whose outcome that request records once.
        :raise TooBusy, ShuttingDown: (and with `wait`, the errors of `wait_started`)
        """
        events: queue.Queue = queue.Queue()
        received_at = time.monotonic()
        try:
            job = self.concurrency.submit(
                lambda job: self._work(job, model, prompt, sampling, events, received_at, n_ctx))
        except Exception as exc:
            if counted:
                self.stats.record_outcome(model.name, outcome_of(exc))
            raise
        stream = GenerationStream(self, job, events, model.name, counted)
        if wait:
            stream.wait_started()
        return stream

    def _work(self, job: Job, model: ModelFile, prompt: Prompt,
              sampling: SamplingParams, events: queue.Queue, received_at: float,
              n_ctx: int | None = None) -> None:
        """On a worker: hold an instance, generate, put events; the instance returns first.

        Time to first token and latency run from `received_at` (when the service took the
        request), so they include the queue wait a client experiences.
        """
        result = TokenLoopResult()
        prompt_tokens, generation_seconds, load_seconds = 0, 0.0, 0.0
        try:
            cost = estimate_load(model.size_bytes, model.kv_bytes_per_token, n_ctx or self.n_ctx)
            with self.pool.checkout(model.name, model.path, job.queue_deadline, job.reserve,
                                    cost, n_ctx) as instance:
                load_seconds = time.monotonic() - (job.reserved_at or time.monotonic())
                llm = instance.client
                # Everything that can refuse the input happens before Started, so that a
                # streamed reply has not begun when it does (it gets its own 4xx status).
                tokens, sampling = prepare_prompt(
                    llm, prompt, sampling, functools.partial(self.templates.render,
                                                             check=job.check))
                prompt_tokens = len(tokens)
                check_fits(prompt_tokens, sampling.max_tokens, llm.n_ctx())
                grammar = build_grammar(llm, sampling.grammar)
                job.start()
                events.put(Started(model.name, prompt_tokens, job.queue_seconds * 1000))
                for piece in stream_tokens(llm, tokens, sampling, job.check, result, grammar):
                    events.put(Token(piece))
                generation_seconds = time.monotonic() - job.started_at
        except BaseException as exc:
            self._record(model.name, False, job, result, prompt_tokens, received_at)
            events.put(exc)
            raise
        # Counted before the reply can reach the client, so /stats never lags behind it.
        self._record(model.name, True, job, result, prompt_tokens, received_at)
        events.put(Finished(
            model=model.name, text="".join(result.pieces), finish_reason=result.finish_reason,
            usage=Usage(prompt_tokens, result.completion_tokens),
            timings=Timings(job.queue_seconds * 1000, generation_seconds * 1000,
                            result.completion_tokens / generation_seconds if generation_seconds else 0.0,
                            load_ms=load_seconds * 1000,
                            prompt_ms=(result.first_token_at - job.started_at) * 1000
                            if result.first_token_at else generation_seconds * 1000)))

    def _record(self, model: str, ok: bool, job: Job, result: TokenLoopResult,
                prompt_tokens: int, received_at: float) -> None:
        """Add one generation's tokens and timings to the usage statistics."""
        now = time.monotonic()
        self.stats.record(
            model, ok, prompt_tokens, result.completion_tokens, job.queue_seconds,
            now - job.started_at if job.started_at is not None else 0.0,
            latency_seconds=now - received_at,
            ttft_seconds=result.first_token_at - received_at if result.first_token_at else None)


def next_event(job: Job, events: queue.Queue) -> Any:
    """The job's next event; raises the job's error, or a timeout if the worker is late."""
    while True:
        try:
            event = events.get(timeout=max(0.0, job.deadline - time.monotonic() + _GRACE_SECONDS))
        except queue.Empty:
            if job.abandon():
                raise QueueTimeout("no worker became free within QUEUE_TIMEOUT")
            if job.reserved_at is not None and time.monotonic() < job.deadline:
                continue
            job.cancel()
            raise GenerationTimeout("generation exceeded REQUEST_TIMEOUT")
        if isinstance(event, BaseException):
            raise event
        return event


def prepare_prompt(llm: Any, prompt: Prompt, sampling: SamplingParams,
                   render: Render) -> tuple[list[int], SamplingParams]:
    """The prompt's token ids on this instance, and the sampling with any stops it adds.

    :raise InvalidRequest: token ids outside this model's vocabulary, or a chat the template
        refuses. :raise ChatTemplateError: the model's chat template failed or ran over a bound.
    """
    if isinstance(prompt, str):
        return tokenize(llm, prompt), sampling
    if callable(prompt):
        built = prompt(llm, render)
        extra = tuple(stop for stop in built.stop if stop not in sampling.stop)
        return list(built.tokens), replace(sampling, stop=sampling.stop + extra)
    return check_token_ids(prompt, llm.n_vocab()), sampling


def check_token_ids(ids: Sequence[int], n_vocab: int) -> list[int]:
    """:raise InvalidRequest: an id that is not one of the model's tokens (llama.cpp would fail
    to decode it)."""
    bad = next((i for i, t in enumerate(ids) if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise InvalidRequest(f"prompt[{bad}] = {ids[bad]} is not a token id of this model "
                             f"(0 .. {n_vocab - 1})", param="prompt")
    return list(ids)


def build_prompt(prompt: str, system: str | None) -> str:
    """The text the model sees: the prompt, after the system instruction when there is one."""
    if system:
        return _WITH_SYSTEM.format(system=system, prompt=prompt)
    return _PLAIN.format(prompt=prompt)


def check_fits(prompt_tokens: int, max_tokens: int | None, n_ctx: int) -> None:
    """:raise ContextOverflow: prompt and completion together exceed the context window (with no
    max_tokens, the prompt leaves no room for a single token)."""
    if max_tokens is None and prompt_tokens >= n_ctx:
        raise ContextOverflow(
            f"the prompt is {prompt_tokens} tokens: it leaves no room to answer in the model's "
            f"context of {n_ctx} tokens; shorten the prompt",
            prompt_tokens=prompt_tokens, context_length=n_ctx)
    if max_tokens is not None and prompt_tokens + max_tokens > n_ctx:
        raise ContextOverflow(
            f"the prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}: "
            f"{prompt_tokens + max_tokens} exceed the model's context of {n_ctx} tokens; "
            f"shorten the prompt or lower max_tokens",
            prompt_tokens=prompt_tokens, max_tokens=max_tokens, context_length=n_ctx)
