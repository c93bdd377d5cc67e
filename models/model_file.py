"""What the server knows of one model file: its identity, GGUF facts and trial status.

Built from a file's checked header (`describe_gguf`) or read back from models_list.json
(`from_entry`); a value, so a listing can hand it out while the registry changes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from models.gguf_header import read_gguf
from models.probe import TRIAL_VERSION

TRIAL, READY, UNUSABLE = "trial", "ready", "unusable"
# llama.cpp's LLAMA_FTYPE names for the common general.file_type values.
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
               10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
               16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


@dataclass(frozen=True)
class ModelFile:
    name: str
    path: str
    type: str
    file: str
    size_bytes: int
    sha256: str | None
    architecture: str | None
    size_label: str | None
    parameter_count: int | None
    quantization: str | None
    context_length: int | None
    kv_bytes_per_token: int | None
    added_at: str
    source: str
    mtime_ns: int
    status: str = TRIAL                 # trial / ready / unusable
    unusable_reason: str | None = None
    trial_version: int | None = None    # the TRIAL_VERSION that gave `status`
    inode: str | None = None            # "device:inode" of the file (links share it)

    def to_dict(self) -> dict:
        info = asdict(self)
        for internal in ("path", "mtime_ns", "kv_bytes_per_token", "trial_version", "inode"):
            info.pop(internal)
        return info

    def same_file(self, path: Path) -> bool:
        """Whether the file at `path` still is the one this entry describes (and was tried)."""
        try:
            stat = path.stat()
        except OSError:
            return False
        return (self.size_bytes, self.mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def describe_gguf(path: Path, model_type: str, source: str, sha256: str | None = None,
                  meta: dict | None = None, name: str | None = None) -> ModelFile:
    """A ModelFile, status "trial", from a file's checked header; `name` when it is about to be
    renamed (a file still being copied fails the check).

    :raise GGUFError: not an acceptable GGUF file.
    """
    meta = meta if meta is not None else read_gguf(str(path)).metadata
    arch = meta.get("general.architecture")
    name = name or path.name

    def arch_key(suffix: str):
        return meta.get(f"{arch}.{suffix}")

    stat = path.stat()
    return ModelFile(
        name=name, path=str(path.with_name(name)), type=model_type, file=name,
        size_bytes=stat.st_size, sha256=sha256, architecture=arch,
        size_label=meta.get("general.size_label"), parameter_count=meta.get("general.parameter_count"),
        quantization=_FILE_TYPES.get(meta.get("general.file_type"), meta.get("general.file_type")),
        context_length=arch_key("context_length"), kv_bytes_per_token=_kv_bytes_per_token(arch_key),
        added_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), source=source,
        mtime_ns=stat.st_mtime_ns, inode=f"{stat.st_dev}:{stat.st_ino}")


def _kv_bytes_per_token(arch_key) -> int | None:
    """f16 K and V for every layer: what one token of context costs in memory."""
    layers, heads = arch_key("block_count"), arch_key("attention.head_count")
    kv_heads = arch_key("attention.head_count_kv") or heads
    embedding = arch_key("embedding_length")
    key_len = arch_key("attention.key_length") or (embedding // heads if embedding and heads else None)
    value_len = arch_key("attention.value_length") or key_len
    if not (layers and kv_heads and key_len and value_len):
        return None
    return layers * kv_heads * (key_len + value_len) * 2



def from_entry(models_dir: Path, entry: dict) -> ModelFile:
    """A registry entry as a ModelFile; a trial by an older version of the trial counts as none."""
    model = ModelFile(path=str(models_dir / entry["name"]), **entry)
    if model.trial_version != TRIAL_VERSION or model.status not in (READY, UNUSABLE):
        model = replace(model, status=TRIAL, unusable_reason=None)
    return model
