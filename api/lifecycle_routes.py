"""Model lifecycle routes: load and unload a model now, and the stream of model events."""

from __future__ import annotations

import json
import re
import time
from typing import Callable, Iterator

from flask import Blueprint, Response, jsonify, request

from api import backend
from api.access import admin_only
from api.client import client_gone_check
from api.docs import document
from api.http import log_fields
from services.model_events import ModelEvent, Subscription
from services.model_preload import load_now

bp = Blueprint("lifecycle", __name__)

# How often an events stream looks whether its client left or the server began to drain.
_POLL_SECONDS = 1.0
_LAST_EVENT_ID = re.compile(r"^\s*(\d{1,18})\s*$")
_MODEL = {"name": "gemma-3-270m-q4_k_m.gguf", "type": "gguf", "status": "ready", "loaded": True,
          "instances": 1, "in_use": 0, "memory_estimate_bytes": 328610560, "...": "as in "
          "GET /api/v1/models/<name>"}


@bp.post("/models/<name>/load")
@admin_only
@document(reply={**_MODEL, "load_seconds": 0.41},
          curl="curl -X POST {base}/api/v1/models/gemma-3-270m-q4_k_m.gguf/load")
def load_model(name: str):
    """Load a model now (admin): its generation engine, as its first request would; 200 with
    its state once loaded, at once if it already is.

    404 unknown model; 503 still on trial (retry after Retry-After); 422 it failed its trial;
    507 it does not fit in memory now. With MODEL_IDLE_SECONDS its idle clock starts now.
    """
    services = backend()
    model = services.models.resolve(name)
    log_fields(model=model.name)
    seconds = load_now(services.pool, model)
    return jsonify({**services.model_admin.describe(model.name, model.type),
                    "load_seconds": round(seconds, 3)})


@bp.post("/models/<name>/unload")
@admin_only
@document(reply={**_MODEL, "loaded": False, "instances": 0, "instances_closed": 1},
          curl="curl -X POST {base}/api/v1/models/gemma-3-270m-q4_k_m.gguf/unload")
def unload_model(name: str):
    """Unload a model now (admin): its engines and embedding instances; 404 unknown model.

    Generations already running or queued on it finish first (its engine takes no new ones and
    frees its memory when they end); `instances_closed` counts what closed at once. The next
    request for it loads it again. A model that is not loaded answers 200, instances_closed 0.
    """
    services = backend()
    model = services.model_admin.describe(name)
    log_fields(model=model["name"])
    closed = services.pool.evict(model["name"], reason="admin")
    return jsonify({**services.model_admin.describe(model["name"], model["type"]),
                    "instances_closed": closed})


@bp.get("/models/events")
@document(reply="text/event-stream",
          stream_reply='id: 7\nevent: loaded\ndata: {"id": 7, "kind": "loaded", "model": '
                       '"gemma-3-270m-q4_k_m.gguf", "at": "2026-12-06T11:00:00.000Z", '
                       '"load_seconds": 0.41}',
          curl="curl -N {base}/api/v1/models/events")
def model_events():
    """Follow model status changes as server-sent events: loading, loaded, unloaded (with a
    reason: admin, idle, keep_alive, evicted, replaced, deleted), failed, uploaded, deleted.

    Each event has an `id:` and an `event:` line (its kind) and a JSON `data:` line. A comment
    goes out every 15 s when nothing happens. A client reconnecting with `Last-Event-ID` first
    gets the events it missed, from the last 100 of this server process. At most 8 clients
    follow at once (more: 429); a client that stops reading falls behind and is dropped. The
    stream ends when the server shuts down.
    """
    services = backend()
    hub = services.model_events
    subscription = hub.subscribe(_last_event_id())
    concurrency = services.concurrency
    started = []
    lines = _stream(subscription, client_gone_check(), lambda: concurrency.snapshot().draining,
                    hub.heartbeat_seconds, lambda: started.append(True) or
                    response.call_on_close(subscription.close))
    response = Response(lines, mimetype="text/event-stream")
    response.call_on_close(lambda: started or subscription.close())   # the body never ran
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def _last_event_id() -> int | None:
    """The Last-Event-ID a reconnecting client sends; anything but a plain id is ignored."""
    match = _LAST_EVENT_ID.match(request.headers.get("Last-Event-ID", ""))
    return int(match.group(1)) if match else None


def _stream(subscription: Subscription, gone: Callable[[], bool], draining: Callable[[], bool],
            heartbeat: float, on_start: Callable[[], None]) -> Iterator[str]:
    """The reply's text: events as they come, a comment when quiet; it ends when the client
    leaves, the server drains or closes, or the client fell too far behind.

    `on_start` runs once the body runs, after every hook: it has the subscription closed as
    the reply's last act, after its access-log line (Backend.close waits for that).
    """
    on_start()
    poll = min(_POLL_SECONDS, heartbeat)
    yield "retry: 3000\n: model events\n\n"
    quiet_since = time.monotonic()
    while True:
        event = subscription.next(poll)
        if event is None or gone() or draining():
            return
        if event is False:
            if time.monotonic() - quiet_since >= heartbeat:
                quiet_since = time.monotonic()
                yield ": heartbeat\n\n"
            continue
        quiet_since = time.monotonic()
        yield _frame(event)


def _frame(event: ModelEvent) -> str:
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(event.to_dict())}\n\n"
