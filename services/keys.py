"""API keys and what they may do: who a request comes from, as a `Principal`.

Keys come from two places: the settings (`API_KEYS` inference keys, `ADMIN_KEYS` admin keys;
for simple setups) and the key store, a SQLite file under DATA_DIR that `flask keys create`
fills. Only a hash of a stored key is kept. When no key exists anywhere the server is open and
every request acts as an admin without a name.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from services.errors import Forbidden, Unauthorized
from services.types import NORMAL, PRIORITIES

INFERENCE, ADMIN = "inference", "admin"
# Each scope with the scopes it covers: an admin key may do whatever an inference key may.
SCOPES = {INFERENCE: {INFERENCE}, ADMIN: {INFERENCE, ADMIN}}


@dataclass(frozen=True)
class Principal:
    """The authenticated sender of a request. `name` is what logs, /stats and /metrics show
    (None on an open server). `priority` is its requests' default, `top_priority` the highest
    an `X-Request-Priority` header may ask for. A limit of None means the server's default."""

    name: str | None
    scope: str
    priority: str = NORMAL
    top_priority: str = PRIORITIES[0]
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    def require(self, scope: str) -> None:
        """:raise Forbidden: this principal's scope does not cover `scope`."""
        if scope not in SCOPES[self.scope]:
            raise Forbidden(f"this route needs a key with the {scope!r} scope; key "
                            f"{self.name!r} has {self.scope!r}")


OPEN = Principal(name=None, scope=ADMIN)


class Authenticator:
    """Turns the `Authorization` header into a Principal: the settings' keys, then the store."""

    def __init__(self, api_keys: tuple[str, ...], admin_keys: tuple[str, ...], store=None):
        self._configured = [(key.encode(), INFERENCE) for key in api_keys] + [
            (key.encode(), ADMIN) for key in admin_keys]
        self.store = store

    @property
    def required(self) -> bool:
        """Whether requests must carry a key: some key exists (set, or stored and not revoked)."""
        return bool(self._configured) or (self.store is not None and self.store.has_keys())

    def authenticate(self, authorization: str | None) -> Principal:
        """The Principal an `Authorization: Bearer <key>` header names (OPEN when no key exists).

        :raise Unauthorized: keys exist and the header carries none of them.
        """
        if not self.required:
            return OPEN
        scheme, _, presented = (authorization or "").partition(" ")
        secret = presented.strip()
        if scheme.lower() == "bearer" and secret:
            principal = self._configured_key(secret.encode())
            if principal is None and self.store is not None:
                principal = self.store.authenticate(secret)
            if principal is not None:
                return principal
        raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'")

    def _configured_key(self, presented: bytes) -> Principal | None:
        """A settings key matching `presented`; every key is compared, in constant time each, so
        the time taken does not tell which one nearly matched."""
        found = None
        for index, (key, scope) in enumerate(self._configured):
            if hmac.compare_digest(presented, key) and found is None:
                found = Principal(name=f"{scope}-key-{index + 1}", scope=scope)
        return found
