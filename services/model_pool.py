"""The loaded models: one batched engine per model for generation, and pooled instances for
work that needs a context of its own (embeddings).

`engine` loads a model once and shares its BatchEngine: every request for that model decodes in
its one context, driven by the engine's thread. `checkout` lends an instance of a variant (an
embedding context) to one caller and takes it back in `finally`, whatever happens; instances are
created lazily, up to MODEL_POOL_SIZE per variant. Names follow Ollama's scheduler: `load`,
`evict`, `loaded_models`.

A model may be given a deadline (`expire_at`: Ollama's keep_alive), and with MODEL_IDLE_SECONDS
one that is not used for that long is unloaded (services/model_expiry.py keeps both). Loads,
failed loads and unloads are published as model events (services/model_events.py).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from services.engine.batch_engine import BatchEngine, EngineSettings
from services.engine.memory import LoadCost
from services.errors import BackendError, ModelLoadError, QueueTimeout, ShuttingDown
from services.model_events import ModelEvents
from services.model_expiry import Expiry
from services.model_loading import Loader, close_instance

log = logging.getLogger(__name__)

# The engine settings for requests of n_ctx tokens (None: N_CTX).
EngineSettingsFor = Callable[["int | None"], EngineSettings]

# Instances of one file loaded differently (with embeddings on, say) are pooled under the
# model's name, this mark and the variant, so evicting the model evicts them too.
VARIANT_MARK = "#"


def variant_name(name: str, variant: str) -> str:
    """The pool name of `name`'s instances loaded as `variant` (e.g. "embedding")."""
    return f"{name}{VARIANT_MARK}{variant}"


def model_of(pool_name: str) -> str:
    """The model file a pool name belongs to (a variant's name without its suffix)."""
    return pool_name.split(VARIANT_MARK, 1)[0]


def close_instances(instances: list) -> None:
    """Close what an unload detached, outside the pool's lock (freeing takes a moment)."""
    for instance in instances:
        close_instance(instance)


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
    n_ctx: int | None = None      # None: the pool's default context size
    kv_tokens: int = 0            # KV cache cells of all its contexts
    slots: int = 0                # an engine's sequence slots (0: pooled instances)
    slots_busy: int = 0


