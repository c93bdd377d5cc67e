"""Admission, queueing, timeouts and disconnects through the live server on the real model."""

from __future__ import annotations

import threading

import requests

from conftest import LONG, instances_in_use, sse_events, wait_until


def test_requests_over_the_limit_get_429_and_the_rest_200(live):
    server = live(MAX_CONCURRENT_REQUESTS=3)
    barrier = threading.Barrier(6)
    replies = []

    def client():
        barrier.wait()
        replies.append(server.generate(**LONG, max_tokens=40))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(reply.status_code for reply in replies)
    assert statuses == [200, 200, 200, 429, 429, 429]
    for reply in replies:
        if reply.status_code == 429:
            assert reply.json()["error"]["code"] == "too_many_requests"
            assert int(reply.headers["Retry-After"]) >= 1
        else:
            assert reply.json()["usage"]["completion_tokens"] == 40
    snapshot = server.backend.concurrency.snapshot()
    assert (snapshot.outcomes["rejected"], snapshot.outcomes["succeeded"], snapshot.in_flight) == (3, 3, 0)


def test_a_client_that_drops_a_stream_frees_its_instance(live):
    server = live()
    reply = server.stream(**LONG, max_tokens=800)
    lines = reply.iter_lines(decode_unicode=True)
    received = [line for _, line in zip(range(6), (line for line in lines if line))]
    assert len(received) == 6 and all(line.startswith("data: {\"token\"") for line in received)
    reply.close()
    assert wait_until(lambda: server.backend.concurrency.snapshot().in_flight == 0)
    assert instances_in_use(server) == 0
    snapshot = server.backend.concurrency.snapshot()
    assert snapshot.outcomes["cancelled"] == 1 and snapshot.outcomes["succeeded"] == 0
    usage = server.backend.stats.by_model()
    assert next(iter(usage.values()))["completion_tokens"] < 800
    again = server.generate(prompt="Hello", max_tokens=4)
    assert again.status_code == 200
    logged = server.logged_request(reply.headers["X-Request-ID"])
    assert logged["error"] == "client_disconnected" and logged["status"] == 200


def test_request_timeout_gives_504_and_stops_the_generation(live):
    server = live(REQUEST_TIMEOUT=1, N_CTX=2048)
    reply = server.generate(**LONG, max_tokens=1500)
    assert reply.status_code == 504
    assert reply.json()["error"]["code"] == "generation_timeout"
    assert wait_until(lambda: instances_in_use(server) == 0, seconds=1.0)
    assert server.backend.concurrency.snapshot().outcomes["timed_out"] == 1
    assert server.generate(prompt="Hello", max_tokens=4).status_code == 200


def test_stream_timeout_ends_with_an_error_event(live):
    server = live(REQUEST_TIMEOUT=1, N_CTX=2048)
    reply = server.stream(**LONG, max_tokens=1500)
    assert reply.status_code == 200
    events = sse_events(reply)
    assert events[0].get("token") is not None
    assert events[-1]["error"]["code"] == "generation_timeout"
    assert wait_until(lambda: instances_in_use(server) == 0, seconds=1.0)


def test_waiting_longer_than_queue_timeout_gets_503(live):
    server = live(N_PARALLEL=1, QUEUE_TIMEOUT=0.3)
    first = []
    runner = threading.Thread(target=lambda: first.append(server.generate(**LONG, max_tokens=120)))
    runner.start()
    assert wait_until(lambda: server.backend.concurrency.snapshot().active == 1)
    queued = server.generate(prompt="Hello", max_tokens=4)
    runner.join()
    assert queued.status_code == 503
    assert queued.json()["error"]["code"] == "queue_timeout"
    assert first[0].status_code == 200
    assert server.backend.concurrency.snapshot().outcomes["queue_timed_out"] == 1


def test_health_answers_while_every_worker_is_busy(live):
    server = live(MAX_WORKERS=1, MAX_CONCURRENT_REQUESTS=1)
    runner = threading.Thread(target=lambda: server.generate(**LONG, max_tokens=150))
    runner.start()
    assert wait_until(lambda: server.backend.concurrency.snapshot().active == 1)
    assert requests.get(f"{server.url}/health", timeout=5).json() == {"status": "ok"}
    stats = requests.get(f"{server.url}/stats/concurrency", timeout=5).json()
    busy = server.generate(prompt="Hello", max_tokens=4)
    runner.join()
    assert stats["active"] == 1 and stats["in_flight"] == 1
    assert busy.status_code == 429
