"""Per-request plumbing: request id, browser safety (api/browser_safety.py), API-key check, the
access-log line and request counts."""

from __future__ import annotations

import hmac
import re
import time
import uuid

from flask import Flask, Response, g, request

from api.browser_safety import HostRule, OriginRule, check_host
from services.errors import Unauthorized

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Reachable without a key: liveness probes, the docs page and its static files, CORS preflight,
# and the dashboard page (it holds no data; the figures it polls need the key).
_PUBLIC_ENDPOINTS = {"monitoring.health", "docs.index", "static", "monitoring.dashboard",
                     "monitoring.static"}
# Pages and probes that are not API traffic: logged, but not counted in /stats and /metrics,
# where a dashboard polling every 2 s or a Prometheus scrape would drown the real requests.
_UNCOUNTED_BLUEPRINTS = {"monitoring", "docs"}
def _request_id() -> str:
    """The client's X-Request-ID when it is a sane token, else a fresh one."""
    incoming = request.headers.get("X-Request-ID", "")
    return incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex


def _check_api_key(keys: tuple[str, ...]) -> None:
    """:raise Unauthorized: keys are configured and the request carries none of them."""
    if not keys or request.method == "OPTIONS" or request.endpoint in _PUBLIC_ENDPOINTS:
        return
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    presented = presented.strip().encode()
    # Compare against every key so the time taken does not tell which one nearly matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    if scheme.lower() != "bearer" or not matched:
        raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'")


def register_request_hooks(app: Flask) -> None:
    access_log = app.extensions["llm"].loggers.access
    config = app.extensions["llm"].config
    api_keys = config.API_KEYS
    counts = app.extensions["llm"].requests
    hosts, origins = HostRule(config.ALLOWED_HOSTS), OriginRule(config.CORS_ORIGINS or ())

    @app.before_request
    def start_request() -> None:
        g.request_id = _request_id()
        g.started = time.monotonic()
        g.log_fields = {}
        # Before the key and before any work: a hostile page learns nothing and starts nothing.
        check_host(hosts)
        origins.check(request)
        _check_api_key(api_keys)

    @app.after_request
    def finish_request(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id") or _request_id()
        # The line is written when the response is closed, so a stream is logged once it ends.
        line = {"request_id": response.headers["X-Request-ID"], "method": request.method,
                "path": request.path, "route": request.url_rule.rule if request.url_rule else None,
                "status": response.status_code, "client": request.remote_addr}
        started, fields = g.get("started", time.monotonic()), g.get("log_fields", {})
        counted = request.blueprint not in _UNCOUNTED_BLUEPRINTS and request.endpoint != "static"

        def write_line() -> None:
            line["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
            line.update(fields)
            access_log.info("request", extra={"fields": line})
            if counted:
                counts.record(line["method"], line["route"], line["status"], fields.get("error"))

        response.call_on_close(write_line)
        return response
