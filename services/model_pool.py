"""Per-model pools of llama.cpp instances with exclusive checkout.

One llama.cpp context is never used by two threads at once: `checkout` hands an instance to one
caller and takes it back in `finally`, whatever happens to the generation. Instances are created
lazily, up to MODEL_POOL_SIZE per model, and named after Ollama's scheduler: `load`, `evict`,
`loaded_models`.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from services.errors import ModelLoadError, QueueTimeout, ShuttingDown

log = logging.getLogger(__name__)

Loader = Callable[[str], Any]


@dataclass(frozen=True)
class InstanceSettings:
    """What every pooled llama.cpp instance is built with."""

    n_ctx: int
    n_batch: int
    n_threads: int
    n_gpu_layers: int


def llamacpp_loader(settings: InstanceSettings) -> Loader:
    """The real loader: a LangChain `LlamaCpp` whose `.client` is the `llama_cpp.Llama`."""

    def load(path: str) -> Any:
        from langchain_community.llms import LlamaCpp

        return LlamaCpp(model_path=path, n_ctx=settings.n_ctx, n_batch=settings.n_batch,
                        n_threads=settings.n_threads, n_gpu_layers=settings.n_gpu_layers,
                        model_kwargs={"n_threads_batch": settings.n_threads}, verbose=False)

    return load


def close_instance(instance: Any) -> None:
    """Free an instance's llama.cpp model and context now rather than at garbage collection."""
    client = getattr(instance, "client", None)
    if client is not None and hasattr(client, "close"):
        client.close()


@dataclass(frozen=True)
class LoadedModel:
    """A snapshot of one model's instances, for /stats and /cache/status."""

    name: str
    path: str
    instances: int
    in_use: int
    loading: int
    last_used: float
    load_seconds: float


@dataclass(eq=False)
class _Slot:
    path: str
    idle: list = field(default_factory=list)
    busy: list = field(default_factory=list)
    loading: int = 0
    last_used: float = field(default_factory=time.time)
    load_seconds: float = 0.0

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy) + self.loading


class ModelPool:
    """Holds up to `size` instances per model and lends each to one caller at a time."""

    def __init__(self, size: int, loader: Loader):
        self.size = size
        self._loader = loader
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._slots: dict[str, _Slot] = {}
        self._closed = False

    @contextmanager
    def checkout(self, name: str, path: str, deadline: float,
                 on_reserve: Callable[[], None] = lambda: None) -> Iterator[Any]:
        """Lend an instance of `name` (loaded from `path`) until the block ends.

        `on_reserve` runs (pool lock held; lock order: pool, then the caller's) once an idle
        instance or a free slot is found, before anything is taken; it may raise to refuse.
        :raise QueueTimeout: none became free before `deadline` (time.monotonic).
        :raise ModelLoadError: llama.cpp could not load the file.
        """
        slot, instance = self._acquire(name, path, deadline, on_reserve)
        try:
            yield instance
        finally:
            self._release(name, slot, instance)

    def _acquire(self, name: str, path: str, deadline: float,
                 on_reserve: Callable[[], None]) -> tuple[_Slot, Any]:
        with self._changed:
            while True:
                if self._closed:
                    raise ShuttingDown("the model pool is closed")
                slot = self._current_slot(name, path)
                if slot.idle:
                    on_reserve()
                    instance = slot.idle.pop()
                    slot.busy.append(instance)
                    slot.last_used = time.time()
                    return slot, instance
                if slot.size < self.size:
                    on_reserve()
                    slot.loading += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueTimeout(f"all {self.size} instances of {name} stayed busy")
                self._changed.wait(min(remaining, 0.25))
        return slot, self._load_into(slot, name, path)

    def _current_slot(self, name: str, path: str) -> _Slot:
        """The slot serving `name`; a new one when its file path changed (needs reload)."""
        slot = self._slots.get(name)
        if slot is None or slot.path != path:
            for stale in self._retire(name):
                close_instance(stale)
            slot = self._slots[name] = _Slot(path)
        return slot

    def _load_into(self, slot: _Slot, name: str, path: str) -> Any:
        """Load one instance outside the lock (loading takes a while) and hand it out busy."""
        started = time.monotonic()
        try:
            instance = self._loader(path)
        except Exception as exc:
            with self._changed:
                slot.loading -= 1
                self._changed.notify_all()
            log.exception("loading %s from %s failed", name, path)
            raise ModelLoadError(f"model {name} could not be loaded") from exc
        with self._changed:
            slot.loading -= 1
            slot.busy.append(instance)
            slot.load_seconds = time.monotonic() - started
            slot.last_used = time.time()
        log.info("loaded an instance of %s in %.2f s", name, slot.load_seconds)
        return instance

    def _release(self, name: str, slot: _Slot, instance: Any) -> None:
        with self._changed:
            slot.busy.remove(instance)
            slot.last_used = time.time()
            keep = not self._closed and self._slots.get(name) is slot
            if keep:
                slot.idle.append(instance)
            self._changed.notify_all()
        if not keep:
            close_instance(instance)

    def _retire(self, name: str) -> list:
        """Detach `name`'s slot (lock held); its busy instances close when they come back."""
        slot = self._slots.pop(name, None)
        if slot is None:
            return []
        idle, slot.idle = slot.idle, []
        return idle

    def evict(self, name: str) -> int:
        """Unload `name`: close idle instances now, busy ones when released; count closed now."""
        with self._changed:
            idle = self._retire(name)
        for instance in idle:
            close_instance(instance)
        return len(idle)

    def loaded_models(self) -> list[LoadedModel]:
        with self._lock:
            return [LoadedModel(name=name, path=slot.path, instances=len(slot.idle) + len(slot.busy),
                                in_use=len(slot.busy), loading=slot.loading,
                                last_used=slot.last_used, load_seconds=slot.load_seconds)
                    for name, slot in sorted(self._slots.items())]

    def close(self) -> None:
        """Close every idle instance now and every busy one as it is released."""
        with self._changed:
            self._closed = True
            names = list(self._slots)
            idle = [instance for name in names for instance in self._retire(name)]
        for instance in idle:
            close_instance(instance)
