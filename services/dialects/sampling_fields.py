"""Each sampling field once: its name (a SamplingParams attribute), JSON type, bounds, default and
meaning; how already-named values become a SamplingParams; and the max_tokens-vs-context rule.

Every dialect lists these fields in its parameter table through `Field.param`, under its own wire
name and, where its API defines one, its own default (OpenAI's temperature 1.0, Ollama's top_p
0.9); type, bounds, check and doc text stay the field's. So an out-of-range value is refused
with the same message, naming the parameter, by every API, and the docs page says the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from services.dialects.params import Check, Param, at_least, in_range, number_text
from services.errors import InvalidRequest
from services.types import SamplingParams

MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
# llama.cpp takes top_k as an int32: a larger value would wrap around, not mean "all".
MAX_TOP_K = 2**31 - 1
MAX_SEED = 2**32 - 1

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
_SAME = object()


@dataclass(frozen=True)
class Field:
    name: str          # the SamplingParams attribute
    kind: str
    meaning: str
    bounds: str        # the bounds as the docs page shows them
    check: Check

    @property
    def default(self) -> Any:
        return _DEFAULTS[self.name]

    def param(self, wire: str | None = None, default: Any = _SAME, note: str = "") -> Param:
        """This field as a row of a dialect's table: its wire name and default, this field's
        type, bounds and check; `note` adds what the dialect's default or name means."""
        help_text = f"{self.meaning} ({self.bounds})" + (f"; {note}" if note else "")
        return Param(wire or self.name, self.kind, self.default if default is _SAME else default,
                     help_text, self.check)


def _ranged(name: str, kind: str, meaning: str, low: float, high: float) -> Field:
    return Field(name, kind, meaning, f"{number_text(low)} .. {number_text(high)}",
                 in_range(low, high))


def _stop_list(value: list) -> str | None:
    if len(value) > MAX_STOP_STRINGS:
        return f"may hold at most {MAX_STOP_STRINGS} strings"
    if not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in value):
        return f"must hold non-empty strings of at most {MAX_STOP_CHARS} characters"
    return None


MAX_TOKENS = Field("max_tokens", "integer", "tokens to generate at most",
                   "1 .. context size - 1", at_least(1))
TEMPERATURE = _ranged("temperature", "number", "sampling temperature, 0 = greedy", 0, 2)
TOP_P = _ranged("top_p", "number", "nucleus sampling: keep the likeliest tokens whose "
                "probabilities add up to top_p", 0, 1)
TOP_K = Field("top_k", "integer", "sample among the k likeliest tokens, 0 = all", "0 .. 2^31-1",
              in_range(0, MAX_TOP_K))
MIN_P = _ranged("min_p", "number", "drop tokens less likely than min_p times the likeliest "
                "one, 0 = off", 0, 1)
TYPICAL_P = _ranged("typical_p", "number", "locally typical sampling: keep the tokens closest to "
                    "the expected surprise whose probabilities add up to typical_p, 1 = off",
                    0, 1)
REPEAT_PENALTY = _ranged("repeat_penalty", "number", "penalty for repeated tokens, 1 = none",
                         0, 10)
PRESENCE_PENALTY = _ranged("presence_penalty", "number", "penalty for tokens already present",
                           -2, 2)
FREQUENCY_PENALTY = _ranged("frequency_penalty", "number", "penalty by how often a token "
                            "appeared", -2, 2)
STOP = Field("stop", "array of strings", "a string or a list of strings that end generation",
             f"at most {MAX_STOP_STRINGS}, each 1 .. {MAX_STOP_CHARS} characters", _stop_list)
SEED = Field("seed", "integer", "sampling seed: same seed, same request, same output",
             "0 .. 2^32-1", in_range(0, MAX_SEED))

FIELDS = {f.name: f for f in (MAX_TOKENS, TEMPERATURE, TOP_P, TOP_K, MIN_P, TYPICAL_P, REPEAT_PENALTY,
                              PRESENCE_PENALTY, FREQUENCY_PENALTY, STOP, SEED)}


def named_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields among parsed values whose wire names are the fields' own."""
    return {name: value for name, value in values.items() if name in FIELDS}


def sampling_params(n_ctx: int, wire_names: Mapping[str, str] | None = None,
                    **named: Any) -> SamplingParams:
    """A SamplingParams from values named as its fields (what a field leaves out keeps
    SamplingParams' default); `wire_names` maps a field to the name the request used for it, for
    the error. Bounds are checked here too, so a dialect that maps a value (Ollama's num_predict
    -1) cannot bypass them.

    :raise InvalidRequest: a value out of its field's bounds, or max_tokens that leaves no room
        for a prompt in `n_ctx`.
    """
    wire_names = wire_names or {}
    for name, value in named.items():
        field = FIELDS.get(name)
        problem = field.check(value) if field is not None and value is not None else None
        if problem:
            wire = wire_names.get(name, name)
            raise InvalidRequest(f"{wire} {problem}", param=wire)
    if named.get("max_tokens") is not None:
        check_max_tokens(named["max_tokens"], n_ctx, wire_names.get("max_tokens", "max_tokens"))
    return SamplingParams(**{name: _typed(name, value) for name, value in named.items()})


def _typed(name: str, value: Any) -> Any:
    """A JSON value as SamplingParams holds it: numbers as floats, stop strings as a tuple."""
    if value is None or name not in FIELDS:
        return value
    if FIELDS[name].kind == "number":
        return float(value)
    return tuple(value) if FIELDS[name] is STOP else value


def check_max_tokens(max_tokens: int, n_ctx: int, wire: str = "max_tokens") -> None:
    """:raise InvalidRequest: `max_tokens` fills the context alone. A prompt has at least one
    token, so max_tokens must be below n_ctx; the whole rule, prompt + max_tokens <= n_ctx, is
    checked once the prompt is tokenized (ContextOverflow, with both counts)."""
    if max_tokens >= n_ctx:
        raise InvalidRequest(f"{wire} must be smaller than the context size ({n_ctx} tokens), "
                             f"so that the prompt fits", param=wire, context_length=n_ctx)
