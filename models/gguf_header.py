"""Read and check a GGUF file's header in pure Python, before llama.cpp ever opens it.

llama.cpp's own parser has had a run of overflow bugs and can abort() on a crafted file, taking
the whole server down; so every count, length and tensor extent is checked here against the
file's real size. `gguf.GGUFReader` would do the reading but parses the whole tokenizer into
numpy (10 s for Gemma 3's 262k-token vocabulary); this reader seeks past arrays instead.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4                  # GGML_MAX_DIMS
_MAX_STRING = 1 << 24         # no key or value string is anywhere near 16 MiB
_MAX_ITEMS = 1 << 24          # tensors, keys, array items: generous, and bounded
_MAX_NESTING = 4
_DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """The file is not a GGUF model this server accepts; the message says why."""


@dataclass
class GGUFInfo:
    version: int
    tensor_count: int
    metadata: dict = field(default_factory=dict)


class _Reader:
    """Bounded reads over a file of known size."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size = f, size

    def take(self, n: int) -> bytes:
        if n > self.size - self.f.tell():
            raise GGUFError("the file ends inside its GGUF header (truncated?)")
        return self.f.read(n)

    def skip(self, n: int) -> None:
        if n > self.size - self.f.tell():
            raise GGUFError("the file ends inside its GGUF header (truncated?)")
        self.f.seek(n, os.SEEK_CUR)

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str, limit: int = _MAX_ITEMS) -> int:
        value = self.unpack("<Q")
        if value > limit:
            raise GGUFError(f"implausible {what} count {value}")
        return value

    def string(self, keep: bool = True) -> str | None:
        length = self.unpack("<Q")
        if length > _MAX_STRING:
            raise GGUFError(f"implausible string length {length}")
        if not keep:
            self.skip(length)
            return None
        return self.take(length).decode("utf-8", errors="replace")

    def value(self, kind: int, keep: bool = True, depth: int = 0):
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string(keep)
        if kind == _ARRAY and depth < _MAX_NESTING:
            item_kind, items = self.unpack("<I"), self.count("array item")
            if item_kind in _SCALARS:
                self.skip(items * struct.calcsize(_SCALARS[item_kind]))
            else:
                for _ in range(items):
                    self.value(item_kind, keep=False, depth=depth + 1)
            return None
        raise GGUFError(f"unknown GGUF value type {kind}")


def _tensor_bytes(name: str, dims: list[int], ggml_type: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except ValueError:
        raise GGUFError(f"tensor {name!r} has unknown type {ggml_type}") from None
    elements = 1
    for dim in dims:
        elements *= dim
    if elements % block:
        raise GGUFError(f"tensor {name!r} is not a whole number of {block}-element blocks")
    return elements // block * type_size


def read_gguf(path: str) -> GGUFInfo:
    """Metadata scalars and strings of a GGUF file, after checking all of its header.

    :raise GGUFError: bad magic, unsupported version, truncated or malformed header, or a
        tensor whose data would lie outside the file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        r = _Reader(f, size)
        if size < 4 or r.take(4) != MAGIC:
            raise GGUFError("not a GGUF file (bad magic)")
        version = r.unpack("<I")
        if version not in SUPPORTED_VERSIONS:
            raise GGUFError(f"unsupported GGUF version {version}")
        info = GGUFInfo(version=version, tensor_count=r.count("tensor"))
        for _ in range(r.count("metadata key")):
            key = r.string()
            info.metadata[key] = r.value(r.unpack("<I"))
        if not isinstance(info.metadata.get("general.architecture"), str):
            raise GGUFError("no general.architecture: not a model file")
        if info.tensor_count == 0:
            raise GGUFError("the file holds no tensors")
        _check_tensor_table(r, info)
    return info


def _check_tensor_table(r: _Reader, info: GGUFInfo) -> None:
    alignment = info.metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"invalid general.alignment {alignment!r}")
    tensors = []
    for _ in range(info.tensor_count):
        name = r.string()
        n_dims = r.unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has {n_dims} dimensions")
        dims = [r.unpack("<Q") for _ in range(n_dims)]
        ggml_type, offset = r.unpack("<I"), r.unpack("<Q")
        tensors.append((name, dims, ggml_type, offset))
    data_start = -(-r.f.tell() // alignment) * alignment
    for name, dims, ggml_type, offset in tensors:
        if offset % alignment:
            raise GGUFError(f"tensor {name!r} is not aligned to {alignment} bytes")
        end = data_start + offset + _tensor_bytes(name, dims, ggml_type)
        if end > r.size:
            raise GGUFError(f"tensor {name!r} extends {end - r.size} bytes past the end of the file")
