"""The key store: API keys made by `flask keys create`, kept hashed in a SQLite file.

The CLI runs in its own process and the server may run as several gunicorn workers, so the file
is the only truth: every request looks its key up there (one indexed read, no cache), and a key
revoked by the CLI is refused on the very next request. Only a SHA-256 digest of each key is
kept: keys are 256-bit random secrets, which no fast hash lets anyone guess back, so a slow
password hash would only cost every request time. The file appears on the first write (a
`flask keys create`); until then the store simply has no keys.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from services.errors import ConfigError, InvalidRequest, KeyStoreUnavailable
from services.keys import SCOPES, Principal
from services.types import NORMAL, PRIORITIES

KEYS_FILE = "keys.sqlite3"
KEY_PREFIX = "llm-"
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Names the settings' keys go by (services/keys.py): a stored key may not pose as one.
RESERVED_NAME = re.compile(r"(inference|admin)-key-\d+")
MAX_LIMIT = 10**9
LAST_USED_EVERY = 60.0            # seconds: last_used is a hint, not a write per request
BUSY_TIMEOUT = 5.0                # seconds a statement waits for another process's write
KEEP = object()                   # set_limits: leave this limit as it is

_COLUMNS = ("name", "scope", "priority", "requests_per_minute", "tokens_per_minute",
            "created", "last_used", "revoked_at")
_SCHEMA = ("""
CREATE TABLE IF NOT EXISTS keys (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    scope TEXT NOT NULL,
    digest BLOB NOT NULL UNIQUE,
    priority TEXT NOT NULL DEFAULT 'normal',
    requests_per_minute INTEGER,
    tokens_per_minute INTEGER,
    created REAL NOT NULL,
    last_used REAL,
    revoked_at REAL
)""", "CREATE UNIQUE INDEX IF NOT EXISTS keys_live_name ON keys (name) WHERE revoked_at IS NULL")


@dataclass(frozen=True)
class KeyRecord:
    """What may be shown about a stored key: never the key or its digest. A limit of None
    means the server's default (RATE_LIMIT_*), 0 means no limit for this key."""

    name: str
    scope: str
    priority: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    created: float
    last_used: float | None
    revoked_at: float | None


