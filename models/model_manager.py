"""The registry of one models directory: its GGUF files, their metadata, and models_list.json.

The directory is the truth; models_list.json remembers what is costly to recompute (sha256, the
result of each file's trial, when and how a model arrived). Every listing reconciles the two:
files copied in by hand appear, files removed by hand disappear, and a missing or corrupt
models_list.json is rebuilt. Requests name models, and only names found this way resolve, so a
client-supplied name is never joined into a filesystem path.

No file is served before its trial (models/probe.py) has passed: uploads and imports are tried
before they are renamed into place; files that appear otherwise (copied by hand, or from a
version without trials) are listed with status "trial" and tried in the background, one at a
time. The result is remembered with the file's identity (size and mtime_ns; sha256 once known),
so a restart does not try a file again and a changed file is tried anew.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterable

from models.gguf_header import GGUFError, read_gguf
from models.model_file import READY, TRIAL, UNUSABLE, ModelFile, describe_gguf, from_entry
from models.probe import TRIAL_VERSION, SubprocessTrial
from models.registry_file import REGISTRY_FILE, directory_lock, sha256_of_file, write_atomically
from models.uploads import (NAME_PATTERN, SUFFIX, TEMP_PREFIX, TEMP_SUFFIX, HashingFile,
                            is_temp_file, model_file_name, remove_stale_temp_files)
from services.errors import (ChecksumMismatch, InsufficientStorage, InvalidModelFile,
                             ModelConflict, ModelLoadError, ModelNotFound, ModelOnTrial, ModelUnusable,
                             ShuttingDown, UnloadableModel)

log = logging.getLogger(__name__)

# Temp files of killed processes, removed at start unless a live process holds their lock.
STALE_PATTERNS = (f"{TEMP_PREFIX}*{TEMP_SUFFIX}", f".{REGISTRY_FILE}.*.tmp", ".install-*.partial")
RETRY_AFTER = 5
Probe = Callable[[Path], None]


class ModelManager:
    """One models directory; thread-safe. `probe` tries files before they may be served.

    With `background=False` files found on disk wait for `run_pending_trials` (the setup
    script and the test fixtures) instead of being tried on a worker thread. `siblings` is a
    list shared by the managers of one app: a file found on disk that is the very file another
    entry describes (a link: same device, inode, size and mtime) takes over its trial result.
    """

    def __init__(self, models_dir: str, model_type: str = "gguf", default_model: str = "",
                 probe: Probe | None = None, background: bool = True,
                 siblings: list[ModelManager] | None = None):
        self.models_dir = Path(models_dir)
        self.model_type = model_type
        self.default_model = default_model
        self._probe = probe or SubprocessTrial()
        self._background = background
        self._lock = threading.RLock()
        self._models: dict[str, ModelFile] = {}
        self._installed_default: str | None = None
        self._pending: set[str] = set()
        self._uploads: set[HashingFile] = set()
        self._closed = False
        self._unsaved = False       # a write failed: models_list.json lags behind until the next
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-trial")
        self._siblings = siblings if siblings is not None else []
        self._siblings.append(self)
        if self.models_dir.is_dir():
            remove_stale_temp_files(self.models_dir, STALE_PATTERNS)
        self._load_registry()
        self.sync()
        self._start_default = self._pick_start_default()

    # -- finding models ---------------------------------------------------------------------

    def list(self) -> list[ModelFile]:
        """Every model in the directory, sorted by name, after reconciling with the disk."""
        self.sync()
        with self._lock:
            return [self._models[name] for name in sorted(self._models)]

    def find(self, name: str) -> ModelFile:
        """The model named (with or without `.gguf`), whatever its trial status.

        :raise ModelNotFound:
        """
        models = {m.name: m for m in self.list()}
        model = models.get(name) or models.get(f"{name}{SUFFIX}")
        if model is None:
            raise ModelNotFound(f"model {name!r} not found; GET /api/v1/models lists the models")
        return model

    def resolve(self, name: str | None) -> ModelFile:
        """The model a request names, or the default one, if it may be served.

        :raise ModelNotFound: no such model, or no model at all.
        :raise ModelOnTrial: its trial has not finished yet (retry shortly).
        :raise ModelUnusable: it failed its trial.
        """
        if not name:
            name = self.default_name()
            if name is None:
                with self._lock:
                    what = "servable models" if self._models else "models"
                raise ModelNotFound(f"no {what} in {self.models_dir}; add a .gguf file")
        return self.check_servable(self.find(name))

    def check_servable(self, model: ModelFile) -> ModelFile:
        """:raise ModelOnTrial, ModelUnusable: the file may not be loaded in this process."""
        if model.status == UNUSABLE:
            raise ModelUnusable(f"model {model.name} cannot be served: its trial failed: "
                                f"{model.unusable_reason}", model=model.name)
        if model.status != READY:
            raise ModelOnTrial(f"model {model.name} is still being tried; retry in a few seconds",
                               retry_after=RETRY_AFTER)
        return model

    def check_path(self, path: str) -> None:
        """The pool's last check before llama.cpp opens `path` in this process.

        :raise ModelNotFound, ModelOnTrial, ModelUnusable:
        """
        file = Path(path)
        if file.parent.resolve() != self.models_dir.resolve():
            raise ModelNotFound(f"{file.name} is not in {self.models_dir}")
        self.check_servable(self.find(file.name))

    def default_name(self) -> str | None:
        """DEFAULT_MODEL; else the model the setup installed, if present at start; else the
        servable model that has been here longest at start (oldest added_at, then name); with
        none at start, the first model that became servable later. Uploads never change it; if
        it is deleted, the same rule picks again."""
        if self.default_model:
            return self.default_model
        self.sync()
        with self._lock:
            if self._start_default not in self._models:
                self._start_default = self._pick_start_default()
            return self._start_default

    def _pick_start_default(self) -> str | None:
        with self._lock:
            if self._installed_default in self._models:
                return self._installed_default
            ready = [m for m in self._models.values() if m.status == READY]
            return min(ready, key=lambda m: (m.added_at, m.name)).name if ready else None

    def with_sha256(self, model: ModelFile) -> ModelFile:
        """The model as registered now: its sha256 once the background hash is done."""
        with self._lock:
            return self._models.get(model.name, model)

    # -- adding and removing ----------------------------------------------------------------

    def new_upload(self) -> HashingFile:
        """A locked temp file in this directory for an incoming model; `close` discards it."""
        if self._closed:
            raise ShuttingDown("the server is shutting down")
        upload = HashingFile(self.models_dir, on_discard=self._forget_upload)
        with self._lock:
            self._uploads.add(upload)
        return upload

    def _forget_upload(self, upload: HashingFile) -> None:
        with self._lock:
            self._uploads.discard(upload)

    def add(self, incoming: HashingFile, name: str, overwrite: bool, source: str = "upload",
            sha256: str | None = None) -> ModelFile:
        """Check a fully received file, try it, and rename it into place (ready to serve).

        :raise ChecksumMismatch: `sha256` was given and the bytes differ.
        :raise InvalidModelFile: not a GGUF file this server accepts (checked in pure Python).
        :raise UnloadableModel: its trial failed (crash, error or timeout in the subprocess).
        :raise ModelConflict: the name exists and `overwrite` is false.
        :raise InsufficientStorage: the disk filled; nothing was kept.
        """
        name = model_file_name(name)
        incoming.close()
        if sha256 is not None and incoming.sha256 != sha256:
            raise ChecksumMismatch(f"the received file's sha256 is {incoming.sha256}, not {sha256}")
        if incoming.path.parent.resolve() != self.models_dir.resolve():
            incoming.move_to(self.models_dir)
        staged = incoming.path
        try:
            meta = read_gguf(str(staged)).metadata
        except GGUFError as exc:
            raise InvalidModelFile(f"not an acceptable GGUF file: {exc}") from None
        self._try_now(staged, incoming.sha256)
        with self._lock:
            target = self.models_dir / name
            if target.exists() and not overwrite:
                raise ModelConflict(f"model {name} exists; send overwrite=true to replace it")
            model = replace(describe_gguf(staged, self.model_type, source, incoming.sha256, meta,
                                          name), status=READY, trial_version=TRIAL_VERSION)
            self._commit({name: model}, lambda: os.replace(staged, target))
            self._start_default = self._start_default or self._pick_start_default()
        return model

    def _try_now(self, path: Path, sha256: str) -> None:
        """The trial, or the remembered result of a file with the same bytes.

        :raise UnloadableModel:
        """
        with self._lock:
            known = next((m for m in self._models.values() if m.sha256 == sha256
                          and m.trial_version == TRIAL_VERSION and m.status != TRIAL), None)
        if known is None:
            self._probe(path)
        elif known.status == UNUSABLE:
            raise UnloadableModel(known.unusable_reason or "its trial failed")

    def _commit(self, changes: dict[str, ModelFile | None], then: Callable[[], None]) -> None:
        """Apply registry changes, write models_list.json, then run `then` (the rename); the
        in-memory registry is restored when the write fails. Lock held."""
        before = {name: self._models.get(name) for name in changes}
        for name, model in changes.items():
            self._set(name, model)
        try:
            self._save_registry()
            then()
        except BaseException:
            for name, model in before.items():
                self._set(name, model)
            raise

    def _set(self, name: str, model: ModelFile | None) -> None:
        if model is None:
            self._models.pop(name, None)
        else:
            self._models[name] = model

    def copy(self, source: str, destination: str) -> ModelFile:
        """A new model `destination` with the bytes of model `source`, served at once: the
        same bytes (same sha256) keep the source's trial result, so no trial runs again. A hard
        link where the filesystem allows it, else a copy into a locked temp file; either way the
        file appears under its name in one step that never replaces an existing file (another
        process sharing the directory included), and the registry is written after it: on any
        failure (a full disk) neither file nor entry is left.

        :raise ModelNotFound, ModelOnTrial, ModelUnusable: the source cannot be served.
        :raise InvalidRequest: `destination` is not a valid model name.
        :raise ModelConflict: a model named `destination` exists.
        :raise InsufficientStorage: the disk filled; nothing was kept.
        """
        model = self.check_servable(self.find(source))
        name = model_file_name(destination)
        target = self.models_dir / name
        if target.exists():
            raise _exists(name)
        with self._lock:
            try:
                os.link(model.path, target)
            except FileExistsError:
                raise _exists(name) from None
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
            else:
                return self._register_copy(target, model.sha256, model)
        return self._copy_bytes(model, target)

    def _copy_bytes(self, model: ModelFile, target: Path) -> ModelFile:
        """The copy where no hard link can be made: written and hashed into a locked temp file
        (a full disk is InsufficientStorage, the temp file gone), tried unless its sha256 is one
        already tried, then linked under its name (never over an existing file)."""
        incoming = self.new_upload()
        try:
            with open(model.path, "rb") as source:
                for block in iter(lambda: source.read(1 << 20), b""):
                    incoming.write(block)
            incoming.close()
            self._try_now(incoming.path, incoming.sha256)
            with self._lock:
                try:
                    os.link(incoming.path, target)
                except FileExistsError:
                    raise _exists(target.name) from None
                return self._register_copy(target, incoming.sha256, model)
        finally:
            incoming.discard()

    def _register_copy(self, target: Path, sha256: str, source: ModelFile) -> ModelFile:
        """Record a copy just linked into place; if models_list.json cannot be written, the
        file goes again and the error raises. Lock held."""
        try:
            meta = read_gguf(str(target)).metadata
            model = replace(describe_gguf(target, self.model_type, "copy", sha256, meta),
                            status=source.status, trial_version=TRIAL_VERSION,
                            unusable_reason=source.unusable_reason)
            self._commit({model.name: model}, lambda: None)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        log.info("copied %s to %s", source.name, model.name)
        return model

    def remove(self, name: str) -> ModelFile:
        """Delete a model's file and entry. A registry that cannot be written (a full disk) is
        logged, not raised: the file is gone, and the next listing drops its stale entry.

        :raise ModelNotFound:
        """
        with self._lock:
            model = self.find(name)
            Path(model.path).unlink(missing_ok=True)
            self._models.pop(model.name, None)
            self._save_registry_or_log()
        return model

    # -- reconciling with the disk and trying files -------------------------------------------

    def sync(self) -> None:
        """Reconcile the registry with the directory; persist it when anything changed; queue
        the files that still need a hash or a trial."""
        with self._lock:
            on_disk = {p.name: p for p in self._gguf_files()}
            changed = False
            for name in set(self._models) - set(on_disk):
                del self._models[name]
                changed = True
            for name, path in on_disk.items():
                known = self._models.get(name)
                if known and known.same_file(path):
                    continue
                try:
                    self._models[name] = self._as_known(describe_gguf(path, self.model_type, "disk"))
                except (GGUFError, OSError) as exc:
                    log.warning("ignoring %s: %s", path, exc)
                    self._models.pop(name, None)
                    continue
                changed = True
            if changed or self._unsaved:
                self._save_registry_or_log()
            if self._background and not self._closed:
                for model in self._models.values():
                    if self._unsettled(model) and model.name not in self._pending:
                        self._pending.add(model.name)
                        self._worker.submit(self._settle_logged, model.name)

    def _as_known(self, model: ModelFile) -> ModelFile:
        """`model` with the hash and trial result of an entry describing the same file, if any."""
        for manager in self._siblings:
            # A snapshot, not the sibling's lock: two syncs taking each other's would deadlock.
            entries = list(manager._models.values())
            known = next((m for m in entries if (m.inode, m.size_bytes, m.mtime_ns) == (
                model.inode, model.size_bytes, model.mtime_ns)
                and m.trial_version == TRIAL_VERSION and m.status != TRIAL), None)
            if known is not None:
                return replace(model, sha256=known.sha256, status=known.status,
                               unusable_reason=known.unusable_reason, trial_version=TRIAL_VERSION)
        return model

    @staticmethod
    def _unsettled(model: ModelFile) -> bool:
        return model.sha256 is None or model.status == TRIAL

    def run_pending_trials(self) -> None:
        """Hash and try, here and now, every file still waiting (setup script, fixtures)."""
        for model in self.list():
            if self._unsettled(model):
                self._settle(model.name)

    def _settle_logged(self, name: str) -> None:
        try:
            self._settle(name)
        except Exception:
            log.exception("the background trial of %s failed", name)
        finally:
            with self._lock:
                self._pending.discard(name)

    def _settle(self, name: str) -> None:
        """Hash a file found on disk, then try it (one process at a time per directory: the
        directory's flock), unless a record for the same bytes already says how it went."""
        with self._lock:
            model = self._models.get(name)
        if model is None or self._closed:
            return
        path = Path(model.path)
        if model.sha256 is None:
            digest = sha256_of_file(path)
            model = self._update(model, sha256=digest) if digest else None
        if model is None or model.status != TRIAL:
            return
        with directory_lock(self.models_dir):
            model = self._adopt_from_disk(model)
            if model is None or model.status != TRIAL:
                return
            try:
                self._try_now(path, model.sha256)
                result = {"status": READY, "unusable_reason": None}
            except UnloadableModel as exc:
                result = {"status": UNUSABLE, "unusable_reason": exc.message}
                log.warning("%s is unusable: %s", path, exc.message)
            except ShuttingDown:
                return
            except ModelLoadError as exc:      # the trial could not run: the file is not at fault
                log.error("could not try %s: %s", path, exc.message)
                return
            self._update(model, trial_version=TRIAL_VERSION, **result)

    def _update(self, model: ModelFile, **fields) -> ModelFile | None:
        """Record a finding about `model` if its file has not changed meanwhile."""
        with self._lock:
            current = self._models.get(model.name)
            if current is None or current.mtime_ns != model.mtime_ns or not model.same_file(
                    Path(model.path)):
                return None
            updated = self._models[model.name] = replace(current, **fields)
            self._save_registry_or_log()
            if updated.status == READY:
                self._start_default = self._start_default or self._pick_start_default()
            return updated

    def _adopt_from_disk(self, model: ModelFile) -> ModelFile | None:
        """Another process sharing the directory may have tried the same file already."""
        for entry in self._read_registry().get("models", []):
            if (isinstance(entry, dict) and entry.get("name") == model.name
                    and entry.get("size_bytes") == model.size_bytes
                    and entry.get("mtime_ns") == model.mtime_ns
                    and entry.get("trial_version") == TRIAL_VERSION
                    and entry.get("status") in (READY, UNUSABLE)):
                return self._update(model, status=entry["status"], trial_version=TRIAL_VERSION,
                                    unusable_reason=entry.get("unusable_reason"))
        return model

    def _gguf_files(self) -> list[Path]:
        if not self.models_dir.is_dir():
            return []
        return [p for p in self.models_dir.glob(f"*{SUFFIX}") if p.is_file() and not is_temp_file(p)]

    # -- models_list.json -------------------------------------------------------------------

    def _read_registry(self) -> dict:
        try:
            registry = json.loads((self.models_dir / REGISTRY_FILE).read_text())
            return registry if isinstance(registry, dict) else {}
        except (OSError, ValueError):
            return {}

    def _load_registry(self) -> None:
        path = self.models_dir / REGISTRY_FILE
        try:
            registry = json.loads(path.read_text())
            entries = registry["models"]
            # The path is derived, never read back: the file must not be able to point elsewhere.
            self._models = {e["name"]: from_entry(self.models_dir, e)
                            for e in entries if NAME_PATTERN.match(e["name"])}
            default = registry.get("default_model")
            self._installed_default = default if isinstance(default, str) else None
        except FileNotFoundError:
            self._models = {}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s is unreadable (%s); rebuilding it from the files", path, exc)
            self._models = {}

    def _save_registry(self) -> None:
        """Write models_list.json atomically; lock held. :raise InsufficientStorage:"""
        if not self.models_dir.is_dir():
            return
        entries = [{k: v for k, v in asdict(m).items() if k != "path"} for m in self._models.values()]
        registry = {"models": entries}
        if self._installed_default:
            registry["default_model"] = self._installed_default
        write_atomically(self.models_dir, json.dumps(registry, indent=1))
        self._unsaved = False

    def _save_registry_or_log(self) -> None:
        """For writes that only remember (hashes, trials, deletions): the directory stays the
        truth, so a failed write costs a re-hash or a re-trial later, never consistency."""
        try:
            self._save_registry()
        except (OSError, InsufficientStorage) as exc:
            self._unsaved = True
            log.warning("could not write %s: %s", self.models_dir / REGISTRY_FILE, exc)

    def close(self) -> None:
        """Stop trials and hashing (a running trial's child is killed; queued work dropped) and
        discard this process's uploads still in progress."""
        self._closed = True
        self._worker.shutdown(wait=False, cancel_futures=True)
        cancel = getattr(self._probe, "cancel", None)
        if cancel is not None:
            cancel()
        with self._lock:
            uploads = list(self._uploads)
        for upload in uploads:
            upload.discard()


# os.link's failures that mean "no hard link here" (another filesystem, or one without links).
_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP)


def _exists(name: str) -> ModelConflict:
    return ModelConflict(f"model {name} exists; a copy does not replace a model: delete it "
                         f"first or pick another name")


def servable_check(managers: Iterable[ModelManager]) -> Callable[[str], None]:
    """For the pool: refuse to load a file that no manager has seen pass its trial."""
    managers = list(managers)

    def check(path: str) -> None:
        for manager in managers:
            if Path(path).parent.resolve() == manager.models_dir.resolve():
                manager.check_path(path)
                return
        raise ModelUnusable(f"{Path(path).name} is not in a models directory")

    return check
