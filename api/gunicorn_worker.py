"""gunicorn's gthread worker, safe from slow clients and draining on SIGTERM.

Slow clients: gthread hands a connection to a pool thread as soon as its first byte arrives,
and that thread then blocks until the whole request head is in; 18 clients sending one byte
every few seconds held all the threads and the server answered nobody. Here the event loop
reads request heads itself (non-blocking, any number of connections, each closed with a 408
after CLIENT_HEADER_TIMEOUT), and a thread takes a request only once its head is complete.
Bodies and replies are read and written by the thread under the deadlines of api/serving.py.

SIGTERM: gthread stops accepting at once, so new clients are refused. Here the worker keeps
accepting while it drains: the app answers new generations and the health checks with 503
(shutting_down), running requests finish, and after SHUTDOWN_TIMEOUT (less a short reserve)
whatever is left is cancelled and aborted so that `worker_exit` (gunicorn.conf.py) can close
the backend and discard partial uploads before gunicorn's graceful_timeout kills the worker.
"""

from __future__ import annotations

import errno
import math
import re
import selectors
import socket
import time
from collections import deque
from functools import partial

from gunicorn.http.errors import NoMoreData, ParseException
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers import gthread

from api.serving import ClientLimits, Deadline, ShutdownPlan, timeout_reply
from services.errors import ClientTimeout, InvalidRequest

# A request head larger than this goes to a thread at once; gunicorn's parser then refuses it
# (limit_request_line / limit_request_fields / limit_request_field_size).
_HEAD_LIMIT = 1024 * 1024
# A body of at most this many bytes (by its Content-Length) is read by the event loop too, so a
# client trickling a JSON body holds no thread; larger and chunked bodies (model uploads) are
# read by a thread, under the body deadline. Covers any prompt that fits a 32k context.
_BUFFERED_BODY = 256 * 1024
_CONTENT_LENGTH = re.compile(rb"\ncontent-length[ \t]*:[ \t]*(\d{1,18})[ \t]*\r?\n", re.I)
_TRANSFER_ENCODING = re.compile(rb"\ntransfer-encoding[ \t]*:", re.I)


def _buffered_length(head: bytes) -> int:
    """How much of the request the event loop reads: the head, plus a small plain body."""
    ends = [found + len(mark) for mark in (b"\r\n\r\n", b"\n\n")
            if (found := head.find(mark)) >= 0]
    if not ends:
        return 0 if len(head) > _HEAD_LIMIT else -1  # -1: the head is still arriving
    end = min(ends)
    lengths = _CONTENT_LENGTH.findall(head[:end])
    if len(lengths) != 1 or _TRANSFER_ENCODING.search(head[:end]):
        return end  # no body, chunked, or ambiguous: the thread's parser decides
    return end + int(lengths[0]) if int(lengths[0]) <= _BUFFERED_BODY else end


class _DeadlineUnreader(SocketUnreader):
    """gunicorn's socket reader, every recv bounded by the request's `Deadline`."""

    def __init__(self, sock, deadline: Deadline):
        super().__init__(sock)
        self.deadline = deadline

    def chunk(self, size_hint=None) -> bytes:
        data = self.deadline.receive(self.sock, lambda: SocketUnreader.chunk(self, size_hint))
        if data is None:  # the drain of a leftover body ran out: gunicorn then closes
            raise TimeoutError("the leftover request body did not arrive in time")
        return data


class _BodyReader:
    """A request body reader whose parse errors (a malformed chunk size, a body cut short) are
    the client's 400 rather than the server's 500. After any failure, including a stalled
    body's 408, the reply says `Connection: close` and the connection closes: where the next
    request would start is unknown."""

    def __init__(self, reader, request):
        self._reader, self._request = reader, request

    def read(self, size):
        try:
            return self._reader.read(size)
        except (ParseException, NoMoreData) as exc:
            self._request.must_close = True
            raise InvalidRequest(f"the request body is malformed or cut short "
                                 f"({type(exc).__name__})") from exc
        except ClientTimeout:
            self._request.must_close = True
            raise


