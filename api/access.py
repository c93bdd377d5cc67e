"""Who may call what: a route's required scope, and the caller the services see.

Views that change the model store or what is loaded are marked `admin_only`; every other
route needs an inference key (when keys exist). The middleware checks the mark.
"""

from __future__ import annotations

from typing import Callable

from flask import Flask, g, has_request_context, request

from services.errors import InvalidRequest
from services.keys import ADMIN, INFERENCE, Principal
from services.types import ANONYMOUS, PRIORITIES, Caller

PRIORITY_HEADER = "X-Request-Priority"


def admin_only(view: Callable) -> Callable:
    """Mark a view as needing an admin key (an inference key gets 403)."""
    view.required_scope = ADMIN
    return view


def required_scope(app: Flask, endpoint: str | None) -> str:
    """The scope the view of `endpoint` needs."""
    view = app.view_functions.get(endpoint) if endpoint else None
    return getattr(view, "required_scope", INFERENCE)


def request_priority(principal: Principal) -> str:
    """The priority of this request: its X-Request-Priority header, capped at what the key may
    ask for, else the key's default.

    :raise InvalidRequest: the header names no priority.
    """
    asked = request.headers.get(PRIORITY_HEADER)
    if asked is None:
        return principal.priority
    asked = asked.strip().lower()
    if asked not in PRIORITIES:
        raise InvalidRequest(f"{PRIORITY_HEADER} must be one of {', '.join(PRIORITIES)}",
                             param=PRIORITY_HEADER)
    return max(asked, principal.top_priority, key=PRIORITIES.index)


def current_caller() -> Caller:
    """The caller of the request this thread handles (ANONYMOUS outside a request): handed to
    the concurrency manager, which reads it when a job is admitted."""
    if not has_request_context():
        return ANONYMOUS
    return g.get("caller", ANONYMOUS)
