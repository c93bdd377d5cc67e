"""The one place where errors become HTTP: status table, JSON shape, and Flask handlers."""

from __future__ import annotations

import re
from typing import Any, Callable

from flask import Flask, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from services import errors as e

STATUS_BY_ERROR: dict[type[e.BackendError], int] = {
    e.InvalidRequest: 400,
    e.HostNotAllowed: 400,
    e.Unauthorized: 401,
    e.OriginNotAllowed: 403,
    e.Forbidden: 403,
    e.ModelNotFound: 404,
    e.ClientTimeout: 408,
    e.ModelConflict: 409,
    e.PayloadTooLarge: 413,
    e.UnloadableModel: 422,
    e.ModelUnusable: 422,
    e.ChatTemplateError: 422,
    e.TooBusy: 429,
    e.ModelLoadError: 500,
    e.DecodeFailed: 500,
    e.ClientGone: 499,      # nginx's "client closed request": never read by anyone
    e.QueueTimeout: 503,
    e.KeyStoreUnavailable: 503,
    e.ShuttingDown: 503,
    e.ModelOnTrial: 503,
    e.GenerationTimeout: 504,
    e.InsufficientMemory: 507,
    e.InsufficientStorage: 507,
}

# Werkzeug's names, where the contract wants a different code.
_HTTP_CODES = {413: "payload_too_large"}

# Recasts `error_payload` and its status as another API's error body (OpenAI's, Ollama's).
Shape = Callable[[dict, int], Any]


def native_error(payload: dict, status: int) -> dict:
    return payload


def openai_error(payload: dict, status: int) -> dict:
    """An error in OpenAI's shape; the openai package picks its exception class by status."""
    error = payload["error"]
    kind = ("authentication_error" if status == 401 else "rate_limit_error" if status == 429
            else "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": error["message"], "type": kind, "param": error.get("param"),
                      "code": error["code"]}}


def ollama_error(payload: dict, status: int) -> dict:
    """Ollama's shape: the ollama package's ResponseError.error is this string."""
    return {"error": payload["error"]["message"]}


def shape_for(path: str) -> Shape:
    """The error body a path's API speaks, unknown routes included: OpenAI's under /v1/,
    Ollama's under /api/ except the native /api/v1/ and /api/deepseek/, ours elsewhere."""
    if path == "/v1" or path.startswith("/v1/"):
        return openai_error
    if (path == "/api" or path.startswith("/api/")) and not path.startswith(
            ("/api/v1/", "/api/deepseek/")) and path not in ("/api/v1", "/api/deepseek"):
        return ollama_error
    return native_error


def status_for(error: e.BackendError) -> int:
    """The status of the closest class in the table (a ContextOverflow is an InvalidRequest)."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def error_payload(error: BaseException) -> dict:
    """`{"error": {"code", "message", ...details}}` for any exception; internals stay hidden."""
    if isinstance(error, e.BackendError):
        return {"error": {"code": error.code, "message": error.message, **error.details}}
    if isinstance(error, HTTPException):
        code = _HTTP_CODES.get(error.code) or re.sub(r"\W+", "_", (error.name or "error").lower())
        return {"error": {"code": code, "message": error.description or error.name}}
    return {"error": {"code": "internal_error",
                      "message": "the server failed to handle this request; see errors.log"}}


def status_of(error: BaseException) -> int:
    """The status any exception gets: the table's, an HTTPException's own, else 500."""
    if isinstance(error, e.BackendError):
        return status_for(error)
    if isinstance(error, HTTPException):
        return error.code or 500
    return 500


def register_error_handlers(app: Flask) -> None:
    """JSON for every error: domain errors, Flask's own 4xx/5xx, and anything unexpected; the
    body in the shape of the API the path belongs to (`shape_for`), same statuses and headers.
    """

    def reply(payload: dict, status: int):
        """The JSON error response; its code also goes on the access-log line."""
        if "log_fields" in g:
            g.log_fields["error"] = payload["error"]["code"]
        response = jsonify(shape_for(request.path)(payload, status))
        response.status_code = status
        return response

    def log_failure(error: BaseException) -> None:
        current_app.extensions["llm"].loggers.errors.error(
            "request failed", exc_info=error,
            extra={"fields": {"request_id": g.get("request_id"), "error": repr(error)}})

    @app.errorhandler(e.BackendError)
    def backend_error(error: e.BackendError):
        response = reply(error_payload(error), status_for(error))
        if response.status_code >= 500 and not isinstance(
                error, (e.QueueTimeout, e.ShuttingDown, e.ModelOnTrial)):
            log_failure(error)
        if isinstance(error, e.RetryLater):
            response.headers["Retry-After"] = str(error.retry_after)
        if isinstance(error, e.Unauthorized):
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        response = reply(error_payload(error), error.code or 500)
        if error.code == 405 and error.valid_methods:
            response.headers["Allow"] = ", ".join(error.valid_methods)
        return response

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception):
        log_failure(error)
        return reply(error_payload(error), 500)
