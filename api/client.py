"""Whether the client of the request being served is still connected.

A whole (non-streamed) reply, or a request still queued, writes nothing until it ends, so a
client that leaves is not noticed by a failed write. The servers here hand the route the
connection's socket (Werkzeug as `werkzeug.socket`, gunicorn as `gunicorn.socket`): a peek that
reads end-of-file means the client closed its side.
"""

from __future__ import annotations

import select
import socket
from typing import Callable

from flask import request


def client_gone_check() -> Callable[[], bool]:
    """A check for the current request's client, usable from any thread (it holds the socket,
    not the request context); one that always says "connected" when the server gives no socket."""
    conn = request.environ.get("werkzeug.socket") or request.environ.get("gunicorn.socket")
    if conn is None:
        return lambda: False

    def gone() -> bool:
        try:
            readable, _, _ = select.select([conn], [], [], 0)
            # Readable with nothing to read is end-of-file; a pipelined next request is data.
            return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
        except (BlockingIOError, InterruptedError, TimeoutError):
            return False
        except (OSError, ValueError):
            return True

    return gone
