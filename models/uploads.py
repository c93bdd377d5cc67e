"""Model names and incoming model files: name rules, and a temp file that hashes as it is written.

Everything a client sends as a name passes through `model_file_name` or `sanitised_file_name`
before it comes near the filesystem; both return a bare file name that matches NAME_PATTERN.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path

from services.errors import InvalidRequest

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


def is_temp_file(path: Path) -> bool:
    return path.name.startswith(TEMP_PREFIX) and path.name.endswith(TEMP_SUFFIX)


class HashingFile(io.FileIO):
    """A temporary file in a models directory that computes its sha256 while it is written.

    Created next to its final place so the finished file becomes visible by one atomic rename;
    `discard` removes it whatever state it is in.
    """

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX)
        os.close(fd)
        super().__init__(name, "w+b")
        self.path = Path(name)
        self.bytes_written = 0
        self._digest = hashlib.sha256()

    def write(self, data) -> int:
        written = super().write(data)
        self._digest.update(memoryview(data)[:written])
        self.bytes_written += written
        return written

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
