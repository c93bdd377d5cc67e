"""models_list.json shared by every process on one models directory: lock files and merged writes.

Several server processes (replicas on one host, or pods on an NFS / RWX volume) may share a models
directory. Each keeps its own view in memory; models_list.json is where they meet. So that they
never lose each other's entries, a write is read-merge-write under an exclusive flock of a lock
file: the registry on disk is read, this process's changes are applied by name, every other entry
is kept. A publish (the file's rename or link and its registry entry) happens under that one
lock, and a reader that must see both or neither takes it shared (registry_file.LockFile).
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable

from models.model_file import READY, UNUSABLE, ModelFile
from models.probe import TRIAL_VERSION
from models.registry_file import REGISTRY_FILE
from models.uploads import NAME_PATTERN, SUFFIX, is_temp_file

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def scan_models(models_dir: Path) -> dict[str, tuple[int, int]]:
    """The model files in a directory: name -> (size, mtime_ns); one scandir, one stat each.
    Temp files (uploads in progress), lock files and models_list.json never match."""
    files = {}
    try:
        with os.scandir(models_dir) as entries:
            for entry in entries:
                if not entry.name.endswith(SUFFIX) or is_temp_file(Path(entry.name)):
                    continue
                try:
                    st = entry.stat()
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    files[entry.name] = (st.st_size, st.st_mtime_ns)
    except (FileNotFoundError, NotADirectoryError):
        pass
    return files


def registry_stamp(models_dir: Path) -> tuple | None:
    """What changes whenever models_list.json is rewritten (each write is a new inode)."""
    try:
        st = os.stat(models_dir / REGISTRY_FILE)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def entries_of(registry: dict) -> dict[str, dict]:
    """The registry's well-formed entries by name; a malformed entry is skipped, not trusted
    (an entry's name must be a valid model file name: paths are derived from names, never read)."""
    entries = registry.get("models")
    if not isinstance(entries, list):
        return {}
    valid = {}
    for entry in entries:
        if (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and NAME_PATTERN.match(entry["name"]) and ".." not in entry["name"]
                and entry["name"].endswith(SUFFIX)
                and isinstance(entry.get("size_bytes"), int)
                and isinstance(entry.get("mtime_ns"), int)):
            valid[entry["name"]] = entry
    return valid


def describes(entry: dict | None, size: int, mtime_ns: int) -> bool:
    """Whether a registry entry is about the file with this identity."""
    return entry is not None and (entry["size_bytes"], entry["mtime_ns"]) == (size, mtime_ns)


def known_sha256(entry: dict) -> str | None:
    sha256 = entry.get("sha256")
    return sha256 if isinstance(sha256, str) and _SHA256.match(sha256) else None


def settled(entry: dict) -> bool:
    """Whether an entry records a finished trial, by this version of the trial, of known bytes."""
    return (entry.get("trial_version") == TRIAL_VERSION and entry.get("status") in (READY, UNUSABLE)
            and known_sha256(entry) is not None)


def merged(models_dir: Path, registry: dict, changes: dict[str, dict | None],
           publishing: set[str], default_model: str | None) -> dict:
    """The registry on disk with this process's `changes` applied (lock held).

    An entry set is kept only if its file still has the identity it describes (or is being
    renamed into place: `publishing`), a removal only if the file is really gone: a change that
    another process overtook leaves the other's entry. Entries whose file is gone are dropped.
    """
    entries = entries_of(registry)
    for name, entry in changes.items():
        if entry is None:
            if not (models_dir / name).exists():
                entries.pop(name, None)
        elif name in publishing or _has_identity(models_dir / name, entry):
            entries[name] = entry
    kept = {name: entry for name, entry in entries.items()
            if name in publishing or (models_dir / name).exists()}
    result = {"models": [kept[name] for name in sorted(kept)]}
    default = registry.get("default_model")
    default = default if isinstance(default, str) else default_model
    if default:
        result["default_model"] = default
    return result


def _has_identity(path: Path, entry: dict) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return describes(entry, st.st_size, st.st_mtime_ns)


def adopted(model: ModelFile, entry: dict | None, size: int, mtime_ns: int) -> ModelFile:
    """`model` (not yet hashed or tried) with the hash and trial result another process recorded
    for the same file (same name, size and mtime_ns, this TRIAL_VERSION), if it did."""
    if describes(entry, size, mtime_ns) and settled(entry):
        return replace(model, sha256=entry["sha256"], status=entry["status"],
                       unusable_reason=entry.get("unusable_reason"), trial_version=TRIAL_VERSION)
    return model


class Every:
    """Calls `work` every `seconds` on a daemon thread until `stop` (errors are logged)."""

    def __init__(self, seconds: float, work: Callable[[], None], name: str):
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(seconds, work), daemon=True,
                                        name=name)
        self._thread.start()

    def _run(self, seconds: float, work: Callable[[], None]) -> None:
        while not self._stopped.wait(seconds):
            try:
                work()
            except Exception:
                log.exception("%s failed", self._thread.name)

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
