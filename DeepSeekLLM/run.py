"""Running a planned DeepSeek request: map, collapse and reduce steps, and their events.

A plan without chunks is one generation. A chunked plan maps every chunk to a note (in chunk
order, several at once), merges runs of notes that together fit one prompt until all of them
fit one (each round at least halves them, see services.plan_budget), then writes the answer from
the notes. The events: Progress after each map or collapse step, heartbeats (str) while steps
run, Piece for each bit of the answer (text or reasoning), and last the DeepSeekResult.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Iterator

from DeepSeekLLM.model_cache import CachedModel
from DeepSeekLLM.reasoning import ReasoningSplitter, split_reasoning
from DeepSeekLLM.services import Budget, Note, PromptBuilder, group_notes
from DeepSeekLLM.steps import StepRunner
from services.errors import ContextOverflow
from services.types import SamplingParams
from services.llm_service import GenerationStream
from services.types import SUCCEEDED, Finished, Timings, Token, Usage
from services.concurrency_manager import outcome_of


@dataclass(frozen=True)
class Progress:
    phase: str       # "chunk" (a map step finished) or "collapse" (a merge of notes finished)
    index: int       # counted from 1
    of: int


@dataclass(frozen=True)
class Piece:
    kind: str        # "text" or "reasoning"
    text: str


@dataclass(frozen=True)
class DeepSeekResult:
    model: str
    text: str
    reasoning: str
    finish_reason: str
    usage: Usage
    timings: Timings
    chunking: dict

    def to_dict(self) -> dict:
        return {"model": self.model, "text": self.text, "reasoning": self.reasoning,
                "finish_reason": self.finish_reason, "usage": self.usage.to_dict(),
                "timings": self.timings.to_dict(), "chunking": self.chunking}


@dataclass
class Plan:
    """How one request runs: its context size, prompts, and (when chunked) chunks and budget."""

    entry: CachedModel
    n_ctx: int
    builder: PromptBuilder
    context_tokens: int
    single: list[int] | None = None
    chunks: list[list[int]] = field(default_factory=list)
    budget: Budget | None = None

    @property
    def thinking(self) -> bool:
        return self.entry.tokenizer.layout.thinking

    def chunking(self) -> dict:
        if not self.chunks:
            sizes = [self.context_tokens] if self.context_tokens else []
            return {"strategy": "none", "chunks": len(sizes), "chunk_tokens": sizes, "overlap": 0}
        return {"strategy": "map_reduce", "chunks": len(self.chunks),
                "chunk_tokens": [len(c) for c in self.chunks], "overlap": self.budget.overlap}


class DeepSeekRun:
    """A started request: iterate for Progress, Piece and heartbeat (str) events, then one
    DeepSeekResult. Closing it (client gone) cancels its steps and lets go of its model."""

    def __init__(self, model: str, chunking: dict, events: Iterator, cleanup: ExitStack):
        self.model, self.chunking = model, chunking
        self._events, self._cleanup = events, cleanup

    def __iter__(self) -> Iterator:
        try:
            yield from self._events
        finally:
            self.close()

    def close(self) -> None:
        self._events.close()
        self._cleanup.close()


def step_sampling(plan: Plan, sampling: SamplingParams) -> SamplingParams:
    """The sampling of the first step: a map step writes notes of at most note_tokens."""
    return replace(sampling, max_tokens=plan.budget.note_tokens) if plan.chunks else sampling


def run_events(plan: Plan, runner: StepRunner, first: GenerationStream,
               sampling: SamplingParams) -> Iterator:
    """The run proper, from its started first step; ends the request's job once."""
    try:
        final = first
        if plan.chunks:
            final = yield from _map_reduce(plan, runner, first, sampling)
        result = yield from _answer(plan, runner, final)
    except BaseException as exc:
        runner.job.end(outcome_of(exc))
        raise
    runner.job.end(SUCCEEDED)
    yield result


def _map_reduce(plan: Plan, runner: StepRunner, first: GenerationStream,
                sampling: SamplingParams) -> Iterator:
    """Map every chunk to a note, collapse the notes until they fit; start the reduce step."""
    notes_sampling = step_sampling(plan, sampling)
    notes: list[Note] = []
    later = (plan.builder.map_step(chunk) for chunk in plan.chunks[1:])
    for event in runner.run_ordered(later, notes_sampling, first=first):
        if isinstance(event, Finished):
            notes.append(Note(len(notes) + 1, len(notes) + 1, _answer_of(plan, event)))
            yield Progress("chunk", len(notes), len(plan.chunks))
        else:
            yield event
    notes = yield from _collapse(plan, runner, notes, notes_sampling)
    blocks = [plan.builder.note_block(note) for note in notes]
    return runner.start(plan.builder.notes_step(blocks, final=True), sampling)


def _collapse(plan: Plan, runner: StepRunner, notes: list[Note],
              sampling: SamplingParams) -> Iterator:
    """Merge runs of notes that together fit one prompt, until all of them fit one.

    :raise ContextOverflow: a round did not shrink the notes (they outgrew the budget).
    """
    room = plan.budget.notes_room
    while True:
        blocks = [plan.builder.note_block(note) for note in notes]
        if sum(map(len, blocks)) <= room:
            return notes
        groups = group_notes([len(block) for block in blocks], room)
        merges = [group for group in groups if len(group) > 1]
        if not merges:
            raise ContextOverflow("the notes no longer shrink; raise n_ctx or lower max_tokens")
        prompts = (plan.builder.notes_step([blocks[i] for i in group], final=False)
                   for group in merges)
        merged: list[str] = []
        for event in runner.run_ordered(prompts, sampling):
            if isinstance(event, Finished):
                merged.append(_answer_of(plan, event))
                yield Progress("collapse", len(merged), len(merges))
            else:
                yield event
        texts = iter(merged)
        notes = [notes[g[0]] if len(g) == 1 else
                 Note(notes[g[0]].first, notes[g[-1]].last, next(texts)) for g in groups]


def _answer(plan: Plan, runner: StepRunner, final: GenerationStream) -> Iterator:
    """Stream the final step as text and reasoning pieces; return the DeepSeekResult."""
    splitter = ReasoningSplitter(plan.thinking)
    kept: dict[str, list[str]] = {"text": [], "reasoning": []}
    events = runner.drain(final)
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            finished: Finished = done.value
            break
        parts = splitter.feed(event.text) if isinstance(event, Token) else []
        for kind, piece in parts:
            kept[kind].append(piece)
            yield Piece(kind, piece)
    for kind, piece in splitter.flush():
        kept[kind].append(piece)
        yield Piece(kind, piece)
    elapsed = time.monotonic() - runner.started_at
    return DeepSeekResult(
        model=plan.entry.model.name, text="".join(kept["text"]),
        reasoning="".join(kept["reasoning"]), finish_reason=finished.finish_reason,
        usage=Usage(runner.prompt_tokens, runner.completion_tokens),
        timings=Timings(runner.queue_ms, elapsed * 1000,
                        runner.completion_tokens / elapsed if elapsed else 0.0),
        chunking=plan.chunking())


def _answer_of(plan: Plan, step: Finished) -> str:
    """A note: the step's answer without its reasoning."""
    return split_reasoning(step.text, plan.thinking)[0]