class DrainingThreadWorker(gthread.ThreadWorker):
    """See the module docstring. Heads are read by the event loop for plain HTTP/1.x, as
    gunicorn.conf.py configures it; with TLS, gthread's threads read them (deadlines still
    apply, but a thread waits for each)."""

    def run(self):
        backend = self.wsgi.extensions["llm"]
        self.concurrency = backend.concurrency
        self.limits = ClientLimits.from_config(backend.config)
        self.plan = ShutdownPlan(backend.config.SHUTDOWN_TIMEOUT)
        self.heads: deque = deque()          # connections whose request head is arriving
        self.in_threads: set = set()         # connections a pool thread is serving
        self.drain_deadline: float | None = None
        super().run()

    # Request heads, read by the event loop.

    def accept(self, listener):
        if self.cfg.is_ssl:  # TLS handshakes stay with gthread's threads
            return super().accept(listener)
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._await_head(gthread.TConn(self.cfg, sock, client, listener.getsockname()))

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection has bytes: its next request head, read here too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._await_head(conn)

    def _await_head(self, conn) -> None:
        conn.head, conn.wanted = bytearray(), -1
        conn.timeout = time.monotonic() + self.limits.header_timeout
        self.heads.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._read_head, conn))

    def _read_head(self, conn, sock) -> None:
        """Read what arrived; once the head (and a small body) is in, hand it to a thread."""
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return self._close_head(conn)
        conn.head += data
        if conn.wanted < 0:
            conn.wanted = _buffered_length(conn.head)
            if conn.wanted > len(conn.head):  # a body follows: the body deadline applies
                conn.timeout = time.monotonic() + self.limits.body_timeout
        elif conn.wanted > 0:
            conn.timeout += len(data) / self.limits.min_rate
        if 0 <= conn.wanted <= len(conn.head):
            self.poller.unregister(sock)
            self.heads.remove(conn)
            conn.data_ready = True
            self.enqueue_req(conn)

    def _close_head(self, conn, reply: bytes = b"") -> None:
        self.heads.remove(conn)
        self.poller.unregister(conn.sock)
        if reply:
            try:
                conn.sock.send(reply)  # non-blocking: a client that does not read gets none
            except OSError:
                pass
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self):
        """Each turn of the event loop: close heads past their deadline, move the drain on."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [conn for conn in self.heads if conn.timeout <= now or not self.alive]:
            what = "request line and headers" if conn.wanted < 0 else "request body"
            error = ClientTimeout(f"the {what} did not arrive in time (CLIENT_HEADER_TIMEOUT "
                                  f"{self.limits.header_timeout:g} s, CLIENT_BODY_TIMEOUT "
                                  f"{self.limits.body_timeout:g} s)")
            self._close_head(conn, timeout_reply(error) if self.alive else b"")
        self._advance_drain()

    # Requests, served by pool threads.

    def handle(self, conn):
        self.in_threads.add(conn)
        try:
            if not conn.initialized:
                conn.sock.setblocking(True)
                conn.init()
                conn.parser.unreader = _DeadlineUnreader(conn.sock, Deadline(self.limits))
            unreader = conn.parser.unreader
            unreader.deadline.head()
            if getattr(conn, "head", None):
                unreader.unread(bytes(conn.head))
                conn.head = None
            return super().handle(conn)
        finally:
            self.in_threads.discard(conn)

    def handle_request(self, req, conn):
        deadline = conn.parser.unreader.deadline
        deadline.body()
        conn.sock.settimeout(self.limits.send_timeout)  # gthread made it blocking: no timeout
        if req.body is not None:
            req.body.reader = _BodyReader(req.body.reader, req)
        try:
            keepalive = super().handle_request(req, conn)
        except TimeoutError:  # only a write can time out here: the client stopped reading
            self.log.info("dropped %s: it read nothing of the reply for CLIENT_SEND_TIMEOUT "
                          "(%g s)", conn.client, self.limits.send_timeout)
            return False
        deadline.reply_started()
        return keepalive and not deadline.expired

    # SIGTERM: drain.

    def handle_exit(self, sig, frame):
        """SIGTERM: drain rather than stop (gthread stops accepting at once)."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.plan.drain_seconds
            self.method_queue.defer(self._begin_drain)

    def _begin_drain(self) -> None:
        self.concurrency.begin_drain()
        self.log.info("SIGTERM: draining for up to %.1f s; new requests get 503",
                      self.plan.drain_seconds)

    def _advance_drain(self) -> None:
        """Stop once no generation and no request is in progress, or the drain ran out: then
        cancel and abort what is left, so the worker exits within the reserve."""
        if self.drain_deadline is None or not self.alive:
            return
        idle = not self.in_threads and self.concurrency.snapshot().in_flight == 0
        if not idle and time.monotonic() < self.drain_deadline:
            return
        cancelled = self.concurrency.cancel_running()
        for conn in list(self.in_threads):
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.log.info("drained (%s); stopping", "all requests finished" if idle else
                      f"timed out: cancelled {cancelled}, aborted {len(self.in_threads)}")
        self.cfg.set("graceful_timeout", math.ceil(self.plan.reserve))  # gthread's last wait
        self.alive = False
