"""Several generations for one request: OpenAI's `n`, and a list of prompts on completions.

Each choice is a generation of its own, started through `LLMService` and admitted like a
request (so `n` counts against MAX_CONCURRENT_REQUESTS and the choices decode together in the
model's batched engine). The request starts only if every choice can: the first that cannot
cancels those already started and its error raises, before any reply is sent.

Seeds: choices with one seed would repeat each other, so choice `i` runs with `seed + i`
(modulo 2^32): a seeded request with n=2 gives the texts of two single requests seeded `seed`
and `seed + 1`. Seeded generations run alone in the engine (README, "Seeds and batching"), so
seeded choices run one after another.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator

from services.llm_service import GenerationStream
from services.types import Finished, Prompt, SamplingParams, Started

# Turns a choice's event stream into the events its caller wants (e.g. tools.tool_events).
Transform = Callable[[Iterable[Any]], Iterable[Any]]
_DONE = object()


def start_choices(llm: Any, model_name: str | None,
                  requests: list[tuple[Prompt, SamplingParams]], client_gone=lambda: False,
                  transform: Transform = lambda events: events) -> "Choices":
    """Start one generation per (prompt, sampling), choice `i` with seed + i when seeded, and
    wait until each holds a slot.

    :raise ModelNotFound, ContextOverflow, TooBusy, QueueTimeout, ShuttingDown,
        ChatTemplateError: the first error of a choice that could not start (the others are
        cancelled).
    """
    model = llm.models.resolve(model_name)
    streams: list[GenerationStream] = []
    try:
        for i, (prompt, sampling) in enumerate(requests):
            streams.append(llm.start(model, prompt, seeded(sampling, i), client_gone=client_gone))
        started = [stream.wait_started() for stream in streams]
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return Choices(streams, started, transform)


def seeded(sampling: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s sampling: its seed moved on by `index`, so choices differ."""
    if sampling.seed is None or index == 0:
        return sampling
    return replace(sampling, seed=(sampling.seed + index) % 2**32)


class Choices:
    """Running choices: iterate for `(index, event)` in arrival order (each choice's events,
    `Token`s then one `Finished`, through the transform); closing cancels every choice.

    One choice is read on the caller's thread; several are read by one thread each, into a
    queue the caller reads, so a slow choice does not hold back the others' tokens."""

    def __init__(self, streams: list[GenerationStream], started: list[Started],
                 transform: Transform):
        self.streams = streams
        self.started = started
        self._transform = transform
        self._closed = False

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        try:
            if len(self.streams) == 1:
                for event in self._transform(self.streams[0]):
                    yield 0, event
            else:
                yield from self._merged()
        finally:
            self.close()

    def _merged(self) -> Iterator[tuple[int, Any]]:
        events: queue.Queue = queue.Queue()
        for index, stream in enumerate(self.streams):
            threading.Thread(target=self._relay, args=(index, stream, events),
                             name=f"choice-{index}", daemon=True).start()
        running = len(self.streams)
        while running:
            index, event = events.get()
            if event is _DONE:
                running -= 1
            elif isinstance(event, BaseException):
                raise event
            else:
                yield index, event

    def _relay(self, index: int, stream: GenerationStream, events: queue.Queue) -> None:
        """One choice's events into the shared queue, then _DONE (or the error it ended with,
        unless the choices were closed, and the error is only the cancellation)."""
        try:
            for event in self._transform(stream):
                events.put((index, event))
            events.put((index, _DONE))
        except BaseException as exc:
            events.put((index, _DONE if self._closed else exc))

    def close(self) -> None:
        """Cancel every choice still running (the client left, or one choice failed)."""
        self._closed = True
        for stream in self.streams:
            stream.close()

    def collect(self) -> list[Finished]:
        """Run every choice to its end; their `Finished` events in index order."""
        finished: dict[int, Finished] = {}
        for index, event in self:
            if isinstance(event, Finished):
                finished[index] = event
        return [finished[i] for i in range(len(self.streams))]
