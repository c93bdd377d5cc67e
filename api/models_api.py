"""Model management (/api/v1): list, describe, upload, delete, and what fits in memory."""

from __future__ import annotations

from flask import Blueprint, jsonify, request
from werkzeug.exceptions import UnsupportedMediaType

from api import backend
from api.access import admin_only
from api.docs import document
from services.errors import InvalidRequest

bp = Blueprint("models", __name__)

_MODEL = {"name": "gemma-3-270m-q4_k_m.gguf", "type": "gguf", "file": "gemma-3-270m-q4_k_m.gguf",
          "size_bytes": 253113024, "sha256": "a5fd3b…", "architecture": "gemma3",
          "size_label": "270M", "quantization": "Q4_K_M", "context_length": 32768,
          "added_at": "2026-11-24T10:00:00Z", "source": "disk", "status": "ready",
          "unusable_reason": None, "loaded": False, "instances": 0,
          "in_use": 0, "memory_estimate_bytes": 328610560}


@bp.get("/models")
@document(reply={"models": [_MODEL]})
def list_models():
    """List models with metadata and load state; `?type=gguf` or `?type=deepseek` filters.

    Files copied into or removed from a models directory by hand show up here at once, with
    `status` "trial" until their trial in a throwaway process has run, then "ready" or
    "unusable" (with `unusable_reason`). Only "ready" models are served.
    """
    return jsonify(models=backend().model_admin.list(request.args.get("type")))


@bp.get("/models/<name>")
@document(reply=_MODEL)
def model_info(name: str):
    """One model's metadata and load state; 404 if there is no such model."""
    return jsonify(backend().model_admin.describe(name, request.args.get("type")))


@bp.post("/models")
@document(reply=_MODEL, curl="curl -X POST {base}/api/v1/models -F file=@model.gguf "
                              "-F name=my-model [-F sha256=<hex>] [-F type=deepseek] "
                              "[-F overwrite=true]")
@admin_only
def upload_model():
    """Upload a GGUF model (multipart field `file`; optional `name`, `sha256`, `type`,
    `overwrite`): 201 once it passed its trial.

    The file streams to disk and is hashed as it arrives (a given `sha256` must match: else 400
    sha256_mismatch); its header is checked (400 invalid_model_file), then it is tried in a
    throwaway process doing what serving does with it (422 model_unloadable, with the reason),
    and only then renamed into place, usable at once. An upload never replaces the default
    model. An existing name is 409 unless overwrite=true; over MAX_UPLOAD_BYTES is 413; a full disk is
    507. Nothing is kept from a refused upload.
    """
    services = backend()
    request.max_content_length = services.config.MAX_UPLOAD_BYTES
    if request.mimetype != "multipart/form-data":
        raise UnsupportedMediaType("upload the model as multipart/form-data with a field 'file'")
    sinks = []
    request.upload_sink_factory = lambda: sinks.append(
        services.model_admin.new_upload(request.args.get("type"))) or sinks[-1]
    try:
        upload = request.files.get("file")
        if upload is None:
            raise InvalidRequest("send the model file in a multipart field named 'file'")
        model = services.model_admin.add(
            upload.stream, model_type=request.form.get("type") or request.args.get("type"),
            name=request.form.get("name"), filename=upload.filename,
            overwrite=request.form.get("overwrite", "").lower() in ("1", "true", "yes"),
            sha256=request.form.get("sha256"))
    finally:
        for sink in sinks:
            sink.discard()
    return jsonify(model), 201


@bp.delete("/models/<name>")
@document(reply={"removed": _MODEL, "instances_closed": 1})
@admin_only
def delete_model(name: str):
    """Delete a model's file and metadata and evict its instances; 404 if unknown.

    Generations already running on it finish on the old file; the next request sees it gone.
    """
    return jsonify(backend().model_admin.remove(name, request.args.get("type")))


@bp.get("/system")
@document(reply={"memory": {"total_bytes": 25276514304, "available_bytes": 24692015104},
                 "cpu": {"cores": 2}, "disk_free_bytes": {"gguf": 84902862848},
                 "models": [{"name": "gemma-3-270m-q4_k_m.gguf", "estimate_bytes": 328610560,
                             "fits": True}]})
def system():
    """RAM, CPU cores, disk free per models directory, and whether each model fits in memory."""
    return jsonify(backend().model_admin.system())
