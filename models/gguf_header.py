"""Read the few metadata keys a model listing needs from a GGUF header, in pure Python.

`gguf.GGUFReader` parses the whole tokenizer (10 s for Gemma 3's 262k-token vocabulary), far too
slow for a listing; this reader walks the key/value section with bounds checks and stops as soon
as it has what it was asked for.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_STRING = 1 << 24
_MAX_COUNT = 1 << 32


class GGUFHeaderError(ValueError):
    """The file is not a GGUF file this server can read."""


def _read(f: BinaryIO, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise GGUFHeaderError("file ends inside the GGUF header")
    return data


def _unpack(f: BinaryIO, fmt: str):
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _string(f: BinaryIO) -> str:
    length = _unpack(f, "<Q")
    if length > _MAX_STRING:
        raise GGUFHeaderError("a GGUF string is implausibly long")
    return _read(f, length).decode("utf-8", errors="replace")


def _value(f: BinaryIO, kind: int):
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item_kind, count = _unpack(f, "<I"), _unpack(f, "<Q")
        if count > _MAX_COUNT:
            raise GGUFHeaderError("a GGUF array is implausibly long")
        if item_kind in _SCALARS:
            f.seek(count * struct.calcsize(_SCALARS[item_kind]), 1)
        else:
            for _ in range(count):
                _value(f, item_kind)
        return None
    raise GGUFHeaderError(f"unknown GGUF value type {kind}")


def read_metadata(path: str, wanted: set[str]) -> dict:
    """Values of the `wanted` keys (scalars and strings; arrays are skipped).

    A key ending in `.` stands for `<general.architecture>.<suffix>`, e.g. `.context_length`.
    :raise GGUFHeaderError: not a GGUF file, or its header is cut short or malformed.
    """
    found: dict = {}
    with open(path, "rb") as f:
        if _read(f, 4) != MAGIC:
            raise GGUFHeaderError("not a GGUF file (bad magic)")
        found["gguf_version"] = _unpack(f, "<I")
        if found["gguf_version"] not in (2, 3):
            raise GGUFHeaderError(f"unsupported GGUF version {found['gguf_version']}")
        _tensor_count, kv_count = _unpack(f, "<Q"), _unpack(f, "<Q")
        for _ in range(kv_count):
            key = _string(f)
            value = _value(f, _unpack(f, "<I"))
            arch = found.get("general.architecture")
            if key in wanted or (arch and key.startswith(arch + ".") and key[len(arch):] in wanted):
                found[key if key in wanted else key[len(arch):]] = value
            if wanted <= found.keys():
                break
    return found
