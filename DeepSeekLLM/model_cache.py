"""The DeepSeek model cache: an LRU of models in use, each with its tokenizer and instances.

Planning a request needs exact token counts before any instance is checked out, so each cached
model keeps its own tokenizer (the vocabulary alone, a fraction of a second and a few tens of MB
to load) and its chat layout. Its llama.cpp instances live in the shared ModelPool under
(name, n_ctx); evicting a model closes those instances.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import llama_cpp

from DeepSeekLLM.services import ChatLayout
from models.model_file import ModelFile
from services.engine.chat_template import ChatTemplates
from services.errors import BackendError, ModelLoadError
from services.engine.memory import estimate_load
from services.model_loading import load_quietly
from services.model_pool import LoadedModel, ModelPool

log = logging.getLogger(__name__)

_MARK = "\x00MESSAGE\x00"
# For models without a chat template: the message as is, then a cue to answer.
_PLAIN_CUE = "\n\nAnswer:"


class ModelTokenizer:
    """A model's own tokenizer and chat layout, from a vocabulary-only llama.cpp load."""

    def __init__(self, path: str, templates: ChatTemplates | None = None):
        def load() -> llama_cpp.Llama:
            llm = llama_cpp.Llama(model_path=path, vocab_only=True, n_ctx=32, n_batch=32,
                                  verbose=True)
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
            return llm

        try:
            self._llm = load_quietly(load)
        except Exception as exc:
            raise ModelLoadError(f"the tokenizer of {path} could not be loaded") from exc
        self._llm.verbose = False
        self._lock = threading.Lock()
        self.layout = self._chat_layout(templates)

    def tokenize(self, text: str) -> list[int]:
        """The ids of user text: no BOS, and special-token names stay plain text."""
        with self._lock:
            return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, ids: list[int]) -> str:
        with self._lock:
            return self._llm.detokenize(ids).decode("utf-8", errors="replace")

    def close(self) -> None:
        self._llm.close()

    def _chat_layout(self, templates: ChatTemplates | None) -> ChatLayout:
        """The template's user turn split around the message; a plain layout without one."""
        llm = self._llm
        bos = llm.tokenize(b"", add_bos=True, special=False)  # [BOS] when the model wants one
        split = split_template(llm.metadata.get("tokenizer.chat_template"),
                               llm.detokenize([llm.token_bos()], special=True).decode(),
                               llm.detokenize([llm.token_eos()], special=True).decode(),
                               templates)
        if split is None:
            return ChatLayout(tuple(bos), tuple(self.tokenize(_PLAIN_CUE)))
        before, after = split
        before_ids = llm.tokenize(before.encode(), add_bos=False, special=True)
        if bos and before_ids[:1] != bos:
            before_ids = bos + before_ids
        return ChatLayout(tuple(before_ids),
                          tuple(llm.tokenize(after.encode(), add_bos=False, special=True)),
                          thinking=after.rstrip().endswith("<think>"))


def split_template(template: str | None, bos: str, eos: str,
                   templates: ChatTemplates | None = None) -> tuple[str, str] | None:
    """The text of a chat template's user turn before and after the message, rendered in the
    bounded sandbox (ChatTemplates); None without a template or if it cannot render one."""
    if not template:
        return None
    try:
        rendered = (templates or ChatTemplates()).render(
            template, [{"role": "user", "content": _MARK}], bos, eos)
    except BackendError:
        log.warning("a chat template failed to render; using a plain layout", exc_info=True)
        return None
    before, mark, after = rendered.partition(_MARK)
    if not mark or _MARK in after:
        return None
    return before, after


@dataclass(eq=False)
class CachedModel:
    model: ModelFile
    tokenizer: ModelTokenizer
    contexts: set[int] = field(default_factory=set)    # n_ctx values it has pool instances at
    users: int = 0
    last_used: float = field(default_factory=time.time)
    retired: bool = False      # evicted while in use: the tokenizer closes with the last user


