"""OpenAI request bodies (/v1) as typed requests: each field's type, default and bounds, once.

The tables validate requests and document them on the docs page. Every field of OpenAI's chat
completions, completions and embeddings request schemas is accepted: applied, or, where it has
no meaning here, `ignored` (a row property the docs page shows): bookkeeping (user, store,
metadata, service_tier, …), reasoning and output options of OpenAI's own models, and logit_bias,
whose keys are ids of OpenAI's tokenizer, not this model's. The extension fields other local
servers take (llama-server's and Ollama's top_k, min_p, repeat_penalty, typical_p; vLLM's
repetition_penalty) are applied. Any other field is refused, as OpenAI refuses it: a misspelt
max_token would otherwise be dropped without a word.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from services.dialects import sampling_fields as f
from services.dialects.chat import ChatPrompt, parse_messages
from services.dialects.json_mode import any_json_object, schema_grammar
from services.dialects.openai_reply import EchoedPrompt
from services.dialects.params import (Param, at_least, ignored_param, in_range, one_of,
                                      parse_params)
from services.dialects.tools import ToolSpec, parse_tools
from services.errors import InvalidRequest
from services.types import Prompt, SamplingParams

# Choices one request may ask for (n, times the prompts of a completions request): each is a
# generation admitted like a request of its own.
MAX_CHOICES = 8
MAX_TOP_LOGPROBS = 20           # chat's top_logprobs, as OpenAI bounds it
MAX_COMPLETION_LOGPROBS = 5     # completions' logprobs, as OpenAI bounds it

def _token_biases(value: dict) -> str | None:
    """OpenAI's own check of logit_bias: token ids (as strings) to biases in -100 .. 100."""
    if all(key.isdigit() and isinstance(bias, (int, float)) and not isinstance(bias, bool)
           and -100 <= bias <= 100 for key, bias in value.items()):
        return None
    return "must map token ids to numbers between -100 and 100"


MODEL = Param("model", "string", None, "model id from GET /v1/models (default model if omitted)")
USER = ignored_param("user", "string", "an end-user id for OpenAI's abuse monitoring")
PARALLEL_TOOL_CALLS = Param("parallel_tool_calls", "boolean", None,
                            "false: at most one call per reply")
# Fields for OpenAI's own service that chat completions and the Responses API share.
SERVICE_FIELDS = (
    ignored_param("safety_identifier", "string", "an end-user id for OpenAI's abuse monitoring"),
    ignored_param("service_tier", "string", "OpenAI's processing tiers"),
    ignored_param("prompt_cache_key", "string", "a cached prompt prefix is reused whenever it "
                  "can be"),
    ignored_param("prompt_cache_retention", "string", "OpenAI's prompt cache"),
    ignored_param("prompt_cache_options", "object", "OpenAI's prompt cache"),
)
_SAMPLING = (
    f.TEMPERATURE.param(default=1.0), f.TOP_P.param(default=1.0), f.STOP.param(),
    f.SEED.param(), f.PRESENCE_PENALTY.param(), f.FREQUENCY_PENALTY.param(),
    Param("n", "integer", 1, f"choices to generate (1 .. {MAX_CHOICES}; on completions, n times "
          f"the prompts is at most {MAX_CHOICES})", in_range(1, MAX_CHOICES)),
    Param("stream", "boolean", False, "stream chunks as server-sent events, ending with "
          "data: [DONE]"),
    Param("stream_options", "object", None, '{"include_usage": true} adds a last chunk with '
          "usage (include_obfuscation is ignored)"),
    ignored_param("logit_bias", "object", "its keys are token ids of OpenAI's tokenizer, which "
                  "mean other tokens (or nothing) to this model", _token_biases),
    USER,
)
# What llama-server, vLLM and Ollama's /v1 take beyond OpenAI's fields. min_p and the repeat
# penalty stay off unless asked for (OpenAI has neither); top_k keeps the server default.
_EXTENSIONS = (
    f.TOP_K.param(), f.MIN_P.param(default=0.0), f.TYPICAL_P.param(),
    f.REPEAT_PENALTY.param(default=None, note="default 1.0 (off) on /v1"),
    f.REPEAT_PENALTY.param("repetition_penalty", default=None,
                           note="vLLM's name for repeat_penalty"),
    ignored_param("cache_prompt", "boolean", "llama-server's prompt cache option; this server "
                  "reuses a cached prompt prefix whenever it can"),
)

