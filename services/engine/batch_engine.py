"""Continuous batching: one llama.cpp context per loaded model, N sequence slots, one thread.

A pool of separate contexts makes every context read the whole weights for each token it
decodes, so N contexts split one memory bandwidth. Here every running sequence contributes its
next token to one batch and one `llama_decode` per step evaluates them all: the weights are read
once per step for everybody. Each step the scheduler thread

1. drops queued sequences whose caller gave up, and stops running ones that were cancelled or
   ran out of time (their slot is free for the next step);
2. admits waiting sequences into free slots while the KV cache has room for them, higher
   priority first (see `_next_waiting`), choosing the free slot whose cached tokens share the
   longest prefix with the prompt, so only the rest of the prompt is evaluated;
3. builds one batch: the pending token of every decoding sequence, then prompt chunks of the
   sequences still prefilling, up to N_BATCH tokens (a long prompt advances a chunk per step
   while the others keep streaming);
4. decodes it, and samples each sequence that has logits with its own C sampler chain (after
   reading the raw log probabilities of the row, for a request that asked for them).

A request that scores its prompt (`prompt_logprobs`) is evaluated from position 0 with logits
for every prompt row, a few rows per step: each row of logits is a vocabulary of floats.

The context is touched by this thread only; callers talk to it through `submit`.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import llama_cpp

from services.engine.logprobs import Distribution, token_logprob
from services.engine.sampler import SamplerChain
from services.engine.sequence import Sequence, common_prefix
from services.errors import DecodeFailed, ModelLoadError, ShuttingDown
from services.types import ANONYMOUS

log = logging.getLogger(__name__)

# Prompt rows with logits one step evaluates for a sequence scoring its prompt: llama.cpp keeps
# a vocabulary of floats per row (1 MB for Gemma's 262,144 tokens).
PROMPT_LOGITS_ROWS = 32


@dataclass(frozen=True)
class EngineSettings:
    slots: int           # N_PARALLEL: sequences decoded together
    kv_cells: int        # KV cache cells shared by the slots
    n_ctx: int           # the most positions one sequence may use
    n_batch: int         # tokens evaluated per step
    n_threads: int
    # A waiting sequence rises one priority level per this many seconds (PRIORITY_AGING_SECONDS).
    priority_aging_seconds: float = 10.0


@dataclass(frozen=True)
class EngineSnapshot:
    slots_total: int
    slots_busy: int
    waiting: int
    kv_cells: int
    kv_cells_reserved: int
    steps: int
    sequences_per_step: float | None    # mean over the recent steps
    widest_step: int                    # most sequences one step has carried
    prompt_tokens_evaluated: int
    prompt_tokens_reused: int


@dataclass(eq=False)
class _Waiting:
    """A queued sequence, its priority rank (0 high .. 2 low) and when it was queued."""

    sequence: Sequence
    rank: int
    since: float


@dataclass(eq=False)
class _Slot:
    id: int
    cached: list                    # tokens whose KV this sequence id holds, position 0 on
    sequence: Sequence | None = None
    last_used: float = 0.0


class BatchEngine:
    """Decodes the sequences of one model together; `submit` from any thread."""

    def __init__(self, llm: Any, settings: EngineSettings, name: str,
                 on_exit: Callable[[], None] = lambda: None):
        """`llm` is the model's `llama_cpp.Llama` (weights, vocabulary, metadata); the engine
        makes its own context on those weights with `settings.slots` sequences. `on_exit` runs
        on the scheduler thread once the context is freed (the owner frees the model)."""
        self.llm = llm
        self.name = name
        self.settings = settings
        self.vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self._ctx = self._new_context(llm, settings)
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(settings.n_batch, 0, 1)
        # The batch's arrays, looked up once: each attribute read of a ctypes struct builds a
        # new pointer object, and these are written for every token of every step.
        batch = self._batch
        self._rows = (batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits)
        self._piece = ctypes.create_string_buffer(256)
        self._slots = [_Slot(i, []) for i in range(settings.slots)]
        self._waiting: list[_Waiting] = []      # in arrival order
        self._changed = threading.Condition()
        self._closing = False
        self._retiring = False
        self._on_exit = on_exit
        self._steps = 0
        self._recent_widths: deque[int] = deque(maxlen=64)
        self._widest = 0
        self._evaluated = 0
        self._reused = 0
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    @staticmethod
    def _new_context(llm: Any, settings: EngineSettings) -> Any:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = settings.kv_cells
        params.n_batch = params.n_ubatch = settings.n_batch
        params.n_seq_max = settings.slots
        params.n_threads = params.n_threads_batch = settings.n_threads
        # One cache shared by all slots (a sequence may use up to n_ctx of it), kept whole
        # for sliding-window layers too so a cached prefix can be reused.
        params.kv_unified = True
        params.swa_full = True
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        if not ctx:
            raise ModelLoadError("llama.cpp could not create a batched context "
                                 f"({settings.kv_cells} cells, {settings.slots} slots)")
        return ctx

    # -- callers' side ---------------------------------------------------------------------

    def submit(self, sequence: Sequence, rank: int = ANONYMOUS.rank) -> None:
        """Queue a sequence of priority `rank` (services.types.Caller.rank: 0 is high); the
        scheduler admits it when a slot and KV room are free and nothing ranks before it.

        :raise ShuttingDown: the engine is closing (its model was evicted or the app closed).
        """
        with self._changed:
            if self._closing or self._retiring:
                raise ShuttingDown(f"model {self.name} is being unloaded")
            self._waiting.append(_Waiting(sequence, rank, time.monotonic()))
            self._changed.notify_all()

    def snapshot(self) -> EngineSnapshot:
        with self._changed:
            busy = [slot.sequence for slot in self._slots if slot.sequence is not None]
            widths = list(self._recent_widths)
            return EngineSnapshot(
                slots_total=len(self._slots), slots_busy=len(busy), waiting=len(self._waiting),
                kv_cells=self.settings.kv_cells, kv_cells_reserved=sum(s.reserve for s in busy),
                steps=self._steps,
                sequences_per_step=round(sum(widths) / len(widths), 2) if widths else None,
                widest_step=self._widest,
                prompt_tokens_evaluated=self._evaluated, prompt_tokens_reused=self._reused)

    @property
    def busy(self) -> bool:
        with self._changed:
            return bool(self._waiting) or any(s.sequence for s in self._slots)

    def retire(self) -> None:
        """Take no new sequences; free the context once the running and queued ones end."""
        with self._changed:
            self._retiring = True
            self._changed.notify_all()

    def close(self, wait: bool = True) -> None:
        """Stop taking sequences; running and queued ones end with ShuttingDown; then free the
        context on the scheduler thread (the only one that touches it)."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join()

    # -- the scheduler thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._wait_for_work():
                self._drop_stopped()
                self._admit()
                active = self._active()
                if active:
                    self._decode(active)
                else:
                    self._pause()
        except BaseException:
            log.exception("the batched engine of %s stopped", self.name)
            raise
        finally:
            self._end_all(ShuttingDown(f"model {self.name} was unloaded"))
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._on_exit()

    def _wait_for_work(self) -> bool:
        """Block until there is something to do; False once closing, or retired and idle."""
        with self._changed:
            while not self._closing and not self._waiting and not self._active():
                if self._retiring:
                    return False
                self._changed.wait()
            return not self._closing

    def _pause(self) -> None:
        """Nothing could be admitted and nothing runs (a queued sequence waits on a deadline or a
        cancellation): look again shortly rather than spin."""
        with self._changed:
            self._changed.wait(0.05)

    def _active(self) -> list[_Slot]:
        return [slot for slot in self._slots if slot.sequence is not None]

    def _drop_stopped(self) -> None:
        """End queued sequences whose caller gave up and running ones that must stop."""
        with self._changed:
            waiting = list(self._waiting)
        for entry in waiting:
            try:
                entry.sequence.job.check_waiting()
            except BaseException as exc:
                with self._changed:
                    self._waiting.remove(entry)
                entry.sequence.listener.ended(entry.sequence, exc)
        for slot in self._active():
            try:
                slot.sequence.job.check()
            except BaseException as exc:
                self._end(slot, exc)

    def _admit(self) -> None:
        """Admit waiting sequences, the next by `_next_waiting`, while it can run: a seeded one
        waits for the engine to empty, and one the KV cache has no room for waits for room;
        those below it wait too (none overtakes it)."""
        while True:
            with self._changed:
                if not self._waiting:
                    return
                entry = self._next_waiting()
            sequence = entry.sequence
            free = [slot for slot in self._slots if slot.sequence is None]
            if not free or self._exclusive():
                return
            if sequence.params.seed is not None:
                if len(free) < len(self._slots):
                    return          # a seeded sequence waits for the engine to empty
                self._clear()
            slot = max(free, key=lambda s: (common_prefix(s.cached, sequence.tokens), s.last_used))
            if not self._make_room(slot, sequence.reserve):
                return
            with self._changed:
                self._waiting.remove(entry)
            try:
                sequence.job.reserve()
                self._place(slot, sequence)
            except BaseException as exc:
                slot.sequence = None
                sequence.close()
                sequence.listener.ended(sequence, exc)

    def _next_waiting(self) -> _Waiting:
        """The waiting sequence to admit next (lock held): the best effective rank, its rank
        less one level per PRIORITY_AGING_SECONDS waited; ties in arrival order.

        Aging bounds how long priority holds a request back: once a low request has waited 2
        aging periods, no request queued from then on goes before it (a high one queued then
        has aged 2 levels less, so it ranks no better, and the tie goes to the older); for a
        normal request, 1 period. It waits behind at most what was queued before that.
        """
        now, aging = time.monotonic(), self.settings.priority_aging_seconds
        return min(self._waiting,
                   key=lambda entry: entry.rank - math.floor((now - entry.since) / aging))

    def _exclusive(self) -> bool:
        """Whether a seeded sequence runs: it has the engine to itself (README, "Seeds and
        batching"): what a batch holds changes llama.cpp's arithmetic in the last bits, so a
        seed reproduces its text only from the same state: an empty cache, decoding alone."""
        return any(slot.sequence.params.seed is not None for slot in self._active())

    def _clear(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)
        for slot in self._slots:
            slot.cached = []

    def _make_room(self, slot: _Slot, needed: int) -> bool:
        """Free KV cells held by idle slots' caches (least recently used first) until `needed`
        more fit beside the running sequences' reservations; False if they cannot."""
        def in_use() -> int:
            return (sum(s.sequence.reserve for s in self._slots if s.sequence)
                    + sum(len(s.cached) for s in self._slots if not s.sequence and s is not slot))

        idle = sorted((s for s in self._slots if not s.sequence and s.cached and s is not slot),
                      key=lambda s: s.last_used)
        while in_use() + needed > self.settings.kv_cells:
            if not idle:
                return False
            self._forget(idle.pop(0))
        return True

    def _forget(self, slot: _Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, slot.id, -1, -1)
        slot.cached = []

    def _place(self, slot: _Slot, sequence: Sequence) -> None:
        """Give `sequence` the slot, keeping the cached prefix it shares (at least one prompt
        token is evaluated, for its logits; none when the prompt is to be scored)."""
        keep = min(common_prefix(slot.cached, sequence.tokens), len(sequence.tokens) - 1)
        if sequence.params.prompt_logprobs:
            keep = 0
        if keep <= 0 or llama_cpp.llama_memory_seq_pos_min(self._memory, slot.id) > 0 \
                or not llama_cpp.llama_memory_seq_rm(self._memory, slot.id, keep, -1):
            self._forget(slot)
            keep = 0
        slot.cached = slot.cached[:keep]
        sequence.n_past = keep
        sequence.sampler = SamplerChain(self.vocab, sequence.params, sequence.tokens)
        slot.sequence = sequence
        self._reused += keep
        sequence.job.start()
        sequence.listener.admitted(sequence)

    def _decode(self, slots: list[_Slot]) -> None:
        """One batch: every decoding sequence's token, then prompt chunks; decode; sample."""
        batch, rows, scored = self._batch, [], []
        batch.n_tokens = 0
        for slot in slots:
            if slot.sequence.pending is not None:
                rows.append((slot, self._add(slot, [slot.sequence.pending], True)))
        for slot in slots:
            sequence = slot.sequence
            room = self.settings.n_batch - batch.n_tokens
            if sequence.prefilling and room > 0:
                scoring = sequence.params.prompt_logprobs
                if scoring:
                    room = min(room, PROMPT_LOGITS_ROWS)
                start = sequence.n_past
                chunk = sequence.tokens[start:start + room]
                last = start + len(chunk) == len(sequence.tokens)
                index = self._add(slot, chunk, last, every_row=scoring)
                self._evaluated += len(chunk)
                if scoring:
                    scored.append((slot, index - len(chunk) + 1, start, len(chunk)))
                if last:
                    rows.append((slot, index))
        if batch.n_tokens == 0:
            return
        status = llama_cpp.llama_decode(self._ctx, batch)
        with self._changed:
            self._steps += 1
            self._recent_widths.append(len(slots))
            self._widest = max(self._widest, len(slots))
        if status != 0:
            self._decode_failed(slots, status)
            return
        for slot, first, start, count in scored:
            try:
                self._score_prompt(slot.sequence, first, start, count)
            except BaseException as exc:
                self._end(slot, exc)
        for slot, index in rows:
            if slot.sequence is not None:
                self._sample(slot, index)

    def _add(self, slot: _Slot, tokens: list, logits_for_last: bool,
             every_row: bool = False) -> int:
        """Append `tokens` of `slot`'s sequence at its next positions (with logits for the last,
        or for `every_row`); the last row's index."""
        batch, sequence = self._batch, slot.sequence
        token_of, pos_of, n_seq_of, seq_of, logits_of = self._rows
        k, position = batch.n_tokens, sequence.n_past
        for token in tokens:
            token_of[k], pos_of[k], n_seq_of[k], logits_of[k] = token, position, 1, every_row
            seq_of[k][0] = slot.id
            k += 1
            position += 1
        logits_of[k - 1] = logits_for_last or every_row
        batch.n_tokens, sequence.n_past = k, position
        slot.cached.extend(tokens)
        sequence.pending = None
        return k - 1

    def _score_prompt(self, sequence: Sequence, first: int, start: int, count: int) -> None:
        """Each evaluated prompt row's logits give the next prompt token's logprob."""
        top = sequence.params.logprobs or 0
        for row in range(count):
            position = start + row + 1
            if position < len(sequence.tokens):
                sequence.prompt_logprobs.append(token_logprob(
                    Distribution(self._ctx, first + row, self.n_vocab),
                    sequence.tokens[position], top, self._token_text))

    def _sample(self, slot: _Slot, index: int) -> None:
        sequence = slot.sequence
        if sequence.max_new == 0:                   # the prompt only was to be scored
            sequence.finish_reason = "length"
            self._end(slot, None)
            return
        top = sequence.params.logprobs
        try:
            # The raw distribution, read before the sampler: only for requests that ask.
            raw = Distribution(self._ctx, index, self.n_vocab) if top is not None else None
            token = sequence.sampler.sample(self._ctx, index)
            logprob = token_logprob(raw, token, top, self._token_text) if raw is not None else None
            done = sequence.accept(token, self._token_text(token),
                                   llama_cpp.llama_vocab_is_eog(self.vocab, token), logprob)
        except BaseException as exc:
            self._end(slot, exc)
            return
        if done:
            sequence.flush()
            self._end(slot, None)

    def _token_text(self, token: int) -> bytes:
        size = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece),
                                              0, False)
        if size < 0:
            self._piece = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece,
                                                  len(self._piece), 0, False)
        return self._piece.raw[:size]

    def _decode_failed(self, slots: list[_Slot], status: int) -> None:
        """llama_decode refused the batch: end every sequence in it and clear their caches, so
        the next step starts clean (the sequences' owners see DecodeFailed)."""
        log.error("llama_decode of %s returned %d", self.name, status)
        for slot in slots:
            self._end(slot, DecodeFailed(f"llama.cpp could not evaluate the batch ({status})"))
            self._forget(slot)

    def _end(self, slot: _Slot, error: BaseException | None) -> None:
        sequence = slot.sequence
        slot.sequence = None
        slot.last_used = time.monotonic()      # slot.cached is what was evaluated: it stays
        sequence.close()
        sequence.listener.ended(sequence, error)

    def _end_all(self, error: BaseException) -> None:
        for slot in self._active():
            self._end(slot, error)
        with self._changed:
            waiting, self._waiting = self._waiting, []
        for entry in waiting:
            entry.sequence.listener.ended(entry.sequence, error)
