"""Request bodies as JSON objects, by one strict rule every JSON endpoint shares.

Stricter than `json.loads`, so that nothing a client sends fails later, deeper in the server,
as a 500: nesting depth, duplicate keys, NaN/Infinity, out-of-range numbers and lone surrogates
are 400s here, in the dialect's own error shape.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

from flask import request
from werkzeug.exceptions import UnsupportedMediaType

from services.errors import InvalidRequest

# Deeper JSON is refused: no request needs it, and code that walks a body (a JSON schema
# turned into a grammar, a chat template over messages) recurses.
MAX_JSON_DEPTH = 64
# What Ollama's clients send besides JSON: its docs' `curl -d '{…}'` is form-encoded, and some
# clients send no Content-Type at all.
_OLLAMA_TYPES = ("", "application/x-www-form-urlencoded")
# A \uD800-\uDFFF escape: the only way a lone surrogate gets into a strictly UTF-8 body.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


def json_body(any_content_type: bool = False) -> dict:
    """The request's JSON object, read by the one strict rule every JSON endpoint shares.

    `any_content_type` also accepts what Ollama's own clients send (form-encoded or no
    Content-Type); any other type is 415 (text/plain is what a web page can POST cross-site
    without a preflight).

    :raise 415: the Content-Type is not JSON (nor one Ollama's clients send).
    :raise 413: the body is larger than MAX_REQUEST_BYTES (raised by Werkzeug while reading).
    :raise InvalidRequest: see `parse_json_object`.
    """
    if not request.is_json and not (any_content_type and request.mimetype in _OLLAMA_TYPES):
        raise UnsupportedMediaType("send the body as JSON with Content-Type: application/json")
    return parse_json_object(request.get_data(cache=True))


def parse_json_object(data: bytes) -> dict:
    """`data` as a JSON object, or a 400 that says what is wrong with it, never another error.

    Stricter than `json.loads`: the body must be UTF-8 (a BOM is allowed), an object, nested at
    most MAX_JSON_DEPTH deep, without duplicate keys, NaN/Infinity, numbers out of range or
    lone surrogates (which would fail later, when the text is encoded for the model).

    :raise InvalidRequest:
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid UTF-8 (byte {exc.start})") from exc
    if not text.strip():
        raise InvalidRequest("the request body is empty: send a JSON object")
    try:
        value = json.loads(text, object_pairs_hook=_object, parse_constant=_constant,
                           parse_float=_float)
    except RecursionError as exc:       # the C parser's own bound, far below any stack limit
        raise _too_deep() from exc
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
    except ValueError as exc:           # an integer over Python's 4300-digit limit
        raise InvalidRequest("the JSON body holds an integer with too many digits") from exc
    if not isinstance(value, dict):
        raise InvalidRequest("the request body must be a JSON object, not "
                             + _JSON_TYPES[type(value)])
    _check_tree(value, text)
    return value


def _object(pairs: list[tuple[str, Any]]) -> dict:
    value = dict(pairs)
    if len(value) < len(pairs):
        seen = set()
        key = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise InvalidRequest(f"the JSON body has the key {_quoted(key)} twice in one object",
                             param=key if len(key) <= 64 and key.isprintable() else None)
    return value


def _constant(name: str) -> Any:
    raise InvalidRequest(f"{name} is not a JSON number; send a finite number")


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise InvalidRequest(f"the number {text[:40]} is out of range")
    return value


def _check_tree(root: dict, text: str) -> None:
    """Bound the nesting depth and refuse lone surrogates in keys and strings, walking the
    parsed body level by level (so no stack to exhaust) and only when the text could hold them.
    """
    deep = text.count("[") + text.count("{") > MAX_JSON_DEPTH
    strings = _SURROGATE_ESCAPE.search(text) is not None
    level, depth = [root], 1
    while level and (deep or strings):
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        children = []
        for node in level:
            values = node.values() if isinstance(node, dict) else node
            if strings:
                _check_strings(node if isinstance(node, dict) else (), values)
            children += [value for value in values if isinstance(value, (dict, list))]
        level, depth = children, depth + 1


def _check_strings(keys: Iterable, values: Iterable) -> None:
    for text in (*keys, *values):
        if isinstance(text, str) and _SURROGATE.search(text):
            char = _SURROGATE.search(text).group()
            raise InvalidRequest(f"a string in the JSON body holds the lone surrogate "
                                 f"\\u{ord(char):04x}; strings must be valid Unicode "
                                 "(a surrogate escape needs its pair)")


def _too_deep() -> InvalidRequest:
    return InvalidRequest(f"the JSON body is nested more than {MAX_JSON_DEPTH} levels deep")


def _quoted(key: str) -> str:
    """A key for a message: quoted, cut, and ASCII-escaped, so a hostile key stays printable."""
    return json.dumps(key[:80])