COMPLETION_PARAMS: tuple[Param, ...] = (
    MODEL,
    Param("prompt", "string or array", None, "text to continue: a string, a list of strings "
          "(one choice each), token ids, or a list of token-id lists (required)", required=True),
    Param("max_tokens", "integer", 16, f"{f.MAX_TOKENS.meaning} (0 .. context size - 1); 0 "
          "only with echo: score the prompt, generate nothing", at_least(0)),
    *_SAMPLING,
    Param("echo", "boolean", False, "the reply's text starts with the prompt (and, with "
          "logprobs, its tokens are scored, the first with a null logprob)"),
    Param("logprobs", "integer", None, f"log probabilities of each token and of its k likeliest "
          f"alternatives (0 .. {MAX_COMPLETION_LOGPROBS})",
          in_range(0, MAX_COMPLETION_LOGPROBS)),
    ignored_param("best_of", "integer", "each choice is sampled once; n choices come back"),
    ignored_param("suffix", "string", "insertion (fill-in-the-middle) is not supported; the "
                  "prompt is continued"),
    *_EXTENSIONS,
)

CHAT_PARAMS: tuple[Param, ...] = (
    MODEL,
    Param("messages", "array", None, "the conversation, [{role, content}]; roles system, "
          "developer, user, assistant (with tool_calls), tool (with tool_call_id) (required)",
          required=True),
    f.MAX_TOKENS.param(default=None, note="default: until the reply ends or the context is full"),
    f.MAX_TOKENS.param("max_completion_tokens", default=None, note="the newer name of max_tokens"),
    *_SAMPLING,
    Param("response_format", "object", None, '{"type": "json_object"}, or {"type": '
          '"json_schema", "json_schema": {"schema": {...}}}: output constrained to parse as JSON'),
    Param("tools", "array", None, 'functions the model may call: [{"type": "function", '
          '"function": {"name", "description", "parameters": JSON Schema}}]'),
    Param("tool_choice", "string or object", None, 'auto (text or calls; the default with '
          'tools), none, required (at least one call), or {"type": "function", "function": '
          '{"name": …}}; a forced call is grammar-constrained to the function\'s schema'),
    PARALLEL_TOOL_CALLS,
    Param("functions", "array", None, "the legacy form of tools: [{name, description, "
          "parameters}]; the reply carries message.function_call"),
    Param("function_call", "string or object", None, 'the legacy form of tool_choice: none, '
          'auto, or {"name": …}'),
    Param("logprobs", "boolean", False, "return the log probability of each token of the reply"),
    Param("top_logprobs", "integer", None, f"with logprobs: the likeliest alternatives at each "
          f"token (0 .. {MAX_TOP_LOGPROBS})", in_range(0, MAX_TOP_LOGPROBS)),
    ignored_param("store", "boolean", "OpenAI's stored completions"),
    ignored_param("metadata", "object", "tags for OpenAI's stored completions"),
    ignored_param("reasoning_effort", "string", "for OpenAI's reasoning models"),
    ignored_param("verbosity", "string", "for OpenAI's reasoning models"),
    *SERVICE_FIELDS,
    ignored_param("moderation", "object", "there is no moderation"),
    ignored_param("modalities", "array", "the reply is text"),
    ignored_param("audio", "object", "the reply is text"),
    ignored_param("prediction", "object", "predicted outputs are not used"),
    ignored_param("web_search_options", "object", "there is no web search"),
    *_EXTENSIONS,
    ignored_param("chat_template_kwargs", "object", "vLLM's and llama-server's template "
                  "variables; the model's template gets the messages and tools"),
)

EMBEDDING_PARAMS: tuple[Param, ...] = (
    MODEL,
    Param("input", "string or array", None, "a text or a list of texts (required); token ids "
          "are refused: they would be ids of OpenAI's tokenizer", required=True),
    Param("encoding_format", "string", "float", "float, or base64 (little-endian float32, what "
          "the openai package asks for)", one_of("float", "base64")),
    Param("dimensions", "integer", None, "shorten each vector to its first `dimensions` values, "
          "normalised again (1 .. the model's size)", at_least(1)),
    USER,
)


@dataclass(frozen=True)
class OpenAIGeneration:
    """A completion or chat request: one (prompt, sampling) per choice, ready for
    `start_choices`. Choice `index` is prompt index × n + i, as OpenAI numbers them."""

    model: str | None
    prompts: tuple[Prompt, ...]
    sampling: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    tools: ToolSpec | None = None
    legacy_functions: bool = False  # the request used functions: reply with function_call
    logprobs: bool = False          # reply with logprobs
    echo: bool = False              # completions: the reply's text starts with the prompt

    @property
    def requests(self) -> list[tuple[Prompt, SamplingParams]]:
        """One (prompt, sampling) per choice (start_choices moves a seed on by the index)."""
        return [(prompt, self.sampling) for prompt in self.prompts for _ in range(self.n)]


@dataclass(frozen=True)
class OpenAIEmbedding:
    model: str | None
    inputs: Any
    encoding_format: str
    dimensions: int | None = None


