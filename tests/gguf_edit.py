"""Copy a GGUF model with a chat template of the test's choosing (or none), in about a second.

The default model has no chat template, so tests that need one (Gemma's own, or a malicious
one) splice `tokenizer.chat_template` into a copy: the header's key/value section is rewritten,
and the tensor table and data are copied unchanged (tensor offsets are relative to the data
section, which only needs re-aligning).
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import BinaryIO

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
TEMPLATE_KEY = "tokenizer.chat_template"


def _u32(f: BinaryIO) -> int:
    return struct.unpack("<I", f.read(4))[0]


def _u64(f: BinaryIO) -> int:
    return struct.unpack("<Q", f.read(8))[0]


def _string(f: BinaryIO) -> bytes:
    return f.read(_u64(f))


def _skip_value(f: BinaryIO, kind: int) -> None:
    if kind in _SCALAR_SIZES:
        f.seek(_SCALAR_SIZES[kind], 1)
    elif kind == _STRING:
        f.seek(_u64(f), 1)
    elif kind == _ARRAY:
        item_kind, count = _u32(f), _u64(f)
        if item_kind in _SCALAR_SIZES:
            f.seek(_SCALAR_SIZES[item_kind] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, item_kind)
    else:
        raise ValueError(f"unknown GGUF value type {kind}")


def _encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def with_chat_template(source: Path, target: Path, template: str | None) -> Path:
    """Write `target`: `source` with its chat template replaced by `template` (None: removed)."""
    with open(source, "rb") as f:
        magic, version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        kept, alignment = [], 32
        for _ in range(n_kv):
            start = f.tell()
            key = _string(f).decode("utf-8")
            kind = _u32(f)
            if key == "general.alignment":
                alignment = _u32(f)
            else:
                _skip_value(f, kind)
            if key != TEMPLATE_KEY:
                kept.append((start, f.tell()))
        table_start = f.tell()
        for _ in range(n_tensors):
            _string(f)
            f.seek(8 * _u32(f) + 4 + 8, 1)
        table_end = f.tell()
        data_start = -(-table_end // alignment) * alignment
        extra = b"" if template is None else (
            _encode_string(TEMPLATE_KEY) + struct.pack("<I", _STRING) + _encode_string(template))
        with open(target, "wb") as out:
            out.write(struct.pack("<4sIQQ", magic, version, n_tensors, len(kept) + bool(extra)))
            for start, end in kept:
                f.seek(start)
                out.write(f.read(end - start))
            out.write(extra)
            f.seek(table_start)
            out.write(f.read(table_end - table_start))
            out.write(b"\0" * (-out.tell() % alignment))
            f.seek(data_start)
            shutil.copyfileobj(f, out, 1 << 22)
    return target
