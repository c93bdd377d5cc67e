"""The generation steps of one DeepSeek request, run on the shared concurrency manager and pool.

Each step is an ordinary generation (`LLMService.start`): admitted by the ConcurrencyManager,
run on its workers with an instance checked out of the ModelPool, and held to QUEUE_TIMEOUT and
REQUEST_TIMEOUT on its own. A request runs at most `window` steps at once (MODEL_POOL_SIZE, and
no more than MAX_WORKERS), so every step it submits can get an instance and it never queues
behind itself.

Admission: the request's first step is submitted like any generation, and a full server refuses
it with TooBusy (429). A later step refused because other requests hold every slot does not
fail a request that is already under way: it is retried as soon as one of the request's own
steps ends, or, with none running, polled for up to QUEUE_TIMEOUT (then QueueTimeout, 503).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterable, Iterator, Sequence

from models.model_file import ModelFile
from services.errors import QueueTimeout, TooBusy
from services.types import SamplingParams
from services.llm_service import GenerationStream, LLMService
from services.types import Finished, Token

# While a streamed request waits for its steps, it sends a keep-alive at least this often, so
# a client that went away is noticed (a write fails) and its steps are cancelled.
HEARTBEAT_SECONDS = 1.0
HEARTBEAT = "keep-alive"
_RETRY_SECONDS = 0.05


class StepRunner:
    """Starts, drains and, on close, cancels the steps of one request; sums their usage."""

    def __init__(self, llm: LLMService, model: ModelFile, n_ctx: int, window: int,
                 queue_timeout: float):
        self._llm, self._model, self._n_ctx = llm, model, n_ctx
        self.window = max(1, window)
        self._queue_timeout = queue_timeout
        self._open: set[GenerationStream] = set()
        self.steps = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.queue_ms = 0.0
        self.started_at: float | None = None
        self._last_beat = time.monotonic()

    def start_first(self, prompt: Sequence[int], sampling: SamplingParams) -> GenerationStream:
        """Submit the request's first step and wait until it holds an instance.

        :raise TooBusy, QueueTimeout, ContextOverflow, ModelLoadError, ShuttingDown:
        """
        stream = self._llm.start(self._model, prompt, sampling, self._n_ctx, counted=False)
        self._open.add(stream)
        self.queue_ms = stream.started.queue_ms
        self.started_at = time.monotonic()
        return stream

    def start(self, prompt: Sequence[int], sampling: SamplingParams,
              own_steps_running: bool = False) -> GenerationStream | None:
        """Submit a later step; None when the server is full but own steps will free a slot.

        :raise QueueTimeout: no admission slot came free within QUEUE_TIMEOUT.
        """
        deadline = time.monotonic() + self._queue_timeout
        while True:
            if not self._server_full():
                try:
                    stream = self._llm.start(self._model, prompt, sampling, self._n_ctx,
                                             wait=False, counted=False)
                except TooBusy:
                    pass                  # another request took the slot since the check
                else:
                    self._open.add(stream)
                    return stream
            if own_steps_running:
                return None
            if time.monotonic() >= deadline:
                raise QueueTimeout("no admission slot became free within QUEUE_TIMEOUT for "
                                   "the next step of this request")
            time.sleep(_RETRY_SECONDS)

    def _server_full(self) -> bool:
        """Whether a submit would be refused; checked first so that a step which only has to
        wait for the request's own steps is not counted as a rejected request."""
        snapshot = self._llm.concurrency.snapshot()
        return snapshot.in_flight >= snapshot.max_concurrent_requests

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
                stream = self.start(pending[0], sampling, own_steps_running=bool(running))
                if stream is None:
                    break
                pending.popleft()
                running.append(stream)
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
        """Cancel every step still queued or running; their instances return to the pool."""
        for stream in list(self._open):
            stream.close()
        self._open.clear()
