"""Production server settings: `gunicorn -c gunicorn.conf.py "app_factory:create_app()"`.

One worker process: each process holds its own pool of llama.cpp instances (the model weights
and KV caches), so more processes multiply memory without adding speed. llama.cpp releases the
GIL while it computes, so threads inside the one process give the concurrency.
"""

from config import load_config

_config = load_config()

bind = f"{_config.HOST}:{_config.PORT}"
workers = 1
worker_class = "gthread"
# Every admitted generation holds a thread while it waits or streams; a few more keep /health,
# /stats and the refusals (429) answering when all of those are busy.
threads = _config.MAX_CONCURRENT_REQUESTS + 8
timeout = int(_config.QUEUE_TIMEOUT + _config.REQUEST_TIMEOUT + 30)
graceful_timeout = int(_config.SHUTDOWN_TIMEOUT)
accesslog = None  # api.log already has one JSON line per request


def worker_exit(server, worker):
    """Free the worker's model instances and close its log files."""
    app = getattr(worker, "wsgi", None)
    if app is not None and "llm" in getattr(app, "extensions", {}):
        app.extensions["llm"].close()
