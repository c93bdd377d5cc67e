"""Text generation as the API sees it: resolve the model, build the prompt, run it on a worker.

Every generation, whole or streamed, runs the same way: the concurrency manager admits it and
runs `_work` on a worker thread, which checks out a pooled instance and puts events on a queue;
the caller's thread reads that queue, enforcing the queue and generation timeouts. A caller that
stops reading (client gone, timeout) cancels the job, and the worker stops at the next token.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Iterator

from langchain_core.prompts import PromptTemplate

from models.model_manager import ModelFile, ModelManager
from services.concurrency_manager import ConcurrencyManager, Job
from services.errors import ContextOverflow, GenerationTimeout, QueueTimeout
from services.generate_request import GenerateRequest
from services.generation import SamplingParams, TokenLoopResult, stream_tokens, tokenize
from services.model_pool import ModelPool
from services.stats import UsageStats

# How long the caller waits past a deadline the worker enforces itself before giving up on it.
_GRACE_SECONDS = 1.0

_PLAIN = PromptTemplate.from_template("{prompt}")
_WITH_SYSTEM = PromptTemplate.from_template("{system}\n\n{prompt}")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    generation_ms: float
    tokens_per_second: float

    def to_dict(self) -> dict:
        return {"queue_ms": round(self.queue_ms, 1), "generation_ms": round(self.generation_ms, 1),
                "tokens_per_second": round(self.tokens_per_second, 1)}


@dataclass(frozen=True)
class Started:
    model: str
    prompt_tokens: int
    queue_ms: float


@dataclass(frozen=True)
class Token:
    text: str


@dataclass(frozen=True)
class Finished:
    model: str
    text: str
    finish_reason: str
    usage: Usage
    timings: Timings


class GenerationStream:
    """A running generation: iterate for `Token`s then one `Finished`; closing it cancels."""

    def __init__(self, service: "LLMService", job: Job, events: queue.Queue, started: Started):
        self._service, self._job, self._events = service, job, events
        self.started = started

    def __iter__(self) -> Iterator[Token | Finished]:
        try:
            while True:
                event = self._service._next_event(self._job, self._events)
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self.close()

    def close(self) -> None:
        """Stop the generation if it still runs (the client went away); its instance returns."""
        self._job.cancel()


class LLMService:
    """Generation and model listing over the registry, the pool and the concurrency manager."""

    def __init__(self, models: ModelManager, pool: ModelPool, concurrency: ConcurrencyManager,
                 stats: UsageStats, n_ctx: int):
        self.models = models
        self.pool = pool
        self.concurrency = concurrency
        self.stats = stats
        self.n_ctx = n_ctx

    def parse_request(self, body: object) -> GenerateRequest:
        """:raise InvalidRequest: the body does not describe a valid generation."""
        return GenerateRequest.from_json(body, self.n_ctx)

    def generate(self, request: GenerateRequest) -> Finished:
        """Run a generation to the end.

        :raise ModelNotFound, ContextOverflow, TooBusy, QueueTimeout, GenerationTimeout:
        """
        for event in self.stream(request):
            if isinstance(event, Finished):
                return event
        raise AssertionError("a generation stream ended without a Finished event")

    def stream(self, request: GenerateRequest) -> GenerationStream:
        """Start a generation and wait until it holds an instance, so early errors raise here.

        :raise ModelNotFound, ContextOverflow, TooBusy, QueueTimeout, ShuttingDown:
        """
        model = self.models.resolve(request.model)
        prompt = build_prompt(request.prompt, request.system)
        events: queue.Queue = queue.Queue()
        job = self.concurrency.submit(
            lambda job: self._work(job, model, prompt, request.sampling, events))
        try:
            started = self._next_event(job, events)
        except BaseException:
            job.cancel()
            raise
        return GenerationStream(self, job, events, started)

    def _work(self, job: Job, model: ModelFile, prompt: str, sampling: SamplingParams,
              events: queue.Queue) -> None:
        """On a worker: hold an instance, generate, put events; the instance returns first."""
        result = TokenLoopResult()
        prompt_tokens, ok, generation_seconds = 0, False, 0.0
        try:
            with self.pool.checkout(model.name, model.path, job.queue_deadline,
                                    job.reserve) as instance:
                llm = instance.client
                tokens = tokenize(llm, prompt)
                prompt_tokens = len(tokens)
                check_fits(prompt_tokens, sampling.max_tokens, llm.n_ctx())
                job.start()
                events.put(Started(model.name, prompt_tokens, job.queue_seconds * 1000))
                for piece in stream_tokens(llm, tokens, sampling, job.check, result):
                    events.put(Token(piece))
                generation_seconds = time.monotonic() - job.started_at
            ok = True
            events.put(Finished(
                model=model.name, text="".join(result.pieces), finish_reason=result.finish_reason,
                usage=Usage(prompt_tokens, result.completion_tokens),
                timings=Timings(job.queue_seconds * 1000, generation_seconds * 1000,
                                result.completion_tokens / generation_seconds if generation_seconds else 0.0)))
        except BaseException as exc:
            events.put(exc)
            raise
        finally:
            if job.started_at is not None and not generation_seconds:
                generation_seconds = time.monotonic() - job.started_at
            self.stats.record(model.name, ok, prompt_tokens, result.completion_tokens,
                              job.queue_seconds, generation_seconds)

    def _next_event(self, job: Job, events: queue.Queue) -> Started | Token | Finished:
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

    def list_models(self) -> list[dict]:
        """Every model file with its metadata and whether instances of it are loaded."""
        loaded = {m.name: m for m in self.pool.loaded_models()}
        return [self._describe(model, loaded) for model in self.models.list()]

    def describe_model(self, name: str) -> dict:
        """:raise ModelNotFound:"""
        return self._describe(self.models.resolve(name),
                              {m.name: m for m in self.pool.loaded_models()})

    def _describe(self, model: ModelFile, loaded: dict) -> dict:
        info = self.models.with_sha256(model).to_dict()
        state = loaded.get(model.name)
        info.update(loaded=bool(state and state.instances), instances=state.instances if state else 0,
                    in_use=state.in_use if state else 0)
        return info


def build_prompt(prompt: str, system: str | None) -> str:
    """The text the model sees: the prompt, after the system instruction when there is one."""
    if system:
        return _WITH_SYSTEM.format(system=system, prompt=prompt)
    return _PLAIN.format(prompt=prompt)


def check_fits(prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
    """:raise ContextOverflow: prompt and completion together exceed the context window."""
    if prompt_tokens + max_tokens > n_ctx:
        raise ContextOverflow(
            f"the prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}: "
            f"{prompt_tokens + max_tokens} exceed the model's context of {n_ctx} tokens; "
            f"shorten the prompt or lower max_tokens",
            prompt_tokens=prompt_tokens, max_tokens=max_tokens, context_length=n_ctx)
