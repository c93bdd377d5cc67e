"""OpenAI request bodies (/v1) as typed requests: each field's type, default and bounds, once.

The tables validate requests and document them on the docs page. Unknown fields are refused
(as OpenAI does); fields OpenAI defines that this server cannot honour are accepted only with
the value that means "off" (n = 1, no tools, no logprobs), so nothing is silently ignored
except bookkeeping fields (user, store, metadata).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.dialects import sampling_fields as f
from services.dialects.chat import ChatPrompt, parse_messages
from services.dialects.json_mode import any_json_object, schema_grammar
from services.dialects.params import Param, empty, one_of, only, parse_params
from services.errors import InvalidRequest
from services.types import Prompt, SamplingParams

_MODEL = Param("model", "string", None, "model id from GET /v1/models (default model if omitted)")
_SAMPLING = (
    f.TEMPERATURE.param(default=1.0), f.TOP_P.param(default=1.0), f.STOP.param(),
    f.SEED.param(), f.PRESENCE_PENALTY.param(), f.FREQUENCY_PENALTY.param(),
    Param("n", "integer", 1, "choices per request: only 1", only(1)),
    Param("stream", "boolean", False, "stream chunks as server-sent events, ending with "
          "data: [DONE]"),
    Param("stream_options", "object", None, '{"include_usage": true} adds a last chunk with '
          "usage"),
    Param("logit_bias", "object", None, "not supported (only empty)", empty),
    Param("user", "string", None, "accepted, not used"),
)
# OpenAI's API has no repeat penalty nor min_p: both stay off (top_k keeps the server default).
_OPENAI_FIXED = {"min_p": 0.0, "repeat_penalty": 1.0}

COMPLETION_PARAMS: tuple[Param, ...] = (
    _MODEL,
    Param("prompt", "string or array", None, "text to continue: a string, a list of one string, "
          "or token ids (required)", required=True),
    f.MAX_TOKENS.param(default=16),
    *_SAMPLING,
    Param("echo", "boolean", False, "only false", only(False)),
    Param("best_of", "integer", 1, "only 1", only(1)),
    Param("logprobs", "integer", None, "not supported", empty),
    Param("suffix", "string", None, "not supported", empty),
)

CHAT_PARAMS: tuple[Param, ...] = (
    _MODEL,
    Param("messages", "array", None, "the conversation, [{role, content}]; roles system, "
          "developer, user, assistant (required)", required=True),
    f.MAX_TOKENS.param(default=None, note="default: until the reply ends or the context is full"),
    f.MAX_TOKENS.param("max_completion_tokens", default=None, note="the newer name of max_tokens"),
    *_SAMPLING,
    Param("response_format", "object", None, '{"type": "json_object"}, or {"type": '
          '"json_schema", "json_schema": {"schema": {...}}}: output constrained to parse as JSON'),
    Param("logprobs", "boolean", False, "only false", only(False)),
    Param("top_logprobs", "integer", None, "not supported", empty),
    Param("tools", "array", None, "not supported (only empty)", empty),
    Param("functions", "array", None, "not supported (only empty)", empty),
    Param("tool_choice", "string", None, "only none or auto (there are no tools)",
          one_of("none", "auto")),
    Param("parallel_tool_calls", "boolean", None, "accepted, not used"),
    Param("store", "boolean", None, "accepted, not used"),
    Param("metadata", "object", None, "accepted, not used"),
)

EMBEDDING_PARAMS: tuple[Param, ...] = (
    _MODEL,
    Param("input", "string or array", None, "a text or a list of texts (required)",
          required=True),
    Param("encoding_format", "string", "float", "float, or base64 (little-endian float32, what "
          "the openai package asks for)", one_of("float", "base64")),
    Param("dimensions", "integer", None, "not supported: vectors have the model's size", empty),
    Param("user", "string", None, "accepted, not used"),
)


@dataclass(frozen=True)
class OpenAIGeneration:
    """A completion or chat request, ready for `LLMService.stream_prompt`."""

    model: str | None
    prompt: Prompt
    sampling: SamplingParams
    stream: bool
    include_usage: bool


@dataclass(frozen=True)
class OpenAIEmbedding:
    model: str | None
    inputs: Any
    encoding_format: str


def parse_completion(body: Any, n_ctx: int) -> OpenAIGeneration:
    """:raise InvalidRequest: the body is not a completion request this server can run."""
    values = parse_params(body, COMPLETION_PARAMS)
    return _generation(values, _completion_prompt(values["prompt"]), n_ctx)


def parse_chat(body: Any, n_ctx: int) -> OpenAIGeneration:
    """:raise InvalidRequest: the body is not a chat request this server can run."""
    values = parse_params(body, CHAT_PARAMS)
    return _generation(values, ChatPrompt(parse_messages(values["messages"])), n_ctx,
                       "max_completion_tokens" if values["max_completion_tokens"] else "max_tokens",
                       _response_grammar(values["response_format"]))


def parse_embedding(body: Any) -> OpenAIEmbedding:
    """:raise InvalidRequest: the body is not an embeddings request."""
    values = parse_params(body, EMBEDDING_PARAMS)
    return OpenAIEmbedding(values["model"], values["input"], values["encoding_format"])


def _generation(values: dict, prompt: Prompt, n_ctx: int, max_tokens_name: str = "max_tokens",
                grammar: str | None = None) -> OpenAIGeneration:
    """`max_tokens_name`: the field the limit came in (chat's max_completion_tokens wins)."""
    options = values["stream_options"] or {}
    sampling = f.sampling_params(n_ctx, {"max_tokens": max_tokens_name},
                                 **{**f.named_fields(values), **_OPENAI_FIXED,
                                    "max_tokens": values[max_tokens_name], "grammar": grammar})
    return OpenAIGeneration(values["model"], prompt, sampling, values["stream"],
                            bool(options.get("include_usage")))


def _completion_prompt(prompt: str | list) -> Prompt:
    """A string, a list of one string, or token ids (a list of ints, or a list of one such
    list); several prompts are refused. Ids are checked against the model's vocabulary on the
    worker, before the reply starts.
    """
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt
    if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise InvalidRequest("prompt must be a string, a list of one string, or token ids (a list of "
                         "integers, or a list of one such list): one prompt per request",
                         param="prompt")


def _response_grammar(response_format: dict | None) -> str | None:
    """The grammar a response_format asks for; None for plain text."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return any_json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema_grammar(schema if schema is not None else {"type": "object"},
                              "response_format")
    raise InvalidRequest("response_format.type must be text, json_object or json_schema",
                         param="response_format")
