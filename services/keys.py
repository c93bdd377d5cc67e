"""API keys and what they may do: who a request comes from, as a `Principal`.

Keys come from two places: the settings (`API_KEYS` inference keys, `ADMIN_KEYS` admin keys;
for simple setups) and the key store, a SQLite file under DATA_DIR that `flask keys create`
fills. Only a hash of a stored key is kept. When no key exists anywhere the server is open and
every request acts as an admin without a name; once a key was ever stored, revoking keys never
opens the server again.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from services.errors import Forbidden, Unauthorized
from services.types import NORMAL, PRIORITIES

INFERENCE, ADMIN = "inference", "admin"
# Longer than any key this server hands out or anyone would configure: refused before hashing
# or comparing, so a megabyte header costs nothing.
MAX_KEY_CHARS = 1024
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
        self._configured = [(_encode(key), INFERENCE) for key in api_keys] + [
            (_encode(key), ADMIN) for key in admin_keys]
        self.store = store

    @property
    def required(self) -> bool:
        """Whether requests must carry a key: a key is set, or one was ever stored (revoked
        included, so revoking the last key locks the server rather than opening it)."""
        return bool(self._configured) or (self.store is not None and self.store.has_keys())

    def settings_keys(self) -> list[tuple[str, str]]:
        """(name, scope) of each key from API_KEYS and ADMIN_KEYS, as logs and /stats name them."""
        return [(_settings_name(index, scope), scope)
                for index, (_, scope) in enumerate(self._configured)]

    def authenticate(self, authorization: str | None) -> Principal:
        """The Principal an `Authorization: Bearer <key>` header names (OPEN when no key exists).

        :raise Unauthorized: keys exist and the header carries none of them.
        """
        scheme, _, presented = (authorization or "").partition(" ")
        secret = presented.strip()
        if scheme.lower() == "bearer" and 0 < len(secret) <= MAX_KEY_CHARS:
            principal = self._configured_key(_encode(secret))
            if principal is None and self.store is not None:
                principal = self.store.authenticate(secret)
            if principal is not None:
                return principal
        # Asked only when no key matched: a request with a valid key reads the store once.
        if not self.required:
            return OPEN
        raise Unauthorized("a valid API key is required: send 'Authorization: Bearer <key>'")

    def _configured_key(self, presented: bytes) -> Principal | None:
        """A settings key matching `presented`; every key is compared, in constant time each, so
        the time taken does not tell which one nearly matched."""
        found = None
        for index, (key, scope) in enumerate(self._configured):
            if hmac.compare_digest(presented, key) and found is None:
                found = Principal(name=_settings_name(index, scope), scope=scope)
        return found


def _settings_name(index: int, scope: str) -> str:
    """`inference-key-1`, `admin-key-3`: the 1-based place in API_KEYS followed by ADMIN_KEYS
    (the key store refuses these names, so no stored key can pose as one)."""
    return f"{scope}-key-{index + 1}"


def _encode(key: str) -> bytes:
    """UTF-8 bytes of any string, a header's stray surrogates included (never an error)."""
    return key.encode("utf-8", "surrogatepass")
