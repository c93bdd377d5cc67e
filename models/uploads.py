"""Model names and incoming model files: name rules, and a temp file that hashes as it is written.

Everything a client sends as a name passes through `model_file_name` or `sanitised_file_name`
before it comes near the filesystem; both return a bare file name that matches NAME_PATTERN.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

from services.errors import InsufficientStorage, InvalidRequest, ShuttingDown

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SUFFIX = ".gguf"
TEMP_PREFIX, TEMP_SUFFIX = ".upload-", ".partial"


def model_file_name(name: str) -> str:
    """A client-chosen model name as a file name (`.gguf` appended when missing).

    :raise InvalidRequest: path separators, NUL bytes, `..`, or characters outside the pattern.
    """
    if not name.endswith(SUFFIX):
        name += SUFFIX
    if not NAME_PATTERN.match(name) or ".." in name:
        raise InvalidRequest(
            f"invalid model name {name!r}: use letters, digits, '.', '_' and '-', starting with "
            f"a letter or digit, at most 128 characters")
    return name


def sanitised_file_name(filename: str) -> str:
    """The uploaded file's own name made safe: its last path part, odd characters as '-'.

    :raise InvalidRequest: nothing usable is left.
    """
    base = re.split(r"[/\\]", filename or "")[-1].replace("\x00", "")
    stem = base[: -len(SUFFIX)] if base.lower().endswith(SUFFIX) else base
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).lstrip("._-").replace("..", ".")
    stem = stem[: 128 - len(SUFFIX)]
    if not stem:
        raise InvalidRequest("the uploaded file has no usable name; send a 'name' field")
    return model_file_name(stem)


_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_temp_file(path: Path) -> bool:
    return path.name.startswith(TEMP_PREFIX) and path.name.endswith(TEMP_SUFFIX)


def expected_sha256(raw: str | None) -> str | None:
    """The `sha256` a client sent with an upload, lower-cased. :raise InvalidRequest: not hex."""
    if raw is None or raw.strip() == "":
        return None
    if not _SHA256.match(raw.strip()):
        raise InvalidRequest("sha256 must be 64 hexadecimal digits", param="sha256")
    return raw.strip().lower()


def is_disk_full(exc: OSError) -> bool:
    return exc.errno in _DISK_FULL


def disk_full(exc: OSError, what: str) -> InsufficientStorage:
    return InsufficientStorage(f"the disk is full: {what} could not be written ({exc.strerror})")


def locked_temp_file(directory: Path, prefix: str, suffix: str) -> tuple[int, Path]:
    """A new temp file, opened and flock-ed, so `remove_stale_temp_files` in another process
    leaves it alone. Created and then locked: if a starting process removed it in between,
    another is made."""
    directory.mkdir(parents=True, exist_ok=True)
    while True:
        fd, name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=suffix)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(name).st_ino == os.fstat(fd).st_ino:
                return fd, Path(name)
        except FileNotFoundError:
            pass
        os.close(fd)


def remove_stale_temp_files(directory: Path, patterns: tuple[str, ...]) -> list[str]:
    """Remove temp files left by killed processes: those whose lock can be taken (a live
    process holds the lock of each temp file it is writing). Returns the names removed."""
    removed = []
    for pattern in patterns:
        for path in directory.glob(pattern):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    path.unlink()
                    removed.append(path.name)
            except OSError:
                continue
            finally:
                os.close(fd)
    if removed:
        log.info("removed %d stale temp file(s) from %s: %s", len(removed), directory,
                 ", ".join(removed))
    return removed


class HashingFile(io.FileIO):
    """A temporary file in a models directory that computes its sha256 while it is written.

    Created next to its final place so the finished file becomes visible by one atomic rename;
    `discard` removes it whatever state it is in. Its flock is held (on a descriptor of its own,
    so `close` after the last write keeps it) until `discard`: another process starting on the
    same directory does not take it for a leftover. A full disk is `InsufficientStorage`.
    """

    def __init__(self, directory: Path, on_discard: Callable[["HashingFile"], None] = lambda f: None):
        lock_fd, path = locked_temp_file(directory, TEMP_PREFIX, TEMP_SUFFIX)
        self._lock_fds = [lock_fd]
        self._discarding = threading.Lock()
        super().__init__(str(path), "w+b")
        self.path = path
        self.bytes_written = 0
        self._digest = hashlib.sha256()
        self._on_discard = on_discard

    def write(self, data) -> int:
        try:
            written = super().write(data)
        except ValueError:
            if self.closed:
                raise ShuttingDown("the upload was stopped: the server is shutting down") from None
            raise
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full(exc, "the uploaded model") from None
            raise
        self._digest.update(memoryview(data)[:written])
        self.bytes_written += written
        return written

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def move_to(self, directory: Path) -> None:
        """Move the (closed) file into another directory, still locked, under a new temp name."""
        lock_fd, target = locked_temp_file(directory, TEMP_PREFIX, TEMP_SUFFIX)
        self._lock_fds.append(lock_fd)
        try:
            shutil.move(str(self.path), str(target))
        except OSError as exc:
            target.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise disk_full(exc, "the uploaded model") from None
            raise
        self.path = target

    def discard(self) -> None:
        """Remove the file (if it was not renamed into place) and release its locks. Safe to
        call twice and from two threads at once (the upload's own and a shutdown's): each lock
        descriptor is closed once, never a number the process has since reused."""
        with self._discarding:
            fds, self._lock_fds = self._lock_fds, []
        self.close()
        if fds:
            self.path.unlink(missing_ok=True)
            self._on_discard(self)
        for fd in fds:
            os.close(fd)
