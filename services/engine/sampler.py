"""A request's sampling as a llama.cpp sampler chain: every step of it runs in C.

The chain follows llama.cpp's usual order (penalties, grammar, then greedy or top-k / typical /
top-p / min-p / temperature / a seeded draw), so a request samples as it did before the batched
engine. Each sequence owns its chain, so its seed and grammar state are its own whatever else
shares the batch.

A lazy grammar (`SamplingParams.grammar_triggers`) is not llama.cpp's lazy sampler: that one
throws a C++ exception, which aborts the whole process, when the token that completes a trigger
runs on into text the grammar refuses (" theory" for a trigger " the"). Here the chain runs
without the grammar until the sequence sees a trigger in its output; `trigger` then checks the
text from the trigger on against a fresh grammar, token by token, with the grammar's own
filter (which cannot throw), and only then puts the grammar into the chain. Text the grammar
refuses was not a trigger: the output stays free and the next occurrence is tried.
"""

from __future__ import annotations

import ctypes
import secrets
from typing import Sequence

import llama_cpp

from services.errors import InvalidRequest
from services.types import SamplingParams

# Recent tokens the repeat, presence and frequency penalties look at (llama-cpp-python's default).
PENALTY_LAST_N = 64
# Bounds on a lazy grammar's triggers (they come from tool names: hostile input).
MAX_TRIGGERS = 128
MAX_TRIGGER_CHARS = 512


class SamplerChain:
    """Owns one llama_sampler chain; `close` frees it (the engine calls it when a sequence ends)."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p, params: SamplingParams,
                 prompt: Sequence[int]):
        self._vocab = vocab
        self._chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params())
        lazy = params.grammar is not None and bool(params.grammar_triggers)
        # The grammar text while it waits for a trigger; None once it is in the chain (or never).
        self.pending_grammar: str | None = params.grammar if lazy else None
        add = self._add
        penalties = add(llama_cpp.llama_sampler_init_penalties(
            llama_cpp.llama_vocab_n_tokens(vocab), PENALTY_LAST_N, params.repeat_penalty,
            params.frequency_penalty, params.presence_penalty))
        for token in prompt[-PENALTY_LAST_N:]:
            llama_cpp.llama_sampler_accept(penalties, token)
        if params.grammar is not None and not lazy:
            add(grammar_sampler(vocab, params.grammar))
        if params.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return
        add(llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.typical_p < 1:
            add(llama_cpp.llama_sampler_init_typical(params.typical_p, 1))
        add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else secrets.randbits(32)
        add(llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))

    def _add(self, sampler: llama_cpp.llama_sampler_p) -> llama_cpp.llama_sampler_p:
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)
        return sampler

    def sample(self, ctx: llama_cpp.llama_context_p, index: int) -> int:
        """Sample from the logits of batch row `index` and accept the token into the chain."""
        return llama_cpp.llama_sampler_sample(self._chain, ctx, index)

    def trigger(self, text: str) -> bool:
        """The output reached a trigger: `text` runs from it to the end of the output. Put the
        waiting grammar, fed `text`, into the chain after the penalties (their history and the
        draw's state go on); False, changing nothing, when the grammar refuses `text`."""
        grammar = grammar_sampler(self._vocab, self.pending_grammar)
        if not feed(self._vocab, grammar, text):
            llama_cpp.llama_sampler_free(grammar)
            return False
        rest = [llama_cpp.llama_sampler_chain_remove(self._chain, 1)
                for _ in range(llama_cpp.llama_sampler_chain_n(self._chain) - 1)]
        self._add(grammar)
        for sampler in rest:
            self._add(sampler)
        self.pending_grammar = None
        return True

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None


def grammar_sampler(vocab: llama_cpp.llama_vocab_p, gbnf: str) -> llama_cpp.llama_sampler_p:
    """:raise InvalidRequest: llama.cpp cannot parse the grammar (it returns no sampler)."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), b"root")
    if not sampler:
        raise InvalidRequest("the output format could not be turned into a grammar that "
                             "llama.cpp accepts")
    return sampler


def feed(vocab: llama_cpp.llama_vocab_p, grammar: llama_cpp.llama_sampler_p, text: str) -> bool:
    """Advance `grammar` over `text` if it accepts all of it; False (the grammar then in some
    state part way) if it does not. Each token is offered to the grammar's filter before it is
    accepted: accepting a token the grammar refuses throws in C++, which cannot be caught."""
    data = text.encode("utf-8")
    tokens = tokenize(vocab, data)
    if b"".join(token_piece(vocab, token) for token in tokens) != data:
        return False
    for token in tokens:
        if not allows(grammar, token):
            return False
        llama_cpp.llama_sampler_accept(grammar, token)
    return True


def allows(grammar: llama_cpp.llama_sampler_p, token: int) -> bool:
    """Whether the grammar, in its current state, lets `token` come next."""
    cell = (llama_cpp.llama_token_data * 1)(llama_cpp.llama_token_data(token, 0.0, 0.0))
    candidates = llama_cpp.llama_token_data_array(cell, 1, -1, False)
    llama_cpp.llama_sampler_apply(grammar, ctypes.byref(candidates))
    return cell[0].logit != float("-inf")


def tokenize(vocab: llama_cpp.llama_vocab_p, data: bytes) -> list[int]:
    """Plain text (no BOS, special-token text read as text) as token ids."""
    room = len(data) + 8
    ids = (llama_cpp.llama_token * room)()
    count = llama_cpp.llama_tokenize(vocab, data, len(data), ids, room, False, False)
    return list(ids[:max(count, 0)])


def token_piece(vocab: llama_cpp.llama_vocab_p, token: int) -> bytes:
    """The bytes a token stands for in output text (special tokens as nothing)."""
    buffer = ctypes.create_string_buffer(64)
    size = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
    if size < 0:
        buffer = ctypes.create_string_buffer(-size)
        size = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
    return buffer.raw[:size]


def check_grammar(vocab: llama_cpp.llama_vocab_p, gbnf: str | None,
                  triggers: Sequence[str] = ()) -> None:
    """Parse the grammar once before a request is queued, so a bad one is a 400 up front; a lazy
    one must also accept each of its triggers as the start of its output (its root begins with
    the trigger text), or it could never take effect. Triggers without a grammar mean nothing.

    :raise InvalidRequest:
    """
    if gbnf is None:
        return
    if len(triggers) > MAX_TRIGGERS:
        raise InvalidRequest(f"a lazy grammar takes at most {MAX_TRIGGERS} triggers")
    for trigger in triggers:
        if not trigger or len(trigger) > MAX_TRIGGER_CHARS:
            raise InvalidRequest(f"a grammar trigger must be 1 to {MAX_TRIGGER_CHARS} "
                                 "characters long")
        grammar = grammar_sampler(vocab, gbnf)
        try:
            if not feed(vocab, grammar, trigger):
                raise InvalidRequest(f"the grammar does not begin with its trigger {trigger!r}")
        finally:
            llama_cpp.llama_sampler_free(grammar)
    llama_cpp.llama_sampler_free(grammar_sampler(vocab, gbnf))
