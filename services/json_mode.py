"""JSON output: grammars that make the sampler produce JSON, any object or one matching a schema.

OpenAI's `response_format` and Ollama's `format` both end here. The grammar constrains every
sampled token, so a reply that ends on its own (not cut by max_tokens) always parses.
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from services.errors import InvalidRequest

# The converter's string characters admit raw control characters, which JSON forbids inside
# strings (json.loads refuses them); llama.cpp's own converter excludes them, as this does.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def any_json_object() -> str:
    """GBNF for one JSON object."""
    return JSON_GBNF


def schema_grammar(schema: Any, param: str) -> str:
    """GBNF for JSON matching `schema` (a JSON Schema object; remote $refs are not fetched).

    :raise InvalidRequest: not an object, or a schema the converter does not support.
    """
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{param} must be a JSON Schema object", param=param)
    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:
        raise InvalidRequest(f"{param} is not a JSON Schema this server supports: {exc}",
                             param=param) from exc
    return grammar.replace(_LOOSE_CHAR, _STRICT_CHAR)