@dataclass(eq=False)
class _Engine:
    """A model's engine while it loads (engine None) and once it serves."""

    path: str
    engine: BatchEngine | None = None
    last_used: float = field(default_factory=time.time)
    load_seconds: float = 0.0
    leases: int = 0                    # requests holding it through lease()

    def in_use(self) -> bool:
        """Loading, decoding, holding queued sequences, or leased to a request still preparing
        its sequence (a deadline must not unload it from under that request)."""
        return self.engine is None or self.leases > 0 or self.engine.busy


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

    def __init__(self, size: int, loader: Loader,
                 memory_check: Callable[[str, int], None] = lambda name, needed: None,
                 admit: Callable[[str], None] = lambda path: None,
                 engine_settings: EngineSettingsFor | None = None, idle_seconds: float = 0.0,
                 events: ModelEvents | None = None):
        """`admit(path)` runs before every load and raises to refuse one: the model registry's
        check that the file passed its trial, so nothing untried is ever opened in-process.
        `idle_seconds` (0: never) unloads a model unused for that long."""
        self.size = size
        self._loader = loader
        self.engine_settings = engine_settings
        self._memory_check = memory_check
        self._admit = admit
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # Pooled instances by variant name; engines by (name, n_ctx): an engine asked for with
        # its own request size (DeepSeek's large contexts) is kept apart from the default one.
        self._slots: dict[str, _Slot] = {}
        self._engines: dict[tuple[str, int | None], _Engine] = {}
        self._closed = False
        self.events = events or ModelEvents()
        # Unload deadlines by model name (keep_alive, idle), and the timer that keeps them.
        self._expiry = Expiry(self._changed, idle_seconds, self._in_use, self._loaded_names,
                              self._unload_expired, close_instances)
        # For /cache/status and /metrics: checkouts served by an idle instance or by a load,
        # and instances unloaded by evict() or a changed file.
        self._counts = {"hits": 0, "misses": 0, "evictions": 0}

    @contextmanager
    def lease(self, name: str, path: str, cost: Callable[[int], LoadCost] | None = None,
              n_ctx: int | None = None) -> Iterator[tuple[BatchEngine, float]]:
        """The engine of `name` (loaded from `path`) for requests of `n_ctx` tokens, loading it
        on first use (other callers wait for that load); and the seconds spent loading or
        waiting for a load. `cost(kv_cells)` is checked against available memory first. The
        caller submits its sequence inside the block: until the block ends the engine counts
        as in use, so no deadline unloads it in between.

        :raise InsufficientMemory, ModelLoadError, ShuttingDown:
        """
        entry, seconds = self._hand_out(name, path, cost, n_ctx)
        try:
            yield entry.engine, seconds
        finally:
            with self._changed:
                entry.leases -= 1
                self._expiry.touch(name)
                self._changed.notify_all()

    def _hand_out(self, name: str, path: str, cost: Callable[[int], LoadCost] | None,
                  n_ctx: int | None) -> tuple[_Engine, float]:
        key, started = (name, n_ctx), time.monotonic()
        with self._changed:
            while True:
                if self._closed:
                    raise ShuttingDown("the model pool is closed")
                entry = self._engines.get(key)
                if entry is not None and entry.path != path:
                    self._retire_engine(key)
                    entry = None
                if entry is None:
                    self._counts["misses"] += 1
                    entry = self._engines[key] = _Engine(path)
                    break
                if entry.engine is not None:
                    self._counts["hits"] += 1
                    self._handed(name, entry)
                    return entry, time.monotonic() - started
                self._changed.wait(0.25)
        self._load_engine(key, entry, cost)
        return entry, time.monotonic() - started

    def _handed(self, name: str, entry: _Engine) -> None:
        """An engine goes to a request (lock held): a new use clears the model's deadline."""
        entry.last_used = time.time()
        entry.leases += 1
        self._expiry.used(name)

    def _load_engine(self, key: tuple[str, int | None], entry: _Engine,
                     cost: Callable[[int], LoadCost] | None) -> None:
        """Load the model and start its engine outside the lock; on failure forget the entry."""
        name, n_ctx = key
        settings = self.engine_settings(n_ctx)
        started = time.monotonic()
        self.events.publish("loading", name, n_ctx=n_ctx)
        try:
            try:
                self._admit(entry.path)
                if cost is not None:
                    self._memory_check(name, cost(settings.kv_cells).first_instance)
                instance = self._loader(entry.path)
            except Exception as exc:
                if isinstance(exc, BackendError):
                    raise
                log.exception("loading %s from %s failed", name, entry.path)
                raise ModelLoadError(f"model {name} could not be loaded") from exc
            try:
                engine = BatchEngine(instance.client, settings, name,
                                     on_exit=lambda: close_instance(instance))
            except BaseException:
                close_instance(instance)
                raise
        except BaseException as exc:
            with self._changed:
                if self._engines.get(key) is entry:
                    del self._engines[key]
                self._changed.notify_all()
            self._failed(name, exc, n_ctx=n_ctx)
            raise
        with self._changed:
            closed = self._closed
            if not closed:
                entry.engine, entry.load_seconds = engine, time.monotonic() - started
                self._handed(name, entry)
            self._changed.notify_all()
        if closed:      # closed while it loaded (a preload at shutdown): not kept
            engine.close()
            raise ShuttingDown("the model pool is closed")
        self.events.publish("loaded", name, n_ctx=n_ctx, load_seconds=round(entry.load_seconds, 3))
        log.info("loaded %s in %.2f s: %d slots, %d KV cells", name, entry.load_seconds,
                 settings.slots, settings.kv_cells)

    def _retire_engine(self, key: tuple[str, int | None]) -> int:
        """Detach an engine (lock held): it takes no new sequences, finishes its running and
        queued ones, then frees its context; 1 if it was idle, so it closes now."""
        entry = self._engines.pop(key, None)
        if entry is None or entry.engine is None:
            return 0
        self._counts["evictions"] += 1
        idle = not entry.engine.busy
        entry.engine.retire()
        return int(idle)

    @contextmanager
    def checkout(self, name: str, path: str, deadline: float,
                 on_reserve: Callable[[], None] = lambda: None,
                 cost: LoadCost | None = None,
                 loader: Loader | None = None) -> Iterator[Any]:
        """Lend an instance of `name` (loaded from `path`) until the block ends.

        `on_reserve` runs (pool lock held; lock order: pool, then the caller's) once an idle
        instance or a free slot is found, before anything is taken; it may raise to refuse.
        `cost` is checked against available memory before a new instance is loaded.
        `loader` loads new instances of a variant `name` instead of the pool's loader.
        :raise QueueTimeout: none became free before `deadline` (time.monotonic).
        :raise InsufficientMemory: a new instance would not fit in memory.
        :raise ModelLoadError: llama.cpp could not load the file.
        """
        slot, instance = self._acquire(name, path, deadline, on_reserve, cost, loader)
        try:
            yield instance
        finally:
            self._release(name, slot, instance)

    def _acquire(self, name: str, path: str, deadline: float, on_reserve: Callable[[], None],
                 cost: LoadCost | None, loader: Loader | None = None) -> tuple[_Slot, Any]:
        with self._changed:
            while True:
                if self._closed:
                    raise ShuttingDown("the model pool is closed")
                slot = self._current_slot(name, path)
                self._expiry.used(model_of(name))
                if slot.idle:
                    on_reserve()
                    self._counts["hits"] += 1
                    instance = slot.idle.pop()
                    slot.busy.append(instance)
                    slot.last_used = time.time()
                    return slot, instance
                if slot.size < self.size:
                    on_reserve()
                    self._counts["misses"] += 1
                    needed = 0 if cost is None else (
                        cost.kv_cache_bytes if slot.size else cost.first_instance)
                    slot.loading += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise QueueTimeout(f"all {self.size} instances of {name} stayed busy")
                self._changed.wait(min(remaining, 0.25))
        return slot, self._load_into(slot, name, path, needed, loader or self._loader)

    def _current_slot(self, name: str, path: str) -> _Slot:
        """The slot serving `name`; a new one when its file path changed (needs reload)."""
        slot = self._slots.get(name)
        if slot is None or slot.path != path:
            for stale in self._retire(name):
                close_instance(stale)
            slot = self._slots[name] = _Slot(path)
        return slot

    def _load_into(self, slot: _Slot, name: str, path: str, needed: int,
                   loader: Loader) -> Any:
        """Load one instance outside the lock (loading takes a while) and hand it out busy."""
        started = time.monotonic()
        model, variant = model_of(name), name.partition(VARIANT_MARK)[2] or None
        self.events.publish("loading", model, variant=variant)
        try:
            self._admit(path)
            self._memory_check(name, needed)
            instance = loader(path)
        except BaseException as exc:
            with self._changed:
                slot.loading -= 1
                self._changed.notify_all()
            self._failed(model, exc, variant=variant)
            if isinstance(exc, BackendError) or not isinstance(exc, Exception):
                raise
            log.exception("loading %s from %s failed", name, path)
            raise ModelLoadError(f"model {name} could not be loaded") from exc
        with self._changed:
            slot.loading -= 1
            slot.busy.append(instance)
            slot.load_seconds = time.monotonic() - started
            slot.last_used = time.time()
        log.info("loaded an instance of %s in %.2f s", name, slot.load_seconds)
        self.events.publish("loaded", model, variant=variant,
                            load_seconds=round(slot.load_seconds, 3))
        return instance

    def _failed(self, model: str, exc: BaseException, **detail) -> None:
        """Publish a failed load (not a load refused because the pool is closing)."""
        if isinstance(exc, Exception) and not isinstance(exc, ShuttingDown):
            error = getattr(exc, "message", None) or f"model {model} could not be loaded"
            self.events.publish("failed", model, error=error, **detail)

    def _release(self, key: str, slot: _Slot, instance: Any) -> None:
        with self._changed:
            slot.busy.remove(instance)
            slot.last_used = time.time()
            self._expiry.touch(model_of(key))
            keep = not self._closed and self._slots.get(key) is slot
            if keep:
                slot.idle.append(instance)
            self._changed.notify_all()
        if not keep:
            close_instance(instance)

    def _retire(self, key: str) -> list:
        """Detach a slot (lock held); its busy instances close when they come back."""
        slot = self._slots.pop(key, None)
        if slot is None:
            return []
        self._counts["evictions"] += slot.size
        idle, slot.idle = slot.idle, []
        return idle

    def evict(self, name: str, n_ctx: int | None = None, reason: str = "evicted") -> int:
        """Unload `name`: its engines (only the one for `n_ctx` requests when given) and, with
        no `n_ctx`, its pooled variants and its deadline; idle ones close now, busy ones when
        they finish (their running and queued sequences end normally); count closed now."""
        with self._changed:
            idle, engines = self._detach(name, n_ctx, reason)
        close_instances(idle)
        return len(idle) + engines

    def _unload_expired(self, name: str, reason: str) -> list:
        return self._detach(name, None, reason)[0]

    def _detach(self, name: str, n_ctx: int | None = None,
                reason: str = "evicted") -> tuple[list, int]:
        """Retire `name`'s engines and variants (lock held): the idle instances to close, and
        the count of engines that close now. Publishes `unloaded` if anything was loaded."""
        if n_ctx is None:
            self._expiry.forget(name)
        loaded = any(key[0] == name and (n_ctx is None or key[1] == n_ctx)
                     for key in self._engines) or (
            n_ctx is None and any(model_of(key) == name for key in self._slots))
        if loaded:
            self.events.publish("unloaded", name, reason=reason, n_ctx=n_ctx)
        variants = [] if n_ctx is not None else [
            key for key in self._slots if model_of(key) == name]
        idle = [instance for key in variants for instance in self._retire(key)]
        engines = sum(self._retire_engine(key) for key in list(self._engines)
                      if key[0] == name and (n_ctx is None or key[1] == n_ctx))
        return idle, engines

    # -- deadlines (keep_alive, idle) ---------------------------------------------------------

    def expire_at(self, name: str, deadline: float | None) -> None:
        """Unload model `name` once `deadline` (time.time()) has passed and nothing of it is
        in use (postponed while it is); None keeps it loaded until evicted (the idle timeout
        included, until its next use). A deadline already passed unloads it now if it is idle.
        Any later use of the model clears the deadline."""
        with self._changed:
            if self._closed:
                return
            idle = self._expiry.set(name, deadline)
            self._changed.notify_all()
        close_instances(idle)

    def expires_at(self, name: str) -> float | None:
        """When model `name` is due to be unloaded (time.time()); None: not before evicted."""
        with self._lock:
            return self._expiry.deadline(name)

    def _loaded_names(self) -> set[str]:
        """Models with an engine or a pooled variant, loading or loaded (lock held)."""
        return {key[0] for key in self._engines} | {model_of(key) for key in self._slots}

    def _in_use(self, name: str) -> bool:
        """Whether anything of model `name` is loading or working (lock held)."""
        return (any(entry.in_use() for key, entry in self._engines.items() if key[0] == name)
                or any(slot.busy or slot.loading for key, slot in self._slots.items()
                       if model_of(key) == name))

    def cache_counts(self) -> dict[str, int]:
        """Hits, misses and evictions since start-up."""
        with self._lock:
            return dict(self._counts)

    def loaded_models(self) -> list[LoadedModel]:
        """Engines (one instance each, with their slots) and pooled variants, by name."""
        with self._lock:
            engines = list(self._engines.items())
            pooled = [LoadedModel(name=name, path=slot.path,
                                  instances=len(slot.idle) + len(slot.busy),
                                  in_use=len(slot.busy), loading=slot.loading,
                                  last_used=slot.last_used, load_seconds=slot.load_seconds,
                                  kv_tokens=self._instance_n_ctx() * slot.size)
                      for name, slot in self._slots.items()]
        return sorted([self._describe_engine(name, n_ctx, entry)
                       for (name, n_ctx), entry in engines] + pooled,
                      key=lambda model: (model.name, model.n_ctx or 0))

    def _instance_n_ctx(self) -> int:
        """The context of a pooled instance (an embedding context is N_CTX long)."""
        return self.engine_settings(None).n_ctx if self.engine_settings else 0

    @staticmethod
    def _describe_engine(name: str, n_ctx: int | None, entry: _Engine) -> LoadedModel:
        if entry.engine is None:
            return LoadedModel(name=name, path=entry.path, instances=0, in_use=0, loading=1,
                               last_used=entry.last_used, load_seconds=0.0, n_ctx=n_ctx)
        state = entry.engine.snapshot()
        return LoadedModel(name=name, path=entry.path, instances=1,
                           in_use=int(state.slots_busy > 0), loading=0,
                           last_used=entry.last_used, load_seconds=entry.load_seconds,
                           n_ctx=n_ctx, kv_tokens=state.kv_cells, slots=state.slots_total,
                           slots_busy=state.slots_busy)

    def engines(self) -> list[tuple[str, int | None, BatchEngine]]:
        """The loaded engines, for /stats/concurrency and /metrics."""
        with self._lock:
            return [(name, n_ctx, entry.engine) for (name, n_ctx), entry in
                    sorted(self._engines.items(), key=lambda item: (item[0][0], item[0][1] or 0))
                    if entry.engine is not None]

    def close(self) -> None:
        """Stop every engine (its sequences end with ShuttingDown), close every idle instance
        now and every busy one as it is released."""
        with self._changed:
            self._closed = True
            keys = list(self._slots)
            idle = [instance for key in keys for instance in self._retire(key)]
            engines = [entry.engine for entry in self._engines.values() if entry.engine]
            self._engines.clear()
            self._changed.notify_all()
        self._expiry.stop()
        for engine in engines:
            engine.close()
        for instance in idle:
            close_instance(instance)
