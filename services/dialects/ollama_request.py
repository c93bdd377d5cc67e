"""Ollama request bodies (/api/generate, /api/chat, /api/embed, …) as typed requests.

Ollama names models `name:tag`; here a model file `gemma-3-270m-q4_k_m.gguf` is
`gemma-3-270m-q4_k_m:latest`, and requests may use either form. `options` map to the same
sampling parameters as every other API, with Ollama's defaults. Options that tune the runtime
rather than the output (num_ctx, num_thread, …) are accepted and have no effect here, as the
server's own settings decide them; other unknown options are refused rather than ignored.

`keep_alive` is Ollama's: a number of seconds or a Go-style duration ("30s", "5m", "1h30m"); 0
unloads the model once the request is done, a negative value keeps it loaded until evicted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from services.dialects import sampling_fields as f
from services.dialects.chat import ChatMessage, ChatPrompt, parse_messages
from services.dialects.json_mode import any_json_object, schema_grammar
from services.dialects.params import Param, empty, never, parse_params
from services.dialects.tools import ToolSpec, parse_tools
from services.errors import InvalidRequest
from services.types import Prompt, SamplingParams

TAG = ":latest"
SUFFIX = ".gguf"

# Ollama's own names and defaults for the shared fields; num_predict and seed take negative
# values too (-1 / -2 = no limit, a negative seed = random), which `_sampling` maps onto them.
OPTION_PARAMS: tuple[Param, ...] = (
    Param("num_predict", "integer", -1, "tokens to generate at most (1 .. context size - 1); "
          "-1 or -2 = until the reply ends or the context is full",
          lambda v: None if v >= 1 or v in (-1, -2) else "must be -1, -2 or at least 1"),
    f.TEMPERATURE.param(), f.TOP_K.param(), f.TOP_P.param(default=0.9),
    f.MIN_P.param(default=0.0), f.REPEAT_PENALTY.param(), f.PRESENCE_PENALTY.param(),
    f.FREQUENCY_PENALTY.param(),
    replace(f.SEED.param(note="negative = random"),
            check=lambda v: None if v < 0 else f.SEED.check(v)),
    f.STOP.param(),
)
# The options as rows of the docs page's table, under the names a request nests them in.
OPTION_ROWS = tuple(replace(p, name=f"options.{p.name}") for p in OPTION_PARAMS)
# Runtime and hardware options: the server's settings (N_CTX, N_THREADS, …) decide these.
RUNTIME_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep",
                   "use_mmap", "use_mlock", "numa", "low_vram", "vocab_only", "logits_all",
                   "embedding_only")

# keep_alive: a request's own deadline for its model. Longer than this is refused (a typo, or a
# deadline no clock can show); a negative value is Ollama's "forever".
MAX_KEEP_ALIVE = 10 * 365 * 86400.0
FOREVER = math.inf
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                 "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^([+-]?)((?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_KEEP_ALIVE_HELP = ('how long the model stays loaded after this request: seconds, or a duration '
                    'such as "30s", "5m", "1h"; 0 unloads it when the request is done, negative '
                    "keeps it until evicted; omitted: loaded until evicted")

_COMMON = (
    Param("model", "string", None, "model name from GET /api/tags (default model if omitted)"),
    Param("format", "string or object", None, '"json", or a JSON Schema: output constrained to '
          "parse as JSON"),
    Param("options", "object", None, "sampling options (options.* below); runtime options ("
          "num_ctx, num_thread, …) are accepted and left to the server's settings"),
    Param("stream", "boolean", True, "stream NDJSON lines (the default); false for one object"),
    Param("keep_alive", "string or number", None, _KEEP_ALIVE_HELP),
    Param("think", "boolean", False, "only false", empty),
    Param("logprobs", "boolean", False, "only false", empty),
    Param("top_logprobs", "integer", None, "not supported", never),
)
GENERATE_PARAMS: tuple[Param, ...] = (
    *_COMMON,
    Param("prompt", "string", "", "the prompt; empty only reports the model as loaded"),
    Param("system", "string", None, "system message"),
    Param("raw", "boolean", False, "send the prompt as it is, without the chat template"),
    Param("suffix", "string", None, "not supported", empty),
    Param("template", "string", None, "not supported", empty),
    Param("context", "array", None, "not supported", empty),
    Param("images", "array", None, "not supported", empty),
)
CHAT_PARAMS: tuple[Param, ...] = (
    *_COMMON,
    Param("messages", "array", [], "the conversation, [{role, content}]; empty only reports the "
          "model as loaded"),
    Param("tools", "array", None, "functions the model may call ([{type: function, function: "
          "{name, description, parameters}}]); calls come back in message.tool_calls"),
)
EMBED_PARAMS: tuple[Param, ...] = (
    Param("model", "string", None, "model name (default model if omitted)"),
    Param("input", "string or array", None, "a text or a list of texts (required)", required=True),
    Param("truncate", "boolean", True, "cut inputs longer than the context instead of refusing"),
    Param("options", "object", None, "accepted, not used"),
    Param("keep_alive", "string or number", None, _KEEP_ALIVE_HELP),
    Param("dimensions", "integer", None, "not supported", never),
)
# The older /api/embeddings: one text, one vector.
EMBEDDINGS_PARAMS: tuple[Param, ...] = (
    Param("model", "string", None, "model name (default model if omitted)"),
    Param("prompt", "string", "", "the text to embed; empty gives an empty vector"),
    Param("options", "object", None, "accepted, not used"),
    Param("keep_alive", "string or number", None, _KEEP_ALIVE_HELP),
)
PULL_PARAMS: tuple[Param, ...] = (
    Param("model", "string", None, "model name (required); only models already here"),
    Param("name", "string", None, "older name of model"),
    Param("stream", "boolean", True, "stream NDJSON status lines (the default); false for one"),
    Param("insecure", "boolean", False, "accepted, not used"),
    Param("username", "string", None, "accepted, not used"),
    Param("password", "string", None, "accepted, not used"),
)
COPY_PARAMS: tuple[Param, ...] = (
    Param("source", "string", None, "the model to copy", required=True),
    Param("destination", "string", None, "the new name (letters, digits, '.', '_', '-'); an "
          "existing model is not replaced (409)", required=True),
)
MODEL_PARAMS: tuple[Param, ...] = (
    Param("model", "string", None, "model name (required)"),
    Param("name", "string", None, "older name of model"),
    Param("verbose", "boolean", False, "accepted"),
)


@dataclass(frozen=True)
class OllamaGeneration:
    """A generate or chat request; `prompt` None means "load only" (an empty prompt)."""

    model: str | None
    prompt: Prompt | None
    sampling: SamplingParams
    stream: bool
    chat: bool
    keep_alive: float | None = None        # seconds; FOREVER; None: not given
    tools: ToolSpec | None = None


def model_name(name: str | None) -> str | None:
    """Our model name for an Ollama one: `x:latest` is `x` (resolved with or without .gguf)."""
    if name and name.endswith(TAG):
        return name[: -len(TAG)]
    return name


def ollama_name(name: str) -> str:
    """The Ollama-style name of a model file: `x.gguf` is `x:latest`."""
    return (name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name) + TAG


def parse_generate(body: Any, n_ctx: int) -> OllamaGeneration:
    """:raise InvalidRequest: not a generate request this server can run."""
    values = parse_params(body, GENERATE_PARAMS)
    prompt: Prompt | None = None
    if values["prompt"]:
        if values["raw"]:
            prompt = values["prompt"]
        else:
            system = (ChatMessage("system", values["system"]),) if values["system"] else ()
            prompt = ChatPrompt((*system, ChatMessage("user", values["prompt"])))
    return _generation(values, prompt, n_ctx, chat=not values["raw"])


def parse_chat(body: Any, n_ctx: int) -> OllamaGeneration:
    """Ollama has no tool_choice: with tools the model may answer or call (OpenAI's "auto").

    :raise InvalidRequest: not a chat request this server can run.
    """
    values = parse_params(body, CHAT_PARAMS)
    spec = parse_tools(values["tools"], param="tools") if values["tools"] else None
    prompt = (ChatPrompt(parse_messages(values["messages"]), tools=spec)
              if values["messages"] else None)
    request = _generation(values, prompt, n_ctx, chat=True)
    if spec is None:
        return request
    return replace(request, sampling=spec.sampling(request.sampling), tools=spec)


def parse_embed(body: Any) -> dict:
    """:raise InvalidRequest: not an embed request."""
    values = parse_params(body, EMBED_PARAMS)
    return {"model": model_name(values["model"]), "input": values["input"],
            "truncate": values["truncate"], "keep_alive": keep_alive(values["keep_alive"])}


def parse_embeddings(body: Any) -> dict:
    """:raise InvalidRequest: not a legacy embeddings request."""
    values = parse_params(body, EMBEDDINGS_PARAMS)
    return {"model": model_name(values["model"]), "prompt": values["prompt"],
            "keep_alive": keep_alive(values["keep_alive"])}


def parse_pull(body: Any) -> tuple[str, bool]:
    """The model a pull names, and whether to stream. :raise InvalidRequest: it names none."""
    values = parse_params(body, PULL_PARAMS)
    name = values["model"] or values["name"]
    if not name:
        raise InvalidRequest("model is required", param="model")
    return model_name(name), values["stream"]


def parse_copy(body: Any) -> tuple[str, str]:
    """(source, destination) as our model names. :raise InvalidRequest:"""
    values = parse_params(body, COPY_PARAMS)
    return model_name(values["source"]), model_name(values["destination"])


def keep_alive(value: str | int | float | None) -> float | None:
    """Ollama's keep_alive in seconds: None when not given, FOREVER when negative.

    :raise InvalidRequest: not a number or a duration, or longer than MAX_KEEP_ALIVE.
    """
    if value is None:
        return None
    seconds = _duration_seconds(value)
    if seconds is None or math.isnan(seconds):
        raise InvalidRequest(f"keep_alive must be a number of seconds or a duration such as "
                             f'"30s", "5m" or "1h" (negative: until evicted), got {value!r:.40}',
                             param="keep_alive")
    if seconds < 0:
        return FOREVER
    if seconds > MAX_KEEP_ALIVE:
        raise InvalidRequest(f"keep_alive must be at most {int(MAX_KEEP_ALIVE)} seconds (ten "
                             f"years); a negative value keeps the model loaded until evicted",
                             param="keep_alive")
    return seconds


def _duration_seconds(value: str | int | float) -> float | None:
    """A number is seconds; a string is a number of seconds or a Go duration ("1h30m")."""
    if not isinstance(value, str):
        try:
            return float(value) if math.isfinite(value) else None
        except OverflowError:          # an integer no float holds
            return None
    text = value.strip()
    if len(text) > 64:
        return None
    try:
        return float(text) if math.isfinite(float(text)) else None
    except ValueError:
        pass
    if not _DURATION.match(text):
        return None
    total = sum(float(number) * _UNIT_SECONDS[unit]
                for number, unit in _DURATION_PART.findall(text))
    return -total if text.startswith("-") else total


def parse_model(body: Any) -> str:
    """The model a show or delete request names.

    :raise InvalidRequest: it names none.
    """
    values = parse_params(body, MODEL_PARAMS)
    name = values["model"] or values["name"]
    if not name:
        raise InvalidRequest("model is required", param="model")
    return model_name(name)


def _generation(values: dict, prompt: Prompt | None, n_ctx: int, chat: bool) -> OllamaGeneration:
    return OllamaGeneration(model_name(values["model"]), prompt,
                            _sampling(values["options"] or {}, values["format"], n_ctx),
                            values["stream"], chat, keep_alive(values["keep_alive"]))


def _sampling(options: dict, output_format: str | dict | None, n_ctx: int) -> SamplingParams:
    """`options` as the shared sampling fields; runtime options are accepted and left to the
    server's settings, any other unknown option is refused."""
    unknown = sorted(set(options) - {p.name for p in OPTION_PARAMS} - set(RUNTIME_OPTIONS))
    if unknown:
        raise InvalidRequest(f"unsupported option(s): {', '.join(unknown)}; supported: "
                             f"{', '.join(p.name for p in OPTION_PARAMS)}", param="options")
    values = parse_params({k: v for k, v in options.items() if k not in RUNTIME_OPTIONS},
                          OPTION_PARAMS)
    seed, num_predict = values["seed"], values["num_predict"]
    return f.sampling_params(n_ctx, {"max_tokens": "num_predict"}, **{
        **f.named_fields(values), "max_tokens": num_predict if num_predict > 0 else None,
        "seed": seed if seed is not None and seed >= 0 else None,
        "grammar": _format_grammar(output_format)})


def _format_grammar(output_format: str | dict | None) -> str | None:
    if not output_format:
        return None
    if output_format == "json":
        return any_json_object()
    if isinstance(output_format, dict):
        return schema_grammar(output_format, "format")
    raise InvalidRequest('format must be "json" or a JSON Schema object', param="format")
