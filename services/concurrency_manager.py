"""The one job runner: bounded admission, a fixed worker pool, and every ending owned here.

At most MAX_CONCURRENT_REQUESTS jobs are admitted (queued + running); the next is refused at
once with TooBusy, like Ollama's ErrMaxQueue, so a burst costs the server nothing. An admitted
job's work runs on a ThreadPoolExecutor of MAX_WORKERS threads. Work that hands the job on (a
generation goes to its model's batched engine) returns its worker at once; the engine ends the
job when the sequence ends.

Whatever ends a job (done, error, queue or generation timeout, client gone, shutdown), it ends
through `Job.end` exactly once: the admission place comes back and the outcome is counted, from
the one vocabulary in `services.types`, here and in the per-model statistics.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from services.errors import (ClientGone, GenerationTimeout, JobCancelled, QueueTimeout,
                             ShuttingDown, TooBusy)
from services.observability.window import SlidingWindow
from services.types import (ANONYMOUS, CANCELLED, FAILED, OUTCOMES, PRIORITIES, QUEUE_TIMED_OUT,
                            REJECTED, SUCCEEDED, TIMED_OUT, Caller)

# Called once per counted ending: (label, outcome), e.g. the model's name and "succeeded".
OutcomeSink = Callable[[str, str], None]
# Who is asking, read when a job is admitted (the HTTP edge supplies the request's key name and
# priority; outside a request, ANONYMOUS).
CallerOf = Callable[[], Caller]
# How long a caller waits past a deadline the work enforces itself before giving up on it.
_GRACE_SECONDS = 1.0
# How often a caller waiting for events looks whether its client is still there.
_POLL_SECONDS = 0.25


def outcome_of(error: BaseException) -> str:
    """The outcome of work that ended with `error` (matched by type)."""
    if isinstance(error, TooBusy):
        return REJECTED
    if isinstance(error, QueueTimeout):
        return QUEUE_TIMED_OUT
    if isinstance(error, GenerationTimeout):
        return TIMED_OUT
    if isinstance(error, (JobCancelled, GeneratorExit, ClientGone)):
        return CANCELLED
    return FAILED


class Job:
    """One admitted unit of work: its deadlines, the flag that stops it, and its one ending.

    A job is queued until `reserve()` (its sequence got a slot, or its embedding an instance);
    time spent loading a model is work, not queueing, so it pushes the queue deadline back.
    The work reports to its caller through `events` (results, or an exception to raise there).
    """

    def __init__(self, manager: "ConcurrencyManager", label: str, counted: bool,
                 caller: Caller = ANONYMOUS):
        self.label = label
        self.counted = counted
        self.caller = caller
        self.admitted_at = time.monotonic()
        self.queue_deadline = self.admitted_at + manager.queue_timeout
        self.request_timeout = manager.request_timeout
        self.reserved_at: float | None = None
        self.working_since: float | None = None     # a worker (or its caller) took it up
        self.started_at: float | None = None
        self.cancelled = threading.Event()
        self.outcome: str | None = None
        self.events: queue.Queue = queue.Queue()
        self._next_client_check = 0.0
        self._manager = manager
        self._lock = threading.Lock()
        self._handed_off = False

    @property
    def queue_seconds(self) -> float:
        return (self.reserved_at or time.monotonic()) - self.admitted_at

    @property
    def deadline(self) -> float:
        """When the caller stops waiting: the queue deadline, then REQUEST_TIMEOUT after that."""
        if self.reserved_at is None:
            return self.queue_deadline
        return (self.started_at or self.reserved_at) + self.request_timeout

    def loaded(self, seconds: float) -> None:
        """The work spent `seconds` loading a model: not queue time."""
        self.queue_deadline += seconds

    def reserve(self) -> None:
        """End the queue wait; raise QueueTimeout (or JobCancelled) if the job already ended."""
        with self._lock:
            if self.outcome is not None or self.cancelled.is_set():
                raise QueueTimeout("the request stopped waiting before a slot became free")
            if self.reserved_at is None:
                self.reserved_at = time.monotonic()
                self._manager._reserved(self)      # lock order: a job's, then the manager's

    def start(self) -> None:
        """Mark the generation proper as begun (after loading and tokenizing)."""
        self.started_at = time.monotonic()

    def hand_off(self) -> None:
        """The work returns its worker but the job goes on elsewhere (the batched engine),
        which calls `end` when it is over."""
        self._handed_off = True

    def check_waiting(self) -> None:
        """Raise if a queued job must stop waiting: it ended, or its queue deadline passed."""
        if self.outcome is not None or self.cancelled.is_set():
            raise JobCancelled()
        if time.monotonic() > self.queue_deadline:
            raise QueueTimeout("no slot became free within QUEUE_TIMEOUT")

    def check(self) -> None:
        """Raise when running work should stop: GenerationTimeout once REQUEST_TIMEOUT has
        passed since the work began (preparing a prompt is work too), or JobCancelled when the
        job was cancelled or ended."""
        begun = self.started_at or self.working_since
        if begun is not None and time.monotonic() > begun + self.request_timeout:
            raise GenerationTimeout(
                f"generation exceeded REQUEST_TIMEOUT ({self.request_timeout:g} s)")
        if self.cancelled.is_set() or self.outcome is not None:
            raise JobCancelled()

    def cancel(self) -> None:
        """Stop the job (client gone, caller gave up, shutdown). A job not yet running ends now;
        running work ends itself at its next check, within one decode step."""
        self.cancelled.set()
        with self._lock:
            running = self.working_since is not None or self.reserved_at is not None
        if not running:
            self.end(CANCELLED)

    def abandon(self) -> bool:
        """The caller's queue wait ran out: end a job that is still queued (QueueTimeout);
        False when it already holds a slot."""
        with self._lock:
            if self.reserved_at is not None:
                return False
        self.cancelled.set()
        self.end(QUEUE_TIMED_OUT)
        return True

    def next_event(self, client_gone: Callable[[], bool] = lambda: False) -> Any:
        """The work's next event, for its caller; raises the error the work put, a timeout if
        the work is late past its deadline, or GeneratorExit once `client_gone()` (polled while
        waiting: a caller not yet streaming learns that way that its client left)."""
        while True:
            now = time.monotonic()
            if now >= self._next_client_check:
                self._next_client_check = now + _POLL_SECONDS
                if client_gone():
                    self.cancel()
                    raise ClientGone("the client closed its connection")
            wait = self.deadline - now + _GRACE_SECONDS
            try:
                event = self.events.get(timeout=max(0.0, min(wait, _POLL_SECONDS)))
            except queue.Empty:
                if time.monotonic() < self.deadline + _GRACE_SECONDS:
                    continue
                if self.abandon():
                    raise QueueTimeout("no slot became free within QUEUE_TIMEOUT")
                self.end(TIMED_OUT)
                raise GenerationTimeout("generation exceeded REQUEST_TIMEOUT")
            if isinstance(event, BaseException):
                raise event
            return event

    def end(self, outcome: str) -> bool:
        """End the job with `outcome`; the first call wins and returns True."""
        with self._lock:
            if self.outcome is not None:
                return False
            self.outcome = outcome
            self.cancelled.set()
            self._manager._ended(self)
        return True


@dataclass(frozen=True)
class ConcurrencySnapshot:
    max_concurrent_requests: int
    max_workers: int
    queue_timeout: float
    request_timeout: float
    in_flight: int
    active: int  # holding a slot (decoding) or an embedding instance
    queued: int  # admitted, waiting for a worker, a model load or a slot
    queued_by_priority: dict  # the queued ones by their caller's priority (high, normal, low)
    workers_busy: int
    workers_started: int  # threads start on demand, up to MAX_WORKERS
    workers_alive: int
    outcomes: dict
    draining: bool


class ConcurrencyManager:
    """Admits, queues and runs jobs; ends each once and counts how.

    Lock order: a job's lock is never held while this manager's is taken, and nothing here
    waits for a generation.
    """

    def __init__(self, max_concurrent: int, max_workers: int, queue_timeout: float,
                 request_timeout: float, on_outcome: OutcomeSink = lambda label, outcome: None,
                 caller: CallerOf = lambda: ANONYMOUS):
        self.max_concurrent = max_concurrent
        self.max_workers = max_workers
        self.queue_timeout = queue_timeout
        self.request_timeout = request_timeout
        self._on_outcome = on_outcome
        self._caller = caller
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="generate",
                                            initializer=self._register_worker)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._busy = 0
        self._active = 0
        self._workers: list[threading.Thread] = []
        self.queue_wait = SlidingWindow()
        self._counts = dict.fromkeys(OUTCOMES, 0)
        self._recent_seconds: deque[float] = deque(maxlen=50)
        self._draining = False
        self._jobs: set[Job] = set()

    def submit(self, work: Callable[[Job], Any], label: str = "", *,
               within: Job | None = None) -> Job:
        """Admit `work(job)` and queue it on a worker. `within` names the admitted job this is a
        step of (a DeepSeek map step): it takes no admission place and is not counted; its
        request's outcome is.

        :raise TooBusy: MAX_CONCURRENT_REQUESTS jobs are already in flight (HTTP 429).
        :raise ShuttingDown: the server is draining after SIGTERM (HTTP 503).
        """
        job = self._new_job(label, counted=within is None,
                            caller=within.caller if within is not None else None)
        self._executor.submit(self._run, job, work)
        return job

    def admit(self, label: str) -> Job:
        """Admit a job whose caller drives it (a DeepSeek request, whose steps run `within`
        it); the caller ends it.

        :raise TooBusy, ShuttingDown:
        """
        job = self._new_job(label, counted=True)
        job.working_since = job.admitted_at   # it runs on its caller's thread
        return job

    def _new_job(self, label: str, counted: bool, caller: Caller | None = None) -> Job:
        caller = caller or self._caller()
        with self._lock:
            refusal = self._refusal() if counted else None
            if refusal is None:
                job = Job(self, label, counted, caller)
                self._in_flight += counted
                self._jobs.add(job)
        if refusal is not None:
            self._count(label, outcome_of(refusal), True)
            raise refusal
        return job

    def _refusal(self) -> Exception | None:
        """Why a new request cannot be admitted now (lock held), or None."""
        if self._draining:
            return ShuttingDown("the server is shutting down")
        if self._in_flight >= self.max_concurrent:
            return TooBusy(f"{self._in_flight} requests in flight (MAX_CONCURRENT_REQUESTS="
                           f"{self.max_concurrent}); retry shortly",
                           retry_after=self._retry_after())
        return None

    def _register_worker(self) -> None:
        with self._lock:
            self._workers.append(threading.current_thread())

    def _reserved(self, job: Job) -> None:
        """A job got its slot: its queue wait is over and it counts as active."""
        if not job.counted:
            return
        self.queue_wait.add(job.queue_seconds)
        with self._lock:
            self._active += 1

    def _run(self, job: Job, work: Callable[[Job], Any]) -> None:
        with job._lock:
            if job.outcome is not None:
                return                      # it ended while queued for a worker
            job.working_since = time.monotonic()
        with self._lock:
            self._busy += 1
        try:
            work(job)
            if not job._handed_off:
                job.end(SUCCEEDED)
        except BaseException as exc:
            job.end(outcome_of(exc))
        finally:
            with self._lock:
                self._busy -= 1

    def _ended(self, job: Job) -> None:
        with self._idle:
            self._jobs.discard(job)
            if job.counted:
                self._active -= job.reserved_at is not None
                self._in_flight -= 1
            if job.started_at is not None:
                self._recent_seconds.append(time.monotonic() - job.started_at)
            self._idle.notify_all()
        self._count(job.label, job.outcome, job.counted)

    def _count(self, label: str, outcome: str, counted: bool) -> None:
        if not counted:
            return
        with self._lock:
            self._counts[outcome] += 1
        self._on_outcome(label, outcome)

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
                queued=self._in_flight - self._active,
                queued_by_priority=self._queued_by_priority(), workers_busy=self._busy,
                workers_started=len(self._workers),
                workers_alive=sum(worker.is_alive() for worker in self._workers),
                outcomes=dict(self._counts), draining=self._draining)

    def _queued_by_priority(self) -> dict:
        """Counted jobs not yet holding a slot, per priority (lock held; a job's `reserved_at`
        is read without its lock: a job reserving now is counted on one side or the other)."""
        counts = dict.fromkeys(PRIORITIES, 0)
        for job in self._jobs:
            if job.counted and job.reserved_at is None:
                counts[job.caller.priority] += 1
        return counts

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
        """Ask every admitted job to stop (the drain ran out); how many."""
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