def digest_of(secret: str) -> bytes:
    """The SHA-256 of a key, as stored (any string, a header's odd characters included)."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


class KeyStore:
    """Keys in the SQLite file at `path`, created (mode 0600) on the first write.

    One connection per process, used under a lock: a lookup takes microseconds, and a fresh
    connection per thread would be one per request under a threaded server. The connection is
    reopened when the file was replaced or deleted, and in a forked worker.

    :raise ConfigError: the file exists but is not a readable key store.
    """

    def __init__(self, path: Path, clock=time.time):
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._opened: tuple | None = None      # (pid, device, inode) the connection is for
        if self.path.exists():
            self._check()

    def has_keys(self) -> bool:
        """Whether any key was ever stored. Revoked keys count: revoking the last key locks the
        server (every request 401) instead of opening it to everyone."""
        with self._lock:
            conn = self._read()
            return conn is not None and bool(
                self._run(conn, "SELECT EXISTS (SELECT 1 FROM keys)").fetchone()[0])

    def authenticate(self, secret: str) -> Principal | None:
        """The Principal of the live stored key `secret`, or None (unknown or revoked)."""
        digest = digest_of(secret)
        with self._lock:
            conn = self._read()
            if conn is None:
                return None
            row = self._run(conn, "SELECT id, digest, last_used, " + ", ".join(_COLUMNS)
                            + " FROM keys WHERE digest = ?", (digest,)).fetchone()
            if row is None or not hmac.compare_digest(row[1], digest):
                return None
            record = KeyRecord(*row[3:])
            if record.revoked_at is not None:
                return None
            self._touch(conn, row[0], row[2])
        return Principal(name=record.name, scope=record.scope, priority=record.priority,
                         top_priority=record.priority,
                         requests_per_minute=record.requests_per_minute,
                         tokens_per_minute=record.tokens_per_minute)

    def create(self, name: str, scope: str, priority: str = NORMAL,
               requests_per_minute: int | None = None,
               tokens_per_minute: int | None = None) -> tuple[KeyRecord, str]:
        """A new key: its record and the key itself, which is not kept and cannot be shown again.

        :raise InvalidRequest: a bad name, scope, priority or limit, or a live key of that name.
        """
        _check_name(name)
        if scope not in SCOPES:
            raise InvalidRequest(f"scope must be one of {', '.join(SCOPES)}", param="scope")
        if priority not in PRIORITIES:
            raise InvalidRequest(f"priority must be one of {', '.join(PRIORITIES)}",
                                 param="priority")
        for limit in (requests_per_minute, tokens_per_minute):
            _check_limit(limit)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(name, scope, priority, requests_per_minute, tokens_per_minute,
                           self._clock(), None, None)
        with self._lock, self._write() as conn:
            try:
                conn.execute("INSERT INTO keys (digest, " + ", ".join(_COLUMNS) + ") VALUES "
                             "(?, ?, ?, ?, ?, ?, ?, ?, ?)", (digest_of(secret), *_values(record)))
            except sqlite3.IntegrityError:
                raise InvalidRequest(f"a live key named {name!r} exists: revoke it first or "
                                     f"pick another name", param="name") from None
        return record, secret

    def list(self) -> list[KeyRecord]:
        """Every stored key, revoked ones included, oldest first (never a key or a digest)."""
        with self._lock:
            conn = self._read()
            if conn is None:
                return []
            rows = self._run(conn, "SELECT " + ", ".join(_COLUMNS) + " FROM keys ORDER BY id")
            return [KeyRecord(*row) for row in rows.fetchall()]

    def revoke(self, name: str) -> KeyRecord:
        """Revoke the live key `name`: refused from the next request on, in every process.

        :raise InvalidRequest: no live key has that name.
        """
        return self._update(name, "revoked_at = ?", (self._clock(),))

    def set_limits(self, name: str, requests_per_minute=KEEP, tokens_per_minute=KEEP) -> KeyRecord:
        """Set the live key's own limits (None: the server's default; 0: no limit); KEEP leaves
        one as it is.

        :raise InvalidRequest: a bad limit, or no live key has that name.
        """
        changes = {column: value for column, value in (
            ("requests_per_minute", requests_per_minute),
            ("tokens_per_minute", tokens_per_minute)) if value is not KEEP}
        if not changes:
            raise InvalidRequest("give a requests-per-minute or tokens-per-minute limit")
        for value in changes.values():
            _check_limit(value)
        return self._update(name, ", ".join(f"{column} = ?" for column in changes),
                            tuple(changes.values()))

    def close(self) -> None:
        with self._lock:
            self._forget(close=True)

    def _update(self, name: str, assignments: str, values: tuple) -> KeyRecord:
        """Change the live key `name` (never creating the file for an unknown one)."""
        with self._lock:
            conn = self._read()
            if conn is None:
                raise _unknown(name)
            with self._transaction(conn):
                if conn.execute(f"UPDATE keys SET {assignments} WHERE name = ? AND revoked_at "
                                f"IS NULL", (*values, name)).rowcount != 1:
                    raise _unknown(name)
                row = conn.execute("SELECT " + ", ".join(_COLUMNS) + " FROM keys WHERE name = ? "
                                   "ORDER BY revoked_at IS NULL DESC, id DESC LIMIT 1",
                                   (name,)).fetchone()
        return KeyRecord(*row)

    def _touch(self, conn: sqlite3.Connection, key_id: int, last_used: float | None) -> None:
        """Record a use, at most once a LAST_USED_EVERY per key (judged by the file, so several
        workers write no more often than one). A failed write does not fail the request."""
        now = self._clock()
        if last_used is not None and now - last_used < LAST_USED_EVERY:
            return
        try:
            conn.execute("UPDATE keys SET last_used = ? WHERE id = ? AND (last_used IS NULL OR "
                         "last_used <= ?)", (now, key_id, now - LAST_USED_EVERY))
        except sqlite3.Error:
            pass                        # read-only file or a long lock: the hint waits a minute

    def _read(self) -> sqlite3.Connection | None:
        """The connection to the file as it is now, or None while it does not exist (or holds
        no table yet: another process is creating it). Caller holds the lock.

        :raise KeyStoreUnavailable:
        """
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._forget(close=True)
            return None
        except OSError as exc:
            raise _unavailable(exc) from exc
        opened = (os.getpid(), stat.st_dev, stat.st_ino)
        if self._conn is None or self._opened != opened:
            # A connection inherited through fork must not be touched, not even closed.
            self._forget(close=self._opened is not None and self._opened[0] == opened[0])
            try:
                self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT,
                                             isolation_level=None, check_same_thread=False)
            except sqlite3.Error as exc:
                raise _unavailable(exc) from exc
            self._opened = opened
        if not self._run(self._conn, "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE "
                                     "type = 'table' AND name = 'keys')").fetchone()[0]:
            return None
        return self._conn

    def _write(self) -> _Transaction:
        """A write transaction on the file, created with its directory and table if missing.
        Caller holds the lock."""
        self._create_file()
        conn = self._read()
        if conn is None:
            with self._transaction(self._conn) as fresh:
                for statement in _SCHEMA:
                    fresh.execute(statement)
            conn = self._read()
        return self._transaction(conn)

    def _create_file(self) -> None:
        """The empty file, owner-only (the WAL files SQLite adds take its mode), if missing."""
        if self.path.exists():
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return                          # another process made it first
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")   # readers never wait for the CLI
        finally:
            conn.close()

    def _transaction(self, conn: sqlite3.Connection) -> _Transaction:
        return _Transaction(conn)

    def _run(self, conn: sqlite3.Connection, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        """:raise KeyStoreUnavailable: the file cannot be read."""
        try:
            return conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc

    def _forget(self, close: bool) -> None:
        if self._conn is not None and close:
            self._conn.close()
        self._conn, self._opened = None, None

    def _check(self) -> None:
        """At start: refuse a file that is not a key store rather than fail every request.
        Nothing stays open, so a server that forks its workers after this hands them none."""
        try:
            with self._lock:
                conn = self._read()
                if conn is not None:
                    columns = {row[1] for row in conn.execute("PRAGMA table_info(keys)")}
                    if not {"digest", *_COLUMNS} <= columns:
                        raise sqlite3.DatabaseError("its 'keys' table has other columns")
        except (KeyStoreUnavailable, sqlite3.Error) as exc:
            cause = exc.__cause__ or exc
            raise ConfigError(f"{self.path} is not a readable key store ({cause}); move it "
                              f"away or fix its permissions (DATA_DIR holds it)") from None
        finally:
            self._forget(close=True)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one writer at a time across processes.

    :raise KeyStoreUnavailable: the file cannot be written.
    """

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _unavailable(exc) from exc
        return self.conn

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            try:
                self.conn.execute("COMMIT")
                return
            except sqlite3.Error as exc:
                self.conn.execute("ROLLBACK")
                raise _unavailable(exc) from exc
        self.conn.execute("ROLLBACK")
        if isinstance(error, sqlite3.Error) and not isinstance(error, sqlite3.IntegrityError):
            raise _unavailable(error) from error


