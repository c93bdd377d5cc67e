"""The response cache: a repeated deterministic request answered without generating.

A request is deterministic when it samples greedily (temperature 0) or with a seed: the same
model file (by sha256), the same prompt tokens and the same sampling settings give the same
reply, so the reply of the first is kept (LRU, RESPONSE_CACHE_SIZE entries) and replayed to
the next. A changed model file has another sha256, so its requests miss.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

from services.types import Finished, SamplingParams, Token


@dataclass(frozen=True)
class CachedReply:
    """What a generation produced: its token events, in order, and its Finished event."""

    tokens: tuple[Token, ...]
    finished: Finished


def deterministic(sampling: SamplingParams) -> bool:
    """Whether the same input gives the same output: greedy sampling, or a seed."""
    return sampling.temperature == 0 or sampling.seed is not None


class ResponseCache:
    """An LRU of CachedReply by key; `size` 0 keeps nothing (and counts nothing)."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[Hashable, CachedReply] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def get(self, key: Hashable) -> CachedReply | None:
        """The reply stored under `key` (now the most recently used), counting a hit or a miss."""
        with self._lock:
            reply = self._entries.get(key)
            if reply is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return reply

    def put(self, key: Hashable, reply: CachedReply) -> None:
        """Keep `reply`, dropping the least recently used beyond `size`."""
        if not self.enabled:
            return
        with self._lock:
            self._entries[key] = reply
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def status(self) -> dict:
        """For /cache/status and /metrics."""
        with self._lock:
            return {"size": self.size, "entries": len(self._entries), "hits": self._hits,
                    "misses": self._misses}
