"""Bounded admission and a fixed worker pool for generations.

At most MAX_CONCURRENT_REQUESTS jobs are admitted (running + waiting); the next is refused at
once with TooBusy, like Ollama's ErrMaxQueue, so a burst costs the server nothing. Admitted jobs
run on a ThreadPoolExecutor of MAX_WORKERS threads; llama.cpp releases the GIL while it computes,
so threads give real parallelism.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from services.errors import GenerationTimeout, QueueTimeout, ShuttingDown, TooBusy
from services.observability.window import SlidingWindow


class Job:
    """One admitted unit of work: its deadlines and the flags that stop it.

    The work calls `reserve()` the moment a model instance is set aside for it, which ends its
    time in the queue (loading a model is work, not queueing). A caller that stopped waiting
    calls `abandon()`. Both take one lock, so exactly one of them wins.
    """

    def __init__(self, queue_timeout: float, request_timeout: float,
                 on_reserve: Callable[["Job"], None] = lambda job: None):
        self.admitted_at = time.monotonic()
        self.queue_deadline = self.admitted_at + queue_timeout
        self.request_timeout = request_timeout
        self.reserved_at: float | None = None
        self.started_at: float | None = None
        self.cancelled = threading.Event()
        self._lock = threading.Lock()
        self._on_reserve = on_reserve
        self.future: Future | None = None

    @property
    def queue_seconds(self) -> float:
        return (self.reserved_at or time.monotonic()) - self.admitted_at

    @property
    def deadline(self) -> float:
        """When the caller stops waiting: the queue deadline, then REQUEST_TIMEOUT after that."""
        if self.reserved_at is None:
            return self.queue_deadline
        return (self.started_at or self.reserved_at) + self.request_timeout

    def reserve(self) -> None:
        """End the queue wait; raise QueueTimeout if the caller already gave up."""
        with self._lock:
            if self.cancelled.is_set():
                raise QueueTimeout("no worker or model instance became free in time")
            first = self.reserved_at is None
            self.reserved_at = time.monotonic()
            if first:  # counted once, however many instances the work checks out
                self._on_reserve(self)

    def start(self) -> None:
        """Mark the generation proper as begun (after loading and tokenizing)."""
        self.started_at = time.monotonic()

    def abandon(self) -> bool:
        """Stop a job still waiting in the queue; False when it already holds an instance."""
        with self._lock:
            if self.reserved_at is not None:
                return False
            self.cancelled.set()
            return True

    def cancel(self) -> None:
        """Ask running work to stop at its next check (timeout, client gone, shutdown)."""
        self.cancelled.set()

    def check(self) -> None:
        """Raise when the work should stop: GenerationTimeout past the deadline or cancelled."""
        if self.started_at is not None and time.monotonic() > self.deadline:
            self.cancelled.set()
            raise GenerationTimeout(f"generation exceeded REQUEST_TIMEOUT ({self.request_timeout:g} s)")
        if self.cancelled.is_set():
            raise JobCancelled()


class JobCancelled(Exception):
    """The job was cancelled by its caller (client gone or caller timed out)."""


_OUTCOMES = {GenerationTimeout: "timed_out", QueueTimeout: "queue_timed_out",
             JobCancelled: "cancelled"}


@dataclass(frozen=True)
class ConcurrencySnapshot:
    max_concurrent_requests: int
    max_workers: int
    queue_timeout: float
    request_timeout: float
    in_flight: int
    active: int  # holding a model instance (loading it or generating)
    queued: int  # admitted, waiting for a worker or a model instance
    workers_busy: int
    workers_started: int  # threads start on demand, up to MAX_WORKERS
    workers_alive: int
    completed: int
    failed: int
    rejected: int
    timed_out: int
    queue_timed_out: int
    cancelled: int
    draining: bool


class ConcurrencyManager:
    """Admits, queues and runs jobs; counts what happened to them.

    Lock order: the pool's lock, then a job's, then this manager's (`Job.reserve` runs with
    the pool lock held and reports here); nothing here waits for a generation.
    """

    def __init__(self, max_concurrent: int, max_workers: int, queue_timeout: float,
                 request_timeout: float):
        self.max_concurrent = max_concurrent
        self.max_workers = max_workers
        self.queue_timeout = queue_timeout
        self.request_timeout = request_timeout
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="generate",
                                            initializer=self._register_worker)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._busy = 0
        self._active = 0
        self._workers: list[threading.Thread] = []
        self.queue_wait = SlidingWindow()
        self._counts = dict(completed=0, failed=0, rejected=0, timed_out=0, queue_timed_out=0,
                            cancelled=0)
        self._recent_seconds: deque[float] = deque(maxlen=50)
        self._draining = False
        self._jobs: set[Job] = set()

    def submit(self, work: Callable[[Job], Any]) -> Job:
        """Admit `work(job)` and queue it on a worker.

        :raise TooBusy: MAX_CONCURRENT_REQUESTS jobs are already in flight (HTTP 429).
        :raise ShuttingDown: the server is draining after SIGTERM (HTTP 503).
        """
        with self._lock:
            if self._draining:
                raise ShuttingDown("the server is shutting down")
            if self._in_flight >= self.max_concurrent:
                self._counts["rejected"] += 1
                raise TooBusy(f"{self._in_flight} requests in flight (MAX_CONCURRENT_REQUESTS="
                              f"{self.max_concurrent}); retry shortly", retry_after=self._retry_after())
            self._in_flight += 1
            job = Job(self.queue_timeout, self.request_timeout, self._reserved)
            self._jobs.add(job)
        job.future = self._executor.submit(self._run, job, work)
        return job

    def _register_worker(self) -> None:
        with self._lock:
            self._workers.append(threading.current_thread())

    def _reserved(self, job: Job) -> None:
        """A job got its model instance: its queue wait is over and it counts as active."""
        self.queue_wait.add(job.queue_seconds)
        with self._lock:
            self._active += 1

    def _run(self, job: Job, work: Callable[[Job], Any]) -> Any:
        with self._lock:
            self._busy += 1
        outcome = "failed"
        try:
            result = work(job)
            outcome = "completed"
            return result
        except (GenerationTimeout, QueueTimeout, JobCancelled) as exc:
            outcome = _OUTCOMES[type(exc)]
            raise
        finally:
            with self._idle:
                self._busy -= 1
                self._active -= job.reserved_at is not None
                self._in_flight -= 1
                self._jobs.discard(job)
                self._counts[outcome] += 1
                if job.started_at is not None:
                    self._recent_seconds.append(time.monotonic() - job.started_at)
                self._idle.notify_all()

    def _retry_after(self) -> int:
        """Seconds a refused client should wait: the recent mean job time, at least 1."""
        if not self._recent_seconds:
            return 1
        return max(1, round(sum(self._recent_seconds) / len(self._recent_seconds)))

    def snapshot(self) -> ConcurrencySnapshot:
        with self._lock:
            return ConcurrencySnapshot(
                max_concurrent_requests=self.max_concurrent, max_workers=self.max_workers,
                queue_timeout=self.queue_timeout, request_timeout=self.request_timeout,
                in_flight=self._in_flight, active=self._active,
                queued=self._in_flight - self._active, workers_busy=self._busy,
                workers_started=len(self._workers),
                workers_alive=sum(worker.is_alive() for worker in self._workers),
                draining=self._draining, **self._counts)

    def begin_drain(self) -> None:
        """Stop admitting (new jobs get ShuttingDown, readiness turns 503); running ones go on."""
        with self._lock:
            self._draining = True

    def drain(self, timeout: float) -> bool:
        """Stop admitting and wait up to `timeout` s for in-flight jobs; True when all finished."""
        with self._idle:
            self._draining = True
            return self._idle.wait_for(lambda: not self._in_flight, timeout)

    def cancel_running(self) -> int:
        """Ask every admitted job to stop at its next check (the drain ran out); how many."""
        with self._lock:
            self._draining = True
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        return len(jobs)

    def shutdown(self) -> None:
        """Stop the workers (after `drain`): queued jobs are dropped, running ones cancelled."""
        self.cancel_running()
        self._executor.shutdown(wait=False, cancel_futures=True)
