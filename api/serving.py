"""The HTTP server under the app: deadlines for slow clients and the drain on SIGTERM.

A thread that serves a connection must never wait on a client for ever. A request's line and
headers must arrive within CLIENT_HEADER_TIMEOUT in total (a per-read timeout alone never ends
a client that sends one byte every few seconds); its body within CLIENT_BODY_TIMEOUT plus
1/CLIENT_MIN_RATE s per byte received, so an upload at a fair rate is never cut while a trickle
is; a reply write blocked for CLIENT_SEND_TIMEOUT on a client that does not read drops the
connection (which stops its generation). A stalled request is a 408, a malformed chunked body a
400, and both close the connection. `python main.py` serves with `DeadlineWSGIServer`;
gunicorn with `api.gunicorn_worker.DrainingThreadWorker`, which shares `Deadline`.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from werkzeug.serving import DechunkedInput, ThreadedWSGIServer, WSGIRequestHandler

from api.errors import error_payload
from services.errors import ClientTimeout, InvalidRequest

# After a reply has begun, the unread rest of a request body is drained (so the client sees
# the reply rather than a reset) for at most this long; then reads end quietly.
DRAIN_SECONDS = 1.0


@dataclass(frozen=True)
class ClientLimits:
    header_timeout: float
    body_timeout: float
    min_rate: float
    send_timeout: float

    @classmethod
    def from_config(cls, config) -> "ClientLimits":
        return cls(config.CLIENT_HEADER_TIMEOUT, config.CLIENT_BODY_TIMEOUT,
                   config.CLIENT_MIN_RATE, config.CLIENT_SEND_TIMEOUT)


class Deadline:
    """When the client must have sent what the request still owes; reads wait no longer.

    Before a reply has begun, a missed deadline raises ClientTimeout (the app answers 408);
    after it, the drain of a leftover body just ends (`quiet`).
    """

    def __init__(self, limits: ClientLimits):
        self.limits = limits
        self.expired = False
        self.head()

    def head(self) -> None:
        """A request line and headers are due, all of them within CLIENT_HEADER_TIMEOUT."""
        self._set(self.limits.header_timeout, "request line and headers",
                  f"CLIENT_HEADER_TIMEOUT ({self.limits.header_timeout:g} s)")
        self.expired = False

    def body(self) -> None:
        """A body is due: CLIENT_BODY_TIMEOUT, and longer by 1/CLIENT_MIN_RATE s per byte."""
        self._set(self.limits.body_timeout, "request body",
                  f"CLIENT_BODY_TIMEOUT ({self.limits.body_timeout:g} s) at CLIENT_MIN_RATE "
                  f"({self.limits.min_rate:g} bytes/s)", grows=True)

    def reply_started(self) -> None:
        """The reply is under way: what is left of the body may drain briefly, then reads end."""
        self._set(0 if self.expired else DRAIN_SECONDS, self._what, self._limit)
        self.quiet = True

    def _set(self, seconds: float, what: str, limit: str, grows: bool = False) -> None:
        self.until = time.monotonic() + seconds
        self.grows, self.quiet, self._what, self._limit = grows, False, what, limit

    def receive(self, sock: socket.socket,
                receive: Callable[[], bytes | int]) -> bytes | int | None:
        """`receive()` (a recv on `sock`) waiting at most until the deadline.

        :return: what it returned, or None once the deadline passed quietly.
        :raise ClientTimeout: the deadline passed before the reply began.
        """
        remaining = self.until - time.monotonic()
        if remaining > 0 and not self.expired:
            sock.settimeout(remaining)
            try:
                data = receive()
            except TimeoutError:
                data = None
            finally:
                sock.settimeout(self.limits.send_timeout)
            if data is not None:
                if self.grows:
                    count = data if isinstance(data, int) else len(data)
                    self.until += count / self.limits.min_rate
                return data
        self.expired = True
        if self.quiet:
            return None
        raise ClientTimeout(f"the {self._what} did not arrive in time: {self._limit}")


def timeout_reply(error: ClientTimeout) -> bytes:
    """A complete 408 response for a request whose headers never arrived (no app to ask)."""
    body = json.dumps(error_payload(error)).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nX-Request-ID: %s\r\nConnection: close\r\n\r\n%s"
            % (len(body), uuid.uuid4().hex.encode(), body))


@dataclass(frozen=True)
class ShutdownPlan:
    """SIGTERM's time budget: drain (let requests finish), then a short reserve to tear down
    (abort what is left, discard partial uploads, close models), all within SHUTDOWN_TIMEOUT."""

    timeout: float

    @property
    def reserve(self) -> float:
        return min(2.0, self.timeout / 4)

    @property
    def drain_seconds(self) -> float:
        return self.timeout - self.reserve


class _SocketReader(io.RawIOBase):
    """The request side of a connection, read under its `Deadline`."""

    def __init__(self, sock: socket.socket, deadline: Deadline):
        self._sock, self._deadline = sock, deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._deadline.receive(self._sock, lambda: self._sock.recv_into(buffer))
        return count or 0


class _Dechunked(DechunkedInput):
    """Werkzeug's chunked-body reader; a malformed chunk is the client's 400, not an I/O error,
    and it closes the connection (where the next request would start is unknown)."""

    def __init__(self, rfile, handler: "DeadlineRequestHandler"):
        super().__init__(rfile)
        self._handler = handler

    def readinto(self, buffer) -> int:
        try:
            return super().readinto(buffer)
        except ConnectionError:
            raise
        except OSError as exc:
            self._handler.close_connection = True
            raise InvalidRequest(f"the chunked request body is malformed: {exc}") from exc


class DeadlineRequestHandler(WSGIRequestHandler):
    """Werkzeug's request handler with the deadlines above (one request per connection:
    Werkzeug answers every request with `Connection: close`)."""

    def setup(self) -> None:
        super().setup()
        limits = self.server.client_limits
        self.connection.settimeout(limits.send_timeout)
        self.deadline = Deadline(limits)
        self.rfile.close()
        self.rfile = io.BufferedReader(_SocketReader(self.connection, self.deadline))
        self.server.connections.opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.connections.closed(self.connection)

    def handle_one_request(self) -> None:
        self.deadline.head()
        try:
            super().handle_one_request()
        except ClientTimeout as exc:  # the head never came; a stalled body is the app's 408
            self.close_connection = True
            if not self.deadline.quiet:
                self.wfile.write(timeout_reply(exc))
                self.log_error("closed a slow client: %s", exc.message)
        finally:
            self.server.connections.idle(self.connection)
        if self.deadline.expired:
            self.close_connection = True

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        if parsed:
            self.deadline.body()
            self.server.connections.busy(self.connection)
        return parsed

    def send_response(self, code: int, message: str | None = None) -> None:
        self.deadline.reply_started()
        super().send_response(code, message)

    def make_environ(self):
        environ = super().make_environ()
        if environ.get("wsgi.input_terminated"):
            environ["wsgi.input"] = _Dechunked(self.rfile, self)
        return environ


class Connections:
    """The open connections of a server, and which are mid-request, so a drain can wait for
    requests in progress and then abort whatever is still open."""

    def __init__(self):
        self._open: dict[socket.socket, bool] = {}
        self._changed = threading.Condition()

    def opened(self, sock: socket.socket) -> None:
        with self._changed:
            self._open[sock] = False

    def busy(self, sock: socket.socket) -> None:
        with self._changed:
            self._open[sock] = True

    def idle(self, sock: socket.socket) -> None:
        with self._changed:
            if sock in self._open:
                self._open[sock] = False
                self._changed.notify_all()

    def closed(self, sock: socket.socket) -> None:
        with self._changed:
            self._open.pop(sock, None)
            self._changed.notify_all()

    def wait(self, deadline: float, busy_only: bool = True) -> bool:
        """Wait until no request is in progress (or no connection is open); True if so."""
        def settled() -> bool:
            return not (any(self._open.values()) if busy_only else self._open)

        with self._changed:
            return self._changed.wait_for(settled, max(0.0, deadline - time.monotonic()))

    def abort(self) -> int:
        """Shut every open connection down, which ends any read or write blocked on it."""
        with self._changed:
            socks = list(self._open)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(socks)


class DeadlineWSGIServer(ThreadedWSGIServer):
    """Werkzeug's threaded server with `DeadlineRequestHandler`, tracking its connections.

    Threads are daemons: shutdown does not join them blindly but aborts the connections they
    serve and waits a bounded time (see main.py).
    """

    daemon_threads = True

    def __init__(self, host: str, port: int, app, limits: ClientLimits):
        self.client_limits = limits
        self.connections = Connections()
        super().__init__(host, port, app, handler=DeadlineRequestHandler)
