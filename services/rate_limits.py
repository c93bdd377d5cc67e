"""Per-key rate limits: requests per minute and generated tokens per minute.

Counting is done by the `limits` library, the one Flask-Limiter is built on, with the same
storages (`memory://` for one process, `redis://` shared by several replicas). Flask-Limiter
itself does not fit: it charges a request's cost when the request arrives, while the tokens a
reply generates are known only once a streamed reply has ended (the access-log hook in
api/middleware.py calls `charge_tokens` then).

Fixed windows (limits' FixedWindowRateLimiter): a key's window opens at its first counted
request (or token) and lasts `window_seconds` (60). They cost one INCR per hit on Redis and are
the one strategy that records a charge beyond the limit, which a finished reply's tokens need.
Their known cost: a key may spend up to twice its limit across a window boundary.

The tokens limit refuses new requests once the window's budget is used up; a reply already
running is never cut, so a key overshoots by what its running replies generate.

Headers, on a limited key's replies (200 or 429): `X-RateLimit-Limit`, `-Remaining` and
`-Reset` describe the requests limit (or the tokens limit when it is the only one), and
`X-RateLimit-Limit-Tokens`, `-Remaining-Tokens`, `-Reset-Tokens` the tokens limit. A reset is
the Unix time (whole seconds, rounded up) at which that budget is full again, as Flask-Limiter
and GitHub send it; a 429 also carries `Retry-After` in seconds (api/errors.py sets it).

A storage that fails at request time (Redis down) fails open: requests pass without limits and
errors.log gets one line per outage; the storage is tried again after `retry_storage_after`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable, TypeVar
from urllib.parse import quote

from limits import RateLimitItemPerSecond
from limits.errors import ConfigurationError, StorageError
from limits.storage import Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter

from services.errors import ConfigError, RateLimited
from services.keys import Principal
from utils.redact import mask_uri

SETTING = "RATE_LIMIT_STORAGE_URI"
# Unless the URI sets its own (?socket_timeout=...): a Redis that stops answering costs a
# request about this long, not the operating system's TCP timeout of minutes.
_REDIS_SCHEMES = {"redis", "rediss", "redis+unix"}
_REDIS_TIMEOUTS = {"socket_connect_timeout": 1.0, "socket_timeout": 1.0}
T = TypeVar("T")


def open_storage(uri: str) -> Storage:
    """The counters' storage for RATE_LIMIT_STORAGE_URI. Nothing is connected yet (Redis is
    reached at the first request), so this also serves to check the setting.

    :raise ConfigError: an unknown or asynchronous scheme, a malformed URI, or a storage whose
        client package is not installed (memcached://, mongodb://).
    """
    scheme = uri.partition("://")[0].lower()
    options = dict(_REDIS_TIMEOUTS) if scheme in _REDIS_SCHEMES else {}
    try:
        storage = storage_from_string(uri, wrap_exceptions=True, **options)
    except (ConfigurationError, ValueError, TypeError) as exc:
        reason = str(exc).replace(uri, mask_uri(uri))
        raise ConfigError(f"{SETTING}={mask_uri(uri)!r} is invalid: {reason}; expected "
                          "memory:// or redis://[:password@]host:port/db") from exc
    if not isinstance(storage, Storage):
        raise ConfigError(f"{SETTING}={mask_uri(uri)!r} is invalid: asynchronous storages "
                          "are not supported; expected memory:// or redis://host:port/db")
    return storage


class RateLimiter:
    """Counts each identity's requests and generated tokens in fixed windows of
    `window_seconds` (a minute; tests pass a few seconds). A limit of 0 is off."""

    def __init__(self, storage_uri: str, requests_per_minute: int, tokens_per_minute: int, *,
                 window_seconds: int = 60, retry_storage_after: float = 5.0,
                 errors_log: logging.Logger | None = None):
        if int(window_seconds) < 1:
            raise ValueError("window_seconds must be a whole number >= 1")
        self.storage_uri = mask_uri(storage_uri)
        self.storage = open_storage(storage_uri)
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.window_seconds = int(window_seconds)
        self.retry_storage_after = retry_storage_after
        self.errors_log = errors_log or logging.getLogger(__name__)
        self._counter = FixedWindowRateLimiter(self.storage)
        self._lock = threading.Lock()
        self._down = False
        self._retry_at = 0.0

    def limits_for(self, principal: Principal) -> tuple[int, int]:
        """(requests, tokens) per window for `principal`: a key's own limits where set (None is
        the server's default; 0 exempts the key), else RATE_LIMIT_*_PER_MINUTE."""
        requests, tokens = principal.requests_per_minute, principal.tokens_per_minute
        return (self.requests_per_minute if requests is None else requests,
                self.tokens_per_minute if tokens is None else tokens)

    def admit(self, principal: Principal, identity: str) -> dict[str, str]:
        """Count one request of `identity` (the key's name, or the client's address on an open
        server); the X-RateLimit-* headers for its reply.

        :raise RateLimited: over a limit; its `headers` go on the 429 reply.
        """
        requests, tokens = self.limits_for(principal)
        if not (requests or tokens):
            return {}
        who = f"key {principal.name!r}" if principal.name else "this client"
        return self._guarded(lambda: self._count_request(who, quote(identity, safe=":"),
                                                         requests, tokens)) or {}

    def charge_tokens(self, principal: Principal, identity: str, tokens: int) -> None:
        """Count `tokens` generated for `identity` against its tokens-per-minute limit; all of
        them, even past the limit (the reply is already out)."""
        limit = self.limits_for(principal)[1]
        if limit and tokens > 0:
            item = self._item("tokens", limit)
            self._guarded(lambda: self._counter.hit(item, quote(identity, safe=":"), cost=tokens))

    def _count_request(self, who: str, identity: str, requests: int,
                       tokens: int) -> dict[str, str]:
        """The headers for one more request. A request over the requests limit counts too
        (a fixed window does not move, so that does not delay the reset)."""
        now, headers, refusal = time.time(), {}, None
        if tokens:
            item = self._item("tokens", tokens)
            spent = self._counter.get_window_stats(item, identity)
            headers.update(_headers(tokens, spent.remaining, spent.reset_time, "-Tokens"))
            if spent.remaining <= 0:
                refusal = (f"{who} used its {tokens} generated tokens per {self.window_seconds}"
                           " s", spent.reset_time)
        if requests:
            item = self._item("requests", requests)
            # Not counted when the tokens limit refuses it already.
            over = refusal is None and not self._counter.hit(item, identity)
            counted = self._counter.get_window_stats(item, identity)
            headers.update(_headers(requests, counted.remaining, counted.reset_time))
            if over:
                refusal = (f"{who} sent its {requests} requests per {self.window_seconds} s",
                           counted.reset_time)
        else:
            headers.update(_headers(tokens, spent.remaining, spent.reset_time))
        if refusal:
            message, reset = refusal
            wait = max(1, math.ceil(reset - now))
            raise RateLimited(f"rate limit reached: {message}; retry in {wait} s", wait, headers)
        return headers

    def _item(self, namespace: str, amount: int) -> RateLimitItemPerSecond:
        return RateLimitItemPerSecond(amount, self.window_seconds, namespace=namespace)

    def _guarded(self, action: Callable[[], T]) -> T | None:
        """`action()` against the storage, or None while the storage fails (fail open): one
        errors.log line when it fails, one when it answers again."""
        if self._down and time.monotonic() < self._retry_at:
            return None
        try:
            result = action()
        except StorageError as exc:
            with self._lock:
                if not self._down:
                    self._log(logging.ERROR, "rate-limit storage failed: requests pass without "
                              "limits until it answers again", repr(exc.storage_error))
                self._down, self._retry_at = True, time.monotonic() + self.retry_storage_after
            return None
        if self._down:
            with self._lock:
                if self._down:
                    self._down = False
                    self._log(logging.WARNING, "rate-limit storage answers again: limits apply")
        return result

    def _log(self, level: int, message: str, error: str | None = None) -> None:
        fields = {"message": message, "storage": self.storage_uri}
        if error:
            fields["error"] = error
        self.errors_log.log(level, message, extra={"fields": fields})


def _headers(limit: int, remaining: int, reset: float, suffix: str = "") -> dict[str, str]:
    return {f"X-RateLimit-Limit{suffix}": str(limit),
            f"X-RateLimit-Remaining{suffix}": str(max(0, remaining)),
            f"X-RateLimit-Reset{suffix}": str(math.ceil(max(reset, time.time())))}
