"""Production server settings: `gunicorn -c gunicorn.conf.py "app_factory:create_app()"`.

One worker process: each process holds its own pool of llama.cpp instances (the model weights
and KV caches), so more processes multiply memory without adding speed. llama.cpp releases the
GIL while it computes, so threads inside the one process give the concurrency.
"""

from config import load_config
from services.model_events import MAX_EVENT_STREAMS

_config = load_config()

bind = f"{_config.HOST}:{_config.PORT}"
workers = 1
# gthread, reading request heads in its event loop and draining on SIGTERM: see that module.
worker_class = "api.gunicorn_worker.DrainingThreadWorker"
# Every admitted generation holds a thread while it waits or streams; a few more keep /health,
# /stats and the refusals (429) answering when all of those are busy, and each open model
# events stream (at most MAX_EVENT_STREAMS) has its own.
threads = _config.MAX_CONCURRENT_REQUESTS + 8 + MAX_EVENT_STREAMS
timeout = int(_config.QUEUE_TIMEOUT + _config.REQUEST_TIMEOUT + 30)
# The worker drains for SHUTDOWN_TIMEOUT (less a short reserve), then exits by itself; the
# margin lets worker_exit close the backend (partial uploads discarded) before a SIGKILL.
graceful_timeout = int(_config.SHUTDOWN_TIMEOUT) + 10
accesslog = None  # api.log already has one JSON line per request
# gunicorn 25+ opens a control socket (resize workers, shut down) at one path per user, which
# several instances on a machine would fight over; nothing here uses it.
control_socket_disable = True


def worker_exit(server, worker):
    """Free the worker's model instances and close its log files."""
    app = getattr(worker, "wsgi", None)
    if app is not None and "llm" in getattr(app, "extensions", {}):
        app.extensions["llm"].close()
