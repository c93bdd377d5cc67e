"""Text generation as the API sees it: resolve the model, build the prompt, run it on the
model's batched engine, and hand the caller a stream of events.

Every generation, whole or streamed, runs the same way: the concurrency manager admits it and
runs `_prepare` on a worker, which gets the model's engine (loading it on first use), turns the
prompt into tokens, refuses what cannot run, and hands a `Sequence` to the engine. The engine's
thread reports through `_SequenceEvents`, which puts events on the caller's queue, records the
tokens, and ends the job once. The caller's thread reads the queue; a caller that stops reading
(client gone, timeout) cancels the job, and the engine frees the slot at its next step.

A deterministic request the response cache holds is answered from it in `_prepare`, after
tokenizing (the key holds the prompt's tokens), without the engine; a miss is recorded by its
`_SequenceEvents` and kept once it ends complete. Waiting sequences are admitted by their
caller's priority (services/engine/batch_engine.py).
"""

from __future__ import annotations

import functools
import time
from dataclasses import replace
from typing import Any, Hashable, Iterator

from langchain_core.prompts import PromptTemplate

from models.model_file import ModelFile
from models.model_manager import ModelManager
from services.concurrency_manager import ConcurrencyManager, Job, outcome_of
from services.engine.chat_template import ChatTemplates
from services.engine.memory import estimate_load
from services.engine.sampler import check_grammar
from services.engine.sequence import Sequence as EngineSequence, check_token_ids
from services.errors import ContextOverflow
from services.model_pool import ModelPool
from services.observability.stats import UsageStats
from services.response_cache import CachedReply, ResponseCache
from services.types import (SUCCEEDED, Finished, Prompt, Render, SamplingParams,
                            Started, Timings, Token, Usage)

_PLAIN = PromptTemplate.from_template("{prompt}")
_WITH_SYSTEM = PromptTemplate.from_template("{system}\n\n{prompt}")


class GenerationStream:
    """A running generation: iterate for `Token`s then one `Finished`; closing it cancels.

    `client_gone`, when given, is polled while waiting: a caller that is not streaming yet (a
    whole reply, or a queued request) learns that way that its client left, and cancels."""

    def __init__(self, job: Job, model: str, client_gone=lambda: False):
        self._job = job
        self.model = model
        self.started: Started | None = None
        self.client_gone = client_gone

    def __iter__(self) -> Iterator[Token | Finished]:
        try:
            while True:
                event = self._job.next_event(self.client_gone)
                if isinstance(event, Started):
                    self.started = event
                    continue
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self.close()

    def close(self) -> None:
        """Stop the generation if it still runs (the client went away); its slot comes back."""
        self._job.cancel()

    def wait_started(self) -> Started:
        """Block until the generation holds a slot, so its early errors raise here.

        :raise QueueTimeout, ContextOverflow, ModelLoadError, InsufficientMemory, ShuttingDown:
        """
        try:
            self.started = self._job.next_event(self.client_gone)
        except BaseException:
            self._job.cancel()
            raise
        return self.started

    def collect(self) -> Finished:
        """Run to the end and return the `Finished` event, whose text holds every token."""
        for event in self:
            if isinstance(event, Finished):
                return event
        raise AssertionError("a generation stream ended without a Finished event")


