"""A request's sampling as a llama.cpp sampler chain: every step of it runs in C.

The chain mirrors llama-cpp-python's own order (penalties, grammar, then greedy or
top-k / top-p / min-p / temperature / a seeded draw), so a request samples as it did before the
batched engine. Each sequence owns its chain, so its seed and grammar state are its own whatever
else shares the batch.
"""

from __future__ import annotations

import secrets
from typing import Sequence

import llama_cpp

from services.errors import InvalidRequest
from services.types import SamplingParams

# Recent tokens the repeat, presence and frequency penalties look at (llama-cpp-python's default).
PENALTY_LAST_N = 64


class SamplerChain:
    """Owns one llama_sampler chain; `close` frees it (the engine calls it when a sequence ends)."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p, params: SamplingParams,
                 prompt: Sequence[int]):
        self._chain = llama_cpp.llama_sampler_chain_init(
            llama_cpp.llama_sampler_chain_default_params())
        add = self._add
        penalties = add(llama_cpp.llama_sampler_init_penalties(
            llama_cpp.llama_vocab_n_tokens(vocab), PENALTY_LAST_N, params.repeat_penalty, params.frequency_penalty,
            params.presence_penalty))
        for token in prompt[-PENALTY_LAST_N:]:
            llama_cpp.llama_sampler_accept(penalties, token)
        if params.grammar is not None:
            add(grammar_sampler(vocab, params.grammar))
        if params.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return
        add(llama_cpp.llama_sampler_init_top_k(params.top_k))
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


def check_grammar(vocab: llama_cpp.llama_vocab_p, gbnf: str | None) -> None:
    """Parse the grammar once before a request is queued, so a bad one is a 400 up front.

    :raise InvalidRequest:
    """
    if gbnf is not None:
        llama_cpp.llama_sampler_free(grammar_sampler(vocab, gbnf))
