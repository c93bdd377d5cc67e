"""The generation steps of one DeepSeek request, run as jobs within that request's job.

The request is admitted once (`ConcurrencyManager.admit`: 429 when the server is full); each of
its steps is an ordinary generation submitted `within` that job, so it takes no admission place
of its own, is held to QUEUE_TIMEOUT and REQUEST_TIMEOUT on its own, and decodes on the model's
batched engine beside every other sequence. Up to `window` steps (N_PARALLEL, the engine's
slots) run at once, so the map steps of one request decode together in one batch.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Iterator, Sequence

from models.model_file import ModelFile
from services.concurrency_manager import Job
from services.llm_service import GenerationStream, LLMService
from services.types import Finished, SamplingParams, Token

# While a streamed request waits for its steps, it sends a keep-alive at least this often, so
# a client that went away is noticed (a write fails) and its steps are cancelled.
HEARTBEAT_SECONDS = 1.0
HEARTBEAT = "keep-alive"


class StepRunner:
    """Starts, drains and, on close, cancels the steps of one request; sums their usage."""

    def __init__(self, llm: LLMService, model: ModelFile, n_ctx: int, window: int, job: Job):
        self._llm, self._model, self._n_ctx = llm, model, n_ctx
        self.window = max(1, window)
        self.job = job
        self._open: set[GenerationStream] = set()
        self.steps = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.queue_ms = 0.0
        self.started_at: float | None = None
        self._last_beat = time.monotonic()

    def start_first(self, prompt: Sequence[int], sampling: SamplingParams) -> GenerationStream:
        """Submit the request's first step and wait until it holds a slot; the request's queue
        wait ends there.

        :raise QueueTimeout, ContextOverflow, ModelLoadError, ShuttingDown:
        """
        stream = self.start(prompt, sampling)
        started = stream.wait_started()
        self.job.reserve()
        self.job.start()
        self.queue_ms = started.queue_ms
        self.started_at = time.monotonic()
        return stream

    def start(self, prompt: Sequence[int], sampling: SamplingParams) -> GenerationStream:
        """Submit a step of this request.

        :raise ShuttingDown:
        """
        stream = self._llm.start(self._model, prompt, sampling, self._n_ctx, within=self.job)
        self._open.add(stream)
        return stream

    def drain(self, stream: GenerationStream) -> Iterator[str | Token]:
        """Yield the step's tokens (and heartbeats while they are slow to come); return Finished.

        :raise GenerationTimeout, QueueTimeout, ContextOverflow, ModelLoadError:
        """
        for event in stream:
            if isinstance(event, Finished):
                self._open.discard(stream)
                self.steps += 1
                self.prompt_tokens += event.usage.prompt_tokens
                self.completion_tokens += event.usage.completion_tokens
                return event
            yield event
            if time.monotonic() - self._last_beat >= HEARTBEAT_SECONDS:
                self._last_beat = time.monotonic()
                yield HEARTBEAT
        raise AssertionError("a generation stream ended without a Finished event")

    def run_ordered(self, prompts: Iterable[Sequence[int]], sampling: SamplingParams,
                    first: GenerationStream | None = None) -> Iterator[str | Finished]:
        """Run steps, at most `window` at once; yield each Finished in order, and heartbeats.

        `first`, when given, is the already started step of the first prompt (not in `prompts`).
        """
        pending = deque(prompts)
        running: deque[GenerationStream] = deque([first] if first else [])
        while pending or running:
            while pending and len(running) < self.window:
                running.append(self.start(pending.popleft(), sampling))
            finished = yield from self._quiet(running[0])
            running.popleft()
            yield finished

    def _quiet(self, stream: GenerationStream) -> Iterator[str]:
        """`drain` with the step's tokens dropped (notes are not streamed); return Finished."""
        events = self.drain(stream)
        while True:
            try:
                event = next(events)
            except StopIteration as done:
                return done.value
            if isinstance(event, str):
                yield event

    def close(self) -> None:
        """Cancel every step still queued or running; their slots come back."""
        for stream in list(self._open):
            stream.close()
        self._open.clear()