def _values(record: KeyRecord) -> tuple:
    return tuple(getattr(record, column) for column in _COLUMNS)


def _check_name(name: str) -> None:
    """:raise InvalidRequest: not 1-64 letters, digits, '_', '.', '-', or a settings key's name."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidRequest("a key name is 1-64 letters, digits, '_', '.' or '-'", param="name")
    if RESERVED_NAME.fullmatch(name):
        raise InvalidRequest(f"{name!r} is how keys from API_KEYS/ADMIN_KEYS are named: pick "
                             f"another name", param="name")


def _check_limit(limit) -> None:
    """:raise InvalidRequest: not None and not a whole number from 0 to MAX_LIMIT."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or not 0 <= limit <= MAX_LIMIT):
        raise InvalidRequest(f"a limit is a whole number from 0 (no limit) to {MAX_LIMIT}")


def _unknown(name: str) -> InvalidRequest:
    return InvalidRequest(f"no live key is named {name[:80]!r} (`flask keys list` shows them)",
                          param="name")


def _unavailable(exc: BaseException) -> KeyStoreUnavailable:
    """The error clients see; `exc` (chained to it) names the cause in errors.log."""
    return KeyStoreUnavailable("the server cannot read its key store, so it refuses requests "
                               "until an operator fixes it (errors.log has the cause)")
