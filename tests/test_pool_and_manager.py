"""ModelPool and ConcurrencyManager rules, with trivial fake instances beside the real model."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import wait_until
from services.concurrency_manager import ConcurrencyManager
from services.errors import ModelLoadError, QueueTimeout, ShuttingDown, TooBusy
from services.model_loading import InstanceSettings, llamacpp_loader
from services.model_pool import ModelPool


class FakeInstance:
    """Stands in for a LlamaCpp where only the pool's bookkeeping is under test."""

    def __init__(self, path):
        self.path, self.closed = path, False
        self.client = self

    def close(self):
        self.closed = True


def far() -> float:
    return time.monotonic() + 30


def test_pool_creates_instances_lazily_and_lends_each_to_one_caller():
    pool = ModelPool(2, FakeInstance)
    holders, lent, lock = [], [], threading.Lock()

    def borrow():
        with pool.checkout("m", "/m.gguf", far()) as instance:
            with lock:
                assert instance not in lent, "one instance lent to two callers"
                lent.append(instance)
            time.sleep(0.05)
            with lock:
                lent.remove(instance)
                holders.append(instance)

    threads = [threading.Thread(target=borrow) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(map(id, holders))) == 2
    [model] = pool.loaded_models()
    assert (model.instances, model.in_use) == (2, 0)


def test_an_instance_returns_to_the_pool_when_the_work_fails():
    pool = ModelPool(1, FakeInstance)
    with pytest.raises(ValueError):
        with pool.checkout("m", "/m.gguf", far()):
            raise ValueError("generation failed")
    with pool.checkout("m", "/m.gguf", far()) as instance:
        assert not instance.closed
    assert pool.loaded_models()[0].in_use == 0


def test_checkout_times_out_when_every_instance_stays_busy():
    pool = ModelPool(1, FakeInstance)
    with pool.checkout("m", "/m.gguf", far()):
        with pytest.raises(QueueTimeout):
            with pool.checkout("m", "/m.gguf", time.monotonic() + 0.1):
                pass


def test_a_failed_load_frees_its_slot():
    attempts = []

    def flaky(path):
        attempts.append(path)
        if len(attempts) == 1:
            raise RuntimeError("corrupt")
        return FakeInstance(path)

    pool = ModelPool(1, flaky)
    with pytest.raises(ModelLoadError):
        with pool.checkout("m", "/m.gguf", far()):
            pass
    with pool.checkout("m", "/m.gguf", far()) as instance:
        assert instance.path == "/m.gguf"


def test_evict_closes_idle_now_and_busy_on_release():
    pool = ModelPool(2, FakeInstance)
    with pool.checkout("m", "/m.gguf", far()) as idle_later:
        pass
    with pool.checkout("m", "/m.gguf", far()) as busy:
        assert busy is idle_later
        with pool.checkout("m", "/m.gguf", far()) as second:
            pass
        assert pool.evict("m") == 1 and second.closed and not busy.closed
    assert busy.closed and pool.loaded_models() == []


def test_a_changed_file_path_reloads_the_model():
    pool = ModelPool(1, FakeInstance)
    with pool.checkout("m", "/old.gguf", far()) as old:
        pass
    with pool.checkout("m", "/new.gguf", far()) as new:
        assert new.path == "/new.gguf"
    assert old.closed


def test_a_closed_pool_refuses_checkouts():
    pool = ModelPool(1, FakeInstance)
    pool.close()
    with pytest.raises(ShuttingDown):
        with pool.checkout("m", "/m.gguf", far()):
            pass


def test_real_instances_are_reused_between_checkouts(model_file):
    pool = ModelPool(1, llamacpp_loader(InstanceSettings(n_ctx=256, n_batch=64, n_threads=1,
                                                         n_gpu_layers=0)))
    with pool.checkout("gemma", str(model_file), far()) as first:
        assert first.client.n_ctx() == 256
    with pool.checkout("gemma", str(model_file), far()) as second:
        assert second is first
    pool.close()


def test_manager_refuses_beyond_the_limit_and_counts_outcomes():
    manager = ConcurrencyManager(max_concurrent=2, max_workers=1, queue_timeout=5,
                                 request_timeout=5)
    release = threading.Event()
    jobs = [manager.submit(lambda job: (job.reserve(), release.wait(5))) for _ in range(2)]
    with pytest.raises(TooBusy) as refused:
        manager.submit(lambda job: None)
    assert refused.value.retry_after >= 1
    deadline = time.monotonic() + 5
    while manager.snapshot().active < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    snapshot = manager.snapshot()
    assert (snapshot.active, snapshot.queued, snapshot.outcomes["rejected"]) == (1, 1, 1)
    assert (snapshot.workers_busy, snapshot.workers_alive) == (1, 1)
    assert manager.queue_wait.percentiles((50,))["samples"] == 1
    release.set()
    assert wait_until(lambda: manager.snapshot().in_flight == 0, seconds=5)
    assert [job.outcome for job in jobs] == ["succeeded", "succeeded"]
    failing = manager.submit(lambda job: 1 / 0)
    assert wait_until(lambda: failing.outcome is not None, seconds=5)
    assert manager.drain(5)
    snapshot = manager.snapshot()
    assert failing.outcome == "failed"
    assert (snapshot.outcomes["succeeded"], snapshot.outcomes["failed"], snapshot.in_flight) == (2, 1, 0)
    with pytest.raises(ShuttingDown):
        manager.submit(lambda job: None)
    manager.shutdown()


def test_drain_waits_for_running_jobs():
    manager = ConcurrencyManager(max_concurrent=2, max_workers=2, queue_timeout=5,
                                 request_timeout=5)
    release = threading.Event()
    manager.submit(lambda job: release.wait(5))
    assert manager.drain(0.1) is False
    release.set()
    assert manager.drain(5) is True
    manager.shutdown()


LOAD_WHILE_LOGGING = """
import logging, sys, threading, time
logging.basicConfig(level=logging.INFO, format="%(message)s")
from services.model_loading import InstanceSettings, llamacpp_loader
load = llamacpp_loader(InstanceSettings(n_ctx=256, n_batch=64, n_threads=1, n_gpu_layers=0))
loaders = [threading.Thread(target=load, args=(sys.argv[1],)) for _ in range(2)]
for thread in loaders:
    thread.start()
count = 0
while any(thread.is_alive() for thread in loaders):
    count += 1
    logging.info("line %d", count)
    time.sleep(0.001)
logging.info("total %d", count)
"""


def test_loading_models_does_not_swallow_other_threads_console_output(model_file):
    """llama-cpp-python's quiet mode points the process's stderr at /dev/null while it loads:
    the server's console log lines written meanwhile by other threads were lost."""
    import subprocess
    import sys

    from conftest import ROOT

    done = subprocess.run([sys.executable, "-c", LOAD_WHILE_LOGGING, str(model_file)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stderr.splitlines()
    totals = [int(line.split()[1]) for line in output if line.startswith("total ")]
    assert totals, "stderr stayed redirected after the loads"
    assert totals[0] > 10
    assert len([line for line in output if line.startswith("line ")]) == totals[0]
