"""Loading models before anyone asks: PRELOAD_MODELS at start, and the admin's "load now".

A model is loaded the way a request loads it, its generation engine for the default context
(`ModelPool.lease`), so the first request finds it ready. Preloading runs on a thread of its
own: the server answers at once, and readiness (/api/v1/health) says "starting" until every
listed model is loaded or has failed. A name that is unknown, unusable or fails to load is
logged and reported by readiness ("degraded"); it does not stop the server, which serves its
other models. A model still on trial is waited for.
"""

from __future__ import annotations

import logging
import threading

from models.model_file import ModelFile
from models.model_manager import ModelManager
from services.engine.memory import estimate_load
from services.errors import BackendError, ModelOnTrial, ShuttingDown
from services.model_events import ModelEvents
from services.model_pool import ModelPool

log = logging.getLogger(__name__)

# How often a listed model whose trial has not finished is looked at again.
TRIAL_RECHECK = 1.0


def load_now(pool: ModelPool, model: ModelFile) -> float:
    """Load `model`'s engine as a request would (nothing if it is loaded); seconds it took.

    :raise InsufficientMemory, ModelLoadError, ShuttingDown:
    """
    def cost(cells: int):
        return estimate_load(model.size_bytes, model.kv_bytes_per_token, cells)

    with pool.lease(model.name, model.path, cost) as (_engine, seconds):
        return seconds


class Preloader:
    """Loads `names` on a background thread; `status()` tells readiness how far it got."""

    def __init__(self, names: tuple[str, ...], models: ModelManager, pool: ModelPool,
                 events: ModelEvents):
        self.names = tuple(dict.fromkeys(names))
        self._models, self._pool, self._events = models, pool, events
        self._lock = threading.Lock()
        self._pending = list(self.names)
        self._loaded: list[str] = []
        self._failed: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.names and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="model-preload", daemon=True)
            self._thread.start()

    def status(self) -> dict:
        """{"pending": names not yet done, "loaded": names, "failed": {name: reason}}."""
        with self._lock:
            return {"pending": list(self._pending), "loaded": list(self._loaded),
                    "failed": dict(self._failed)}

    def stop(self) -> None:
        """Load nothing more (call before the pool closes; `join` after it)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        for name in self.names:
            if self._stop.is_set():
                return
            try:
                model = self._resolve(name)
            except BackendError as exc:       # unknown or unusable: never reached the pool
                self._events.publish("failed", name, error=exc.message, preload=True)
                self._done(name, exc.message)
                continue
            if model is None:
                return
            try:
                seconds = load_now(self._pool, model)   # the pool publishes a failed load
                log.info("preloaded %s in %.2f s", model.name, seconds)
                self._done(name)
            except ShuttingDown:
                return
            except BackendError as exc:
                self._done(name, exc.message)
            except Exception as exc:        # noqa: BLE001 - a preload must never kill the thread
                log.exception("preloading %s failed", name)
                self._done(name, repr(exc))

    def _resolve(self, name: str) -> ModelFile | None:
        """The model named, once its trial is over; None if stopped while waiting.

        :raise ModelNotFound, ModelUnusable:
        """
        while not self._stop.is_set():
            try:
                return self._models.resolve(name)
            except ModelOnTrial:
                self._stop.wait(TRIAL_RECHECK)
        return None

    def _done(self, name: str, error: str | None = None) -> None:
        with self._lock:
            self._pending.remove(name)
            if error is None:
                self._loaded.append(name)
            else:
                self._failed[name] = error
        if error is not None:
            log.error("PRELOAD_MODELS: %s was not loaded: %s", name, error)
