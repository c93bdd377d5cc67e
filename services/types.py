"""The value types every layer shares: what a request asks for, and what a generation reports.

They sit at the bottom of `services/`: the dialect parsers build them, the engine consumes and
produces them, the API shapes them into replies. Nothing here imports from the rest of the app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int | None = 256    # None: until end of turn or the context is full
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    typical_p: float = 1.0          # locally typical sampling; 1 = off
    # GBNF text the output must match (JSON mode, tool calls); built into a grammar sampler by
    # the engine. With `grammar_triggers` the grammar is lazy: the output is free until one of
    # these strings appears, and constrained from that string on (a tool call that `auto` lets
    # the model start).
    grammar: str | None = None
    grammar_triggers: tuple[str, ...] = ()
    # Log probabilities: None = off; k >= 0 = each generated token's own logprob and its k
    # likeliest alternatives (Token.logprobs, Finished.logprobs).
    logprobs: int | None = None
    # Score the prompt too (completions' echo with logprobs): Finished.prompt_logprobs holds
    # each prompt token's logprob given the tokens before it (None for the first).
    prompt_logprobs: bool = False


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
    # Parts of the whole, for replies that report them (Ollama's durations): loading the
    # model, and evaluating the prompt up to the first sampled token.
    load_ms: float = 0.0
    prompt_ms: float = 0.0

    def to_dict(self) -> dict:
        return {"queue_ms": round(self.queue_ms, 1), "generation_ms": round(self.generation_ms, 1),
                "tokens_per_second": round(self.tokens_per_second, 1)}


@dataclass(frozen=True)
class Started:
    model: str
    prompt_tokens: int
    queue_ms: float
    cached: bool = False            # the reply comes from the response cache, not the model


# Request priorities, highest first (`X-Request-Priority`, or a key's default).
PRIORITIES = ("high", "normal", "low")
NORMAL = "normal"


@dataclass(frozen=True)
class Caller:
    """Who a request came from, as the services see it: the key's name (never the key itself;
    None without authentication) and the priority its wait for a slot is ordered by."""

    key_name: str | None = None
    priority: str = NORMAL

    @property
    def rank(self) -> int:
        """0 for high, 1 for normal, 2 for low."""
        return PRIORITIES.index(self.priority)


ANONYMOUS = Caller()


@dataclass(frozen=True)
class TopLogprob:
    """One candidate token at a position: its text, log probability and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """A generated (or prompt) token's log probability under the model's raw distribution
    (before temperature and truncation), and its `top` likeliest alternatives, likeliest first."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Token:
    text: str
    # The tokens this text came from, when the request asked for logprobs (a piece held back
    # for a stop string carries its tokens when it is sent).
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made: `arguments` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolCalled:
    """A stream event: the model finished writing a tool call (the `index`-th of its reply)."""

    index: int
    call: ToolCall


@dataclass(frozen=True)
class Finished:
    model: str
    text: str
    finish_reason: str          # stop, length, or tool_calls
    usage: Usage
    timings: Timings
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()


@dataclass(frozen=True)
class PromptTokens:
    """A prompt built from the loaded model (a chat rendered with the model's own template):
    its token ids, and stop strings its layout adds."""

    tokens: Sequence[int]
    stop: tuple[str, ...] = ()


# Renders a chat template: ChatTemplates.render with the job's stop check bound in.
Render = Callable[..., str]
# Text (tokenized with BOS), the model's own token ids, or a builder called with the loaded
# model's llama_cpp.Llama and the app's template renderer.
Prompt = Union[str, Sequence[int], Callable[[Any, Render], PromptTokens]]


# How a request (or a job) ended: the one vocabulary of /stats, /stats/concurrency and /metrics.
SUCCEEDED, FAILED, REJECTED = "succeeded", "failed", "rejected"
TIMED_OUT, QUEUE_TIMED_OUT, CANCELLED = "timed_out", "queue_timed_out", "cancelled"
OUTCOMES = (SUCCEEDED, FAILED, REJECTED, TIMED_OUT, QUEUE_TIMED_OUT, CANCELLED)
