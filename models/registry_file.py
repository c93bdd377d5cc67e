"""models_list.json on disk: atomic writes, the setup's default-model mark, the directory lock
that serialises trials across processes, and file hashing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from models.uploads import disk_full, is_disk_full, locked_temp_file

REGISTRY_FILE = "models_list.json"


def record_installed_default(models_dir: Path, name: str) -> None:
    """Mark `name` as the model the setup installed (models_list.json's "default_model"): the
    default when DEFAULT_MODEL is unset. The server keeps the mark when it rewrites the file."""
    path = models_dir / REGISTRY_FILE
    try:
        registry = json.loads(path.read_text())
        if not isinstance(registry, dict):
            registry = {"models": []}
    except (OSError, ValueError):
        registry = {"models": []}
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


class directory_lock:
    """An flock on the models directory: one trial at a time among the processes sharing it."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __enter__(self):
        self.fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        os.close(self.fd)




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
