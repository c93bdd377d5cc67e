"""The models of one directory as requests see them: finding, resolving the default, adding,
copying and removing (models/model_directory.py keeps the directory in step with the disk and
with the other processes sharing it).

Requests name models, and only names found by a listing resolve, so a client-supplied name is
never joined into a filesystem path. No file is served before its trial (models/probe.py) has
passed: uploads and imports are tried before they are renamed into place.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

from models.gguf_header import GGUFError, read_gguf
from models.model_directory import ModelDirectory, OnChange, Probe
from models.model_file import READY, UNUSABLE, ModelFile, describe_gguf
from models.probe import TRIAL_VERSION
from models.uploads import SUFFIX, HashingFile, model_file_name
from services.errors import (ChecksumMismatch, InvalidModelFile, ModelConflict, ModelNotFound,
                             ModelOnTrial, ModelUnusable, ShuttingDown)

log = logging.getLogger(__name__)

RETRY_AFTER = 5


class ModelManager(ModelDirectory):
    """One models directory as requests use it; thread-safe (see ModelDirectory for `probe`,
    `background`, `siblings` and `on_change`). `default_model` is DEFAULT_MODEL."""

    def __init__(self, models_dir: str, model_type: str = "gguf", default_model: str = "",
                 probe: Probe | None = None, background: bool = True,
                 siblings: list[ModelDirectory] | None = None, on_change: OnChange | None = None):
        self.default_model = default_model
        self._uploads: set[HashingFile] = set()
        self._start_default: str | None = None
        super().__init__(models_dir, model_type, probe, background, siblings, on_change)
        self._start_default = self._pick_start_default()

    def _became_ready(self) -> None:
        self._start_default = self._start_default or self._pick_start_default()

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
        # The existence check and the rename under the registry lock: of two processes adding
        # one name at once, exactly one finds it free.
        with self._lock, self._registry_lock.held():
            target = self.models_dir / name
            if target.exists() and not overwrite:
                raise ModelConflict(f"model {name} exists; send overwrite=true to replace it")
            model = replace(describe_gguf(staged, self.model_type, source, incoming.sha256, meta,
                                          name), status=READY, trial_version=TRIAL_VERSION)
            if overwrite:
                self._commit({name: model}, lambda: os.replace(staged, target))
            else:
                self._publish_new(staged, target, model)
            self._became_ready()
        return model

    def _publish_new(self, staged: Path, target: Path, model: ModelFile) -> None:
        """Put a file under a name that must be free: a hard link, which the filesystem (the
        NFS server, whatever a client's cache believes) refuses over an existing name, then the
        registry entry; the link goes again if the entry cannot be written. Where no hard link
        can be made, the rename, under the registry lock that every process takes. Both locks
        held. :raise ModelConflict:"""
        try:
            os.link(staged, target)
        except FileExistsError:
            raise ModelConflict(f"model {target.name} exists; send overwrite=true to replace "
                                f"it") from None
        except OSError as exc:
            if exc.errno not in _NO_LINK:
                raise
            self._commit({model.name: model}, lambda: os.replace(staged, target))
            return
        try:
            self._commit({model.name: model}, lambda: staged.unlink(missing_ok=True))
        except BaseException:
            target.unlink(missing_ok=True)
            raise

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
        with self._lock, self._registry_lock.held():
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
            with self._lock, self._registry_lock.held():
                try:
                    os.link(incoming.path, target)
                except FileExistsError:
                    raise _exists(target.name) from None
                return self._register_copy(target, incoming.sha256, model)
        finally:
            incoming.discard()

    def _register_copy(self, target: Path, sha256: str, source: ModelFile) -> ModelFile:
        """Record a copy just linked into place; if models_list.json cannot be written, the
        file goes again and the error raises. Both locks held."""
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
        """Delete a model's file and entry (under the registry lock: another process's listing
        sees both gone or neither). A registry that cannot be written (a full disk) is logged,
        not raised: the file is gone, and the next write drops its stale entry.

        :raise ModelNotFound: also when another process deleted it first (which `on_change`
            then reports, as the next listing would have).
        """
        model = self.find(name)
        with self._lock, self._registry_lock.held():
            known = self._models.pop(model.name, None)
            try:
                os.unlink(model.path)
            except FileNotFoundError:
                gone = True
            else:
                gone = False
            self._unsaved[model.name] = None
            self._save_registry_or_log()
        if gone:
            if known is not None:
                self._notify(model.name, "deleted")
            raise ModelNotFound(f"model {name!r} not found; GET /api/v1/models lists the models")
        return model

    def close(self) -> None:
        """Stop trials and watching, and discard this process's uploads still in progress."""
        super().close()
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
