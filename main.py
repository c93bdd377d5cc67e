"""Run the server: load settings (.env included), build the app, serve until SIGTERM/SIGINT.

On SIGTERM the server stops admitting generations (new ones get 503), lets running ones finish
for up to SHUTDOWN_TIMEOUT seconds, then exits 0. For production use gunicorn (see README).
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading

from werkzeug.serving import make_server

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
    server = make_server(config.HOST, config.PORT, app, threaded=True)
    # Streamed tokens are small writes; without TCP_NODELAY, Nagle's algorithm holds each one
    # until the client's delayed ACK (~40 ms). Accepted sockets inherit the option on Linux.
    server.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # Request threads are joined at server_close(), so no reply is cut off at exit.
    server.daemon_threads = False

    def drain_then_stop() -> None:
        finished = backend.concurrency.drain(config.SHUTDOWN_TIMEOUT)
        log.info("drained (%s); stopping", "all requests finished" if finished else "timed out")
        server.shutdown()

    def on_signal(signum, _frame) -> None:
        log.info("received %s: finishing running requests", signal.Signals(signum).name)
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
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
