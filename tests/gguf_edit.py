"""Crafted GGUF files for tests.

`with_chat_template` copies a GGUF model with a chat template of the test's choosing (or none),
in about a second. The default model has no chat template, so tests that need one (Gemma's own,
or a malicious one) splice `tokenizer.chat_template` into a copy: the header's key/value section
is rewritten, and the tensor table and data are copied unchanged (tensor offsets are relative to
the data section, which only needs re-aligning).

`tiny_llama` writes a small, well-formed llama model with the `gguf` package (126 KB): without
byte tokens it is issue 9's reproducer, a file that loads and tokenizes "probe" but aborts the
process on any character its vocabulary lacks.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any, BinaryIO

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


def tiny_llama(path: Path, byte_tokens: bool = False, n_vocab: int = 300,
               overrides: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A 1-layer, 32-wide llama (f32) whose vocabulary has "probe"'s letters, BOS/EOS/UNK,
    filler tokens, and the 256 <0xNN> byte tokens only when `byte_tokens`. `overrides` replaces
    or adds metadata values ((value, GGUFValueType) pairs, or plain values for existing keys);
    `drop` leaves keys out."""
    import gguf
    import numpy as np

    tokens = ["<unk>", "<s>", "</s>", "\u2581probe", "p", "r", "o", "b", "e", "\u2581"]
    types = [2, 3, 3] + [1] * 7
    if byte_tokens:
        tokens += [f"<0x{value:02X}>" for value in range(256)]
        types += [6] * 256
    tokens += [f"tok{i}" for i in range(max(0, n_vocab - len(tokens)))]
    types += [1] * (len(tokens) - len(types))
    T = gguf.GGUFValueType
    dim, ff = 32, 64
    meta = {"general.architecture": ("llama", T.STRING), "llama.context_length": (64, T.UINT32),
            "llama.embedding_length": (dim, T.UINT32), "llama.block_count": (1, T.UINT32),
            "llama.feed_forward_length": (ff, T.UINT32), "llama.attention.head_count": (4, T.UINT32),
            "llama.attention.head_count_kv": (4, T.UINT32),
            "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32),
            "llama.rope.dimension_count": (dim // 4, T.UINT32),
            "tokenizer.ggml.model": ("llama", T.STRING), "tokenizer.ggml.tokens": (tokens, T.ARRAY),
            "tokenizer.ggml.scores": ([0.0] * len(tokens), T.ARRAY),
            "tokenizer.ggml.token_type": (types, T.ARRAY),
            "tokenizer.ggml.bos_token_id": (1, T.UINT32), "tokenizer.ggml.eos_token_id": (2, T.UINT32),
            "tokenizer.ggml.unknown_token_id": (0, T.UINT32)}
    for key, value in (overrides or {}).items():
        meta[key] = value if isinstance(value, tuple) else (value, meta[key][1])
    writer = gguf.GGUFWriter(str(path), meta.pop("general.architecture")[0])
    for key, (value, kind) in meta.items():
        if key not in drop:
            sub = None
            if kind == T.ARRAY:
                sub = T.STRING if isinstance(value[0], str) else (
                    T.FLOAT32 if isinstance(value[0], float) else T.INT32)
            writer.add_key_value(key, value, kind, sub_type=sub)
    rng = np.random.default_rng(0)

    def weights(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer.add_tensor("token_embd.weight", weights(len(tokens), dim))
    writer.add_tensor("output_norm.weight", np.ones(dim, np.float32))
    writer.add_tensor("output.weight", weights(len(tokens), dim))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(dim, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        writer.add_tensor(f"blk.0.{name}.weight", weights(dim, dim))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(dim, np.float32))
    writer.add_tensor("blk.0.ffn_gate.weight", weights(ff, dim))
    writer.add_tensor("blk.0.ffn_up.weight", weights(ff, dim))
    writer.add_tensor("blk.0.ffn_down.weight", weights(dim, ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
