"""The registry of model files: what is in MODELS_DIR, its metadata, and name resolution.

Requests name models; only names found by scanning the directory resolve, so a client-supplied
name is never joined into a filesystem path.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from models.gguf_header import GGUFHeaderError, read_metadata
from services.errors import ModelNotFound

_WANTED_KEYS = {"general.architecture", "general.name", "general.size_label", "general.file_type",
                ".context_length"}
# llama.cpp's LLAMA_FTYPE names for the common general.file_type values.
_FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
               10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
               16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


@dataclass(frozen=True)
class ModelFile:
    name: str
    path: str
    type: str
    size_bytes: int
    sha256: str | None
    architecture: str | None
    size_label: str | None
    quantization: str | None
    context_length: int | None

    def to_dict(self) -> dict:
        info = asdict(self)
        info.pop("path")
        return info


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelManager:
    """Scans one models directory; caches each file's metadata until its size or mtime changes."""

    def __init__(self, models_dir: str, model_type: str = "gguf", default_model: str = ""):
        self.models_dir = Path(models_dir)
        self.model_type = model_type
        self.default_model = default_model
        self._cache: dict[str, tuple[tuple[int, int], ModelFile]] = {}
        self._lock = threading.Lock()
        self._hashing: set[str] = set()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")

    def list(self) -> list[ModelFile]:
        """Every readable GGUF file in the directory, sorted by name."""
        if not self.models_dir.is_dir():
            return []
        models = []
        for path in sorted(self.models_dir.glob("*.gguf")):
            model = self._describe(path)
            if model is not None:
                models.append(model)
        return models

    def resolve(self, name: str | None) -> ModelFile:
        """The model a request names (with or without `.gguf`), or the default one.

        :raise ModelNotFound: no such model, or no model at all.
        """
        models = {m.name: m for m in self.list()}
        if not name:
            if self.default_model:
                name = self.default_model
            elif models:
                return next(iter(models.values()))
            else:
                raise ModelNotFound(f"no models in {self.models_dir}; add a .gguf file")
        model = models.get(name) or models.get(f"{name}.gguf")
        if model is None:
            raise ModelNotFound(f"model {name!r} not found; GET /api/v1/models lists the models")
        return model

    def with_sha256(self, model: ModelFile) -> ModelFile:
        """The model with its sha256 when known; otherwise hashing starts in the background.

        Hashing a multi-gigabyte file takes many seconds, too long to hold up a listing: until
        it is done the listing shows `sha256: null`.
        """
        if model.sha256 is not None:
            return model
        with self._lock:
            if model.path not in self._hashing:
                self._hashing.add(model.path)
                self._hasher.submit(self._hash, model)
        return model

    def _hash(self, model: ModelFile) -> None:
        try:
            digest = sha256_of(Path(model.path))
        except OSError:
            digest = None
        with self._lock:
            self._hashing.discard(model.path)
            stamp, cached = self._cache.get(model.path, (None, None))
            if digest and cached is not None and cached.size_bytes == model.size_bytes:
                self._cache[model.path] = (stamp, replace(cached, sha256=digest))

    def close(self) -> None:
        """Stop background hashing (a running hash finishes; queued ones are dropped)."""
        self._hasher.shutdown(wait=False, cancel_futures=True)

    def _describe(self, path: Path) -> ModelFile | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        stamp = (stat.st_size, stat.st_mtime_ns)
        with self._lock:
            cached = self._cache.get(str(path))
        if cached and cached[0] == stamp:
            return cached[1]
        try:
            meta = read_metadata(str(path), _WANTED_KEYS)
        except (GGUFHeaderError, OSError):
            return None
        model = ModelFile(
            name=path.name, path=str(path), type=self.model_type, size_bytes=stat.st_size,
            sha256=None, architecture=meta.get("general.architecture"),
            size_label=meta.get("general.size_label"),
            quantization=_FILE_TYPES.get(meta.get("general.file_type"), meta.get("general.file_type")),
            context_length=meta.get(".context_length"))
        with self._lock:
            self._cache[str(path)] = (stamp, model)
        return model
