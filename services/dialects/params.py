"""Parameter tables: how every dialect declares, checks and documents the fields of a JSON body.

A table row (`Param`) is a field's wire name, JSON type, default, doc text and check. The same
table validates requests (`parse_params`) and is rendered on the docs page, so the two cannot
drift. The sampling fields' rows come from `sampling_fields`, where each is defined once.

A row may be `ignored`: a field another API defines that a client may send (bookkeeping such as
OpenAI's `user`, or an option this server has nothing to do with). Its type is still checked, its
value is not used, and the docs page says so (`ignored_param`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from services.errors import InvalidRequest

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    default: Any
    help: str
    check: Check = lambda value: None
    required: bool = False


def ignored_param(name: str, kind: str, why: str, check: Check = lambda value: None) -> Param:
    """A row for a field that is accepted and checked (type, and `check`) but not used; its doc
    text says so (and why), so the docs page lists it as ignored."""
    return Param(name, kind, None, f"ignored: {why}", check)


def number_text(value: float) -> str:
    """A bound as people write it: 4294967295, not 4.29497e+09; 0.5, not 0.500000."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def in_range(low: float, high: float) -> Check:
    return lambda v: (None if low <= v <= high
                      else f"must be between {number_text(low)} and {number_text(high)}")


def at_least(low: float) -> Check:
    return lambda v: None if v >= low else f"must be >= {number_text(low)}"


def not_blank(value: str) -> str | None:
    return None if value.strip() else "must not be empty"


def only(allowed: Any) -> Check:
    return lambda v: None if v == allowed else f"is not supported by this server (only {allowed!r})"


def empty(value: Any) -> str | None:
    """Accepted only with the value that means "off"."""
    return "is not supported by this server" if value else None


def never(value: Any) -> str | None:
    """Refused whatever the value: the server cannot honour it."""
    return "is not supported by this server"


def one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _finite_number(value: Any) -> bool:
    """A JSON number a float can hold: 10**400 is an int that no float (nor range check) takes."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) if isinstance(value, float) else abs(value) < 2**1023


_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": _finite_number,
    "boolean": lambda v: isinstance(v, bool),
    "array of strings": lambda v: isinstance(v, list),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "string or array": lambda v: isinstance(v, (str, list)),
    "string or object": lambda v: isinstance(v, (str, dict)),
    "string or number": lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
}


def parse_params(body: Any, params: tuple[Param, ...]) -> dict[str, Any]:
    """Check `body` against a parameter table; return every parameter, defaults filled in.

    :raise InvalidRequest: not an object, unknown or missing fields, wrong types or ranges; the
        error's `param` is the field's wire name.
    """
    if not isinstance(body, Mapping):
        raise InvalidRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - {p.name for p in params})
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}; accepted: "
                             f"{', '.join(p.name for p in params)}", param=unknown[0])
    return {param.name: _value(param, body.get(param.name)) for param in params}


def _value(param: Param, value: Any) -> Any:
    if value is None:
        if param.required:
            raise InvalidRequest(f"{param.name} is required", param=param.name)
        return param.default
    if param.kind == "array of strings" and isinstance(value, str):
        value = [value]
    if not _TYPES[param.kind](value):
        raise InvalidRequest(f"{param.name} must be {'an' if param.kind[0] in 'aeiou' else 'a'} "
                             f"{param.kind}, got {type(value).__name__}", param=param.name)
    problem = param.check(value)
    if problem:
        raise InvalidRequest(f"{param.name} {problem}", param=param.name)
    return value
