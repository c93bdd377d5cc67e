"""Counts of API requests per endpoint and status, and per key, fed by the HTTP layer once per
reply.

Endpoints are route templates (`POST /api/v1/models/<name>`), never raw paths, so the set of
keys (and of Prometheus label values) stays bounded whatever clients send; keys are counted by
their names, which only an operator creates.
"""

from __future__ import annotations

import threading
from collections import Counter

from services.errors import ClientGone, GenerationTimeout, QueueTimeout
from services.types import (CANCELLED, FAILED, OUTCOMES, QUEUE_TIMED_OUT, REJECTED, SUCCEEDED,
                            TIMED_OUT)

# Route of a request that matched no rule (404s for unknown paths): one bucket for all of them.
UNMATCHED = "<unmatched>"
CLIENT_DISCONNECTED = ClientGone.code
# Error codes a reply can carry that name an outcome other than "failed".
_OUTCOME_OF_CODE = {GenerationTimeout.code: TIMED_OUT, QueueTimeout.code: QUEUE_TIMED_OUT,
                    CLIENT_DISCONNECTED: CANCELLED}


def classify(status: int, error_code: str | None) -> str:
    """The outcome of one reply, in the vocabulary of `services.types.OUTCOMES`.

    A stream can fail after its 200 went out, so the error code of its last event counts too.
    """
    if status == 429:
        return REJECTED
    if error_code in _OUTCOME_OF_CODE:
        return _OUTCOME_OF_CODE[error_code]
    if status >= 400 or error_code:
        return FAILED
    return SUCCEEDED


class RequestCounts:
    """Thread-safe counts keyed by (method, route, status), by (method, route, outcome), and by
    key name (requests per outcome and generated tokens)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._statuses: Counter[tuple[str, str, int]] = Counter()
        self._outcomes: Counter[tuple[str, str, str]] = Counter()
        self._keys: dict[str, dict[str, int]] = {}

    def record(self, method: str, route: str | None, status: int, error_code: str | None,
               key: str | None = None, completion_tokens: int = 0) -> str:
        """Count one finished reply (sent with the key named `key`, if any); its outcome."""
        outcome = classify(status, error_code)
        route = route or UNMATCHED
        with self._lock:
            self._statuses[method, route, status] += 1
            self._outcomes[method, route, outcome] += 1
            if key is not None:
                counts = self._keys.setdefault(
                    key, {"total": 0, **dict.fromkeys(OUTCOMES, 0), "completion_tokens": 0})
                counts["total"] += 1
                counts[outcome] += 1
                counts["completion_tokens"] += completion_tokens
        return outcome

    def by_key(self) -> dict[str, dict[str, int]]:
        """{key name: {"total", <outcome>: n..., "completion_tokens"}}, for /stats and /metrics."""
        with self._lock:
            return {key: dict(counts) for key, counts in sorted(self._keys.items())}

    def by_status(self) -> dict[tuple[str, str, int], int]:
        """{(method, route, status): count}, for /metrics."""
        with self._lock:
            return dict(self._statuses)

    def summary(self) -> dict:
        """{"total", <outcome>: n..., "endpoints": {"POST /route": {"total", outcomes, "statuses"}}}."""
        with self._lock:
            statuses, outcomes = dict(self._statuses), dict(self._outcomes)
        endpoints: dict[str, dict] = {}
        for (method, route, outcome), count in sorted(outcomes.items()):
            entry = endpoints.setdefault(f"{method} {route}", _empty())
            entry[outcome] += count
            entry["total"] += count
        for (method, route, status), count in sorted(statuses.items()):
            endpoints[f"{method} {route}"]["statuses"][str(status)] = count
        totals = _empty()
        del totals["statuses"]
        for entry in endpoints.values():
            for key in ("total", *OUTCOMES):
                totals[key] += entry[key]
        return {**totals, "endpoints": dict(sorted(endpoints.items()))}


def _empty() -> dict:
    return {"total": 0, **dict.fromkeys(OUTCOMES, 0), "statuses": {}}
