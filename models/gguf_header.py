"""Read and check a GGUF file's header in pure Python, before llama.cpp ever opens it.

llama.cpp's own parser has had a run of overflow bugs and can abort() on a crafted file, taking
the whole server down; so every count, length and tensor extent is checked here against the
file's real size. `gguf.GGUFReader` would do the reading but parses the whole tokenizer into
numpy (10 s for Gemma 3's 262k-token vocabulary); this reader seeks past arrays instead.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4                  # GGML_MAX_DIMS
_MAX_STRING = 1 << 24         # no string inside an array is anywhere near 16 MiB
_MAX_VALUE_STRING = 1 << 20   # a metadata string (a chat template, say) is kept: at most 1 MiB
_MAX_ITEMS = 1 << 24          # tensors, keys, array items: generous, and bounded
_MAX_HEADER = 1 << 27         # the whole key/value section; real vocabularies need ~10 MiB
_MAX_CONTEXT = 1 << 24        # {arch}.context_length: no model is trained on 16M tokens
_MAX_HPARAM = 1 << 20         # layers, heads, embedding width
_HPARAMS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "attention.key_length", "attention.value_length")
_TOKEN_ARRAYS = ("tokenizer.ggml.scores", "tokenizer.ggml.token_type")
_MAX_NESTING = 4
_DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _ArrayLength(int):
    """What `_Reader.value` returns for an array: its item count."""


class GGUFError(ValueError):
    """The file is not a GGUF model this server accepts; the message says why."""


@dataclass
class GGUFInfo:
    version: int
    tensor_count: int
    metadata: dict = field(default_factory=dict)
    # Item counts of the array values (kept out of `metadata`: a vocabulary is large).
    array_lengths: dict = field(default_factory=dict)


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

    def string(self, keep: bool = True, limit: int = _MAX_STRING) -> str | None:
        length = self.unpack("<Q")
        if length > limit:
            raise GGUFError(f"implausible string length {length}")
        if not keep:
            self.skip(length)
            return None
        return self.take(length).decode("utf-8", errors="replace")

    def value(self, kind: int, keep: bool = True, depth: int = 0):
        """A scalar or string (None when not kept); an array is skipped and its length returned."""
        if kind in _SCALARS:
            value = self.unpack(_SCALARS[kind])
            if isinstance(value, float) and not math.isfinite(value):
                raise GGUFError(f"a metadata value is {value}")
            return value
        if kind == _STRING:
            return self.string(keep, _MAX_VALUE_STRING if keep else _MAX_STRING)
        if kind == _ARRAY and depth < _MAX_NESTING:
            item_kind, items = self.unpack("<I"), self.count("array item")
            if item_kind in _SCALARS:
                self.skip(items * struct.calcsize(_SCALARS[item_kind]))
            else:
                for _ in range(items):
                    self.value(item_kind, keep=False, depth=depth + 1)
            return _ArrayLength(items)
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
            key = r.string(limit=1 << 16)
            value = r.value(r.unpack("<I"))
            if isinstance(value, _ArrayLength):
                info.array_lengths[key], value = int(value), None
            info.metadata[key] = value
            if r.f.tell() > _MAX_HEADER:
                raise GGUFError(f"implausible metadata: more than {_MAX_HEADER >> 20} MiB")
        if not isinstance(info.metadata.get("general.architecture"), str):
            raise GGUFError("no general.architecture: not a model file")
        if info.tensor_count == 0:
            raise GGUFError("the file holds no tensors")
        _check_hparams(info)
        _check_vocabulary(info)
        _check_tensor_table(r, info)
    return info


def _check_hparams(info: GGUFInfo) -> None:
    """Hyperparameters serving reads (memory estimates, context sizes) must be sane numbers."""
    arch, meta = info.metadata["general.architecture"], info.metadata
    context = meta.get(f"{arch}.context_length")
    if context is not None and not (isinstance(context, int) and 0 < context <= _MAX_CONTEXT):
        raise GGUFError(f"implausible {arch}.context_length {context!r}")
    for name in _HPARAMS:
        value = meta.get(f"{arch}.{name}")
        if value is not None and not (isinstance(value, int) and 0 <= value <= _MAX_HPARAM):
            raise GGUFError(f"implausible {arch}.{name} {value!r}")


def _check_vocabulary(info: GGUFInfo) -> None:
    """Per-token arrays as long as the token list (llama.cpp indexes them by token id without a
    check), and special token ids inside the vocabulary."""
    n_vocab = info.array_lengths.get("tokenizer.ggml.tokens")
    if n_vocab is None:
        return
    for key in _TOKEN_ARRAYS:
        length = info.array_lengths.get(key)
        if length is not None and length != n_vocab:
            raise GGUFError(f"{key} has {length} entries for {n_vocab} tokens")
    for key, token in info.metadata.items():
        if not (key.startswith("tokenizer.ggml.") and key.endswith("_token_id")):
            continue
        if not (isinstance(token, int) and 0 <= token < n_vocab):
            raise GGUFError(f"{key} {token!r} is outside the {n_vocab}-token vocabulary")


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
