"""The registry of one models directory: its GGUF files, their metadata, and models_list.json.

The directory is the truth; models_list.json remembers what is costly to recompute (sha256,
when and how a model arrived). Every listing reconciles the two: files copied in by hand appear,
files removed by hand disappear, and a missing or corrupt models_list.json is rebuilt. Requests
name models, and only names found this way resolve, so a client-supplied name is never joined
into a filesystem path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from models.gguf_header import GGUFError, read_gguf
from models.uploads import NAME_PATTERN, SUFFIX, HashingFile, is_temp_file, model_file_name
from services.errors import InvalidModelFile, ModelConflict, ModelNotFound, UnloadableModel

log = logging.getLogger(__name__)

REGISTRY_FILE = "models_list.json"
# llama.cpp's LLAMA_FTYPE names for the common general.file_type values.
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
               10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
               16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}

Probe = Callable[[Path], None]


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

    def to_dict(self) -> dict:
        info = asdict(self)
        for internal in ("path", "mtime_ns", "kv_bytes_per_token"):
            info.pop(internal)
        return info


def describe_gguf(path: Path, model_type: str, source: str, sha256: str | None = None,
                  meta: dict | None = None) -> ModelFile:
    """A ModelFile from a file's checked header (a file still being copied fails the check).

    :raise GGUFError: not an acceptable GGUF file.
    """
    meta = meta if meta is not None else read_gguf(str(path)).metadata
    arch = meta.get("general.architecture")

    def arch_key(suffix: str):
        return meta.get(f"{arch}.{suffix}")

    stat = path.stat()
    return ModelFile(
        name=path.name, path=str(path), type=model_type, file=path.name,
        size_bytes=stat.st_size, sha256=sha256, architecture=arch,
        size_label=meta.get("general.size_label"), parameter_count=meta.get("general.parameter_count"),
        quantization=_FILE_TYPES.get(meta.get("general.file_type"), meta.get("general.file_type")),
        context_length=arch_key("context_length"), kv_bytes_per_token=_kv_bytes_per_token(arch_key),
        added_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), source=source,
        mtime_ns=stat.st_mtime_ns)


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


def probe_in_subprocess(path: Path, timeout: float = 300) -> None:
    """Load the file once in a short-lived process: a crash there cannot take the server down.

    :raise UnloadableModel: llama.cpp failed, crashed or hung on the file.
    """
    try:
        done = subprocess.run([sys.executable, "-m", "models.probe", str(path)],
                              cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UnloadableModel(f"llama.cpp did not load the file within {timeout:g} s") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise UnloadableModel(f"llama.cpp could not load the file: {reason[:300]}")


class ModelManager:
    """One models directory; thread-safe. `probe` test-loads newly added files."""

    def __init__(self, models_dir: str, model_type: str = "gguf", default_model: str = "",
                 probe: Probe = probe_in_subprocess):
        self.models_dir = Path(models_dir)
        self.model_type = model_type
        self.default_model = default_model
        self._probe = probe
        self._lock = threading.RLock()
        self._models: dict[str, ModelFile] = {}
        self._hashing: set[str] = set()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._load_registry()
        self.sync()

    def list(self) -> list[ModelFile]:
        """Every model in the directory, sorted by name, after reconciling with the disk."""
        self.sync()
        with self._lock:
            return [self._models[name] for name in sorted(self._models)]

    def resolve(self, name: str | None) -> ModelFile:
        """The model a request names (with or without `.gguf`), or the default one.

        :raise ModelNotFound: no such model, or no model at all.
        """
        models = {m.name: m for m in self.list()}
        if not name:
            if not self.default_model and models:
                return next(iter(models.values()))
            if not models:
                raise ModelNotFound(f"no models in {self.models_dir}; add a .gguf file")
            name = self.default_model
        model = models.get(name) or models.get(f"{name}{SUFFIX}")
        if model is None:
            raise ModelNotFound(f"model {name!r} not found; GET /api/v1/models lists the models")
        return model

    def with_sha256(self, model: ModelFile) -> ModelFile:
        """The model as registered now: its sha256 once the background hash is done."""
        with self._lock:
            return self._models.get(model.name, model)

    def new_upload(self) -> HashingFile:
        """A temp file in this directory for an incoming model."""
        return HashingFile(self.models_dir)

    def add(self, incoming: HashingFile, name: str, overwrite: bool, source: str = "upload") -> ModelFile:
        """Validate a fully received file, test-load it, and rename it into place.

        :raise InvalidModelFile: not a GGUF file this server accepts (checked in pure Python).
        :raise UnloadableModel: llama.cpp failed on it in a separate process.
        :raise ModelConflict: the name exists and `overwrite` is false.
        """
        name = model_file_name(name)
        incoming.close()
        staged = self._stage(incoming)
        try:
            meta = read_gguf(str(staged)).metadata
        except GGUFError as exc:
            raise InvalidModelFile(f"not an acceptable GGUF file: {exc}") from None
        self._probe(staged)
        with self._lock:
            target = self.models_dir / name
            if target.exists() and not overwrite:
                raise ModelConflict(f"model {name} exists; send overwrite=true to replace it")
            os.replace(staged, target)
            model = describe_gguf(target, self.model_type, source, incoming.sha256, meta)
            self._models[name] = model
            self._save_registry()
        return model

    def _stage(self, incoming: HashingFile) -> Path:
        """The received file inside this directory (it may have arrived in another one)."""
        if incoming.path.parent.resolve() == self.models_dir.resolve():
            return incoming.path
        local = HashingFile(self.models_dir)
        local.close()
        shutil.move(str(incoming.path), str(local.path))
        incoming.path = local.path
        return local.path

    def remove(self, name: str) -> ModelFile:
        """Delete a model's file and entry. :raise ModelNotFound:"""
        with self._lock:
            model = self.resolve(name)
            Path(model.path).unlink(missing_ok=True)
            self._models.pop(model.name, None)
            self._save_registry()
        return model

    def sync(self) -> None:
        """Reconcile the registry with the directory; persist it when anything changed."""
        with self._lock:
            on_disk = {p.name: p for p in self._gguf_files()}
            changed = False
            for name in set(self._models) - set(on_disk):
                del self._models[name]
                changed = True
            for name, path in on_disk.items():
                known = self._models.get(name)
                stat = path.stat()
                if known and (known.size_bytes, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
                    continue
                try:
                    self._models[name] = describe_gguf(path, self.model_type, "disk")
                except (GGUFError, OSError) as exc:
                    log.warning("ignoring %s: %s", path, exc)
                    self._models.pop(name, None)
                    continue
                changed = True
            if changed:
                self._save_registry()
            for model in self._models.values():
                if model.sha256 is None and model.name not in self._hashing:
                    self._hashing.add(model.name)
                    self._hasher.submit(self._hash, model)

    def _gguf_files(self) -> list[Path]:
        if not self.models_dir.is_dir():
            return []
        return [p for p in self.models_dir.glob(f"*{SUFFIX}") if p.is_file() and not is_temp_file(p)]

    def _hash(self, model: ModelFile) -> None:
        """Background sha256 of a file that arrived without one (copied in by hand)."""
        digest = sha256_of_file(Path(model.path))
        with self._lock:
            self._hashing.discard(model.name)
            current = self._models.get(model.name)
            if digest and current is not None and current.mtime_ns == model.mtime_ns:
                self._models[model.name] = replace(current, sha256=digest)
                self._save_registry()

    def _load_registry(self) -> None:
        path = self.models_dir / REGISTRY_FILE
        try:
            entries = json.loads(path.read_text())["models"]
            # The path is derived, never read back: the file must not be able to point elsewhere.
            self._models = {e["name"]: ModelFile(path=str(self.models_dir / e["name"]), **e)
                            for e in entries if NAME_PATTERN.match(e["name"])}
        except FileNotFoundError:
            self._models = {}
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s is unreadable (%s); rebuilding it from the files", path, exc)
            self._models = {}

    def _save_registry(self) -> None:
        """Write models_list.json atomically (temp file + os.replace); lock held."""
        if not self.models_dir.is_dir():
            return
        path = self.models_dir / REGISTRY_FILE
        tmp = path.with_name(f".{REGISTRY_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        entries = [{k: v for k, v in asdict(m).items() if k != "path"} for m in self._models.values()]
        tmp.write_text(json.dumps({"models": entries}, indent=1))
        os.replace(tmp, path)

    def close(self) -> None:
        """Stop background hashing (a running hash finishes; queued ones are dropped)."""
        self._hasher.shutdown(wait=False, cancel_futures=True)


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
