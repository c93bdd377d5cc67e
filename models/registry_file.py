"""models_list.json on disk: atomic writes, the setup's default-model mark, the lock files that
serialise registry writes and trials across the processes sharing a directory, and file hashing.

The locks are files of their own, never renamed nor removed (models_list.json itself is replaced
by each write, so a lock on it would be a lock on a file already gone). flock on NFS is a whole
file fcntl lock on Linux, which needs a descriptor opened for writing, hence O_RDWR. Each holder
opens its own descriptor: two holders in one process conflict like two processes do.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from models.uploads import disk_full, is_disk_full, locked_temp_file

log = logging.getLogger(__name__)

REGISTRY_FILE = "models_list.json"
# Lock files: the registry's (held for a write, briefly) and the trials' (one at a time, long).
REGISTRY_LOCK, TRIALS_LOCK = ".models_list.lock", ".trials.lock"
LOCK_FILES = frozenset({REGISTRY_LOCK, TRIALS_LOCK})
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def read_registry(models_dir: Path) -> dict:
    """models_list.json as a dict; {} when missing or unreadable."""
    try:
        registry = json.loads((models_dir / REGISTRY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return registry if isinstance(registry, dict) else {}


def record_installed_default(models_dir: Path, name: str) -> None:
    """Mark `name` as the model the setup installed (models_list.json's "default_model"): the
    default when DEFAULT_MODEL is unset. The server keeps the mark when it rewrites the file."""
    with LockFile(models_dir / REGISTRY_LOCK).held():
        registry = {"models": [], **read_registry(models_dir)}
        registry["default_model"] = name
        write_atomically(models_dir, json.dumps(registry, indent=1))


def write_atomically(models_dir: Path, text: str) -> None:
    """models_list.json replaced in one rename; on any failure the temp file is gone and the old
    file untouched. :raise InsufficientStorage: the disk is full."""
    fd, tmp = locked_temp_file(models_dir, f".{REGISTRY_FILE}.", ".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(os.dup(fd), "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, models_dir / REGISTRY_FILE)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full(exc, REGISTRY_FILE) from None
        raise
    finally:
        os.close(fd)


class LockFile:
    """An flock on `path`, created on first use and never removed (a process killed while holding
    it releases it: the kernel closes its descriptors). Re-entrant within one thread: a thread
    holding it exclusively may enter again (shared or exclusive) without waiting for itself."""

    def __init__(self, path: Path):
        self.path = path
        self._mine = threading.local()

    @contextmanager
    def held(self, shared: bool = False) -> Iterator[None]:
        depth = getattr(self._mine, "depth", 0)
        if depth:
            if shared is False and self._mine.shared:
                raise RuntimeError(f"{self.path}: a shared holder cannot take it exclusively")
            self._mine.depth += 1
            try:
                yield
            finally:
                self._mine.depth -= 1
            return
        fd = self._open(shared)
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            self._mine.depth, self._mine.shared = 1, shared
            try:
                yield
            finally:
                self._mine.depth = 0
        finally:
            if fd is not None:
                os.close(fd)

    def _open(self, shared: bool) -> int | None:
        """The lock file, opened without following a symbolic link (one planted there is
        replaced by a regular file). A reader of a directory it may not write (a read-only
        volume) reads unlocked: no process can write there either."""
        if not shared:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        for _ in range(3):
            try:
                fd = os.open(self.path, flags, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    log.warning("%s is a symbolic link; replacing it by a lock file", self.path)
                    self.path.unlink(missing_ok=True)
                    continue
                if shared and (exc.errno in _READ_ONLY or exc.errno == errno.ENOENT):
                    return self._open_read_only()
                raise
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
            raise OSError(errno.EINVAL, f"{self.path} is not a regular file")
        raise OSError(errno.ELOOP, f"{self.path} keeps being replaced by a symbolic link")

    def _open_read_only(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None


def sha256_of_file(path: Path) -> str | None:
    """sha256 of a file, or None when it vanished while being read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()
