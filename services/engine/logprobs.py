"""Log probabilities of tokens under the model's raw distribution, from a batch row's logits.

The raw distribution is the log-softmax of the logits before any sampler touches them (no
penalties, temperature or truncation), which is what OpenAI's `logprobs` report. It costs a pass
over the vocabulary per token (about a millisecond for 262,144 tokens), so the engine reads it
only for requests that ask; the likeliest alternatives are picked among the tokens near the top
rather than by sorting the vocabulary.
"""

from __future__ import annotations

from typing import Callable

import llama_cpp
import numpy as np

from services.types import TokenLogprob, TopLogprob

# A token id's text as bytes (the engine's detokenizer).
Piece = Callable[[int], bytes]
# How far below the best logit the alternatives are looked for first (widened if too few).
_WIDTHS = (4.0, 8.0, 16.0, 32.0, float("inf"))


class Distribution:
    """One position's logits (copied from llama.cpp's buffer) and their log-sum-exp."""

    def __init__(self, ctx: llama_cpp.llama_context_p, index: int, n_vocab: int):
        self.logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index),
                                            shape=(n_vocab,)).copy()
        self.peak = float(self.logits.max())
        self.log_total = self.peak + float(np.log(np.exp(self.logits - self.peak).sum()))

    def logprob(self, token: int) -> float:
        return float(self.logits[token]) - self.log_total

    def likeliest(self, count: int) -> np.ndarray:
        """The `count` likeliest token ids, likeliest first."""
        if count <= 0:
            return np.empty(0, dtype=np.int64)
        for width in _WIDTHS:
            near = np.flatnonzero(self.logits >= self.peak - width)
            if len(near) >= count:
                break
        if len(near) > count:
            near = near[np.argpartition(self.logits[near], -count)[-count:]]
        return near[np.argsort(-self.logits[near], kind="stable")]


def token_logprob(distribution: Distribution, token: int, top: int,
                  piece: Piece) -> TokenLogprob:
    """`token`'s entry at this position, with the `top` likeliest tokens, likeliest first."""
    return TokenLogprob(*_described(distribution, token, piece), top=tuple(
        TopLogprob(*_described(distribution, int(t), piece))
        for t in distribution.likeliest(top)))


def _described(distribution: Distribution, token: int, piece: Piece) -> tuple:
    data = piece(token)
    return data.decode("utf-8", errors="replace"), distribution.logprob(token), tuple(data)
