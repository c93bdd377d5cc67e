"""When loaded models unload by themselves: a request's keep-alive deadline (Ollama's
`keep_alive`) or, with MODEL_IDLE_SECONDS, the idle timeout. The pool owns the models and the
lock; this keeps the deadline table and the timer thread that acts on it.

A model's deadline is its explicit one when a request set it (`set`: a time, or FOREVER for
"until evicted"), else, with an idle timeout, the time it was last in use plus the timeout. A new
use (`used`) drops the explicit deadline and restarts the idle clock. A model is never unloaded
while anything of it is in use: the timer looks again every EXPIRY_RECHECK s, and for the idle
timeout counts the time seen in use as use, so a long request's model is not unloaded right
after the request ends but `idle_seconds` later.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable, Iterable

log = logging.getLogger(__name__)

FOREVER = math.inf
# How often a model that is due, or in use under an idle timeout, is looked at again.
EXPIRY_RECHECK = 0.25


class Expiry:
    """The deadlines of one pool. Every method but `stop` runs with the pool's lock held
    (`changed` is that lock's condition); `unload(name, reason)` detaches a model (lock held)
    and returns its instances to close, which `discard(instances)` closes without the lock."""

    def __init__(self, changed: threading.Condition, idle_seconds: float,
                 in_use: Callable[[str], bool], loaded: Callable[[], Iterable[str]],
                 unload: Callable[[str, str], list], discard: Callable[[list], None]):
        self.idle_seconds = idle_seconds
        self._changed = changed
        self._in_use, self._loaded, self._unload, self._discard = in_use, loaded, unload, discard
        self._deadlines: dict[str, float] = {}      # explicit, by model name (time.time())
        self._last_active: dict[str, float] = {}    # for the idle timeout (time.time())
        self._thread: threading.Thread | None = None
        self._closed = False

    def used(self, name: str) -> None:
        """A new use of model `name`: its explicit deadline goes, its idle clock restarts."""
        self._deadlines.pop(name, None)
        self.touch(name)

    def touch(self, name: str) -> None:
        """Model `name` was in use just now (an instance came back, a lease ended)."""
        if self.idle_seconds:
            self._last_active[name] = time.time()
            self._start()

    def set(self, name: str, deadline: float | None) -> list:
        """Model `name` goes once `deadline` has passed and nothing of it is in use; None:
        not before it is evicted (the idle timeout too waits for its next use). A deadline
        already passed unloads it now if idle: the instances to close."""
        self._deadlines[name] = FOREVER if deadline is None else deadline
        if deadline is None:
            return []
        self._start()
        self._changed.notify_all()
        return self.unload_due(time.time())[0]

    def deadline(self, name: str) -> float | None:
        """When model `name` is due to be unloaded (time.time()); None: not before evicted."""
        explicit = self._deadlines.get(name)
        if explicit is not None:
            return None if explicit == FOREVER else explicit
        active = self._last_active.get(name) if self.idle_seconds else None
        return None if active is None else active + self.idle_seconds

    def forget(self, name: str) -> None:
        """Model `name` is gone: no deadline, no idle clock."""
        self._deadlines.pop(name, None)
        self._last_active.pop(name, None)

    def unload_due(self, now: float) -> tuple[list, float | None]:
        """Unload every idle model whose deadline has passed: the instances to close, and how
        long to sleep before looking again (None: until woken)."""
        names = set(self._deadlines)
        if self.idle_seconds:
            names.update(self._loaded())
        closing, waits = [], []
        for name in names:
            wait = self._check(name, now)
            if wait is None:
                continue
            if wait > 0:
                waits.append(wait)
                continue
            reason = "keep_alive" if name in self._deadlines else "idle"
            log.info("unloading %s: %s", name, "its keep-alive deadline passed"
                     if reason == "keep_alive" else f"unused for {self.idle_seconds:g} s")
            closing += self._unload(name, reason)
            self.forget(name)
        return closing, min(waits, default=None)

    def _check(self, name: str, now: float) -> float | None:
        """Seconds until model `name` is looked at again; 0: unload it now; None: no deadline."""
        idle_clock = self.idle_seconds and name not in self._deadlines
        deadline = self.deadline(name)
        if idle_clock and self._in_use(name):
            self._last_active[name] = now     # idle counts from the end of use
            return EXPIRY_RECHECK
        if deadline is None:
            return None
        if deadline > now:
            return deadline - now
        return EXPIRY_RECHECK if self._in_use(name) else 0

    def _start(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="model-expiry", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        """The timer: sleeps until the next deadline (or a change), unloads what is due."""
        while True:
            with self._changed:
                if self._closed:
                    return
                closing, wait = self.unload_due(time.time())
                if not closing:
                    self._changed.wait(wait)
                    continue
            self._discard(closing)

    def stop(self) -> None:
        """Stop the timer (the pool is closing); call without the pool's lock."""
        with self._changed:
            self._closed = True
            self._deadlines.clear()
            self._last_active.clear()
            timer, self._thread = self._thread, None
            self._changed.notify_all()
        if timer is not None and timer is not threading.current_thread():
            timer.join()
