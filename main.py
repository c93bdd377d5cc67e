"""Run the server: load settings (.env included), build the app, serve until SIGTERM/SIGINT.

On SIGTERM (or SIGINT) the server stops admitting generations (new ones get 503, and so do
/health and /api/v1/health), lets running requests finish, then aborts whatever is left (a slow
upload included, whose temp file is removed) and exits 0, all within SHUTDOWN_TIMEOUT. A second
SIGTERM or SIGINT exits at once with status 128 + the signal number (143 or 130). Slow clients
are cut off by the deadlines in api/serving.py. For production use gunicorn (see README).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

from api.serving import ClientLimits, DeadlineWSGIServer, ShutdownPlan
from app_factory import create_app
from config import load_config
from services.errors import ConfigError

log = logging.getLogger("main")


def main() -> int:
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.LOG_LEVEL.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config)
    backend = app.extensions["llm"]
    server = DeadlineWSGIServer(config.HOST, config.PORT, app, ClientLimits.from_config(config))
    # Streamed tokens are small writes; without TCP_NODELAY, Nagle's algorithm holds each one
    # until the client's delayed ACK (~40 ms). Accepted sockets inherit the option on Linux.
    server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    plan = ShutdownPlan(config.SHUTDOWN_TIMEOUT)
    stopping = threading.Event()

    def drain_then_stop() -> None:
        deadline = time.monotonic() + plan.drain_seconds
        finished = (backend.concurrency.drain(plan.drain_seconds)
                    and server.connections.wait(deadline))
        log.info("drained (%s); stopping", "all requests finished" if finished else "timed out")
        server.shutdown()

    def on_signal(signum, _frame) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():
            log.warning("received %s again: exiting at once", name)
            os._exit(128 + signum)
        stopping.set()
        log.info("received %s: finishing running requests", name)
        threading.Thread(target=drain_then_stop, name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for name, value, _help in config.public_items():
        log.info("setting %s=%s", name, value)
    log.info("serving on http://%s:%d (docs at /)", config.HOST, server.server_port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        stop_what_is_left(server, backend, plan)
    return 0


def stop_what_is_left(server: DeadlineWSGIServer, backend, plan: ShutdownPlan) -> None:
    """After the drain: cancel generations, abort open connections (a slow upload's thread
    then fails and discards its temp file), give their threads the reserve, close the backend."""
    cancelled = backend.concurrency.cancel_running()
    aborted = server.connections.abort()
    if cancelled or aborted:
        log.info("cancelled %d generation(s), aborted %d connection(s)", cancelled, aborted)
    server.connections.wait(time.monotonic() + plan.reserve / 2, busy_only=False)
    backend.close()


if __name__ == "__main__":
    sys.exit(main())