def parse_completion(body: Any, n_ctx: int) -> OpenAIGeneration:
    """:raise InvalidRequest: the body is not a completion request this server can run."""
    values = parse_params(body, COMPLETION_PARAMS)
    prompts = completion_prompts(values["prompt"])
    _check_choices(values["n"], len(prompts))
    echo, logprobs = values["echo"], values["logprobs"]
    if values["max_tokens"] == 0 and not echo:
        raise InvalidRequest("max_tokens must be at least 1 (0 only with echo, to score the "
                             "prompt)", param="max_tokens")
    if echo:
        prompts = tuple(EchoedPrompt(prompt) for prompt in prompts)
    # max_tokens 0 (a scoring request) ends right after the prompt, with nothing generated.
    generation = _generation({**values, "max_tokens": values["max_tokens"] or None}, prompts,
                             n_ctx)
    sampling = replace(generation.sampling, max_tokens=values["max_tokens"], logprobs=logprobs,
                       prompt_logprobs=bool(echo and logprobs is not None))
    return replace(generation, sampling=sampling, logprobs=logprobs is not None, echo=echo)


def parse_chat(body: Any, n_ctx: int) -> OpenAIGeneration:
    """:raise InvalidRequest: the body is not a chat request this server can run."""
    values = parse_params(body, CHAT_PARAMS)
    _check_choices(values["n"], 1)
    spec, legacy = _tool_spec(values)
    prompt = ChatPrompt(parse_messages(values["messages"]), tools=spec)
    generation = _generation(values, (prompt,), n_ctx,
                             "max_completion_tokens" if values["max_completion_tokens"]
                             else "max_tokens", _response_grammar(values["response_format"]))
    sampling = generation.sampling
    if spec is not None:
        sampling = spec.sampling(sampling)
    if values["top_logprobs"] is not None and not values["logprobs"]:
        raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    if values["logprobs"]:
        sampling = replace(sampling, logprobs=values["top_logprobs"] or 0)
    return replace(generation, sampling=sampling, tools=spec, legacy_functions=legacy,
                   logprobs=values["logprobs"])


def parse_embedding(body: Any) -> OpenAIEmbedding:
    """:raise InvalidRequest: the body is not an embeddings request."""
    values = parse_params(body, EMBEDDING_PARAMS)
    return OpenAIEmbedding(values["model"], values["input"], values["encoding_format"],
                           values["dimensions"])


def _check_choices(n: int, prompts: int) -> None:
    if n * prompts > MAX_CHOICES:
        raise InvalidRequest(f"n ({n}) times the prompts ({prompts}) is {n * prompts} choices; "
                             f"at most {MAX_CHOICES} per request", param="n" if n > 1 else "prompt")


def _tool_spec(values: dict) -> tuple[ToolSpec | None, bool]:
    """The request's tools, from `tools` or the legacy `functions` (then at most one call, and
    the reply in the legacy shape); True when it was the legacy form."""
    if values["functions"] is None:
        if values["function_call"] is not None:
            raise InvalidRequest("function_call needs functions (or use tools and tool_choice)",
                                 param="function_call")
        return parse_tools(values["tools"], values["tool_choice"],
                           values["parallel_tool_calls"]), False
    if values["tools"] is not None:
        raise InvalidRequest("give tools or the legacy functions, not both", param="functions")
    tools = [{"type": "function", "function": function} for function in values["functions"]]
    choice = values["function_call"]
    if isinstance(choice, dict):
        choice = {"type": "function", "function": choice}
    return parse_tools(tools, choice, False, param="functions"), True


def _generation(values: dict, prompts: tuple[Prompt, ...], n_ctx: int,
                max_tokens_name: str = "max_tokens",
                grammar: str | None = None) -> OpenAIGeneration:
    """`max_tokens_name`: the field the limit came in (chat's max_completion_tokens wins)."""
    options = values["stream_options"] or {}
    repeat = values["repeat_penalty"]
    if repeat is None:
        repeat = values["repetition_penalty"]
    elif values["repetition_penalty"] is not None and values["repetition_penalty"] != repeat:
        raise InvalidRequest("repeat_penalty and repetition_penalty are the same setting: give "
                             "one", param="repetition_penalty")
    named = {**f.named_fields(values), "max_tokens": values[max_tokens_name],
             "repeat_penalty": 1.0 if repeat is None else repeat, "grammar": grammar}
    sampling = f.sampling_params(n_ctx, {"max_tokens": max_tokens_name}, **named)
    return OpenAIGeneration(values["model"], prompts, sampling, values["n"], values["stream"],
                            bool(options.get("include_usage")))


def _is_ids(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def completion_prompts(prompt: str | list) -> tuple[Prompt, ...]:
    """The prompts of a completions request: a string, a list of strings, token ids (a list of
    ints), or a list of token-id lists; one choice (times n) each. Ids are checked against the
    model's vocabulary on the worker, before the reply starts.
    """
    if isinstance(prompt, str):
        return (prompt,)
    if _is_ids(prompt):
        return (list(prompt),)
    if prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        return tuple(p if isinstance(p, str) else list(p) for p in prompt)
    raise InvalidRequest("prompt must be a string, a list of strings, token ids (a list of "
                         "integers), or a list of token-id lists", param="prompt")


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
