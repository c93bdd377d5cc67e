"""Per-key rate limits: requests per minute and generated tokens per minute."""

from __future__ import annotations

from services.keys import Principal


class RateLimiter:
    """Counts each key's requests and generated tokens in one-minute windows."""

    def __init__(self, storage_uri: str, requests_per_minute: int, tokens_per_minute: int):
        self.storage_uri = storage_uri
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute

    def admit(self, principal: Principal, identity: str) -> dict[str, str]:
        """Count one request of `identity` (the key's name, or the client's address on an open
        server); the X-RateLimit-* headers for its reply.

        :raise RateLimited: over a limit; its `headers` go on the 429 reply.
        """
        return {}

    def charge_tokens(self, principal: Principal, identity: str, tokens: int) -> None:
        """Count `tokens` generated for `identity` against its tokens-per-minute limit."""
