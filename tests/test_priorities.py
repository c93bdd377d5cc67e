"""Request priorities on the real model: among requests waiting for a slot, higher goes first;
/stats/concurrency shows the queue per priority; aging keeps a low request from starving; a bad
X-Request-Priority is a 400 in each API's error shape."""

from __future__ import annotations

import threading
import time

import llama_cpp
import pytest
import requests

from conftest import LONG, wait_until
from services.concurrency_manager import ConcurrencyManager
from services.engine.batch_engine import BatchEngine, EngineSettings
from services.engine.sequence import Sequence
from services.types import SUCCEEDED, Caller, SamplingParams


def concurrency(server) -> dict:
    return requests.get(f"{server.url}/stats/concurrency", timeout=10).json()


def waiting(server) -> int:
    return sum(engine["waiting"] for engine in concurrency(server)["engines"])


def low_then_high(server, pause: float) -> dict[str, tuple[float, dict]]:
    """With the one slot busy, queue a low request, wait `pause` s, queue a high one, then free
    the slot: each one's (time it finished, reply). /stats/concurrency shows the queue."""
    assert concurrency(server)["queued_by_priority"] == {"high": 0, "normal": 0, "low": 0}
    running = server.stream(**LONG, max_tokens=800)    # until closed below
    # Kept referenced until closed: a dropped generator would close the connection.
    lines = (line for line in running.iter_lines(decode_unicode=True) if line)
    assert next(lines)
    finished: dict[str, tuple[float, requests.Response]] = {}

    def send(priority: str) -> None:
        reply = requests.post(f"{server.url}/api/v1/generate", timeout=120,
                              json={"prompt": f"Name a {priority} mountain.", "max_tokens": 8,
                                    "temperature": 0},
                              headers={"X-Request-Priority": priority})
        finished[priority] = (time.monotonic(), reply)

    threads = {priority: threading.Thread(target=send, args=(priority,))
               for priority in ("low", "high")}
    threads["low"].start()
    assert wait_until(lambda: waiting(server) == 1)
    assert concurrency(server)["queued_by_priority"] == {"high": 0, "normal": 0, "low": 1}
    time.sleep(pause)
    threads["high"].start()
    assert wait_until(lambda: waiting(server) == 2)
    queued = concurrency(server)
    assert queued["queued"] == 2
    assert queued["queued_by_priority"] == {"high": 1, "normal": 0, "low": 1}
    running.close()                     # the slot comes back: one of the two takes it
    lines.close()
    for thread in threads.values():
        thread.join(120)
    assert [finished[p][1].status_code for p in ("high", "low")] == [200, 200]
    assert wait_until(lambda: concurrency(server)["queued_by_priority"] == {
        "high": 0, "normal": 0, "low": 0})
    return {p: (at, reply.json()) for p, (at, reply) in finished.items()}


def test_with_the_slot_busy_a_high_request_queued_after_a_low_one_finishes_first(live):
    finished = low_then_high(live(N_PARALLEL=1), pause=0.0)
    assert finished["high"][0] < finished["low"][0]
    assert finished["low"][1]["timings"]["queue_ms"] > finished["high"][1]["timings"]["queue_ms"]


def test_a_low_request_waiting_two_aging_periods_goes_before_a_later_high_one(live):
    finished = low_then_high(live(N_PARALLEL=1, PRIORITY_AGING_SECONDS=0.25), pause=1.0)
    assert finished["low"][0] < finished["high"][0]


def test_the_priority_header_is_case_insensitive(module_server):
    reply = requests.post(f"{module_server.url}/api/v1/generate", timeout=60,
                          json={"prompt": "Hi", "max_tokens": 2},
                          headers={"X-Request-Priority": "High"})
    assert reply.status_code == 200


@pytest.mark.parametrize("path, body, shape", [
    ("/api/v1/generate", {"prompt": "Hi", "max_tokens": 2}, "native"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 2}, "openai"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}, "openai"),
    ("/v1/responses", {"input": "Hi", "max_output_tokens": 2}, "openai"),
    ("/api/generate", {"prompt": "Hi", "options": {"num_predict": 2}}, "ollama"),
    ("/api/chat", {"messages": [{"role": "user", "content": "Hi"}]}, "ollama"),
])
@pytest.mark.parametrize("priority", ["urgent", "", "high,low", "x" * 5000])
def test_an_unknown_priority_is_a_400_in_the_api_s_error_shape(module_server, path, body, shape,
                                                               priority):
    reply = requests.post(f"{module_server.url}{path}", json=body, timeout=60,
                          headers={"X-Request-Priority": priority})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    if shape == "ollama":
        assert isinstance(error, str) and "X-Request-Priority" in error
        return
    assert "X-Request-Priority must be one of high, normal, low" in error["message"]
    assert error["code"] == "invalid_request"
    assert error.get("param") == "X-Request-Priority"
    if shape == "openai":
        assert error["type"] == "invalid_request_error"


# -- aging, on an engine of its own (a tiny PRIORITY_AGING_SECONDS) ------------------------


@pytest.fixture(scope="module")
def llm(model_file):
    model = llama_cpp.Llama(model_path=str(model_file), n_ctx=256, verbose=False)
    yield model
    model.close()


class _Order:
    """Listens to the engine's sequences: the order they got a slot, and their endings."""

    def __init__(self):
        self.admitted: list[str] = []
        self.ended = threading.Semaphore(0)

    def listener(self, name: str, job):
        order = self

        class Listener:
            def admitted(self, sequence) -> None:
                order.admitted.append(name)

            def text(self, sequence, piece: str) -> None:
                pass

            def ended(self, sequence, error) -> None:
                job.end(SUCCEEDED)
                order.ended.release()

        return Listener()


@pytest.mark.parametrize("aging, first", [(0.25, "low"), (600.0, "high")])
def test_a_low_request_that_waited_long_enough_goes_before_a_fresh_high_one(llm, aging, first):
    """A low request that waited 4 aging periods ranks above high; with a long aging period
    the high one queued after it still goes first."""
    engine = BatchEngine(llm, EngineSettings(slots=1, kv_cells=512, n_ctx=512, n_batch=64,
                                             n_threads=1, priority_aging_seconds=aging), "aging")
    manager = ConcurrencyManager(8, 1, 60.0, 60.0)
    order = _Order()
    prompt = llm.tokenize(LONG["prompt"].encode(), add_bos=True, special=True)

    def submit(name: str, priority: str, max_tokens: int):
        job = manager.admit(name)
        engine.submit(Sequence(prompt, SamplingParams(max_tokens=max_tokens, temperature=0),
                               512, job, order.listener(name, job)),
                      rank=Caller(None, priority).rank)
        return job

    try:
        blocker = submit("blocker", "normal", 480)
        assert wait_until(lambda: order.admitted == ["blocker"])
        submit("low", "low", 4)
        time.sleep(1.0)
        submit("high", "high", 4)
        assert engine.snapshot().waiting == 2
        blocker.cancel()
        for _ in range(3):
            assert order.ended.acquire(timeout=60)
        assert order.admitted[1] == first
        assert sorted(order.admitted) == ["blocker", "high", "low"]
    finally:
        engine.close()
        manager.shutdown()
