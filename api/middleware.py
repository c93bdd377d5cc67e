"""Per-request plumbing: request id, browser safety (api/browser_safety.py), the key and its
scope (api/access.py), rate limits and priority, the access-log line and request counts."""

from __future__ import annotations

import re
import time
import uuid

from flask import Flask, Response, g, request

from api.access import request_priority, required_scope
from api.browser_safety import HostRule, OriginRule, check_host
from services.errors import RateLimited
from services.keys import OPEN
from services.types import Caller

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


def register_request_hooks(app: Flask) -> None:
    services = app.extensions["llm"]
    access_log, counts = services.loggers.access, services.requests
    access, limiter = services.access, services.limiter
    hosts = HostRule(services.config.ALLOWED_HOSTS)
    origins = OriginRule(services.config.CORS_ORIGINS or ())

    def identify() -> None:
        """The key (401 missing or wrong, 403 out of scope), the request's priority, and one
        request counted against the key's limit (429 over it)."""
        if request.method == "OPTIONS" or request.endpoint in _PUBLIC_ENDPOINTS:
            return
        g.principal = principal = access.authenticate(request.headers.get("Authorization"))
        if principal.name:
            g.log_fields["key"] = principal.name
        principal.require(required_scope(app, request.endpoint))
        g.caller = Caller(principal.name, request_priority(principal))
        if _counted():
            try:
                g.limit_headers = limiter.admit(principal, _identity(principal))
            except RateLimited as refusal:
                g.limit_headers = refusal.headers
                raise

    @app.before_request
    def start_request() -> None:
        g.request_id = _request_id()
        g.started = time.monotonic()
        g.log_fields = {}
        # Before the key and before any work: a hostile page learns nothing and starts nothing.
        check_host(hosts)
        origins.check(request)
        identify()

    @app.after_request
    def finish_request(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id") or _request_id()
        response.headers.update(g.get("limit_headers") or {})
        # The line is written when the response is closed, so a stream is logged once it ends.
        line = {"request_id": response.headers["X-Request-ID"], "method": request.method,
                "path": request.path, "route": request.url_rule.rule if request.url_rule else None,
                "status": response.status_code, "client": request.remote_addr}
        started, fields = g.get("started", time.monotonic()), g.get("log_fields", {})
        if fields.get("cache") == "hit":
            response.headers["X-Cache"] = "HIT"
        counted, principal = _counted(), g.get("principal", OPEN)
        identity = _identity(principal)

        def write_line() -> None:
            line["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
            line.update(fields)
            access_log.info("request", extra={"fields": line})
            if counted:
                # A reply the response cache gave generated nothing: it costs no token budget.
                tokens = 0 if fields.get("cache") == "hit" else fields.get("completion_tokens") or 0
                counts.record(line["method"], line["route"], line["status"], fields.get("error"),
                              key=principal.name, completion_tokens=tokens)
                if tokens:
                    limiter.charge_tokens(principal, identity, tokens)

        response.call_on_close(write_line)
        return response


def _counted() -> bool:
    """API traffic: not the monitoring endpoints or the docs page."""
    return request.blueprint not in _UNCOUNTED_BLUEPRINTS and request.endpoint != "static"


def _identity(principal) -> str:
    """Whom limits count against: the key's name, or on an open server the client's address."""
    return f"key:{principal.name}" if principal.name else f"addr:{request.remote_addr}"
