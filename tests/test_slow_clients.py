"""Slow, stalled and malformed clients against both servers (`python main.py` and the README's
gunicorn command), as subprocesses on 127.0.0.1 with the client timeouts shrunk to ~1.5 s."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import requests

from api.serving import ClientLimits, DeadlineWSGIServer
from conftest import LONG, sse_events, wait_until
from server_process import (ServerProcess, Trickler, json_request, multipart_head, read_reply,
                            send_raw, status_of)

TIMEOUTS = {"CLIENT_HEADER_TIMEOUT": 1.5, "CLIENT_BODY_TIMEOUT": 1.5, "CLIENT_SEND_TIMEOUT": 2,
            "MAX_REQUEST_BYTES": 65536, "MAX_UPLOAD_BYTES": 100_000}
HEAD = b"POST /api/v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
SMALL = json.dumps({"prompt": "Hello", "max_tokens": 2}).encode()


@pytest.fixture(scope="module", params=["main", "gunicorn"])
def server(request, tmp_path_factory, model_file, model_registry):
    process = ServerProcess(request.param, tmp_path_factory.mktemp(request.param), model_file,
                            model_registry, **TIMEOUTS)
    yield process
    process.stop()


def error_of(reply: bytes) -> dict:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]


def test_a_head_that_never_ends_gets_408_and_is_closed(server):
    reply, closed = send_raw(server.url, HEAD)
    assert closed and status_of(reply) == 408
    assert error_of(reply)["code"] == "request_timeout"
    assert b"X-Request-ID" in reply


def test_a_connection_that_sends_nothing_is_closed(server):
    reply, closed = send_raw(server.url, b"")
    assert closed
    assert reply == b"" or status_of(reply) == 408


def first_reply(trickler: Trickler) -> bytes:
    """What the server answers a trickling client first (it must answer within 15 s)."""
    trickler.start()
    try:
        assert wait_until(lambda: trickler.replies, seconds=15)
    finally:
        trickler.stop()
    return trickler.replies[0]


def test_a_head_trickled_byte_by_byte_is_cut_off_with_408(server):
    trickler = Trickler(server.url, HEAD + b"X-Slow: " + b"a" * 1000, interval=0.2)
    assert status_of(first_reply(trickler)) == 408


def test_a_body_shorter_than_its_content_length_gets_408_and_is_closed(server):
    reply, closed = send_raw(server.url, HEAD + b"Content-Length: 100\r\n\r\n{\"prompt\":")
    assert closed and status_of(reply) == 408
    assert error_of(reply)["code"] == "request_timeout"


def test_a_trickled_body_is_cut_off_with_408(server):
    body = b'{"prompt": "Hello", "max_tokens": 2}' + b" " * 200
    head = HEAD + b"Content-Length: %d\r\n\r\n" % len(body)
    trickler = Trickler(server.url, head + body, interval=0.2, first=len(head))
    assert status_of(first_reply(trickler)) == 408


@pytest.mark.parametrize("chunks", [
    b"zz\r\n{}\r\n0\r\n\r\n",                   # not hexadecimal
    b"-5\r\nhello\r\n0\r\n\r\n",                 # negative
    b"2\r\n{}XX0\r\n\r\n",                       # a chunk without its CRLF
])
def test_a_malformed_chunked_body_is_400_and_closed(server, chunks):
    reply, closed = send_raw(server.url, HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunks)
    assert closed and status_of(reply) == 400
    assert error_of(reply)["code"] in ("invalid_request", "bad_request")


@pytest.mark.parametrize("size_line", [b"%x", b"fffffffffff"])
def test_a_chunked_json_body_over_the_cap_is_413(server, size_line):
    body = b'{"prompt": "' + b"a" * 70_000 + b'"}'
    line = size_line % len(body) if b"%" in size_line else size_line
    reply, closed = send_raw(server.url, HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + line
                             + b"\r\n" + body + b"\r\n0\r\n\r\n")
    assert status_of(reply) == 413
    assert error_of(reply)["code"] == "payload_too_large"


def test_a_chunked_upload_over_the_cap_is_413_and_leaves_no_file(server):
    head, tail = multipart_head(server.url, 0)
    head, part = head.split(b"\r\n\r\n", 1)
    head = head.replace(b"Content-Length", b"X-Was-Length") + b"\r\nTransfer-Encoding: chunked"
    body = part + b"\0" * 150_000 + tail
    reply, _ = send_raw(server.url, head + b"\r\n\r\n%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    assert status_of(reply) == 413
    assert error_of(reply)["code"] == "payload_too_large"
    assert wait_until(lambda: not server.partial_uploads())


def test_a_large_body_at_a_fair_rate_outlasts_the_body_timeout(server):
    """The body deadline grows with each byte (CLIENT_MIN_RATE), so only a trickle is cut."""
    body = SMALL[:-1] + b" " * 60_000 + b"}"
    head = HEAD + b"Content-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head)
        for start in range(0, len(body), 10_000):
            time.sleep(0.5)  # 3 s in all: twice CLIENT_BODY_TIMEOUT
            sock.sendall(body[start:start + 10_000])
        reply, _ = read_reply(sock, 30)
    assert status_of(reply) == 200, reply[:300]


def test_a_long_stream_is_not_cut_by_the_client_timeouts(server):
    response = requests.post(f"{server.url}/api/v1/generate", stream=True, timeout=60,
                             json={**LONG, "max_tokens": 150, "stream": True})
    events = sse_events(response)
    assert response.status_code == 200
    assert events[-1].get("done") is True, events[-3:]
    assert events[-1]["usage"]["completion_tokens"] == 150


def test_a_kept_alive_connection_cannot_trickle_its_next_request(server):
    request = json_request("/api/v1/generate", SMALL)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request)
        first = b""
        while b'"usage"' not in first:
            first += sock.recv(65536)
        try:
            sock.sendall(HEAD)
        except OSError:
            return  # Werkzeug closes every connection after one reply
        reply, closed = read_reply(sock, 15)
    assert closed
    assert reply == b"" or status_of(reply) == 408


def test_a_content_length_over_the_cap_is_413_at_once(server):
    reply, _ = send_raw(server.url, HEAD + b"Content-Length: 999999999999\r\n\r\n{")
    assert status_of(reply) == 413


def test_pipelined_requests_are_each_answered_or_refused_cleanly(server):
    request = json_request("/api/v1/generate", SMALL)
    reply, _ = send_raw(server.url, request + request, seconds=30)
    # gunicorn serves both; Werkzeug answers the first with Connection: close.
    assert reply.count(b"HTTP/1.1 200") == (2 if server.kind == "gunicorn" else 1), reply[:500]


def test_a_client_that_stops_reading_is_dropped_and_its_reply_stopped(make_app):
    """A token stream never fills the kernel's socket buffers before it ends (~30 bytes a
    token), so a route that writes 1 MB chunks stands in for a reply the client stops reading;
    the server under test is main.py's, in this process."""
    app, stopped = make_app(), threading.Event()

    def firehose():
        def body():
            try:
                while True:
                    yield b"x" * 1_000_000
            finally:
                stopped.set()
        return app.response_class(body())

    app.add_url_rule("/firehose", view_func=firehose)
    server = DeadlineWSGIServer("127.0.0.1", 0, app, ClientLimits(1.5, 1.5, 1024, 1.0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", server.server_port))
            sock.sendall(b"GET /firehose HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert stopped.wait(20)
    finally:
        server.shutdown()
        server.server_close()


def test_thirty_trickling_clients_leave_health_and_generation_working(server):
    """Issue 9's attack, scaled down in time: 30 clients (20 on headers, 10 on bodies) that
    reconnect whenever they are cut off, while others are served."""
    body = SMALL + b" " * 500
    body_head = HEAD + b"Content-Length: %d\r\n\r\n" % len(body)
    tricklers = ([Trickler(server.url, HEAD + b"X-Slow: " + b"a" * 5000, 0.25)
                  for _ in range(20)]
                 + [Trickler(server.url, body_head + body, 0.25, first=len(body_head))
                    for _ in range(10)])
    for trickler in tricklers:
        trickler.start()
    try:
        time.sleep(2)
        for _ in range(3):
            assert requests.get(f"{server.url}/health", timeout=3).status_code == 200
            generated = requests.post(f"{server.url}/api/v1/generate", timeout=30,
                                      json={"prompt": "Hello", "max_tokens": 4})
            assert generated.status_code == 200
            assert generated.json()["usage"]["completion_tokens"] >= 1
            time.sleep(1)
    finally:
        for trickler in tricklers:
            trickler.stop()
    assert sum(trickler.connects for trickler in tricklers) > 30  # they were cut off
    assert all(status_of(reply) == 408 for t in tricklers for reply in t.replies)
