"""The response cache: a repeated deterministic request answered without generating.

A request is deterministic when it samples greedily (temperature 0) or with a seed: the same
model file (by sha256), the same prompt tokens and the same sampling settings give the same
reply, so the reply of the first is kept (LRU, RESPONSE_CACHE_SIZE entries) and replayed to
the next. A changed model file has another sha256, so its requests miss.

The key is (model sha256, the engine's n_ctx, a SHA-256 of the prompt token ids and the
SamplingParams): the prompt as the model sees it, after the chat template, and every sampling
setting, stops and grammar included (n_ctx bounds a reply without max_tokens). Only complete replies are kept (finish
reason stop, length or tool_calls), never an error or a cancelled one. Requests for logprobs
or prompt logprobs are kept too: the recorded events carry them.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Sequence

from services.types import Finished, SamplingParams, Token


@dataclass(frozen=True)
class CachedReply:
    """What a generation produced: its token events, in order, and its Finished event."""

    tokens: tuple[Token, ...]
    finished: Finished


def deterministic(sampling: SamplingParams) -> bool:
    """Whether the same input gives the same output: greedy sampling, or a seed."""
    return sampling.temperature <= 0 or sampling.seed is not None


# The finish reasons of a complete reply, the only ones kept.
COMPLETE = frozenset({"stop", "length", "tool_calls"})


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

    def key(self, sha256: str | None, n_ctx: int, tokens: Sequence[int],
            sampling: SamplingParams) -> Hashable | None:
        """The key of a generation, or None when it is not to be cached: the cache is off, the
        sampling is not deterministic, or the model file's sha256 is not known yet."""
        if not self.enabled or sha256 is None or not deterministic(sampling):
            return None
        # A digest rather than the tokens themselves: an entry then costs its reply, not a
        # context's worth of prompt ids.
        prompt = hashlib.sha256(array("q", tokens).tobytes() + repr(sampling).encode()).digest()
        return sha256, n_ctx, prompt

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
        """Keep `reply` if it is complete, dropping the least recently used beyond `size`."""
        if not self.enabled or reply.finished.finish_reason not in COMPLETE:
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