class ModelCache:
    """Thread-safe LRU of DeepSeek models, at most `capacity` of them not in use by a request.

    A model no request uses is idle. Bringing in one model too many evicts the least recently
    used idle one; while every cached model is in use the cache holds one more and trims as soon
    as a request lets go, rather than pulling a model out from under a running request.
    Lock order: the cache's lock, then the pool's (eviction calls the pool after letting go).
    """

    name = "deepseek"

    def __init__(self, capacity: int, pool: ModelPool,
                 load: Callable[[str], ModelTokenizer] = ModelTokenizer):
        self.capacity = capacity
        self._pool = pool
        self._load = load
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, CachedModel] = OrderedDict()
        self._counts = {"hits": 0, "misses": 0, "evictions": 0}

    @contextmanager
    def use(self, model: ModelFile) -> Iterator[CachedModel]:
        """Hold `model` in the cache (loading its tokenizer on a miss) until the block ends.

        :raise ModelLoadError: the tokenizer could not be loaded.
        """
        entry = self._acquire(model)
        try:
            yield entry
        finally:
            self._release(entry)

    def add_context(self, entry: CachedModel, n_ctx: int) -> None:
        """Remember that `entry` has pool instances at `n_ctx`, to close them on eviction."""
        with self._lock:
            entry.contexts.add(n_ctx)

    def evict(self, name: str) -> bool:
        """Drop a model (its file was removed or replaced); False if it was not cached."""
        with self._lock:
            entry = self._entries.pop(name, None)
            if entry is not None:
                self._counts["evictions"] += 1
        if entry is not None:
            self._unload(entry)
        return entry is not None

    def cache_status(self) -> dict:
        """For /cache/status: capacity, hits / misses / evictions, and the cached models in LRU
        order (least recently used first) with their instances and estimated memory."""
        with self._lock:
            counts, entries = dict(self._counts), list(self._entries.values())
            users = {id(entry): entry.users for entry in entries}
        loaded = self._pool.loaded_models()
        return {"name": self.name, "capacity": self.capacity, **counts,
                "lru_order": [entry.model.name for entry in entries],
                "models": [self._describe(entry, users[id(entry)], loaded) for entry in entries]}

    @staticmethod
    def _describe(entry: CachedModel, users: int, loaded: list[LoadedModel]) -> dict:
        mine = [m for m in loaded if m.name == entry.model.name and m.n_ctx in entry.contexts]
        instances = sum(m.instances for m in mine)
        kv = estimate_load(entry.model.size_bytes, entry.model.kv_bytes_per_token,
                           sum(m.kv_tokens for m in mine)).kv_cache_bytes
        return {"name": entry.model.name, "instances": instances,
                "idle": instances - sum(m.in_use for m in mine),
                "in_use": sum(m.in_use for m in mine), "requests": users,
                "contexts": sorted(entry.contexts),
                "memory": {"bytes": (entry.model.size_bytes if instances else 0) + kv,
                           "source": "estimate"}}

    def close(self) -> None:
        with self._lock:
            entries, self._entries = list(self._entries.values()), OrderedDict()
        for entry in entries:
            entry.retired = True
            if not entry.users:
                entry.tokenizer.close()

    def _acquire(self, model: ModelFile) -> CachedModel:
        with self._lock:
            entry = self._entries.get(model.name)
            if entry is not None and _same_file(entry.model, model):
                self._counts["hits"] += 1
                return self._touch(entry)
        tokenizer = self._load(model.path)      # outside the lock: other models stay usable
        with self._lock:
            self._counts["misses"] += 1
            entry = self._entries.get(model.name)
            if entry is not None and _same_file(entry.model, model):
                loser, entry = tokenizer, self._touch(entry)    # another request loaded it first
            else:
                loser = self._entries.pop(model.name, None)
                entry = self._entries[model.name] = CachedModel(model, tokenizer)
                self._touch(entry)
            victims = self._over_capacity()
        if isinstance(loser, ModelTokenizer):
            loser.close()
        elif loser is not None:
            self._unload(loser)
        for victim in victims:
            self._unload(victim)
        return entry

    def _touch(self, entry: CachedModel) -> CachedModel:
        entry.users += 1
        entry.last_used = time.time()
        self._entries.move_to_end(entry.model.name)
        return entry

    def _release(self, entry: CachedModel) -> None:
        with self._lock:
            entry.users -= 1
            victims = self._over_capacity()
            close_now = entry.retired and not entry.users
        if close_now:
            entry.tokenizer.close()
        for victim in victims:
            self._unload(victim)

    def _over_capacity(self) -> list[CachedModel]:
        """Take least recently used idle models out until within capacity (lock held)."""
        victims = []
        for name in list(self._entries):
            if len(self._entries) <= self.capacity:
                break
            if not self._entries[name].users:
                victims.append(self._entries.pop(name))
                self._counts["evictions"] += 1
        return victims

    def _unload(self, entry: CachedModel) -> None:
        """Close an evicted model's pool instances now, its tokenizer once no request uses it."""
        for n_ctx in sorted(entry.contexts):
            self._pool.evict(entry.model.name, n_ctx)
        with self._lock:
            entry.retired = True
            close_now = not entry.users
        if close_now:
            entry.tokenizer.close()
        log.info("evicted DeepSeek model %s (contexts %s)", entry.model.name,
                 sorted(entry.contexts))


def _same_file(a: ModelFile, b: ModelFile) -> bool:
    return (a.path, a.size_bytes, a.mtime_ns) == (b.path, b.size_bytes, b.mtime_ns)
