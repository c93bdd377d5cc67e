"""The docs page (GET /), generated from the routes themselves so it cannot drift from the code.

Every view carries its docstring and, through `@document`, its parameter table and examples,
and through `@admin_only` the scope of key it needs; the page walks `app.url_map` and renders
what it finds, plus a streaming playground.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable

from flask import Blueprint, current_app, render_template, request

from api import backend
from api.access import required_scope

bp = Blueprint("docs", __name__, template_folder="templates")


def document(params: tuple = (), example: dict | None = None, reply: Any = None,
             stream_reply: str | None = None, curl: str | None = None) -> Callable:
    """Attach the parameter table and examples the docs page shows for a view.

    `example` is a JSON body; `curl` a whole command (with `{base}`) for other bodies.
    """

    def attach(view: Callable) -> Callable:
        view.api_doc = {"params": params, "example": example, "reply": reply,
                        "stream_reply": stream_reply, "curl": curl}
        return view

    return attach


def describe_endpoints(app, base_url: str) -> list[dict]:
    """One entry per (rule, method) the app serves, in the url_map's order, static files aside."""
    entries = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint.rsplit(".", 1)[-1] == "static":  # the app's or a blueprint's files
            continue
        view = app.view_functions[rule.endpoint]
        meta = getattr(view, "api_doc", {})
        summary, _, details = (inspect.getdoc(view) or "").partition("\n")
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            path = rule.rule.replace("<name>", "gemma-3-270m-q4_k_m.gguf")
            entries.append({
                "method": method, "rule": rule.rule, "endpoint": rule.endpoint,
                "scope": required_scope(app, rule.endpoint),
                "summary": summary, "details": details.strip(), "params": meta.get("params", ()),
                "curl": meta["curl"].format(base=base_url) if meta.get("curl")
                else _curl(method, base_url + path, meta.get("example")),
                "reply": json.dumps(meta["reply"], indent=2, ensure_ascii=False)
                if meta.get("reply") is not None else None,
                "stream_reply": meta.get("stream_reply"),
            })
    return entries


def _curl(method: str, url: str, example: dict | None) -> str:
    if example is None:
        return f"curl {url}" if method == "GET" else f"curl -X {method} {url}"
    body = json.dumps(example, ensure_ascii=False).replace("'", "'\\''")
    return f"curl -X {method} {url} -H 'Content-Type: application/json' -d '{body}'"


@bp.get("/")
@document(reply="text/html")
def index():
    """This page: every endpoint with its parameters, a curl example and a reply, and a playground."""
    services = backend()
    return render_template(
        "docs.html", endpoints=describe_endpoints(current_app, request.host_url.rstrip("/")),
        settings=services.config.public_items(), auth=services.access.required)
