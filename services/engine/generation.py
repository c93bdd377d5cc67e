"""The token loop over one llama.cpp instance.

`Llama.create_completion(stream=True)` reports no token counts and can only be stopped between
the chunks it chooses to emit, so the loop here drives `Llama.generate` itself: every sampled
token passes a stop check (timeout, client gone) and is counted exactly.
"""

from __future__ import annotations

import codecs
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import llama_cpp
from llama_cpp.llama_grammar import LlamaGrammar

from services.errors import InvalidRequest
from services.types import SamplingParams


@dataclass
class TokenLoopResult:
    """Filled in by `stream_tokens` as it runs; final once the iterator is exhausted."""

    completion_tokens: int = 0
    finish_reason: str | None = None
    pieces: list[str] = field(default_factory=list)
    # time.monotonic() when the first token was sampled (text may be held back for stops).
    first_token_at: float | None = None


def tokenize(llm: llama_cpp.Llama, text: str) -> list[int]:
    """The model's own tokens for a prompt, with BOS, special tokens parsed as in a template."""
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def stream_tokens(llm: llama_cpp.Llama, prompt_tokens: Sequence[int], params: SamplingParams,
                  check: Callable[[], None], result: TokenLoopResult,
                  grammar: LlamaGrammar | None) -> Iterator[str]:
    """Yield text pieces as tokens are sampled; `check()` runs before each token and may raise.
    `grammar` is `build_grammar(llm, params.grammar)`, built by the caller: it can refuse the
    request, so serving builds it before the reply starts.

    Stop strings are matched across token boundaries: text that could be the start of a stop
    string is held back until it is known not to be one.
    """
    if params.seed is not None:
        # Reusing the cached prompt prefix changes the logits in the last bits, enough to change
        # a sample: a seeded request evaluates its prompt afresh so it is reproducible.
        llm.reset()
    llm.set_seed(params.seed if params.seed is not None else secrets.randbits(31))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    room = llm.n_ctx() - len(prompt_tokens)
    limit = min(params.max_tokens or room, room)
    held = ""
    check()
    tokens = llm.generate(list(prompt_tokens), temp=params.temperature, top_p=params.top_p,
                          top_k=params.top_k, repeat_penalty=params.repeat_penalty,
                          presence_penalty=params.presence_penalty,
                          frequency_penalty=params.frequency_penalty,
                          grammar=grammar)
    try:
        for token in tokens:
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                result.finish_reason = "stop"
                break
            result.completion_tokens += 1
            if result.first_token_at is None:
                result.first_token_at = time.monotonic()
            held += decoder.decode(llm.detokenize([token]))
            ready, held, stopped = split_at_stop(held, params.stop)
            if ready:
                result.pieces.append(ready)
                yield ready
            if stopped:
                result.finish_reason = "stop"
                return
            if result.completion_tokens >= limit:
                result.finish_reason = "length"
                break
            check()
    finally:
        tokens.close()
    tail = held + decoder.decode(b"", final=True)
    if tail:
        result.pieces.append(tail)
        yield tail


def build_grammar(llm: llama_cpp.Llama, gbnf: str | None) -> LlamaGrammar | None:
    """The grammar for `gbnf`, checked first: llama.cpp returns no sampler for a grammar it
    cannot parse, and llama-cpp-python would add that null to the sampler chain.

    :raise InvalidRequest: llama.cpp cannot parse the grammar.
    """
    if gbnf is None:
        return None
    sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, gbnf.encode("utf-8"),
                                                   b"root")
    if not sampler:
        raise InvalidRequest("the output format could not be turned into a grammar that "
                             "llama.cpp accepts")
    llama_cpp.llama_sampler_free(sampler)
    return LlamaGrammar.from_string(gbnf)


def split_at_stop(text: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split pending text into (safe to send, to hold back, a stop string was reached)."""
    if not stops:
        return text, "", False
    hits = [text.index(stop) for stop in stops if stop in text]
    if hits:
        return text[: min(hits)], "", True
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return text[: len(text) - hold], text[len(text) - hold:], False
