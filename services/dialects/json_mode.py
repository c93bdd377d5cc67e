"""JSON output: grammars that make the sampler produce JSON, any object or one matching a schema.

OpenAI's `response_format` and Ollama's `format` both end here. The grammar constrains every
sampled token, so a reply that ends on its own (not cut by max_tokens) always parses.

A schema is client input that becomes work for the converter and for llama.cpp's grammar
parser, so it is bounded first: the converter writes `minLength: n` as n copies of a rule (a
billion took 74 s and 5 GB), and llama.cpp parses nested groups recursively (`maxLength:
20000` nests 20,000 groups, which overflowed its stack and killed the process).
"""

from __future__ import annotations

import json
import re
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from services.errors import InvalidRequest

# The converter's string characters admit raw control characters, which JSON forbids inside
# strings (json.loads refuses them); llama.cpp's own converter excludes them, as this does.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'

# Largest count a schema may ask for (lengths, item and property counts, pattern repeats), and
# the largest grammar and group nesting handed to llama.cpp.
MAX_SCHEMA_COUNT = 1000
MAX_SCHEMA_NODES = 10_000
MAX_GRAMMAR_CHARS = 256 * 1024
MAX_GRAMMAR_DEPTH = 1024
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
           "minContains", "maxContains")
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
# A GBNF string literal or character class, skipped when counting group nesting.
_LITERAL = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]')


def any_json_object() -> str:
    """GBNF for one JSON object."""
    return JSON_GBNF


def schema_grammar(schema: Any, param: str) -> str:
    """GBNF for JSON matching `schema` (a JSON Schema object; remote $refs are not fetched).

    :raise InvalidRequest: not an object, or a schema the converter does not support.
    """
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param} must be a JSON Schema object", param=param)
    check_schema(schema, param)
    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:
        raise InvalidRequest(f"{param} is not a JSON Schema this server supports: {exc}",
                             param=param) from exc
    check_grammar(grammar, param)
    return grammar.replace(_LOOSE_CHAR, _STRICT_CHAR)


def check_schema(schema: dict, param: str) -> None:
    """:raise InvalidRequest: the schema has too many parts or asks for a count over the bound."""
    pending, seen = [schema], 0
    while pending:
        node = pending.pop()
        seen += 1
        if seen > MAX_SCHEMA_NODES:
            raise InvalidRequest(f"{param} has more than {MAX_SCHEMA_NODES} parts", param=param)
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            for key, value in node.items():
                counts = [value] if key in _COUNTS else []
                if key == "pattern" and isinstance(value, str):
                    counts = [int(n or 0) for pair in _REPEAT.findall(value) for n in pair
                              if len(n) < 20]
                    counts += [MAX_SCHEMA_COUNT + 1] * any(
                        len(n) >= 20 for pair in _REPEAT.findall(value) for n in pair)
                if any(isinstance(n, (int, float)) and not isinstance(n, bool)
                       and n > MAX_SCHEMA_COUNT for n in counts):
                    raise InvalidRequest(f"{param}: {key} asks for more than "
                                         f"{MAX_SCHEMA_COUNT} repeats, this server's bound",
                                         param=param)
                pending.append(value)


def check_grammar(grammar: str, param: str) -> None:
    """:raise InvalidRequest: the grammar is larger or nests deeper than llama.cpp is given."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise InvalidRequest(f"{param} makes a grammar of {len(grammar)} characters, more than "
                             f"{MAX_GRAMMAR_CHARS}", param=param)
    depth = deepest = 0
    for char in _LITERAL.sub("", grammar):
        depth += (char == "(") - (char == ")")
        deepest = max(deepest, depth)
    if deepest > MAX_GRAMMAR_DEPTH:
        raise InvalidRequest(f"{param} makes a grammar that nests {deepest} groups deep, more "
                             f"than {MAX_GRAMMAR_DEPTH}", param=param)
