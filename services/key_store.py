"""The key store: API keys made by `flask keys create`, kept hashed in a SQLite file."""

from __future__ import annotations

from pathlib import Path

from services.keys import Principal

KEYS_FILE = "keys.sqlite3"


class KeyStore:
    """Keys in the SQLite file at `path`, created on first use."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def has_keys(self) -> bool:
        """Whether any key that is not revoked exists."""
        return False

    def authenticate(self, secret: str) -> Principal | None:
        """The Principal of the stored key `secret`, or None."""
        return None
