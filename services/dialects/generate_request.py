"""The typed body of a native generate request (/api/v1/generate): its parameter table.

The table validates requests and documents them on the docs page; its sampling rows are the
shared fields of `sampling_fields`, under their own names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.dialects import sampling_fields as f
from services.dialects.params import Param, not_blank, parse_params
from services.types import SamplingParams

GENERATE_PARAMS: tuple[Param, ...] = (
    Param("prompt", "string", None, "the text to continue (required)", not_blank,
          required=True),
    Param("system", "string", None, "optional instruction placed before the prompt"),
    Param("model", "string", None, "model name from GET /api/v1/models; default model if omitted",
          not_blank),
    f.MAX_TOKENS.param(), f.TEMPERATURE.param(), f.TOP_P.param(), f.TOP_K.param(),
    f.MIN_P.param(), f.REPEAT_PENALTY.param(), f.STOP.param(), f.SEED.param(),
    Param("stream", "boolean", False, "stream tokens as server-sent events"),
)


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
        return cls(prompt=values["prompt"], system=values["system"], model=values["model"],
                   sampling=f.sampling_params(n_ctx, **f.named_fields(values)),
                   stream=values["stream"])
