"""The typed body of a generate request: every field's type, default and bounds, declared once.

The same table validates requests and documents them on the docs page, so the two cannot drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from services.errors import InvalidRequest
from services.types import SamplingParams

MAX_STOP_STRINGS = 8
# llama.cpp takes top_k as an int32: a larger value would wrap around, not mean "all".
MAX_TOP_K = 2**31 - 1


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    default: Any
    help: str
    check: Callable[[Any], str | None] = lambda value: None
    required: bool = False


def _range(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low:g} and {high:g}"


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be >= {low:g}"


def _stop_list(value: list) -> str | None:
    if len(value) > MAX_STOP_STRINGS:
        return f"may hold at most {MAX_STOP_STRINGS} strings"
    if not all(isinstance(s, str) and 0 < len(s) <= 256 for s in value):
        return "must hold non-empty strings of at most 256 characters"
    return None


def _not_blank(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


GENERATE_PARAMS: tuple[Param, ...] = (
    Param("prompt", "string", None, "the text to continue (required)", _not_blank,
          required=True),
    Param("system", "string", None, "optional instruction placed before the prompt"),
    Param("model", "string", None, "model name from GET /api/v1/models; default model if omitted",
          _not_blank),
    Param("max_tokens", "integer", 256, "tokens to generate at most (1 .. context size)",
          _at_least(1)),
    Param("temperature", "number", 0.8, "sampling temperature, 0 = greedy (0 .. 2)", _range(0, 2)),
    Param("top_p", "number", 0.95, "nucleus sampling (0 .. 1)", _range(0, 1)),
    Param("top_k", "integer", 40, "sample among the k likeliest tokens, 0 = all "
          "(0 .. 2^31-1)", _range(0, MAX_TOP_K)),
    Param("repeat_penalty", "number", 1.1, "penalty for repeated tokens (0 .. 10)", _range(0, 10)),
    Param("stop", "array of strings", [], f"up to {MAX_STOP_STRINGS} strings that end generation",
          _stop_list),
    Param("seed", "integer", None, "sampling seed for reproducible output (0 .. 2^32-1)",
          _range(0, 2**32 - 1)),
    Param("stream", "boolean", False, "stream tokens as server-sent events"),
)

def _finite_number(value: Any) -> bool:
    """A JSON number a float can hold: 10**400 is an int that no float (nor range check) takes."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) if isinstance(value, float) else abs(value) < 2**1023


_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: _finite_number(v),
    "boolean": lambda v: isinstance(v, bool),
    "array of strings": lambda v: isinstance(v, list),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "string or array": lambda v: isinstance(v, (str, list)),
    "string or object": lambda v: isinstance(v, (str, dict)),
    "string or number": lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
}


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    system: str | None
    model: str | None
    sampling: SamplingParams
    stream: bool

    @classmethod
    def from_json(cls, body: Any, n_ctx: int) -> "GenerateRequest":
        """Validate a decoded JSON body.

        :raise InvalidRequest: not an object, unknown or missing fields, wrong types or ranges.
        """
        values = parse_params(body, GENERATE_PARAMS)
        if values["max_tokens"] > n_ctx:
            raise InvalidRequest(f"max_tokens must be at most the context size ({n_ctx})")
        sampling = SamplingParams(
            max_tokens=values["max_tokens"], temperature=float(values["temperature"]),
            top_p=float(values["top_p"]), top_k=values["top_k"],
            repeat_penalty=float(values["repeat_penalty"]), stop=tuple(values["stop"]),
            seed=values["seed"])
        return cls(prompt=values["prompt"], system=values["system"], model=values["model"],
                   sampling=sampling, stream=values["stream"])


def parse_params(body: Any, params: tuple[Param, ...]) -> dict[str, Any]:
    """Check `body` against a parameter table; return every parameter, defaults filled in."""
    if not isinstance(body, Mapping):
        raise InvalidRequest("the request body must be a JSON object")
    known = {p.name for p in params}
    unknown = sorted(set(body) - known)
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}; accepted: "
                             f"{', '.join(p.name for p in params)}", param=unknown[0])
    values = {}
    for param in params:
        value = body.get(param.name)
        if value is None:
            if param.required:
                raise InvalidRequest(f"{param.name} is required", param=param.name)
            values[param.name] = param.default
            continue
        if param.kind == "array of strings" and isinstance(value, str):
            value = [value]
        if not _TYPES[param.kind](value):
            raise InvalidRequest(f"{param.name} must be {'an' if param.kind[0] in 'aeiou' else 'a'} "
                                 f"{param.kind}, got {type(value).__name__}", param=param.name)
        problem = param.check(value)
        if problem:
            raise InvalidRequest(f"{param.name} {problem}", param=param.name)
        values[param.name] = value
    return values