class _SequenceEvents:
    """Hears one sequence on the engine's thread: events to the caller's queue, tokens to the
    statistics, the reply to the response cache (under `cache_key`, when it is cacheable), and
    the job's one ending."""

    def __init__(self, service: "LLMService", job: Job, model: str, received_at: float,
                 load_seconds: float, cache_key: Hashable | None = None):
        self._service, self._job, self._events, self._model = service, job, job.events, model
        self._received_at, self._load_seconds = received_at, load_seconds
        self._cache_key = cache_key
        self._tokens: list[Token] = []

    def admitted(self, sequence: EngineSequence) -> None:
        self._events.put(Started(self._model, len(sequence.tokens), self._job.queue_seconds * 1000))

    def text(self, sequence: EngineSequence, piece: str) -> None:
        token = Token(piece, sequence.piece_logprobs)
        if self._cache_key is not None:
            self._tokens.append(token)
        self._events.put(token)

    def ended(self, sequence: EngineSequence, error: BaseException | None) -> None:
        job, now = self._job, time.monotonic()
        generation_seconds = now - job.started_at if job.started_at is not None else 0.0
        # Counted before the reply can reach the client, so /stats never lags behind it.
        self._service.stats.record(
            self._model, error is None, len(sequence.tokens), sequence.completion_tokens,
            job.queue_seconds, generation_seconds, latency_seconds=now - self._received_at,
            ttft_seconds=sequence.first_token_at - self._received_at
            if sequence.first_token_at else None)
        if error is not None:
            self._events.put(error)
            job.end(outcome_of(error))
            return
        finished = Finished(
            model=self._model, text="".join(sequence.pieces),
            finish_reason=sequence.finish_reason,
            usage=Usage(len(sequence.tokens), sequence.completion_tokens),
            timings=Timings(job.queue_seconds * 1000, generation_seconds * 1000,
                            sequence.completion_tokens / generation_seconds
                            if generation_seconds else 0.0,
                            load_ms=self._load_seconds * 1000,
                            prompt_ms=(sequence.first_token_at - job.started_at) * 1000
                            if sequence.first_token_at else generation_seconds * 1000),
            logprobs=tuple(sequence.logprobs),
            prompt_logprobs=tuple(sequence.prompt_logprobs)
            if sequence.params.prompt_logprobs else ())
        if self._cache_key is not None:
            # Before the reply is sent: a client that repeats it at once finds it.
            self._service.response_cache.put(self._cache_key,
                                             CachedReply(tuple(self._tokens), finished))
        self._events.put(finished)
        job.end(SUCCEEDED)


class LLMService:
    """Generation over the model registry, the pool's engines and the concurrency manager."""

    def __init__(self, models: ModelManager, pool: ModelPool, concurrency: ConcurrencyManager,
                 stats: UsageStats, n_ctx: int, templates: ChatTemplates | None = None,
                 response_cache: ResponseCache | None = None):
        self.models = models
        self.pool = pool
        self.concurrency = concurrency
        self.stats = stats
        self.n_ctx = n_ctx
        self.templates = templates or ChatTemplates()
        self.response_cache = response_cache or ResponseCache(0)

    def generate(self, request: Any, client_gone=lambda: False) -> Finished:
        """Run a native generation to the end.

        :raise ModelNotFound, ContextOverflow, TooBusy, QueueTimeout, GenerationTimeout:
        """
        return self.stream(request, client_gone).collect()

    def stream(self, request: Any, client_gone=lambda: False) -> GenerationStream:
        """Start a native generation (a parsed GenerateRequest) and wait until it holds a slot.

        :raise ModelNotFound, ContextOverflow, TooBusy, QueueTimeout, ShuttingDown:
        """
        return self.stream_prompt(request.model, build_prompt(request.prompt, request.system),
                                  request.sampling, client_gone)

    def stream_prompt(self, model_name: str | None, prompt: Prompt, sampling: SamplingParams,
                      client_gone=lambda: False) -> GenerationStream:
        """Start a generation of a prompt built by a caller (the OpenAI and Ollama APIs) on the
        named model, or the default one, and wait until it holds a slot.

        :raise ModelNotFound, ContextOverflow, TooBusy, QueueTimeout, ShuttingDown:
        """
        stream = self.start(self.models.resolve(model_name), prompt, sampling,
                            client_gone=client_gone)
        stream.wait_started()
        return stream

    def start(self, model: ModelFile, prompt: Prompt, sampling: SamplingParams,
              n_ctx: int | None = None, *, within: Job | None = None,
              client_gone=lambda: False) -> GenerationStream:
        """Submit one generation of `prompt` (text, token ids, or a builder) on `model`; the
        stream's first event (`wait_started`) comes once it holds a slot. `n_ctx` runs it on an
        engine whose requests may use that many tokens rather than N_CTX. `within` makes it a
        step of that admitted job (a DeepSeek step), which records the outcome.

        :raise TooBusy, ShuttingDown:
        """
        received_at = time.monotonic()
        job = self.concurrency.submit(
            lambda job: self._prepare(job, model, prompt, sampling, received_at, n_ctx),
            model.name, within=within)
        return GenerationStream(job, model.name, client_gone)

    def _prepare(self, job: Job, model: ModelFile, prompt: Prompt, sampling: SamplingParams,
                 received_at: float, n_ctx: int | None) -> None:
        """On a worker: the engine, the prompt's tokens, every check that can refuse the input
        (so a streamed reply has not begun when it does); then the engine takes over."""
        try:
            # Leased until submitted: no keep-alive deadline unloads the engine in between.
            with self.pool.lease(
                    model.name, model.path,
                    lambda cells: estimate_load(model.size_bytes, model.kv_bytes_per_token, cells),
                    n_ctx) as (engine, load_seconds):
                job.loaded(load_seconds)
                job.check_waiting()
                tokens, sampling = prepare_prompt(
                    engine.llm, prompt, sampling, functools.partial(self.templates.render,
                                                                    check=job.check))
                check_fits(len(tokens), sampling.max_tokens, engine.settings.n_ctx)
                check_grammar(engine.vocab, sampling.grammar, sampling.grammar_triggers)
                key = self.response_cache.key(model.sha256, engine.settings.n_ctx, tokens,
                                              sampling)
                cached = self.response_cache.get(key) if key is not None else None
                if cached is not None:
                    replay(job, model.name, len(tokens), cached, load_seconds)
                    return
                events = _SequenceEvents(self, job, model.name, received_at, load_seconds, key)
                job.hand_off()
                engine.submit(EngineSequence(tokens, sampling, engine.settings.n_ctx, job,
                                             events), rank=job.caller.rank)
        except BaseException as exc:
            self.stats.record(model.name, False, 0, 0, job.queue_seconds, 0.0)
            job.events.put(exc)
            raise


