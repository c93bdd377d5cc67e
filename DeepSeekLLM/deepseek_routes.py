"""DeepSeek blueprint (/api/deepseek): model listing and large-context generation."""

from __future__ import annotations

from flask import Blueprint, g, jsonify

from api import backend
from api.docs import document
from api.http import log_fields
from api.json_body import json_body
from api.relay import Wire, log_result, relay
from DeepSeekLLM.deepseek_service import DEEPSEEK_PARAMS
from DeepSeekLLM.run import DeepSeekResult, Piece, Progress

bp = Blueprint("deepseek", __name__)

_CHUNKING = {"strategy": "map_reduce", "chunks": 5, "overlap": 256,
             "chunk_tokens": [3900, 3900, 3900, 3900, 1203]}
_EXAMPLE_REPLY = {
    "request_id": "3f2c…", "model": "DeepSeek-R1-Distill-Qwen-1.5B-Q4_K_M.gguf",
    "text": "The contract ends on 31 March 2027.", "reasoning": "The termination clause says…",
    "finish_reason": "stop", "usage": {"prompt_tokens": 17312, "completion_tokens": 1410,
                                       "total_tokens": 18722},
    "timings": {"queue_ms": 0.6, "generation_ms": 98120.4, "tokens_per_second": 14.4},
    "chunking": _CHUNKING,
}


@bp.get("/models")
@document(reply={"models": [{"name": "gemma-3-270m-q4_k_m.gguf", "type": "gguf",
                             "fallback": True, "context_length": 32768, "loaded": True,
                             "instances": 1, "in_use": 0, "contexts": [8192]}]})
def list_models():
    """List the DeepSeek models in DEEPSEEK_MODELS_DIR with their metadata and load state.

    Until a DeepSeek model is added (upload with type=deepseek, or copy the .gguf file into
    DeepSeek/model/), the default GGUF model serves DeepSeek requests and is listed here with
    "fallback": true. `contexts` lists the n_ctx values it has instances loaded at.
    """
    return jsonify(models=backend().deepseek.list_models())


@bp.post("/generate")
@document(params=DEEPSEEK_PARAMS,
          example={"prompt": "When does the contract end?", "context": "…a long document…",
                   "max_tokens": 512},
          reply=_EXAMPLE_REPLY,
          stream_reply='data: {"event": "chunk", "index": 1, "of": 5}\n\n…\n\n'
                       'data: {"reasoning": "The termination"}\n\n'
                       'data: {"token": " The"}\n\n…\n\n'
                       'data: {"done": true, "finish_reason": "stop", "usage": {...}, '
                       '"timings": {...}, "chunking": {...}}')
def generate():
    """Answer a prompt over a context of any length with a DeepSeek model.

    When prompt, context and max_tokens fit n_ctx this is one generation (strategy "none").
    Otherwise the context is cut into chunks of chunk_size tokens sharing chunk_overlap tokens;
    each chunk is mapped to notes, notes that do not fit one prompt are merged, and the answer
    is written from the notes (strategy "map_reduce"). `<think>` reasoning comes apart from the
    text. With "stream": true: {"event": "chunk"} (and "collapse") progress events, then
    {"reasoning"} and {"token"} events of the answer, then {"done": true} with usage summed
    over every step and the chunking summary.
    """
    service = backend().deepseek
    request = service.parse_request(json_body())
    log_fields(model=request.model)
    if request.stream:
        run = service.stream(request)
        log_fields(model=run.model, chunks=run.chunking["chunks"])
        return relay(run, run.close, Wire(_sse_event(g.request_id)))
    result = log_result(service.generate(request))
    log_fields(model=result.model, chunks=result.chunking["chunks"])
    return jsonify(request_id=g.request_id, **result.to_dict())


def _sse_event(request_id: str):
    """Progress events, {"reasoning"} and {"token"} pieces of the answer, then {"done": true}
    with usage summed over every step and the chunking summary (not the text)."""

    def shape(event: Progress | Piece | DeepSeekResult) -> list[dict]:
        if isinstance(event, Progress):
            return [{"event": event.phase, "index": event.index, "of": event.of}]
        if isinstance(event, Piece):
            return [{"token" if event.kind == "text" else "reasoning": event.text}]
        done = event.to_dict()
        del done["text"], done["reasoning"]
        return [{"done": True, "request_id": request_id, **done}]

    return shape