def replay(job: Job, model: str, prompt_tokens: int, cached: CachedReply,
           load_seconds: float) -> None:
    """Answer `job` from the response cache: Started (marked cached), the recorded tokens, and
    the Finished with timings of no generation. The job then ends as succeeded; /stats counts it
    as a request of the model but not as a generation (no tokens, speed or latency samples):
    those describe the model's work, and the cache's hits are in /cache/status and /metrics.

    :raise QueueTimeout: the caller stopped waiting meanwhile.
    """
    job.reserve()
    job.start()
    queue_ms = job.queue_seconds * 1000
    job.events.put(Started(model, prompt_tokens, queue_ms, cached=True))
    for token in cached.tokens:
        job.events.put(token)
    # generation_ms is the replay's own few microseconds (not 0: clients divide by durations);
    # tokens_per_second 0 says nothing was generated.
    replay_ms = (time.monotonic() - job.started_at) * 1000
    job.events.put(replace(cached.finished, model=model, timings=Timings(
        queue_ms, replay_ms, 0.0, load_ms=load_seconds * 1000)))


def prepare_prompt(llm: Any, prompt: Prompt, sampling: SamplingParams,
                   render: Render) -> tuple[list[int], SamplingParams]:
    """The prompt's token ids for this model, and the sampling with any stops it adds.

    :raise InvalidRequest: token ids outside this model's vocabulary, or a chat the template
        refuses. :raise ChatTemplateError: the model's chat template failed or ran over a bound.
    """
    if isinstance(prompt, str):
        return llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True), sampling
    if callable(prompt):
        built = prompt(llm, render)
        extra = tuple(stop for stop in built.stop if stop not in sampling.stop)
        return list(built.tokens), replace(sampling, stop=sampling.stop + extra)
    return check_token_ids(prompt, llm.n_vocab()), sampling


def build_prompt(prompt: str, system: str | None) -> str:
    """The text the model sees: the prompt, after the system instruction when there is one."""
    if system:
        return _WITH_SYSTEM.format(system=system, prompt=prompt)
    return _PLAIN.format(prompt=prompt)


def check_fits(prompt_tokens: int, max_tokens: int | None, n_ctx: int) -> None:
    """:raise ContextOverflow: prompt and completion together exceed the context window (with no
    max_tokens, the prompt leaves no room for a single token; max_tokens 0, scoring the prompt
    only, needs room for the prompt alone)."""
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
